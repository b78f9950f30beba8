"""The pipeline end to end on a small synthetic TFDS dataset the test builds."""

import glob
import json
import os

import numpy as np
import pytest

from medscale.configs import load_config, spec_from_config
from medscale.data.batch import check_batch
from medscale.data.pipeline import build_data
from medscale.data.synthetic import render_scene
from medscale.errors import UserError

SMALL = ["data.num_train=160", "data.num_eval=24", "data.tokenizer_examples=160", "data.vq_iters=4"]


def small_cfg(root, *extra):
    return load_config("tiny", [f"data.data_dir={root}", *SMALL, *extra])


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    cfg = small_cfg(tmp_path_factory.mktemp("d"))
    return build_data(cfg, spec_from_config(cfg))


def same(a, b):
    return set(a) == set(b) and all(np.array_equal(a[k], b[k]) for k in a)


def test_batches_follow_the_contract(data):
    spec = data.spec
    it = data.iterator("train", 8, seed=0, shard_index=0, shard_count=1)
    for _ in range(3):
        b = next(it)
        check_batch(b, 8, spec.enc_len, spec.dec_len)
        for k, m in zip(("enc", "dec"), ("enc_tokens", "dec_target")):
            mod = b[f"{k}_modality"]
            vocab = np.asarray(spec.vocab_sizes)[mod]
            assert (b[m] < vocab).all() and (b[m] >= 0).all()
    assert b["enc_valid"].sum() > 0.9 * b["enc_valid"].size


def test_same_seed_same_batches_different_seed_differs(data):
    a = [next(it) for it in [data.iterator("train", 8, 1, 0, 1)] for _ in range(4)]
    b = [next(it) for it in [data.iterator("train", 8, 1, 0, 1)] for _ in range(4)]
    c = [next(it) for it in [data.iterator("train", 8, 2, 0, 1)] for _ in range(4)]
    assert all(same(x, y) for x, y in zip(a, b))
    assert not all(same(x, y) for x, y in zip(a, c))


def test_restored_state_yields_the_identical_next_batch(data):
    it = data.iterator("train", 8, seed=3, shard_index=0, shard_count=1)
    for _ in range(25):  # past one epoch of 160 examples
        next(it)
    state = json.loads(json.dumps(it.get_state()))
    want = [next(it) for _ in range(2)]
    fresh = data.iterator("train", 8, seed=3, shard_index=0, shard_count=1)
    fresh.set_state(state)
    assert all(same(w, next(fresh)) for w in want)
    other = data.iterator("train", 8, seed=4, shard_index=0, shard_count=1)
    with pytest.raises(UserError):
        other.set_state(state)


def test_shards_read_disjoint_examples(data):
    from medscale.data.pipeline import index_dataset

    n = len(data.tokens("train")["image"])  # 160: 80 per shard, 10 batches of 8 per epoch
    seen = []
    for shard in range(2):
        ds = index_dataset(n, 8, seed=5, shard_index=shard, shard_count=2)
        epoch = np.concatenate([ds[i] for i in range(10)])
        assert len(set(epoch.tolist())) == 80  # one epoch visits each of the shard's examples once
        assert set(np.concatenate([ds[i] for i in range(10, 20)]).tolist()) == set(epoch.tolist())
        seen.append(set(epoch.tolist()))
    assert not seen[0] & seen[1] and seen[0] | seen[1] == set(range(n))
    a = next(data.iterator("train", 8, 0, 0, 2))
    b = next(data.iterator("train", 8, 0, 1, 2))
    assert not same(a, b)
    with pytest.raises(UserError):
        data.iterator("train", 8, 0, 2, 2)


def test_eval_batches_are_fixed(data):
    a = data.eval_batches("validation", 8, 4)
    b = data.eval_batches("validation", 8, 4)
    assert len(a) == 4 and all(same(x, y) for x, y in zip(a, b))
    check_batch(a[0], 8, data.spec.enc_len, data.spec.dec_len)


def test_fixed_eval_batches_share_targets_across_encoder_lengths(data):
    # at its own encoder length the length-independent eval set is the eval set itself
    own = data.fixed_eval_batches(data.spec.enc_len, "validation", 8, 2)
    assert all(same(x, y) for x, y in zip(own, data.eval_batches("validation", 8, 2)))
    short_cfg = load_config("tiny", [f"data.data_dir={data.cfg.data.data_dir}", *SMALL, "data.enc_len=32"])
    short = build_data(short_cfg, spec_from_config(short_cfg))
    a = data.fixed_eval_batches(128, "validation", 8, 2)
    b = short.fixed_eval_batches(128, "validation", 8, 2)
    for x, y in zip(a, b):
        check_batch(y, 8, 32, data.spec.dec_len)
        assert all(np.array_equal(x[k], y[k]) for k in x if k.startswith("dec_"))  # the same targets
        assert (y["enc_valid"].sum(1) <= x["enc_valid"].sum(1)).all()
    with pytest.raises(UserError, match="fixed_eval_enc_len"):
        data.fixed_eval_batches(100000, "validation", 8, 1)


