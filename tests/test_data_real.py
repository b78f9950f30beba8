"""Real-data builders on tiny fixture folders written here in the datasets' exact formats."""

import csv
import io
import os
import zipfile

import numpy as np
import PIL.Image
import pytest

from medscale.configs import load_config, spec_from_config
from medscale.data.batch import check_batch
from medscale.data.pipeline import build_data
from medscale.data.real import medmnist_caption, to_grey
from medscale.errors import UserError

FAST = ["data.tokenizer_examples=64", "data.vq_iters=2", "data.image_vocab=16", "data.seg_vocab=16",
        "data.modalities=('image','caption')"]


def picture(seed, h=48, w=40, rgb=False):
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    a = (x * (1 + seed % 3) + y * 2 + rng.integers(0, 30, (h, w))) % 256
    a = a.astype(np.uint8)
    return np.stack([a, 255 - a, a // 2], -1) if rgb else a


def jpg_bytes(a, fmt="PNG"):
    buf = io.BytesIO()
    PIL.Image.fromarray(a).save(buf, format=fmt)
    return buf.getvalue()


def build(tmp_path, dataset, manual, *extra):
    cfg = load_config("tiny", [f"data.data_dir={tmp_path / 'cache'}", f"data.dataset={dataset}",
                               f"data.manual_dir={manual}", *FAST, *extra])
    return build_data(cfg, spec_from_config(cfg))


def by_id(data, split):
    return {e["id"]: e for e in data.examples(split)}


# ----------------------------------------------------------------------------------------------- ROCO
def write_roco(root):
    """Two naming schemes, a missing image, a corrupt one, a caption with leading spaces, an empty caption."""
    truth = {}
    for split, base in (("train", 0), ("validation", 100), ("test", 200)):
        for sub in ("radiology", "non-radiology"):
            d = root / "data" / split / sub
            (d / "images").mkdir(parents=True)
            caps, links = [], []
            for k in range(6):
                n = base + k + (50 if sub == "non-radiology" else 0)
                ident = f"ROCO_{n:05d}"
                cap = f"  CT of the chest number {n} showing a nodule." if k != 4 else ""
                caps.append(f"{ident}\t{cap}")
                pmc, name = f"PMC{4000000 + n}", f"fig-{n}-g001.jpg"
                links.append(f"{ident}\twget -r ftp://ftp.ncbi.nlm.nih.gov/pub/pmc/oa_package/aa/bb/{pmc}.tar.gz "
                             f"-P /path/to/Dir\t{name}")
                img = picture(n, rgb=(k == 1))
                if k == 2:
                    continue  # missing image
                if k == 3:
                    (d / "images" / f"{ident}.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
                    continue
                if k % 2 == 0:  # newer scheme
                    (d / "images" / f"{ident}.jpg").write_bytes(jpg_bytes(img, "JPEG"))
                else:  # older fetch.py scheme
                    (d / "images" / f"{pmc}_{name}").write_bytes(jpg_bytes(img, "PNG"))
                truth[ident] = (" ".join(cap.split()), img, split)
            (d / "captions.txt").write_text("\n".join(caps) + "\n")
            (d / "dlinks.txt").write_text("\n".join(links) + "\n")
            (d / "keywords.txt").write_text("".join(f"{c.split(chr(9))[0]}\t\tchest\tnodule\n" for c in caps))
            (d / "cuis.txt").write_text("".join(f"{c.split(chr(9))[0]}\tC0817096\n" for c in caps))
            (d / "licences.txt").write_text("ROCO_ID,PMC_ID,LICENCE\n")
    return truth


def test_roco_round_trip_both_naming_schemes(tmp_path):
    manual = tmp_path / "roco"
    truth = write_roco(manual)
    data = build(tmp_path, "roco", manual)
    got = {}
    for split in ("train", "validation", "test"):
        got.update({k: (v, split) for k, v in by_id(data, split).items()})
    assert set(got) == set(truth)
    for ident, (cap, img, split) in truth.items():
        e, s = got[ident]
        assert s == split and e["caption"] == cap and e["mask"] is None and e["boxes"] == []
        assert e["meta"]["subset"] in ("radiology", "non-radiology") and e["facts"] == {}
        assert e["meta"]["keywords"] == ["chest", "nodule"] and e["meta"]["cuis"] == ["C0817096"]
        want = to_grey(img, 64)
        tol = 8 if int(ident[5:]) % 2 == 0 else 0  # JPEG (newer scheme) is lossy
        assert np.abs(e["image"].astype(int) - want.astype(int)).mean() <= tol
    skipped = data.builder.info.metadata["skipped"]
    assert skipped["train"] == {"missing_image": 2, "corrupt_image": 2}
    toks = data.tokens("train")
    assert data.stats["train"]["empty_caption"] == 2  # kept; caption absent in batches
    again = build(tmp_path, "roco", manual)  # from the cache: the skip counts persist with the dataset
    assert again.stats["skipped"]["train"] == {"missing_image": 2, "corrupt_image": 2}
    assert (toks["caption_len"] > 0).sum() == 6 and len(toks["caption_len"]) == 8
    b = next(data.iterator("train", 4, 0, 0, 1))
    check_batch(b, 4, data.spec.enc_len, data.spec.dec_len)
    full = build(tmp_path, "roco", manual, "data.modalities=('image','caption','boxes','segmentation')")
    assert full.tokenizers.segmentation is None  # real data has no masks: segmentation is absent, not an error
    b = next(full.iterator("train", 4, 0, 0, 1))
    assert not np.isin(b["enc_modality"][b["enc_valid"]], [2, 3]).any()
    assert not np.isin(b["dec_modality"][b["dec_valid"]], [2, 3]).any()
    with pytest.raises(UserError, match="no segmentation tokenizer"):
        full.detokenize("segmentation", np.zeros(64, int))


# ----------------------------------------------------------------------------------------------- ROCOv2
def write_rocov2(root):
    truth = {}
    root.mkdir()
    for split, fname in (("train", "train"), ("validation", "valid"), ("test", "test")):
        rows = []
        files = {}
        for k in range(5):
            ident = f"ROCOv2_2023_{fname}_{k:06d}"
            cap = f"Axial MRI, case {k}, with a \"quoted\" lesion, and a comma."
            img = picture(k + len(fname), rgb=True)
            rows.append((ident, cap))
            if k == 4:
                continue  # missing
            files[f"{fname}/{ident}.jpg"] = jpg_bytes(img, "PNG")
            truth[(split, ident)] = (" ".join(cap.split()), img, [f"C00{k}", "C9"])
        with open(root / f"{fname}_captions.csv", "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["ID", "Caption"])
            w.writerows(rows)
        with open(root / f"{fname}_concepts.csv", "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["ID", "CUIs"])
            w.writerows([(i, f"C00{k};C9") for k, (i, _) in enumerate(rows)])
        if split == "train":  # zip for train, extracted folder for the others
            with zipfile.ZipFile(root / "train_images.zip", "w") as z:
                for name, raw in files.items():
                    z.writestr(name, raw)
        else:
            for name, raw in files.items():
                p = root / f"{fname}_images" / name
                p.parent.mkdir(parents=True, exist_ok=True)
                p.write_bytes(raw)
    return truth


def test_rocov2_round_trip_zip_and_folder(tmp_path):
    manual = tmp_path / "rocov2"
    truth = write_rocov2(manual)
    data = build(tmp_path, "rocov2", manual)
    for (split, ident), (cap, img, cuis) in truth.items():
        e = by_id(data, split)[ident]
        assert e["caption"] == cap and e["meta"] == {"cuis": cuis} and e["facts"] == {}
        assert np.array_equal(e["image"], to_grey(img, 64))
    assert len(data.examples("train")) == 4
    assert data.builder.info.metadata["skipped"]["validation"] == {"missing_image": 1}


# ----------------------------------------------------------------------------------------------- MedMNIST
def test_medmnist_round_trip_and_label_captions(tmp_path):
    manual = tmp_path / "mm"
    manual.mkdir()
    rng = np.random.default_rng(0)
    arrays = {}
    for s, n in (("train", 12), ("val", 4), ("test", 4)):
        arrays[f"{s}_images"] = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        arrays[f"{s}_labels"] = rng.integers(0, 2, (n, 1))
    np.savez(manual / "pneumoniamnist.npz", **arrays)
    data = build(tmp_path, "medmnist", manual)  # subset found: the only .npz
    ex = data.examples("validation")
    assert len(ex) == 4
    for e in ex:
        i = e["index"]
        lab = int(arrays["val_labels"][i, 0])
        assert e["caption"] == f"chest x-ray: {('normal', 'pneumonia')[lab]}." and e["meta"] == {"label": [lab]}
        assert e["facts"] == {}  # finding accuracy is for synthetic data only
        assert np.abs(e["image"].astype(int) - to_grey(arrays["val_images"][i], 64).astype(int)).max() == 0
    assert medmnist_caption("chestmnist_64", np.array([0, 1, 0, 0, 0, 1] + [0] * 8)) == \
        "chest x-ray: cardiomegaly, nodule."
    assert medmnist_caption("chestmnist", np.zeros(14)) == "chest x-ray: no finding."


# ----------------------------------------------------------------------------------------------- bad folders
def test_missing_or_malformed_manual_dir_names_the_layout(tmp_path):
    with pytest.raises(UserError, match="captions.txt"):
        build(tmp_path, "roco", tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="ROCO"):
        build(tmp_path, "roco", tmp_path / "empty")
    with pytest.raises(UserError, match="train_captions.csv"):
        build(tmp_path, "rocov2", tmp_path / "empty")
    with pytest.raises(UserError, match="subset"):
        build(tmp_path, "medmnist", tmp_path / "empty")
    np.savez(tmp_path / "empty" / "bloodmnist.npz", train_images=np.zeros((2, 28, 28), np.uint8))
    with pytest.raises(UserError, match="lacks"):
        build(tmp_path, "medmnist", tmp_path / "empty", "data.subset=bloodmnist")
    bad = tmp_path / "badcsv"
    bad.mkdir()
    (bad / "train_captions.csv").write_text("Name,Text\nx,y\n")
    with pytest.raises(UserError, match="ID, Caption") as info:
        build(tmp_path, "rocov2", bad)
    assert "\n" not in str(info.value) and "ID,Caption" in str(info.value)  # one line, names the layout
    assert not os.path.exists(tmp_path / "cache" / "tfds" / "rocov2" / "done")
