"""Reading user images and drawing generated outputs (PIL and matplotlib; no JAX).

- ``load_image(path, size)``: any PNG/JPEG (or other format PIL reads) of any size and mode becomes a
  ``size x size`` grey-scale uint8 array: converted to grey ("L", ITU-R 601 luma), padded to a square with
  black (the scans' background; nothing is cropped away), then resized with a Lanczos filter. A file that is
  not a readable image is a :class:`UserError`.
- ``draw(path, ...)``: a PNG with the input image, the predicted mask overlaid (background transparent; body,
  organ, lesion in distinct colours), the predicted boxes (solid) and, when known, the true boxes (dashed), and
  the predicted caption with the true caption beside it. Written to a temp file and moved into place.
- Renderers: how ``medscale generate`` shows each modality (a registry entry's ``renderer``, see
  ``medscale.modalities``): its entries in the command's JSON output and files, its part of the picture
  (``draw``'s keyword arguments), its terminal lines. :class:`Renderer` is the default (an image-like
  prediction becomes ``STEM_<name>.png``, a sequence's decoded value goes into the JSON as it is);
  :class:`CaptionRenderer`, :class:`BoxesRenderer`, :class:`MaskRenderer` and :class:`ImageRenderer` are the
  built-in modalities'.
"""

from __future__ import annotations

import os
import textwrap

import numpy as np
from PIL import Image

from medscale import modalities, rundir
from medscale.errors import UserError
from medscale.generate.metrics import SEG_CLASSES

MASK_COLOURS = ((0, 0, 0, 0), (0.2, 0.5, 1.0, 0.25), (0.1, 0.9, 0.3, 0.35), (1.0, 0.15, 0.1, 0.55))


