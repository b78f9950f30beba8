"""Procedural medical-like scenes: deterministic from ``(seed, index)``.

Each scene is a grey-scale scan of one of three imaging styles (``xray``, ``ct``, ``mri``: different contrast
tables, noise kinds, blur and bias fields) of one of three body regions (``chest``, ``abdomen``, ``head``), with a
body outline, region-specific organs and 0-4 lesions of varied size, shape, intensity and location. It comes
with a caption written by a grammar from the scene's content, one box per lesion and a per-pixel mask
(:data:`MASK_CLASSES`). The true structured findings (:func:`scene_facts`) are kept so that generated captions
can be scored with :func:`parse_caption` ("finding accuracy").

Conventions: location words follow the radiological convention (the patient's right is the image's left);
boxes are ``(class, x0, y0, x1, y1)`` in pixels with ``x1``/``y1`` exclusive.
"""

from __future__ import annotations

import math
import re

import numpy as np

MASK_CLASSES = ("background", "body", "organ", "lesion")
STYLES = ("xray", "ct", "mri")
REGIONS = ("chest", "abdomen", "head")
SIZES = ("small", "medium", "large")
SHAPES = ("round", "oval", "irregular")
INTENSITIES = ("bright", "dark")
MAX_LESIONS = 4

STYLE_WORDS = {"xray": "radiograph", "ct": "ct scan", "mri": "mri scan"}
STYLE_SYNONYMS = {"xray": ("radiograph", "x-ray"), "ct": ("ct scan", "ct image"), "mri": ("mri scan", "mr image")}
INTENSITY_WORDS = {  # per style: (bright, dark)
    "xray": ("opaque", "lucent"),
    "ct": ("hyperdense", "hypodense"),
    "mri": ("hyperintense", "hypointense"),
}
COUNT_WORDS = ("no", "one", "two", "three", "four")
ORGANS = {  # name, centre (x, y) as a fraction of the body box, radii (rx, ry) fractions, angle
    "chest": (("right lung", (0.30, 0.45), (0.17, 0.30), 0.1), ("left lung", (0.70, 0.45), (0.17, 0.30), -0.1),
              ("heart", (0.56, 0.62), (0.14, 0.12), 0.4)),
    "abdomen": (("liver", (0.32, 0.38), (0.22, 0.17), 0.3), ("spleen", (0.75, 0.35), (0.09, 0.12), -0.3),
                ("right kidney", (0.33, 0.68), (0.07, 0.11), 0.2),
                ("left kidney", (0.67, 0.68), (0.07, 0.11), -0.2)),
    "head": (("brain", (0.5, 0.5), (0.38, 0.42), 0.0), ("right ventricle", (0.43, 0.48), (0.05, 0.12), 0.2),
             ("left ventricle", (0.57, 0.48), (0.05, 0.12), -0.2)),
}
BODY_SHAPE = {"chest": (0.44, 0.36), "abdomen": (0.42, 0.33), "head": (0.36, 0.42)}  # radii as fractions of S
# style -> (background, body, organ intensities per region index, noise sd, blur passes)
STYLE_TABLE = {
    "xray": {"background": 0.05, "body": 0.55, "organ": (0.25, 0.45, 0.7), "noise": 0.04, "blur": 1},
    "ct": {"background": 0.0, "body": 0.45, "organ": (0.6, 0.3, 0.75), "noise": 0.06, "blur": 0},
    "mri": {"background": 0.02, "body": 0.35, "organ": (0.7, 0.55, 0.2), "noise": 0.05, "blur": 1},
}
SIZE_RADIUS = {"small": (0.030, 0.045), "medium": (0.055, 0.075), "large": (0.085, 0.11)}
MM_PER_IMAGE = 320.0  # the field of view: an image is 320 mm wide whatever its pixel size
HELDOUT_BASE = 10**12  # held-out scenes (validation, test) have indices from here on; training scenes below


def _vertical(y: float) -> str:
    return "upper" if y < 0.5 else "lower"


def _side(x: float) -> str:
    # radiological convention: the image's left is the patient's right
    if abs(x - 0.5) < 0.08:
        return "central"
    return "right" if x < 0.5 else "left"


def location_words(cx: float, cy: float) -> str:
    """Location of a point (fractions of the image) as words: ``right upper``, ``central lower``, ..."""
    return f"{_side(cx)} {_vertical(cy)}"


