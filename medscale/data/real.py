"""TFDS builders for real datasets a user has already downloaded (TFDS ``manual_dir`` = ``data.manual_dir``).

ROCO, ROCOv2 and MedMNIST give images with captions; VQA-RAD and SLAKE give one example per question (image,
question, answer, answer type; the image repeated for each of its questions). All write the common feature set of :mod:`medscale.data.builders` (grey-scale image resized to
``data.image_size``; caption; no boxes and no mask). Images that are missing or cannot be decoded are skipped
and counted (``builder.info.metadata["skipped"]``, also logged); an empty caption is kept as "" and the pipeline
treats the caption as absent for that example (counted in ``Data.stats``).
"""

from __future__ import annotations

import csv
import hashlib
import io
import logging
import os
import re
import zipfile

import numpy as np
import tensorflow_datasets as tfds

from medscale.data.builders import VERSION, features, make_example
from medscale.errors import UserError

log = logging.getLogger(__name__)

ROCO_LAYOUT = """ROCO v1 (github.com/razorx89/roco-dataset, images fetched with its scripts/fetch.py):
  MANUAL_DIR/data/{train,validation,test}/{radiology,non-radiology}/
      captions.txt   tab-separated: ROCO_00027<TAB> caption text (the caption may start with spaces)
      dlinks.txt     tab-separated: ROCO_00027<TAB>wget ... PMC4083729.tar.gz ...<TAB>image-name.jpg (optional)
      keywords.txt, cuis.txt, semtypes.txt (optional; ID<TAB><TAB>item<TAB>item..., kept in meta), licences.txt
      images/        ROCO_00027.jpg, or the older fetch.py names PMC4083729_image-name.jpg"""
ROCOV2_LAYOUT = """ROCOv2 (zenodo.org/records/10821435):
  MANUAL_DIR/{train,valid,test}_captions.csv   header ID,Caption
  MANUAL_DIR/{train,valid,test}_concepts.csv   header ID,CUIs (separated by ;) (optional)
  images: MANUAL_DIR/{split}_images.zip, or an extracted folder MANUAL_DIR/{split}_images/ or MANUAL_DIR/{split}/,
          holding ID.jpg (or .png) at any depth"""
MEDMNIST_LAYOUT = """MedMNIST v2/v3 (zenodo.org/records/10519652), data.subset = FLAG or FLAG_SIZE:
  MANUAL_DIR/{flag}{_size}.npz   e.g. pneumoniamnist.npz (28x28) or pneumoniamnist_64.npz
      train_images, train_labels, val_images, val_labels, test_images, test_labels"""

VQARAD_LAYOUT = """VQA-RAD (Lau et al. 2018; the Open Science Framework release, osf.io/89kps):
  MANUAL_DIR/VQA_RAD Dataset Public.json   a list of {"qid", "image_name", "question", "answer", "answer_type"
                                           (CLOSED | OPEN), "phrase_type", "question_type", "image_organ", ...}
  MANUAL_DIR/VQA_RAD Image Folder/         the images named by image_name (synpic*.jpg; found at any depth)
  splits: test = phrase_type test_freeform and test_para (451 questions, the split MEVF and later work use);
  train = the rest, less validation = the questions of one image in ten (chosen by a hash of the image name)"""
SLAKE_LAYOUT = """SLAKE (Liu et al. 2021, www.med-vqa.com/slake):
  MANUAL_DIR/{train,validate,test}.json   lists of {"img_name" (e.g. xmlab1/source.jpg), "question", "answer",
                                          "answer_type" (CLOSED | OPEN), "q_lang" (en | zh), "qid", ...}
  MANUAL_DIR/imgs/                        the images, at the img_name paths
  data.subset: en (default: the English questions, as published results use), zh, or all"""

ROCO_BRIEF = ("expected MANUAL_DIR/data/{train,validation,test}/{radiology,non-radiology}/captions.txt "
              "(ID<TAB>caption), optional dlinks.txt, and images/ with ROCO_00027.jpg or PMC<id>_<name>.jpg "
              "(docs/data.md)")
ROCOV2_BRIEF = ("expected MANUAL_DIR/{train,valid,test}_captions.csv (ID,Caption), optional {split}_concepts.csv "
                "(ID,CUIs) and images ID.jpg in {split}_images.zip or {split}_images/ (docs/data.md)")
