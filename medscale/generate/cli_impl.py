"""Library side of ``medscale generate``: load, decode, draw; returns a JSON-ready dict (prints nothing)."""

from __future__ import annotations

import os

import numpy as np
from PIL import Image

from medscale import rundir
from medscale.errors import UserError
from medscale.generate.metrics import SEG_CLASSES
from medscale.generate.predict import DecodeOptions, predict
from medscale.generate.render import draw, load_image
from medscale.generate.run import example as get_example
from medscale.generate.run import load_run, read_config


def _jsonable_boxes(boxes):
    return [[str(b[0]), *(round(float(v), 2) for v in b[1:])] for b in boxes]


def _mask_summary(mask: np.ndarray) -> dict:
    m = np.asarray(mask)
    return {"shape": list(m.shape),
            "class_fractions": {c: float((m == i).mean()) for i, c in enumerate(SEG_CLASSES)}}


def _save_mask(path: str, mask: np.ndarray) -> None:
    with rundir.atomic_path(path) as tmp:
        Image.fromarray(np.asarray(mask, np.uint8), "L").save(tmp)


def generate(workdir: str, *, checkpoint=None, image_path=None, example=None, inputs=("image",),
             targets=("caption", "boxes", "segmentation"), out_dir: str, temperature=0.0, top_k=0,
             refine_steps=1, seed=0) -> dict:
    cfg = read_config(workdir)  # cheap checks before the model loads
    size = int(cfg.data.image_size)
    known = list(cfg.data.modalities)
    for t in targets:
        if t not in known:
            raise UserError(f"--targets: the run has no modality {t!r}; it has {', '.join(known)}")
    for i in inputs:
        if i not in known:
            raise UserError(f"--inputs: the run has no modality {i!r}; it has {', '.join(known)}")
    both = sorted(set(targets) & set(inputs))
    if both:
        raise UserError(f"--targets and --inputs both name {both[0]!r}; a modality is either given or decoded")
    image = load_image(image_path, size) if image_path is not None else None
    try:
        os.makedirs(out_dir, exist_ok=True)
    except OSError as exc:
        raise UserError(f"--out {out_dir}: cannot create the folder ({exc.strerror}); give another --out") from None
    if not os.access(out_dir, os.W_OK):
        raise UserError(f"--out {out_dir}: not writable; give another --out")

    run = load_run(workdir, checkpoint)
    truth = None
    if example is not None:
        split, index = example
        ex = get_example(run, split, index)
        truth = ex
        image = ex.get("image")
        raw = {}
        for name in inputs:
            key = "mask" if name == "segmentation" else name
            if ex.get(key) is None:
                raise UserError(f"--inputs: example {split}:{index} has no {name}")
            raw[name] = [ex[key]]
        stem = f"{split}-{index}"
    else:
        raw = {"image": [image]}
        stem = os.path.splitext(os.path.basename(image_path))[0] or "image"
    opts = DecodeOptions(temperature=float(temperature), top_k=int(top_k), refine_steps=int(refine_steps),
                         seed=int(seed))
    pred = predict(run.decoder, run.tokenizers, raw, list(targets), size, opts)[0]

    picture = os.path.join(out_dir, f"{stem}.png")
    base = image if image is not None else np.zeros((size, size), np.uint8)
    generated = pred.get("image")  # image tokens decoded: the prediction panel shows the generated image
    draw(picture, generated if generated is not None else base, caption=pred.get("caption"),
         boxes=pred.get("boxes"), mask=pred.get("segmentation"),
         true_caption=truth.get("caption") if truth else None,
         true_boxes=truth.get("boxes") if truth else None,
         true_mask=truth.get("mask") if truth is not None and "segmentation" in targets else None,
         true_image=base if generated is not None and truth is not None else None,
         title=f"{os.path.basename(os.path.abspath(workdir))} step {run.step}: "
               f"{'+'.join(inputs)} -> {'+'.join(targets)}")
    out = {"workdir": workdir, "checkpoint_step": run.step, "inputs": list(inputs), "targets": list(targets),
           "picture": picture}
    if "caption" in pred:
        out["caption"] = pred["caption"]
    if "boxes" in pred:
        out["boxes"] = _jsonable_boxes(pred["boxes"])
        out["box_scores"] = [round(float(s), 4) for s in pred["box_scores"]]
    if "segmentation" in pred:
        mask_path = os.path.join(out_dir, f"{stem}_mask.png")
        _save_mask(mask_path, pred["segmentation"])
        out["segmentation"] = _mask_summary(pred["segmentation"]) | {"path": mask_path}
    if "image" in pred:
        img_path = os.path.join(out_dir, f"{stem}_image.png")
        _save_mask(img_path, pred["image"])
        out["image"] = {"path": img_path}
    if truth is not None:
        out["truth"] = {k: v for k, v in (("caption", truth.get("caption")),
                                          ("boxes", _jsonable_boxes(truth.get("boxes") or []))) if v is not None}
    return out