def _blur(img: np.ndarray, passes: int) -> np.ndarray:
    for _ in range(passes):
        p = np.empty((img.shape[0] + 2, img.shape[1] + 2), img.dtype)  # edge padding (np.pad's "edge", faster)
        p[1:-1, 1:-1] = img
        p[0, 1:-1], p[-1, 1:-1] = img[0], img[-1]
        p[:, 0], p[:, -1] = p[:, 1], p[:, -2]
        img = (p[:-2, 1:-1] + p[2:, 1:-1] + p[1:-1, :-2] + p[1:-1, 2:] + 4 * p[1:-1, 1:-1]) / 8.0
    return img


def _ellipse(xx, yy, cx, cy, rx, ry, ang):
    c, s = math.cos(ang), math.sin(ang)
    dx, dy = xx - cx, yy - cy
    u = (dx * c + dy * s) / rx
    v = (-dx * s + dy * c) / ry
    return u * u + v * v


def _box(S: int, cx: float, cy: float, hx: float, hy: float) -> tuple[slice, slice]:
    """Rows and columns of the pixels whose centres lie within ``hx``, ``hy`` of ``(cx, cy)`` (fractions of the
    image), with a pixel to spare: pixels outside it are outside any shape of those half-extents."""
    def span(c, h):
        return slice(max(0, math.floor((c - h) * S - 0.5) - 1), min(S, math.ceil((c + h) * S - 0.5) + 2))

    return span(cy, hy), span(cx, hx)


def _ellipse_in(xx, yy, cx, cy, rx, ry, ang):
    """(box, :func:`_ellipse` over the box): the ellipse computed only in its bounding box, the same values there
    (elementwise arithmetic) for a fraction of the work; every pixel outside the box is outside the ellipse."""
    c, s = math.cos(ang), math.sin(ang)
    box = _box(xx.shape[0], cx, cy, math.hypot(rx * c, ry * s), math.hypot(rx * s, ry * c))
    return box, _ellipse(xx[box], yy[box], cx, cy, rx, ry, ang)


_GRIDS: dict = {}


def _grid(S: int):
    """(yy, xx) pixel-centre coordinates of an S x S image (fractions), shared and read-only."""
    if S not in _GRIDS:
        coords = (np.arange(S, dtype=np.float32) + 0.5) / S
        yy, xx = np.meshgrid(coords, coords, indexing="ij")
        yy.flags.writeable = xx.flags.writeable = False
        _GRIDS[S] = (yy, xx)
    return _GRIDS[S]


class Scene(dict):
    """A rendered scene: ``image`` (uint8 HxW), ``mask`` (uint8 HxW), ``boxes`` [(cls, x0, y0, x1, y1)],
    ``caption`` (str), ``facts`` (dict, see :func:`scene_facts`), one question about it with its ``answer`` and
    ``answer_type`` (``closed`` | ``open``, :func:`scene_qa`)."""