VQARAD_BRIEF = ("expected MANUAL_DIR/'VQA_RAD Dataset Public.json' and the image folder MANUAL_DIR/"
                "'VQA_RAD Image Folder/' with the synpic*.jpg images it names (osf.io/89kps; docs/data.md)")
SLAKE_BRIEF = ("expected MANUAL_DIR/train.json, validate.json, test.json and MANUAL_DIR/imgs/ with the images "
               "they name (e.g. imgs/xmlab1/source.jpg; www.med-vqa.com/slake; docs/data.md)")
MEDMNIST_BRIEF = ("expected MANUAL_DIR/{flag}{_size}.npz with train_images, train_labels, val_images, val_labels, "
                  "test_images, test_labels, and data.subset=FLAG[_SIZE] (docs/data.md)")

MEDMNIST_LABELS = {
    "pathmnist": ("adipose", "background", "debris", "lymphocytes", "mucus", "smooth muscle",
                  "normal colon mucosa", "cancer-associated stroma", "colorectal adenocarcinoma epithelium"),
    "chestmnist": ("atelectasis", "cardiomegaly", "effusion", "infiltration", "mass", "nodule", "pneumonia",
                   "pneumothorax", "consolidation", "edema", "emphysema", "fibrosis", "pleural", "hernia"),
    "dermamnist": ("actinic keratoses and intraepithelial carcinoma", "basal cell carcinoma",
                   "benign keratosis-like lesions", "dermatofibroma", "melanoma", "melanocytic nevi",
                   "vascular lesions"),
    "octmnist": ("choroidal neovascularization", "diabetic macular edema", "drusen", "normal"),
    "pneumoniamnist": ("normal", "pneumonia"),
    "retinamnist": ("grade 0", "grade 1", "grade 2", "grade 3", "grade 4"),
    "breastmnist": ("malignant", "normal, benign"),
    "bloodmnist": ("basophil", "eosinophil", "erythroblast",
                   "immature granulocytes (myelocytes, metamyelocytes and promyelocytes)", "lymphocyte",
                   "monocyte", "neutrophil", "platelet"),
    "tissuemnist": ("collecting duct, connecting tubule", "distal convoluted tubule",
                    "glomerular endothelial cells", "interstitial endothelial cells", "leukocytes", "podocytes",
                    "proximal tubule segments", "thick ascending limb"),
    "organamnist": ("bladder", "femur-left", "femur-right", "heart", "kidney-left", "kidney-right", "liver",
                    "lung-left", "lung-right", "pancreas", "spleen"),
}
for _v in ("organcmnist", "organsmnist"):
    MEDMNIST_LABELS[_v] = MEDMNIST_LABELS["organamnist"]
MEDMNIST_KIND = {
    "pathmnist": "colon pathology", "chestmnist": "chest x-ray", "dermamnist": "dermatoscopy image",
    "octmnist": "retinal oct", "pneumoniamnist": "chest x-ray", "retinamnist": "fundus image",
    "breastmnist": "breast ultrasound", "bloodmnist": "blood cell microscopy", "tissuemnist":
    "kidney cortex microscopy", "organamnist": "abdominal ct, axial", "organcmnist": "abdominal ct, coronal",
    "organsmnist": "abdominal ct, sagittal",
}


