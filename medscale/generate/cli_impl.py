"""Library side of ``medscale generate``: load, decode, draw; returns a JSON-ready dict (prints nothing)."""

from __future__ import annotations

import os

import numpy as np

from medscale import modalities
from medscale.errors import UserError
from medscale.generate.predict import DecodeOptions, predict
from medscale.generate.render import draw, load_image, renderer
from medscale.generate.run import example as get_example
from medscale.generate.run import load_run, read_config


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
    for t in targets:
        if t in modalities.names() and modalities.get(t).role == "input":
            raise UserError(f"--targets: {t} is only ever an input (the model never learns to produce it); "
                            "give it in --inputs")
    for i in inputs:
        if i in modalities.names() and modalities.get(i).role == "target":
            raise UserError(f"--inputs: {i} is only ever a target; give it in --targets")
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
            value = modalities.get(name).value(ex)
            if value is None:
                raise UserError(f"--inputs: example {split}:{index} has no {name}")
            raw[name] = [value]
        stem = f"{split}-{index}"
    else:
        raw = {"image": [image]}
        stem = os.path.splitext(os.path.basename(image_path))[0] or "image"
    opts = DecodeOptions(temperature=float(temperature), top_k=int(top_k), refine_steps=int(refine_steps),
                         seed=int(seed))
    pred = predict(run.decoder, run.tokenizers, raw, list(targets), size, opts)[0]

    picture = os.path.join(out_dir, f"{stem}.png")
    base = image if image is not None else np.zeros((size, size), np.uint8)
    panels = {"image": base}  # each modality's part of the picture (a generated image replaces the input)
    for name in modalities.names():
        panels.update(renderer(name).picture(name, pred, truth, base))
    draw(picture, panels.pop("image"), **panels,
         title=f"{os.path.basename(os.path.abspath(workdir))} step {run.step}: "
               f"{'+'.join(inputs)} -> {'+'.join(targets)}")
    out = {"workdir": workdir, "checkpoint_step": run.step, "inputs": list(inputs), "targets": list(targets),
           "picture": picture}
    for name in targets:
        out.update(renderer(name).outputs(name, pred, out_dir, stem))
    if truth is not None:
        out["truth"] = {}
        for name in modalities.names():
            out["truth"].update(renderer(name).truth(name, truth))
    return out