def render_scene(seed: int, index: int, size: int = 64) -> Scene:
    """Render scene ``index`` of the dataset with seed ``seed`` at ``size`` x ``size`` pixels (deterministic)."""
    rng = np.random.default_rng([int(seed), int(index), 0x4D53])
    S = int(size)
    style = STYLES[rng.integers(3)]
    region = REGIONS[rng.integers(3)]
    tab = STYLE_TABLE[style]
    yy, xx = _grid(S)
    mask = np.zeros((S, S), np.uint8)
    img = np.full((S, S), tab["background"], np.float32)

    # body outline
    brx, bry = BODY_SHAPE[region]
    brx *= rng.uniform(0.9, 1.08)
    bry *= rng.uniform(0.9, 1.08)
    bcx, bcy = 0.5 + rng.uniform(-0.03, 0.03), 0.5 + rng.uniform(-0.03, 0.03)
    body = _ellipse(xx, yy, bcx, bcy, brx, bry, rng.uniform(-0.1, 0.1)) <= 1.0
    mask[body] = 1
    img[body] = tab["body"] + 0.08 * (yy[body] - 0.5)  # soft gradient inside the body
    # organs
    organ_regions = []
    for k, (name, (fx, fy), (frx, fry), ang) in enumerate(ORGANS[region]):
        cx = bcx - brx + 2 * brx * (fx + rng.uniform(-0.03, 0.03))
        cy = bcy - bry + 2 * bry * (fy + rng.uniform(-0.03, 0.03))
        rx = 2 * brx * frx * rng.uniform(0.85, 1.15)
        ry = 2 * bry * fry * rng.uniform(0.85, 1.15)
        box, d = _ellipse_in(xx, yy, cx, cy, rx, ry, ang + rng.uniform(-0.15, 0.15))
        inside = (d <= 1.0) & body[box]
        mask[box][inside] = 2
        level = tab["organ"][k % 3] + rng.uniform(-0.05, 0.05)
        img[box][inside] = level
        organ_regions.append((name, cx, cy, rx, ry, level))

    # lesions: placed inside organs (mostly) or the body
    n = int(rng.choice(5, p=(0.2, 0.3, 0.22, 0.16, 0.12)))
    lesions = []
    attempts = 0
    while len(lesions) < n and attempts < 40:
        attempts += 1
        size_word = SIZES[rng.integers(3)]
        r = rng.uniform(*SIZE_RADIUS[size_word])
        host = organ_regions[rng.integers(len(organ_regions))]
        _, ocx, ocy, orx, ory, _olevel = host
        t, rad = rng.uniform(0, 2 * math.pi), math.sqrt(rng.uniform(0, 1)) * 0.7
        cx, cy = ocx + rad * orx * math.cos(t), ocy + rad * ory * math.sin(t)
        if not (r < cx < 1 - r and r < cy < 1 - r):
            continue
        if any(math.hypot(cx - le["cx"], cy - le["cy"]) < r + le["r"] + 0.02 for le in lesions):
            continue
        lesions.append({"size": size_word, "r": r, "cx": cx, "cy": cy, "host": host, "shape": SHAPES[rng.integers(3)],
                            "intensity": INTENSITIES[rng.integers(2)]})
    # report lesions in reading order (top to bottom, then left to right) so captions are canonical
    lesions.sort(key=lambda le: (round(le["cy"] * 4), le["cx"]))
    boxes, facts_lesions = [], []
    for le in lesions:
        r, cx, cy = le["r"], le["cx"], le["cy"]
        # each shape computed in its bounding box only (pixels outside it are outside the shape)
        if le["shape"] == "round":
            box, d = _ellipse_in(xx, yy, cx, cy, r, r, 0.0)
        elif le["shape"] == "oval":
            box, d = _ellipse_in(xx, yy, cx, cy, r * 1.45, r * 0.7, rng.uniform(0, math.pi))
        else:  # irregular: lobulated radius (at most 1.5 r)
            box = _box(S, cx, cy, 1.5 * r, 1.5 * r)
            bx, by = xx[box], yy[box]
            ang = np.arctan2(by - cy, bx - cx)
            k, ph = int(rng.integers(3, 6)), rng.uniform(0, 2 * math.pi)
            rr = r * (1.0 + 0.35 * np.sin(k * ang + ph) + 0.15 * np.sin((k + 2) * ang + 2 * ph))
            d = ((bx - cx) ** 2 + (by - cy) ** 2) / (rr * rr)
        inside = d <= 1.0
        if not inside.any():
            continue
        host_level = le["host"][5]
        delta = rng.uniform(0.2, 0.35)
        level = min(host_level + delta, 1.0) if le["intensity"] == "bright" else max(host_level - delta, 0.0)
        img[box][inside] = level * (1.0 - 0.15 * np.clip(1.0 - d[inside], 0, 1)) \
            if le["intensity"] == "dark" else level
        mask[box][inside] = 3
        ys, xs = np.nonzero(inside)
        ys, xs = ys + box[0].start, xs + box[1].start
        boxes.append(("lesion", int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1))
        mm = round(2 * r * MM_PER_IMAGE / 5.0) * 5
        facts_lesions.append({"size": le["size"], "shape": le["shape"], "intensity": le["intensity"],
                                  "location": location_words(cx, cy), "organ": le["host"][0], "mm": mm})

    # style-specific acquisition: bias field, blur, noise
    if style == "mri":
        g = rng.uniform(-0.25, 0.25, size=2)
        img = img * (1.0 + g[0] * (xx - 0.5) + g[1] * (yy - 0.5))
    img = _blur(img, tab["blur"])
    noise = rng.standard_normal((S, S)).astype(np.float32) * tab["noise"]
    if style == "mri":  # Rician-like: magnitude of a complex signal
        noise2 = rng.standard_normal((S, S)).astype(np.float32) * tab["noise"]
        img = np.sqrt((img + noise) ** 2 + noise2 ** 2)
    else:
        img = img + noise
    image = np.clip(img * 255.0 + 0.5, 0, 255).astype(np.uint8)

    facts = {"style": style, "region": region, "n_lesions": len(facts_lesions), "lesions": facts_lesions}
    caption = write_caption(facts, rng)
    question, answer, answer_type = scene_qa(facts, seed, index)
    return Scene(image=image, mask=mask, boxes=boxes, caption=caption, facts=facts, question=question,
                 answer=answer, answer_type=answer_type)