def to_grey(data_or_array, size: int) -> np.ndarray:
    """Image bytes (any PIL format) or an array -> uint8 [size, size] grey (centre-cropped square, resized).
    Raises ValueError when the image cannot be decoded."""
    import PIL.Image

    try:
        if isinstance(data_or_array, (bytes, bytearray)):
            im = PIL.Image.open(io.BytesIO(data_or_array))
            if im.format == "JPEG":  # decode at a reduced scale still >= size: much faster for big figures
                im.draft("L", (size, size))
            im.load()
        else:
            im = PIL.Image.fromarray(np.asarray(data_or_array, np.uint8))
    except Exception as exc:  # noqa: BLE001 - PIL raises many kinds on bad files
        raise ValueError(f"cannot decode image: {exc}") from None
    im = im.convert("L")
    w, h = im.size
    s = min(w, h)
    if s == 0:
        raise ValueError("empty image")
    im = im.crop(((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s))
    resample = PIL.Image.BICUBIC if s < size else PIL.Image.BOX
    return np.asarray(im.resize((size, size), resample), np.uint8)


class RealConfig(tfds.core.BuilderConfig):
    def __init__(self, *, manual_dir: str, image_size: int, subset: str = "", **kw):
        tag = hashlib.sha256(os.path.abspath(manual_dir).encode()).hexdigest()[:8]
        name = f"s{image_size}{'_' + subset if subset else ''}_{tag}"
        super().__init__(name=name, version=VERSION, **kw)
        self.manual_dir, self.image_size, self.subset = manual_dir, image_size, subset


class _Skips:
    def __init__(self):
        self.counts: dict = {}

    def add(self, split: str, why: str, ident: str):
        d = self.counts.setdefault(split, {})
        d[why] = d.get(why, 0) + 1
        if d[why] <= 3:
            log.warning("%s: skipping %s (%s)", split, ident, why)


def _record_skips(builder, skips: _Skips, split: str, yielded: int):
    builder.info.metadata["skipped"] = skips.counts
    if not yielded:
        raise UserError(f"{builder.name} split {split!r}: no usable example in {builder.builder_config.manual_dir} "
                        f"(skipped: {skips.counts.get(split, {})}); "
                        f"{builder.BRIEF}")
    if skips.counts:
        log.warning("skipped examples: %s", skips.counts)


def _info(builder):
    return tfds.core.DatasetInfo(builder=builder, description=builder.__doc__,
                                 features=features(builder.builder_config.image_size),
                                 metadata=tfds.core.MetadataDict())


# ----------------------------------------------------------------------------------------------- ROCO v1
def read_roco_captions(path: str) -> list[tuple[str, str]]:
    out = []
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            line = line.rstrip("\n\r")
            if not line.strip():
                continue
            ident, sep, cap = line.partition("\t")
            if not sep:
                raise UserError(f"{path}: line {line[:60]!r} is not 'ID<TAB>caption'; {ROCO_BRIEF}")
            out.append((ident.strip(), " ".join(cap.split())))
    return out


def read_roco_lists(path: str) -> dict[str, list[str]]:
    """keywords.txt / cuis.txt / semtypes.txt: ``ID<TAB>(empty)<TAB>item<TAB>item...`` -> {ID: [items]}."""
    out: dict[str, list[str]] = {}
    if not os.path.exists(path):
        return out
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            parts = line.rstrip("\n\r").split("\t")
            if parts and parts[0].strip():
                out[parts[0].strip()] = [p.strip() for p in parts[1:] if p.strip()]
    return out


def read_roco_dlinks(path: str) -> dict[str, str]:
    """ROCO id -> the older image name ``PMC<id>_<image name>`` (as scripts/fetch.py wrote it)."""
    names = {}
    if not os.path.exists(path):
        return names
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            parts = line.rstrip("\n").split("\t")
            if len(parts) < 3:
                continue
            m = re.search(r"(PMC\d+)\.tar\.gz", parts[1])
            if m:
                names[parts[0].strip()] = f"{m.group(1)}_{parts[-1].strip()}"
    return names


class Roco(tfds.core.GeneratorBasedBuilder):
    """ROCO v1 radiology (and non-radiology) figures with captions, from a manual download."""

    VERSION = VERSION
    code_path = None
    MANUAL_DOWNLOAD_INSTRUCTIONS = ROCO_LAYOUT
    BRIEF = ROCO_BRIEF

    def _info(self):
        return _info(self)

    def _split_generators(self, dl_manager):
        self._skips = _Skips()
        base = os.path.join(self.builder_config.manual_dir, "data")
        return {s: self._generate_examples(s) for s in ("train", "validation", "test")
                if any(os.path.exists(os.path.join(base, s, k, "captions.txt")) for k in ("radiology", "non-radiology"))}

    def _generate_examples(self, split):
        c = self.builder_config
        base = os.path.join(c.manual_dir, "data", split)
        index = 0
        for sub in ("radiology", "non-radiology"):
            folder = os.path.join(base, sub)
            if not os.path.isdir(folder):
                continue
            caps = read_roco_captions(os.path.join(folder, "captions.txt"))
            old = read_roco_dlinks(os.path.join(folder, "dlinks.txt"))
            lists = {k: read_roco_lists(os.path.join(folder, f"{k}.txt")) for k in ("keywords", "cuis", "semtypes")}
            imgdir = os.path.join(folder, "images")
            listing = set(os.listdir(imgdir)) if os.path.isdir(imgdir) else set()
            for ident, cap in caps:
                cands = [f"{ident}{ext}" for ext in (".jpg", ".jpeg", ".png")]
                if ident in old:
                    cands.append(old[ident])
                fname = next((n for n in cands if n in listing), None)
                if fname is None:
                    self._skips.add(split, "missing_image", ident)
                    continue
                with open(os.path.join(imgdir, fname), "rb") as f:
                    raw = f.read()
                try:
                    img = to_grey(raw, c.image_size)
                except ValueError:
                    self._skips.add(split, "corrupt_image", ident)
                    continue
                meta = {"subset": sub, **{k: v[ident] for k, v in lists.items() if ident in v}}
                yield ident, make_example(index, img, cap, ident=ident, meta=meta)
                index += 1
        _record_skips(self, self._skips, split, index)


def check_roco(manual_dir: str):
    found = [os.path.join(manual_dir, "data", s, k, "captions.txt") for s in ("train", "validation", "test")
             for k in ("radiology", "non-radiology")]
    if not any(os.path.exists(p) for p in found):
        raise UserError(f"no ROCO captions.txt under {manual_dir!r}; {ROCO_BRIEF}")
    if not os.path.exists(os.path.join(manual_dir, "data", "train")):
        raise UserError(f"ROCO manual_dir {manual_dir!r} has no data/train; {ROCO_BRIEF}")


# ----------------------------------------------------------------------------------------------- ROCOv2
ROCOV2_SPLITS = {"train": "train", "validation": "valid", "test": "test"}


def _csv_rows(path: str, want: tuple[str, ...]):
    with open(path, encoding="utf-8", errors="replace", newline="") as f:
        reader = csv.DictReader(f)
        if not reader.fieldnames or any(w not in reader.fieldnames for w in want):
            raise UserError(f"{path}: header {reader.fieldnames} lacks {', '.join(want)}; {ROCOV2_BRIEF}")
        yield from reader


class _ImageStore:
    """ID -> image bytes from a zip or a folder (searched recursively)."""

    def __init__(self, manual_dir: str, split: str):
        self.zip, self.files = None, {}
        zpath = os.path.join(manual_dir, f"{split}_images.zip")
        for folder in (os.path.join(manual_dir, f"{split}_images"), os.path.join(manual_dir, split)):
            if os.path.isdir(folder):
                for root, _, names in os.walk(folder):
                    for n in names:
                        self.files.setdefault(os.path.splitext(n)[0], os.path.join(root, n))
                break
        if not self.files and os.path.exists(zpath):
            self.zip = zipfile.ZipFile(zpath)
            for info in self.zip.infolist():
                if not info.is_dir():
                    self.files.setdefault(os.path.splitext(os.path.basename(info.filename))[0], info.filename)

    def get(self, ident: str) -> bytes | None:
        p = self.files.get(ident)
        if p is None:
            return None
        if self.zip is not None:
            return self.zip.read(p)
        with open(p, "rb") as f:
            return f.read()


class Rocov2(tfds.core.GeneratorBasedBuilder):
    """ROCOv2 radiology images with captions (and UMLS concepts), from a manual download."""

    VERSION = VERSION
    code_path = None
    MANUAL_DOWNLOAD_INSTRUCTIONS = ROCOV2_LAYOUT
    BRIEF = ROCOV2_BRIEF

    def _info(self):
        return _info(self)

    def _split_generators(self, dl_manager):
        self._skips = _Skips()
        return {s: self._generate_examples(s) for s, f in ROCOV2_SPLITS.items()
                if os.path.exists(os.path.join(self.builder_config.manual_dir, f"{f}_captions.csv"))}

    def _generate_examples(self, split):
        c = self.builder_config
        f = ROCOV2_SPLITS[split]
        store = _ImageStore(c.manual_dir, f)
        concepts = {}
        cpath = os.path.join(c.manual_dir, f"{f}_concepts.csv")
        if os.path.exists(cpath):
            for row in _csv_rows(cpath, ("ID", "CUIs")):
                concepts[row["ID"]] = [x for x in (row["CUIs"] or "").split(";") if x]
        index = 0
        for row in _csv_rows(os.path.join(c.manual_dir, f"{f}_captions.csv"), ("ID", "Caption")):
            ident = row["ID"].strip()
            raw = store.get(ident)
            if raw is None:
                self._skips.add(split, "missing_image", ident)
                continue
            try:
                img = to_grey(raw, c.image_size)
            except ValueError:
                self._skips.add(split, "corrupt_image", ident)
                continue
            meta = {"cuis": concepts[ident]} if ident in concepts else {}
            yield ident, make_example(index, img, " ".join((row["Caption"] or "").split()), meta=meta,
                                      ident=ident)
            index += 1
        _record_skips(self, self._skips, split, index)


def check_rocov2(manual_dir: str):
    if not os.path.exists(os.path.join(manual_dir, "train_captions.csv")):
        raise UserError(f"no train_captions.csv in {manual_dir!r}; {ROCOV2_BRIEF}")


# ----------------------------------------------------------------------------------------------- MedMNIST
MEDMNIST_SPLITS = {"train": "train", "validation": "val", "test": "test"}


def medmnist_caption(flag: str, label: np.ndarray) -> str:
    base = flag.split("_")[0]
    names = MEDMNIST_LABELS.get(base)
    label = np.asarray(label).reshape(-1)
    kind = MEDMNIST_KIND.get(base, base)

    def name(k):
        return names[k] if names and k < len(names) else f"class {k}"

    if label.size > 1:  # multi-label (chestmnist): one flag per finding
        found = [name(k) for k in np.nonzero(label)[0]]
        return f"{kind}: {', '.join(found) if found else 'no finding'}."
    return f"{kind}: {name(int(label[0]))}."


class Medmnist(tfds.core.GeneratorBasedBuilder):
    """A MedMNIST subset (``data.subset`` = flag or flag_size); labels become captions via the label names."""

    VERSION = VERSION
    code_path = None
    MANUAL_DOWNLOAD_INSTRUCTIONS = MEDMNIST_LAYOUT
    BRIEF = MEDMNIST_BRIEF

    def _info(self):
        return _info(self)

    def _split_generators(self, dl_manager):
        self._skips = _Skips()
        return {s: self._generate_examples(s) for s in MEDMNIST_SPLITS}

    def _generate_examples(self, split):
        c = self.builder_config
        path = os.path.join(c.manual_dir, f"{c.subset}.npz")
        with np.load(path) as z:
            imgs, labels = z[f"{MEDMNIST_SPLITS[split]}_images"], z[f"{MEDMNIST_SPLITS[split]}_labels"]
        if len(imgs) != len(labels):
            raise UserError(f"{path}: {split} has {len(imgs)} images but {len(labels)} labels")
        count = 0
        for i in range(len(imgs)):
            ident = f"{c.subset}-{split}-{i}"
            try:
                img = to_grey(imgs[i], c.image_size)
            except ValueError:
                self._skips.add(split, "corrupt_image", ident)
                continue
            yield ident, make_example(i, img, medmnist_caption(c.subset, labels[i]),
                                      meta={"label": np.asarray(labels[i]).reshape(-1).tolist()}, ident=ident)
            count += 1
        _record_skips(self, self._skips, split, count)


def check_medmnist(manual_dir: str, subset: str):
    if not subset:
        found = sorted(f[:-4] for f in os.listdir(manual_dir) if f.endswith(".npz")) \
            if os.path.isdir(manual_dir) else []
        if len(found) == 1:
            return found[0]
        raise UserError(f"set data.subset to a MedMNIST flag[_size] (found: {found or 'no .npz'} in "
                        f"{manual_dir!r}); {MEDMNIST_BRIEF}")
    path = os.path.join(manual_dir, f"{subset}.npz")
    if not os.path.exists(path):
        raise UserError(f"no {subset}.npz in {manual_dir!r}; {MEDMNIST_BRIEF}")
    try:
        with np.load(path) as z:
            missing = [f"{s}_{k}" for s in MEDMNIST_SPLITS.values() for k in ("images", "labels")
                       if f"{s}_{k}" not in z.files]
    except Exception as exc:  # noqa: BLE001 - any unreadable file is the user's to fix
        raise UserError(f"{path} is not a readable .npz ({exc}); {MEDMNIST_BRIEF}") from None
    if missing:
        raise UserError(f"{path} lacks {', '.join(missing)}; {MEDMNIST_BRIEF}")
    return subset


# ----------------------------------------------------------------------------------------------- VQA
VQARAD_JSON = "VQA_RAD Dataset Public.json"
VQARAD_IMAGES = "VQA_RAD Image Folder"
VQARAD_TEST = ("test_freeform", "test_para")
SLAKE_SPLITS = {"train": "train", "validation": "validate", "test": "test"}


def _json_list(path: str, brief: str, keys: tuple[str, ...]) -> list[dict]:
    import json

    try:
        with open(path, encoding="utf-8") as f:
            rows = json.load(f)
    except (OSError, ValueError) as exc:
        raise UserError(f"{path} is not readable JSON ({exc}); {brief}") from None
    if not isinstance(rows, list) or any(not isinstance(r, dict) for r in rows):
        raise UserError(f"{path} is not a list of question records; {brief}")
    for r in rows:
        missing = [k for k in keys if k not in r]
        if missing:
            raise UserError(f"{path}: a record lacks {', '.join(missing)} (it has {', '.join(sorted(r))}); {brief}")
    return rows


def _answer_type(value) -> str:
    t = str(value or "").strip().lower()
    return t if t in ("closed", "open") else ""


def vqarad_split(row: dict) -> str:
    """``test`` for VQA-RAD's test questions (phrase_type test_freeform / test_para), else ``validation`` for the
    questions of one image in ten (a hash of its name, so an image's questions stay together), else ``train``."""
    if str(row.get("phrase_type", "")).strip() in VQARAD_TEST:
        return "test"
    h = int(hashlib.sha256(str(row["image_name"]).strip().encode()).hexdigest()[:8], 16)
    return "validation" if h % 10 == 0 else "train"


def _index_images(folder: str) -> dict[str, str]:
    """base name and path relative to ``folder`` -> file path, for every file under ``folder``."""
    out: dict[str, str] = {}
    for root, _, files in os.walk(folder):
        for n in files:
            full = os.path.join(root, n)
            out.setdefault(n, full)
            out.setdefault(os.path.relpath(full, folder).replace(os.sep, "/"), full)
    return out


class _VQABuilder(tfds.core.GeneratorBasedBuilder):
    VERSION = VERSION
    code_path = None

    def _info(self):
        return _info(self)

    def _images(self) -> dict[str, str]:
        raise NotImplementedError

    def _emit(self, split: str, rows):
        """Examples of ``rows`` (``(ident, image name, question, answer, answer type, meta)``), images converted
        once per image."""
        c = self.builder_config
        images, cache = self._images(), {}
        index = 0
        for ident, name, question, answer, kind, meta in rows:
            path = images.get(name) or images.get(os.path.basename(name))
            if path is None:
                self._skips.add(split, "missing_image", f"{ident} ({name})")
                continue
            if path not in cache:
                try:
                    with open(path, "rb") as f:
                        cache[path] = to_grey(f.read(), c.image_size)
                except (OSError, ValueError):
                    cache[path] = None
            if cache[path] is None:
                self._skips.add(split, "corrupt_image", f"{ident} ({name})")
                continue
            yield ident, make_example(index, cache[path], meta=meta, ident=ident, question=question,
                                      answer=answer, answer_type=kind)
            index += 1
        _record_skips(self, self._skips, split, index)


class VqaRad(_VQABuilder):
    """VQA-RAD: clinician-written questions about radiology images (MedPix), from a manual download."""

    MANUAL_DOWNLOAD_INSTRUCTIONS = VQARAD_LAYOUT
    BRIEF = VQARAD_BRIEF

    def _images(self):
        root = self.builder_config.manual_dir
        folder = os.path.join(root, VQARAD_IMAGES)
        return _index_images(folder if os.path.isdir(folder) else root)

    def _split_generators(self, dl_manager):
        self._skips = _Skips()
        rows = _json_list(os.path.join(self.builder_config.manual_dir, VQARAD_JSON), VQARAD_BRIEF,
                          ("image_name", "question", "answer", "answer_type"))
        by = {"train": [], "validation": [], "test": []}
        for r in rows:
            by[vqarad_split(r)].append(r)
        return {s: self._generate_examples(s, by[s]) for s in by if by[s]}

    def _generate_examples(self, split, rows):
        def records():
            for k, r in enumerate(rows):
                ident = f"vqarad-{r.get('qid', k)}"
                meta = {key: r[key] for key in ("qid", "phrase_type", "question_type", "image_organ") if key in r}
                yield (ident, str(r["image_name"]).strip(), " ".join(str(r["question"]).split()),
                       " ".join(str(r["answer"]).split()), _answer_type(r["answer_type"]), meta)

        yield from self._emit(split, records())


def check_vqarad(manual_dir: str):
    if not os.path.exists(os.path.join(manual_dir, VQARAD_JSON)):
        raise UserError(f"no '{VQARAD_JSON}' in {manual_dir!r}; {VQARAD_BRIEF}")


class Slake(_VQABuilder):
    """SLAKE: bilingual questions about radiology images, from a manual download (``data.subset``: en | zh |
    all; default en)."""

    MANUAL_DOWNLOAD_INSTRUCTIONS = SLAKE_LAYOUT
    BRIEF = SLAKE_BRIEF

    def _images(self):
        return _index_images(os.path.join(self.builder_config.manual_dir, "imgs"))

    def _split_generators(self, dl_manager):
        self._skips = _Skips()
        return {s: self._generate_examples(s) for s, f in SLAKE_SPLITS.items()
                if os.path.exists(os.path.join(self.builder_config.manual_dir, f"{f}.json"))}

    def _generate_examples(self, split):
        c = self.builder_config
        lang = c.subset or "en"
        rows = _json_list(os.path.join(c.manual_dir, f"{SLAKE_SPLITS[split]}.json"), SLAKE_BRIEF,
                          ("img_name", "question", "answer", "answer_type"))

        def records():
            for k, r in enumerate(rows):
                if lang != "all" and str(r.get("q_lang", "en")) != lang:
                    continue
                ident = f"slake-{r.get('qid', k)}"
                meta = {key: r[key] for key in ("qid", "q_lang", "content_type", "modality", "location") if key in r}
                yield (ident, str(r["img_name"]).strip(), " ".join(str(r["question"]).split()),
                       " ".join(str(r["answer"]).split()), _answer_type(r["answer_type"]), meta)

        yield from self._emit(split, records())


def check_slake(manual_dir: str, subset: str) -> str:
    missing = [f"{f}.json" for f in SLAKE_SPLITS.values() if not os.path.exists(os.path.join(manual_dir, f"{f}.json"))]
    if "train.json" in missing or "test.json" in missing:
        raise UserError(f"no {' or '.join(m for m in missing if m != 'validate.json')} in {manual_dir!r}; "
                        f"{SLAKE_BRIEF}")
    if not os.path.isdir(os.path.join(manual_dir, "imgs")):
        raise UserError(f"no imgs/ folder in {manual_dir!r}; {SLAKE_BRIEF}")
    if subset not in ("", "en", "zh", "all"):
        raise UserError(f"data.subset {subset!r}: SLAKE takes en (default), zh or all")
    return subset or "en"


# ----------------------------------------------------------------------------------------------- factory
def make_real_builder(name: str, dcfg, tfds_dir: str):
    manual_dir = dcfg.get("manual_dir", "")
    if not manual_dir or not os.path.isdir(manual_dir):
        layout = {"roco": ROCO_BRIEF, "rocov2": ROCOV2_BRIEF, "medmnist": MEDMNIST_BRIEF, "vqa_rad": VQARAD_BRIEF,
                  "slake": SLAKE_BRIEF}[name]
        raise UserError(f"data.manual_dir {manual_dir!r} is not a folder; download {name} there first; {layout}")
    manual_dir = os.path.abspath(manual_dir)
    size = int(dcfg.image_size)
    if name == "roco":
        check_roco(manual_dir)
        return Roco(config=RealConfig(manual_dir=manual_dir, image_size=size), data_dir=tfds_dir,
                    file_format="array_record")
    if name == "rocov2":
        check_rocov2(manual_dir)
        return Rocov2(config=RealConfig(manual_dir=manual_dir, image_size=size), data_dir=tfds_dir,
                      file_format="array_record")
    if name == "vqa_rad":
        check_vqarad(manual_dir)
        return VqaRad(config=RealConfig(manual_dir=manual_dir, image_size=size), data_dir=tfds_dir,
                      file_format="array_record")
    if name == "slake":
        subset = check_slake(manual_dir, dcfg.get("subset", ""))
        return Slake(config=RealConfig(manual_dir=manual_dir, image_size=size, subset=subset), data_dir=tfds_dir,
                     file_format="array_record")
    subset = check_medmnist(manual_dir, dcfg.get("subset", ""))
    return Medmnist(config=RealConfig(manual_dir=manual_dir, image_size=size, subset=subset), data_dir=tfds_dir,
                    file_format="array_record")
