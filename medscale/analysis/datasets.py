"""Unique tokens of a finite dataset, for the data-constrained budget (``medscale budget --dataset``).

Unit: the tokens a training read of an example can carry, i.e. the law's D per example when the example fills
its 4M budgets: per example, the tokens of the configured modalities (``data.modalities``, as the token cache
holds them, sequences cut to their ``max_tokens - 1``) capped at ``enc_len + dec_len`` (one read never shows
more). U = the sum over the training split. Then epochs = D / U.

- A folder (``--dataset DIR``): the dataset the user downloaded (``data.manual_dir``; ROCO, ROCOv2 or MedMNIST,
  told apart by their layouts), prepared with the configured tokenizers (built on first use, cached) and counted.
- A name (``roco``, ``rocov2``, ``medmnist[:FLAG]``): counted from the prepared token cache of that dataset
  with the configured lengths when one is present under ``data.data_dir``; otherwise estimated as the
  published size of the training split (cited below) times the tokens per example the configuration gives:
  the image's patch grid plus a caption at its configured cap (real datasets have no boxes or masks), capped at
  ``enc_len + dec_len``: an upper estimate, said so in the output.
"""

from __future__ import annotations

import glob
import os

import numpy as np

from medscale.configs import load_config
from medscale.errors import UserError

# training-split sizes as published
PUBLISHED = {
    # Pelka et al. 2018, "Radiology Objects in COntext (ROCO)", LABELS/CVII-STENT (MICCAI workshops), LNCS 11043:
    # 81,825 radiology images split 65,460 / 8,183 / 8,182 (github.com/razorx89/roco-dataset)
    "roco": (65_460, "Pelka et al. 2018 (ROCO v1), radiology training split"),
    # Rueckert et al. 2024, "ROCOv2", Scientific Data 11:688 (arXiv:2405.10004): 79,789 images split
    # 59,958 / 9,904 / 9,927
    "rocov2": (59_958, "Rueckert et al. 2024 (ROCOv2), Sci. Data 11:688, training split"),
}
# Yang et al. 2023, "MedMNIST v2", Scientific Data 10:41, Table 1: training split per 2D flag (708,069 2D
# images over all splits)
MEDMNIST_TRAIN = {
    "pathmnist": 89_996, "chestmnist": 78_468, "dermamnist": 7_007, "octmnist": 97_477,
    "pneumoniamnist": 4_708, "retinamnist": 1_080, "breastmnist": 546, "bloodmnist": 11_959,
    "tissuemnist": 165_466, "organamnist": 34_581, "organcmnist": 13_000, "organsmnist": 13_940,
}
MEDMNIST_CITATION = "Yang et al. 2023 (MedMNIST v2), Sci. Data 10:41, Table 1, training split"


def _config(config: str, overrides):
    cfg = load_config(config, list(overrides or ()))
    return cfg


def _per_example_cap(cfg) -> int:
    return int(cfg.data.enc_len) + int(cfg.data.dec_len)


def count_arrays(arrays: dict, modalities, cap: int) -> tuple[int, int]:
    """(unique tokens, examples) of token-cache arrays (``NAME_len`` per modality): per example the lengths of
    ``modalities`` summed, capped at ``cap``."""
    lens = [np.asarray(arrays[f"{m}_len"], np.int64) for m in modalities if f"{m}_len" in arrays]
    if not lens:
        raise UserError(f"the token cache holds none of the modalities {', '.join(modalities)}")
    per = np.minimum(np.sum(lens, axis=0), cap)
    return int(per.sum()), len(per)


def _layout(path: str) -> str:
    if os.path.isfile(os.path.join(path, "data", "train", "radiology", "captions.txt")):
        return "roco"
    if os.path.isfile(os.path.join(path, "train_captions.csv")):
        return "rocov2"
    if glob.glob(os.path.join(path, "*.npz")):
        return "medmnist"
    raise UserError(f"--dataset {path}: not a ROCO (data/train/radiology/captions.txt), ROCOv2 "
                    "(train_captions.csv) or MedMNIST ({flag}{_size}.npz) folder; see docs/data.md")