def write_caption(facts: dict, rng: np.random.Generator) -> str:
    """The caption grammar: style and region, count of findings, then each finding in reading order."""
    style, region = facts["style"], facts["region"]
    words = STYLE_SYNONYMS[style]
    head = f"{words[rng.integers(len(words))]} of the {region}."
    n = facts["n_lesions"]
    if n == 0:
        tail = ("no focal lesion.", "no lesion is seen.", "normal study.")[rng.integers(3)]
        return f"{head} {tail}"
    bright, dark = INTENSITY_WORDS[style]
    parts = [f"{COUNT_WORDS[n]} lesion{'s' if n > 1 else ''}:"]
    for i, le in enumerate(facts["lesions"]):
        inten = bright if le["intensity"] == "bright" else dark
        phrase = f"{le['size']} {le['shape']} {inten} {le['mm']}mm, {le['location']} {le['organ']}"
        parts.append(phrase + ("." if i == n - 1 else ";"))
    return f"{head} {' '.join(parts)}"


# ----------------------------------------------------------------------------------------------- VQA
MODALITY_WORDS = {"xray": "x-ray", "ct": "ct", "mri": "mri"}  # open answers to "which imaging modality ..."


def _organs_with_lesions(facts: dict) -> list[str]:
    return sorted({le["organ"] for le in facts["lesions"]})


def scene_qa(facts: dict, seed: int, index: int) -> tuple[str, str, str]:
    """One question about a scene, its answer and its type, from the scene's true findings (deterministic in
    ``(seed, index)``; its own random stream, so the image and caption are those of the scene without it).

    Closed questions (``closed``, as VQA-RAD and SLAKE call yes/no and two-choice questions): a lesion in an
    organ; a lesion in the upper or lower part of an organ (``is there a lesion in the lower left lung?``); the
    imaging modality; a normal study; more than one lesion; a lesion's intensity as a choice of two words. Open
    questions (``open``): the modality, the body region, the number of lesions, the organ holding the lesions
    (only when they all lie in one organ) and the size of the lesion in an organ (only when it holds one).
    Every answer is determined by the facts; yes and no are drawn about equally often."""
    rng = np.random.default_rng([int(seed), int(index), 0x5141])
    style, region, lesions = facts["style"], facts["region"], facts["lesions"]
    organs = [o[0] for o in ORGANS[region]]
    hit = _organs_with_lesions(facts)

    def pick(seq):
        return seq[int(rng.integers(len(seq)))]

    def yes(b: bool) -> str:
        return "yes" if b else "no"

    if rng.random() < 0.5:  # closed
        kind = pick(("organ", "part", "modality", "normal", "several", "intensity") if lesions
                    else ("organ", "part", "modality", "normal", "several"))
        if kind == "organ":
            organ = pick(hit) if hit and rng.random() < 0.5 else pick(organs)
            return f"is there a lesion in the {organ}?", yes(organ in hit), "closed"
        if kind == "part":
            organ = pick(hit) if hit and rng.random() < 0.5 else pick(organs)
            part = pick(("upper", "lower"))
            found = any(le["organ"] == organ and le["location"].endswith(part) for le in lesions)
            return f"is there a lesion in the {part} {organ}?", yes(found), "closed"
        if kind == "modality":
            asked = style if rng.random() < 0.5 else pick(STYLES)
            word = STYLE_WORDS[asked]
            return f"is this {'an' if word[0] in 'aeiou' else 'a'} {word}?", yes(asked == style), "closed"
        if kind == "normal":
            return "is this study normal?", yes(not lesions), "closed"
        if kind == "several":
            return "is there more than one lesion?", yes(len(lesions) > 1), "closed"
        le = pick(lesions)  # intensity: a choice of the style's two words
        bright, dark = INTENSITY_WORDS[style]
        words = (bright, dark) if rng.random() < 0.5 else (dark, bright)
        return (f"is the lesion in the {le['organ']} {words[0]} or {words[1]}?",
                bright if le["intensity"] == "bright" else dark, "closed")
    kinds = ["modality", "region", "count"]
    if len(hit) == 1:
        kinds.append("which_organ")
    single = [o for o in hit if sum(le["organ"] == o for le in lesions) == 1]
    if single:
        kinds.append("size")
    kind = pick(kinds)
    if kind == "modality":
        return "which imaging modality is this?", MODALITY_WORDS[style], "open"
    if kind == "region":
        return "which body region is shown?", region, "open"
    if kind == "count":
        return "how many lesions are there?", COUNT_WORDS[len(lesions)] if lesions else "zero", "open"
    if kind == "which_organ":
        return "which organ has a lesion?", hit[0], "open"
    organ = pick(single)
    size = next(le["size"] for le in lesions if le["organ"] == organ)
    return f"what size is the lesion in the {organ}?", size, "open"