def test_examples_and_detokenize_match_the_generator(data):
    ex = data.examples("validation")
    assert len(ex) == 24
    tb = data.task_batch("validation", range(len(ex)), inputs=("image",), targets=("caption",))
    cap_mod = data.spec.modality_index("caption")
    tok = data.tokenizers.text
    checked = 0
    for i in range(len(ex)):
        e = ex[i]
        s = render_scene(0, e["index"], 64)
        assert e["caption"] == s["caption"] and e["facts"] == json.loads(json.dumps(s["facts"]))
        assert np.array_equal(e["image"], s["image"]) and np.array_equal(e["mask"], s["mask"])
        assert [tuple(b[1:]) for b in e["boxes"]] == [tuple(map(float, b[1:])) for b in s["boxes"]]
        sel = tb["dec_valid"][i] & (tb["dec_modality"][i] == cap_mod)
        ids = tb["dec_target"][i][sel]
        if len(tok.encode(e["caption"])) < data.spec.modalities[cap_mod].max_tokens:
            assert data.detokenize("caption", ids) == tok.normalize(e["caption"])
            checked += 1
        boxes_ids = data.tokens("validation")["boxes"][i][: data.tokens("validation")["boxes_len"][i]]
        back = data.detokenize("boxes", boxes_ids)
        assert len(back) == len(e["boxes"])
    assert checked > 10
    img_ids = data.tokens("validation")["image"][0]
    rec = data.detokenize("image", img_ids)
    assert rec.shape == (64, 64) and np.abs(rec.astype(float) - ex[0]["image"]).mean() < 25


def test_cache_reused_and_keyed_by_tokenizer_hash(data):
    root = data.root
    data.tokens("train"), data.tokens("validation")
    files = glob.glob(os.path.join(root, "tokens", "*", "validation-*.npz"))
    assert len(files) == 1 and data.tokenizers.hash in os.path.basename(files[0])
    chunks = glob.glob(os.path.join(root, "tokens", "*", "train-*", "chunk-*.npy"))
    assert len(chunks) == 1 and data.tokenizers.hash in os.path.basename(os.path.dirname(chunks[0]))
    again = build_data(data.cfg, data.spec)
    assert again.tokenizers.hash == data.tokenizers.hash
    assert same(next(again.iterator("train", 4, 0, 0, 1)), next(data.iterator("train", 4, 0, 0, 1)))
    # another text tokenizer -> another hash -> another token cache; the image codebook is reused
    cfg = load_config("tiny", [f"data.data_dir={root}", *SMALL, "data.text_vocab=600"])
    other = build_data(cfg, spec_from_config(cfg))
    assert other.tokenizers.text.hash != data.tokenizers.text.hash
    assert other.tokenizers.image.hash == data.tokenizers.image.hash
    other.tokens("train"), other.tokens("validation")
    files = glob.glob(os.path.join(root, "tokens", "*", "validation-*.npz"))
    assert sorted(os.path.basename(f).split("-")[1] for f in files) == sorted(
        [data.tokenizers.hash, other.tokenizers.hash])
    dirs = {os.path.dirname(f) for f in glob.glob(os.path.join(root, "tokens", "*", "train-*", "chunk-*.npy"))}
    assert sorted(os.path.basename(d).split("-")[1] for d in dirs) == sorted(
        [data.tokenizers.hash, other.tokenizers.hash])


def test_bad_configs_are_user_errors(data, tmp_path):
    with pytest.raises(UserError, match="dataset"):
        cfg = small_cfg(tmp_path, "data.dataset=cifar")
        build_data(cfg, spec_from_config(cfg))
    with pytest.raises(UserError, match="enc_len"):
        cfg = load_config("tiny", [f"data.data_dir={data.root}", *SMALL, "data.enc_len=4000"])
        build_data(cfg, spec_from_config(cfg))
    with pytest.raises(UserError, match="split"):
        data.examples("nope")
    with pytest.raises(UserError, match="modality"):
        data.detokenize("xray", [1])
    from medscale.data.registry import build_registry
    from medscale.spec import ModalitySpec

    spec = data.spec.replace(modalities=(*data.spec.modalities, ModalitySpec("ecg", "sequence", 10, 5)))
    with pytest.raises(UserError, match="unknown modality"):
        build_registry(spec, data.tokenizers)


def _build_files(root, seed):
    from medscale.data.builders import SyntheticMed, SyntheticMedConfig
    from medscale.data.pipeline import prepare_builder

    b = SyntheticMed(config=SyntheticMedConfig(image_size=64, num_eval=8, seed=seed),
                     data_dir=str(root / "tfds"), file_format="array_record")
    prepare_builder(b, str(root))
    files = sorted(glob.glob(os.path.join(str(b.data_path), "*.array_record*")))
    assert len(files) == 2  # validation, test (the training scenes are the stream's)
    return [open(f, "rb").read() for f in files]


def test_dataset_files_same_seed_same_bytes(tmp_path):
    a = _build_files(tmp_path / "a", 0)
    b = _build_files(tmp_path / "b", 0)
    c = _build_files(tmp_path / "c", 1)
    assert a == b
    assert all(x != y for x, y in zip(a, c))


RACE = """
import sys, json
from medscale.configs import load_config, spec_from_config
from medscale.data.pipeline import build_data
cfg = load_config("tiny", ["data.data_dir=" + sys.argv[1], "data.num_train=48", "data.num_eval=8",
                           "data.tokenizer_examples=48", "data.vq_iters=1", "data.image_vocab=16",
                           "data.seg_vocab=16"])
d = build_data(cfg, spec_from_config(cfg))
b = next(d.iterator("train", 4, 0, 0, 1))
print(json.dumps([d.tokenizers.hash, int(b["enc_tokens"].sum())]))
"""


def test_two_processes_racing_build_once(tmp_path):
    import subprocess
    import sys

    env = dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    procs = [subprocess.Popen([sys.executable, "-c", RACE, str(tmp_path)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=env) for _ in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1][-2000:] for o in outs]
    results = [json.loads(o[0].strip().splitlines()[-1]) for o in outs]
    assert results[0] == results[1]
    assert len(glob.glob(os.path.join(str(tmp_path), "tokens", "*", "train-*", "chunk-*.npy"))) == 1
    assert not glob.glob(os.path.join(str(tmp_path), "**", "*.tmp*"), recursive=True)
    assert not glob.glob(os.path.join(str(tmp_path), "tfds", "**", "incomplete*"), recursive=True)