def load_image(path: str, size: int) -> np.ndarray:
    """``path`` -> uint8 ``[size, size]`` grey-scale (module docstring)."""
    from PIL import Image, UnidentifiedImageError

    if not os.path.isfile(path):
        raise UserError(f"--image {path}: no such file")
    try:
        with Image.open(path) as im:
            im.load()
            if im.mode in ("I;16", "I;16B", "I;16L", "I", "F"):  # 16-bit or float scans: rescale to 8 bits
                arr = np.asarray(im, np.float64)
                lo, hi = float(arr.min()), float(arr.max())
                arr = (arr - lo) / (hi - lo) * 255.0 if hi > lo else np.zeros_like(arr)
                grey = Image.fromarray(arr.astype(np.uint8), "L")
            else:
                grey = im.convert("L")
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        raise UserError(f"--image {path}: not a readable image ({type(exc).__name__}); give a PNG or JPEG "
                        "file") from None
    w, h = grey.size
    if w == 0 or h == 0:
        raise UserError(f"--image {path}: the image is empty")
    side = max(w, h)
    square = Image.new("L", (side, side), 0)
    square.paste(grey, ((side - w) // 2, (side - h) // 2))
    return np.asarray(square.resize((size, size), Image.LANCZOS), np.uint8)


def _boxes(ax, boxes, colour, style):
    from matplotlib.patches import Rectangle

    for b in boxes or ():
        cls, x0, y0, x1, y1 = b if len(b) == 5 else (b[0], *b[1])
        ax.add_patch(Rectangle((x0 - 0.5, y0 - 0.5), x1 - x0, y1 - y0, fill=False, edgecolor=colour,
                               linewidth=1.5, linestyle=style))
        ax.text(x0 - 0.5, y0 - 1.0, str(cls), color=colour, fontsize=7, va="bottom")


def draw(path: str, image: np.ndarray, *, caption: str | None = None, boxes=None, mask=None,
         true_caption: str | None = None, true_boxes=None, true_mask=None, true_image=None,
         title: str = "") -> None:
    """Write the picture described in the module docstring to ``path`` (PNG, atomically). ``image``: the
    prediction panel's background (the input image, or the generated one); ``true_image``: the ground-truth
    panel's (default ``image``)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    show_truth = true_mask is not None or true_image is not None
    ncols = 2 if show_truth else 1
    fig, axes = plt.subplots(1, ncols, figsize=(4.2 * ncols, 5.4), squeeze=False)
    panels = [(axes[0, 0], image, mask, boxes, "prediction")]
    if show_truth:
        panels.append((axes[0, 1], image if true_image is None else true_image, true_mask, true_boxes,
                       "ground truth"))
    for ax, img, m, bx, name in panels:
        ax.imshow(img, cmap="gray", vmin=0, vmax=255, interpolation="nearest")
        if m is not None:
            rgba = np.asarray(MASK_COLOURS, np.float32)[np.clip(np.asarray(m, np.int64), 0, 3)]
            ax.imshow(rgba, interpolation="nearest")
        _boxes(ax, bx, "yellow" if name == "prediction" else "cyan", "-")
        if name == "prediction" and true_boxes and not show_truth:
            _boxes(ax, true_boxes, "cyan", "--")
        ax.set_title(name, fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
    lines = []
    if caption is not None:
        lines.append("predicted: " + caption)
    if true_caption is not None:
        lines.append("truth: " + true_caption)
    text = "\n".join(textwrap.fill(s, 60 * ncols) for s in lines)
    fig.text(0.02, 0.02, text, fontsize=8, va="bottom", ha="left", family="monospace")
    if title:
        fig.suptitle(title, fontsize=9)
    fig.subplots_adjust(bottom=0.28, top=0.9, left=0.03, right=0.97)
    try:
        with rundir.atomic_path(path) as tmp:
            fig.savefig(tmp, dpi=110)
    finally:
        plt.close(fig)


def save_png(path: str, array: np.ndarray) -> None:
    """A uint8 ``[H, W]`` array as a grey-scale PNG (written to a temp file, then moved into place)."""
    with rundir.atomic_path(path) as tmp:
        Image.fromarray(np.asarray(array, np.uint8), "L").save(tmp)


def jsonable_boxes(boxes) -> list:
    return [[str(b[0]), *(round(float(v), 2) for v in b[1:])] for b in boxes]


class Renderer:
    """How ``medscale generate`` shows a modality (module docstring). ``pred``: the prediction dict of
    ``medscale.generate.predict.predict`` for one example; ``truth``: the raw example (None for a user image);
    ``out``: the command's JSON output."""

    def outputs(self, name: str, pred: dict, out_dir: str, stem: str) -> dict:
        """Entries of the JSON output for target ``name`` (files it writes go into ``out_dir``)."""
        value = pred.get(name)
        if value is None:
            return {}
        if isinstance(value, np.ndarray) and value.ndim == 2:
            path = os.path.join(out_dir, f"{stem}_{name}.png")
            save_png(path, value)
            return {name: {"path": path}}
        return {name: value.tolist() if isinstance(value, np.ndarray) else value}

    def picture(self, name: str, pred: dict, truth: dict | None, background: np.ndarray) -> dict:
        """Keyword arguments of :func:`draw` (called for every registered modality, target or not)."""
        return {}

    def truth(self, name: str, example: dict) -> dict:
        """Entries of the JSON output's ``truth`` from the raw example."""
        return {}

    def lines(self, name: str, out: dict) -> list[str]:
        """Terminal lines for target ``name``."""
        return []

    def truth_lines(self, name: str, truth: dict) -> list[str]:
        return []


class CaptionRenderer(Renderer):
    def outputs(self, name, pred, out_dir, stem):
        return {"caption": pred["caption"]} if "caption" in pred else {}

    def picture(self, name, pred, truth, background):
        return {"caption": pred.get("caption"), "true_caption": truth.get("caption") if truth else None}

    def truth(self, name, example):
        return {"caption": example["caption"]} if example.get("caption") is not None else {}

    def lines(self, name, out):
        return [f"caption: {out['caption']}"] if "caption" in out else []

    def truth_lines(self, name, truth):
        return [f"truth caption: {truth['caption']}"] if "caption" in truth else []


class TextRenderer(Renderer):
    """A text modality shown as it is (question, answer): ``name: text``."""

    def outputs(self, name, pred, out_dir, stem):
        return {name: pred[name]} if pred.get(name) is not None else {}

    def truth(self, name, example):
        return {name: example[name]} if example.get(name) else {}

    def lines(self, name, out):
        return [f"{name}: {out[name]}"] if name in out else []

    def truth_lines(self, name, truth):
        return [f"truth {name}: {truth[name]}"] if name in truth else []


class BoxesRenderer(Renderer):
    def outputs(self, name, pred, out_dir, stem):
        if "boxes" not in pred:
            return {}
        return {"boxes": jsonable_boxes(pred["boxes"]), "box_scores": [round(float(s), 4) for s in pred["box_scores"]]}

    def picture(self, name, pred, truth, background):
        return {"boxes": pred.get("boxes"), "true_boxes": truth.get("boxes") if truth else None}

    def truth(self, name, example):
        return {"boxes": jsonable_boxes(example.get("boxes") or [])}

    def lines(self, name, out):
        if "boxes" not in out:
            return []
        shown = ", ".join(f"{b[0]} ({b[1]:.0f},{b[2]:.0f})-({b[3]:.0f},{b[4]:.0f})" for b in out["boxes"])
        return [f"boxes: {shown or 'none'}"]


class MaskRenderer(Renderer):
    """Segmentation: ``STEM_mask.png`` and the predicted share of each class; the mask overlaid on the picture."""

    def outputs(self, name, pred, out_dir, stem):
        if name not in pred:
            return {}
        mask = np.asarray(pred[name])
        path = os.path.join(out_dir, f"{stem}_mask.png")
        save_png(path, mask)
        return {name: {"shape": list(mask.shape),
                       "class_fractions": {c: float((mask == i).mean()) for i, c in enumerate(SEG_CLASSES)},
                       "path": path}}

    def picture(self, name, pred, truth, background):
        return {"mask": pred.get(name),
                "true_mask": truth.get("mask") if truth is not None and name in pred else None}

    def lines(self, name, out):
        if name not in out:
            return []
        fr = out[name]["class_fractions"]
        return [f"{name}: " + ", ".join(f"{k} {v:.1%}" for k, v in fr.items())]


class ImageRenderer(Renderer):
    """Generated image tokens: ``STEM_image.png``; the picture's prediction panel shows the generated image."""

    def outputs(self, name, pred, out_dir, stem):
        if name not in pred:
            return {}
        path = os.path.join(out_dir, f"{stem}_image.png")
        save_png(path, pred[name])
        return {name: {"path": path}}

    def picture(self, name, pred, truth, background):
        if pred.get(name) is None:
            return {}
        return {"image": pred[name], "true_image": background if truth is not None else None}


def renderer(name: str) -> Renderer:
    """The renderer of a registered modality (default :class:`Renderer`)."""
    ref = modalities.get(name).renderer
    obj = modalities.resolve(ref) if ref is not None else Renderer
    return obj() if isinstance(obj, type) else obj