_STYLE_OF = {w: s for s, ws in STYLE_SYNONYMS.items() for w in ws}
_INTEN_OF = {w: ("bright" if i == 0 else "dark") for ws in INTENSITY_WORDS.values() for i, w in enumerate(ws)}
_ORGAN_NAMES = sorted({o[0] for v in ORGANS.values() for o in v}, key=len, reverse=True)
_LESION_RE = re.compile(
    r"(?P<size>small|medium|large)\s+(?P<shape>round|oval|irregular)\s+(?P<inten>\w+)\s+(?:(?P<mm>\d+)\s*mm)?\s*,?\s*"
    r"(?:lesion\s+)?(?:in\s+)?(?:the\s+)?(?P<side>right|left|central)\s+(?P<vert>upper|lower)\s+"
    r"(?P<organ>" + "|".join(re.escape(o) for o in _ORGAN_NAMES) + r")")


def parse_caption(text: str) -> dict:
    """Structured findings of a caption written by this grammar (or a model imitating it).

    Returns ``{"style", "region", "n_lesions", "lesions": [{"size", "shape", "intensity", "location", "organ",
    "mm"}]}``; fields that cannot be read are ``None`` (``n_lesions`` falls back to the number of lesion
    phrases found)."""
    t = " ".join(text.lower().split())
    style = next((s for w, s in sorted(_STYLE_OF.items(), key=lambda kv: -len(kv[0])) if w in t), None)
    region = next((r for r in REGIONS if re.search(rf"\bof the {r}\b", t)), None)
    lesions = []
    for m in _LESION_RE.finditer(t):
        lesions.append({"size": m["size"], "shape": m["shape"], "intensity": _INTEN_OF.get(m["inten"]),
                            "location": f"{m['side']} {m['vert']}", "organ": m["organ"],
                            "mm": int(m["mm"]) if m["mm"] else None})
    n = None
    m = re.search(r"\b(one|two|three|four) lesions?\b", t)
    if m:
        n = COUNT_WORDS.index(m.group(1))
    elif re.search(r"no focal lesion|no lesion|normal study", t):
        n = 0
    elif lesions:
        n = len(lesions)
    return {"style": style, "region": region, "n_lesions": n, "lesions": lesions}


def finding_scores(pred: dict, true: dict) -> dict:
    """Per-field agreement of parsed findings with the true facts (1.0/0.0; lesion attributes matched in order,
    averaged over the true lesions; a missing lesion scores 0)."""
    out = {k: float(pred.get(k) == true.get(k)) for k in ("style", "region", "n_lesions")}
    tl, pl = true.get("lesions", []), pred.get("lesions", [])
    for attr in ("size", "shape", "intensity", "location", "organ"):
        if tl:
            out[f"lesion_{attr}"] = sum(float(i < len(pl) and pl[i][attr] == t[attr]) for i, t in enumerate(tl)) \
                / len(tl)
    return out


def scene_facts(seed: int, index: int, size: int = 64) -> dict:
    """The true findings of scene ``index`` (renders it)."""
    return render_scene(seed, index, size)["facts"]