def _count_folder(path: str, cfg) -> dict:
    dataset = _layout(path)
    cfg.data.dataset = dataset
    cfg.data.manual_dir = os.path.abspath(path)
    # the data pipeline (TFDS, tokenizer training) only when a folder is counted: budget stays fast otherwise
    from medscale.data.pipeline import build_data

    data = build_data(cfg)
    arrays = data.tokens("train")
    names = [m.name for m in data.registry]
    u, n = count_arrays(arrays, names, _per_example_cap(cfg))
    return {"dataset": dataset, "unique_tokens": float(u), "examples": n, "tokens_per_example": u / max(n, 1),
            "method": "counted", "source": f"{path}: training split prepared with the configured tokenizers"}


def _cached(name: str, cfg) -> str | None:
    """The newest prepared training-split token cache of ``name`` with the configured sequence lengths."""
    root = cfg.data.get("data_dir", "") or os.path.join(os.path.expanduser("~"), ".cache", "medscale")
    suffix = f"-c{int(cfg.data.caption_tokens)}-b{int(cfg.data.box_tokens)}-v2.npz"
    folders = glob.glob(os.path.join(root, "tokens", f"{name}_*"))
    sub = str(cfg.data.get("subset", "") or "")
    files = [f for d in folders if (not sub or sub in os.path.basename(d))
             for f in glob.glob(os.path.join(d, f"train-*{suffix}"))]
    return max(files, key=os.path.getmtime) if files else None


def unique_tokens(dataset: str, config: str = "base", overrides=()) -> dict:
    """Unique tokens of ``dataset`` (a folder, or ``roco`` / ``rocov2`` / ``medmnist[:FLAG]``) under the
    training config ``config`` (its tokenizers, modalities and lengths). Returns ``unique_tokens``,
    ``examples``, ``tokens_per_example``, ``method`` (counted | estimate) and ``source``."""
    return unique_tokens_of(dataset, _config(config, overrides))


def unique_tokens_of(dataset: str, cfg) -> dict:
    """``unique_tokens`` with the training config given as a ConfigDict (e.g. a run's ``config.json``)."""
    cap = _per_example_cap(cfg)
    if os.path.isdir(dataset):
        return _count_folder(dataset, cfg)
    name, _, flag = dataset.partition(":")
    if name not in ("roco", "rocov2", "medmnist"):
        raise UserError(f"--dataset {dataset!r}: give a dataset folder, or roco, rocov2, medmnist[:FLAG]")
    if name == "medmnist":
        flag = (flag or str(cfg.data.get("subset", "") or "")).split("_")[0]
        if flag:
            if flag not in MEDMNIST_TRAIN:
                raise UserError(f"--dataset medmnist:{flag}: unknown flag; one of {', '.join(MEDMNIST_TRAIN)}")
            cfg.data.subset = flag
    elif flag:
        raise UserError(f"--dataset {dataset!r}: only medmnist takes :FLAG")
    modalities = list(cfg.data.modalities)
    cached = _cached(name, cfg)
    if cached:
        with np.load(cached) as z:
            u, n = count_arrays({k: z[k] for k in z.files if k.endswith("_len")}, modalities, cap)
        return {"dataset": name, "unique_tokens": float(u), "examples": n, "tokens_per_example": u / max(n, 1),
                "method": "counted", "source": f"prepared token cache {cached}"}
    grid = (int(cfg.data.image_size) // int(cfg.data.patch_size)) ** 2
    per = grid * ("image" in modalities) + (int(cfg.data.caption_tokens) - 1) * ("caption" in modalities)
    per = min(per, cap)
    if name == "medmnist":
        if flag:
            n, cite = MEDMNIST_TRAIN[flag], f"{MEDMNIST_CITATION} ({flag})"
        else:
            n, cite = sum(MEDMNIST_TRAIN.values()), f"{MEDMNIST_CITATION} (all 12 2D flags)"
    else:
        n, cite = PUBLISHED[name]
    return {"dataset": name if not flag else f"{name}:{flag}", "unique_tokens": float(n * per), "examples": n,
            "tokens_per_example": float(per), "method": "estimate",
            "source": (f"estimate: {n:,} examples ({cite}) x {per} tokens per example ({grid} image tokens + a "
                       f"caption at its cap of {int(cfg.data.caption_tokens) - 1}, capped at enc_len + dec_len = "
                       f"{cap}); an upper estimate, as captions are often shorter: prepare the data "
                       "(medscale data prepare) to count it")}
