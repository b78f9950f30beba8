"""Reading user images and drawing generated outputs (PIL and matplotlib; no JAX).

- ``load_image(path, size)``: any PNG/JPEG (or other format PIL reads) of any size and mode becomes a
  ``size x size`` grey-scale uint8 array: converted to grey ("L", ITU-R 601 luma), padded to a square with
  black (the scans' background; nothing is cropped away), then resized with a Lanczos filter. A file that is
  not a readable image is a :class:`UserError`.
- ``draw(path, ...)``: a PNG with the input image, the predicted mask overlaid (background transparent; body,
  organ, lesion in distinct colours), the predicted boxes (solid) and, when known, the true boxes (dashed), and
  the predicted caption with the true caption beside it. Written to a temp file and moved into place.
"""

from __future__ import annotations

import os
import textwrap

import numpy as np

from medscale import rundir
from medscale.errors import UserError

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
