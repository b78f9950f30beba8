"""Task metrics in plain numpy: captions (BLEU-4, finding accuracy), boxes (matched IoU, AP@0.5), masks (mIoU).

Conventions (every figure in ``summary.json['task_metrics']`` follows these):

Captions
- ``corpus_bleu``: corpus-level BLEU (Papineni et al., 2002, "BLEU: a method for automatic evaluation of
  machine translation", ACL): clipped n-gram counts for n = 1..4 are summed over the whole corpus *before*
  the precisions are formed; the geometric mean of the four precisions (uniform weights) is multiplied by the
  brevity penalty ``BP = 1 if c > r else exp(1 - r / c)`` with ``c`` the total hypothesis length and ``r`` the
  sum over sentences of the reference length closest to the hypothesis length (ties: the shorter).
  Tokenisation: lower case, words and single punctuation marks (regex ``\\w+|[^\\w\\s]``).
  Edge cases: an empty corpus, or a total hypothesis length of 0, gives BLEU 0 (BP is 0 as c -> 0). Short
  hypotheses simply contribute no higher-order n-grams.
  Smoothing: ``smooth="none"`` (default, the paper's definition: any order with zero matches gives 0);
  ``smooth="add1"``: add 1 to matches and to candidates for orders n >= 2 (Lin & Och, 2004, "ORANGE",
  COLING; NIST-style "+1" smoothing), which keeps a score for tiny corpora where no 4-gram matches.
- ``finding_scores``: on synthetic data, where the generator knows the truth, the findings a caption states
  (parsed by ``medscale.data.synthetic.parse_caption``) are compared with the true findings. A findings dict
  is ``{"style", "region", "n_lesions", "lesions": [{"location", "organ", "size", ...}, ...]}`` (``n_lesions``
  None: ``len(lesions)``; a lesion's place is "location organ", e.g. "right upper liver"). Per example: style
  correct, region correct, count correct, location F1 (multiset of places), location+size F1 (multiset of
  (place, size) pairs), and "all correct" (style, region, count and the multiset of (place, size) all equal).
  Multisets rather than reading order, so a model listing the right lesions in another order is not
  penalised. F1 of two empty multisets is 1. Reported as means over examples.

- ``rouge_l``: ROUGE-L (Lin, 2004, "ROUGE: A Package for Automatic Evaluation of Summaries", ACL workshop),
  sentence level then averaged over the corpus, as the COCO caption evaluation (and the ROCO / ImageCLEF
  caption tasks after it) reports it: with ``LCS`` the longest common subsequence of hypothesis and
  reference tokens (tokenised as for BLEU), ``P = LCS / len(hyp)``, ``R = LCS / len(ref)`` and
  ``F = (1 + beta^2) P R / (R + beta^2 P)`` with ``beta = 1.2``; with several references, the largest P and the
  largest R over them. An empty hypothesis or reference scores 0.

Visual question answering (VQA-RAD and SLAKE convention: exact match after normalisation, accuracy reported
separately on closed and open questions)
- ``normalize_answer``: lower case; punctuation removed (a full stop between digits kept); the number words
  zero .. ten written as digits; the articles a, an, the dropped; whitespace collapsed (the answer
  normalisation of the VQA evaluation, Antol et al. 2015, which the VQA-RAD and SLAKE pipelines apply to their
  answer vocabularies).
- ``vqa_accuracy``: the share of questions whose normalised predicted answer equals the normalised reference,
  on closed questions (``closed``: yes/no and choice questions), open questions and all; None for a type
  without questions.

Boxes (pixel coordinates ``(x0, y0, x1, y1)``, x1 > x0, y1 > y0; area = (x1-x0)(y1-y0), no "+1")
- ``box_matched_iou``: per image, ground-truth and predicted boxes are matched one-to-one by the Hungarian
  algorithm (``scipy.optimize.linear_sum_assignment``) maximising the summed IoU, where a pair of different
  classes has IoU 0. Each ground-truth box scores the IoU of its match (0 when unmatched); the metric is the mean
  over all ground-truth boxes of the corpus (images without ground truth contribute nothing; extra predictions
  are not penalised here -- AP penalises them). None when the corpus has no ground-truth box.
- ``average_precision``: AP at IoU >= 0.5, class-aware, PASCAL VOC 2010+ style all-point interpolation
  (Everingham et al., 2010, IJCV): per class, all predictions of the corpus are ranked by confidence
  (descending; ties keep input order); each is a true positive if its best-IoU not-yet-matched ground truth of
  the same class in the same image has IoU >= 0.5, else a false positive; AP = sum over recall steps of
  (r_k - r_{k-1}) * max precision at recall >= r_k. Classes with ground truth but no prediction have AP 0;
  classes with predictions but no ground truth are left out (VOC convention). mAP = mean over classes with
  ground truth; None if there are none. Confidence: the caller's scores; the generator gives each box the mean
  log-probability of its tokens, and when no scores are given the generation order is used (earlier box = more
  confident), i.e. score = -index.

Segmentation
- ``segmentation_iou``: class c's IoU = TP / (TP + FP + FN) with the counts summed over all pixels of the
  corpus (dataset-level, as PASCAL VOC and Cityscapes do, not a mean of per-image IoUs). A class absent from
  both prediction and truth of the whole corpus has no IoU (None) and is left out of the mean (mIoU).
  Default classes: background, body, organ, lesion (mask values 0..3).
"""

from __future__ import annotations

import collections
import math
import re
from collections.abc import Iterable, Sequence

import numpy as np

SEG_CLASSES = ("background", "body", "organ", "lesion")
_TOKEN_RE = re.compile(r"\w+|[^\w\s]")


# ----------------------------------------------------------------------------------------------- captions
def tokenize(text: str) -> list[str]:
    """BLEU tokenisation: lower case, words and single punctuation marks."""
    return _TOKEN_RE.findall(text.lower())


def _ngrams(tokens: Sequence[str], n: int) -> collections.Counter:
    return collections.Counter(tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1))


def corpus_bleu(hypotheses: Sequence[str], references: Sequence[str | Sequence[str]], max_n: int = 4,
                smooth: str = "none") -> dict:
    """Corpus-level BLEU-``max_n`` (see the module docstring). ``references[i]``: one string or a list of them.

    Returns ``{"bleu", "precisions" [max_n], "brevity_penalty", "hyp_len", "ref_len"}``.
    """
    if len(hypotheses) != len(references):
        raise ValueError(f"{len(hypotheses)} hypotheses but {len(references)} references")
    if smooth not in ("none", "add1"):
        raise ValueError(f"smooth must be 'none' or 'add1', not {smooth!r}")
    matches = np.zeros(max_n)
    totals = np.zeros(max_n)
    hyp_len = ref_len = 0
    for hyp, refs in zip(hypotheses, references):
        refs = [refs] if isinstance(refs, str) else list(refs)
        h = tokenize(hyp)
        rs = [tokenize(r) for r in refs]
        hyp_len += len(h)
        if rs:
            ref_len += min((abs(len(r) - len(h)), len(r)) for r in rs)[1]
        for n in range(1, max_n + 1):
            hc = _ngrams(h, n)
            best = collections.Counter()
            for r in rs:
                best |= _ngrams(r, n)  # max count per n-gram over references
            matches[n - 1] += sum(min(c, best[g]) for g, c in hc.items())
            totals[n - 1] += max(len(h) - n + 1, 0)
    if smooth == "add1":
        matches[1:] += 1
        totals[1:] += 1
    precisions = np.divide(matches, totals, out=np.zeros(max_n), where=totals > 0)
    if hyp_len == 0:
        bp = 0.0
    else:
        bp = 1.0 if hyp_len > ref_len else math.exp(1.0 - ref_len / hyp_len)
    if hyp_len == 0 or np.any(precisions <= 0):
        bleu = 0.0
    else:
        bleu = bp * math.exp(float(np.mean(np.log(precisions))))
    return {"bleu": bleu, "precisions": precisions.tolist(), "brevity_penalty": bp,
            "hyp_len": hyp_len, "ref_len": ref_len}


def _lcs(a: Sequence[str], b: Sequence[str]) -> int:
    """Length of the longest common subsequence (dynamic programme, one row at a time)."""
    if not a or not b:
        return 0
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    return prev[-1]


def rouge_l(hypothesis: str, references: str | Sequence[str], beta: float = 1.2) -> float:
    """Sentence-level ROUGE-L F-measure (module docstring)."""
    refs = [references] if isinstance(references, str) else list(references)
    h = tokenize(hypothesis)
    ps, rs = [], []
    for r in refs:
        t = tokenize(r)
        n = _lcs(h, t)
        ps.append(n / len(h) if h else 0.0)
        rs.append(n / len(t) if t else 0.0)
    p, r = max(ps, default=0.0), max(rs, default=0.0)
    if p == 0.0 or r == 0.0:
        return 0.0
    return (1 + beta ** 2) * p * r / (r + beta ** 2 * p)


def corpus_rouge_l(hypotheses: Sequence[str], references: Sequence[str | Sequence[str]], beta: float = 1.2) -> float:
    """Mean sentence-level ROUGE-L over a corpus (0 for an empty one)."""
    if len(hypotheses) != len(references):
        raise ValueError(f"{len(hypotheses)} hypotheses but {len(references)} references")
    scores = [rouge_l(h, r, beta) for h, r in zip(hypotheses, references)]
    return float(np.mean(scores)) if scores else 0.0


_NUMBER_WORDS = {w: str(i) for i, w in enumerate(
    ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten"))}
_ARTICLES = {"a", "an", "the"}
_PUNCT_RE = re.compile(r"(?<!\d)\.(?!\d)|[^\w\s.]")


def normalize_answer(text: str) -> str:
    """An answer in the form exact-match accuracy compares (module docstring)."""
    t = _PUNCT_RE.sub(" ", str(text).lower().replace("_", " "))
    words = [_NUMBER_WORDS.get(w, w) for w in t.split()]
    return " ".join(w for w in words if w not in _ARTICLES)


def vqa_accuracy(predicted: Sequence[str], truth: Sequence[str], answer_types: Sequence[str]) -> dict:
    """Exact-match accuracy after :func:`normalize_answer`: ``{"closed", "open", "overall"}`` (None where a type
    has no question) and the counts ``n_closed``, ``n_open``. ``answer_types``: ``closed`` / ``open`` per
    question (case-insensitive; anything else counts towards overall only)."""
    if not len(predicted) == len(truth) == len(answer_types):
        raise ValueError(f"{len(predicted)} predictions, {len(truth)} answers, {len(answer_types)} types")
    hits = {"closed": [], "open": [], "overall": []}
    for p, t, k in zip(predicted, truth, answer_types):
        ok = float(normalize_answer(p) == normalize_answer(t))
        hits["overall"].append(ok)
        k = str(k).lower()
        if k in hits:
            hits[k].append(ok)
    out = {k: (float(np.mean(v)) if v else None) for k, v in hits.items()}
    return out | {"n_closed": len(hits["closed"]), "n_open": len(hits["open"])}


def _multiset_f1(pred: Iterable, true: Iterable) -> float:
    p, t = collections.Counter(pred), collections.Counter(true)
    if not p and not t:
        return 1.0
    hit = sum((p & t).values())
    denom = sum(p.values()) + sum(t.values())
    return 2.0 * hit / denom


def _count(findings: dict) -> int | None:
    for key in ("n_lesions", "count"):
        if findings.get(key) is not None:
            return int(findings[key])
    return len(findings.get("lesions") or ())


def _where(lesion: dict) -> str | None:
    loc, organ = lesion.get("location"), lesion.get("organ")
    return loc if organ is None else f"{loc} {organ}"


def finding_scores(predicted: Sequence[dict | None], truth: Sequence[dict]) -> dict:
    """Mean finding accuracy of parsed captions against true findings (module docstring). A prediction of
    ``None`` (caption that does not parse) scores 0 on every item."""
    if len(predicted) != len(truth):
        raise ValueError(f"{len(predicted)} predictions but {len(truth)} truths")
    keys = ("style_acc", "region_acc", "count_acc", "location_f1", "location_size_f1", "all_correct")
    rows = []
    for p, t in zip(predicted, truth):
        if p is None:
            rows.append(dict.fromkeys(keys, 0.0))
            continue
        pl = [(_where(x), x.get("size")) for x in (p.get("lesions") or ())]
        tl = [(_where(x), x.get("size")) for x in (t.get("lesions") or ())]
        style = float(p.get("style") == t.get("style"))
        region = float(p.get("region") == t.get("region"))
        count = float(_count(p) == _count(t))
        rows.append({
            "style_acc": style,
            "region_acc": region,
            "count_acc": count,
            "location_f1": _multiset_f1([a for a, _ in pl], [a for a, _ in tl]),
            "location_size_f1": _multiset_f1(pl, tl),
            "all_correct": float(style == 1.0 and region == 1.0 and count == 1.0
                                 and collections.Counter(pl) == collections.Counter(tl)),
        })
    if not rows:
        return {k: None for k in keys} | {"n": 0}
    return {k: float(np.mean([r[k] for r in rows])) for k in keys} | {"n": len(rows)}


# ----------------------------------------------------------------------------------------------- boxes
def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU matrix ``[len(a), len(b)]`` of boxes ``(x0, y0, x1, y1)`` (continuous area, no +1)."""
    a = np.asarray(a, np.float64).reshape(-1, 4)
    b = np.asarray(b, np.float64).reshape(-1, 4)
    ix0 = np.maximum(a[:, None, 0], b[None, :, 0])
    iy0 = np.maximum(a[:, None, 1], b[None, :, 1])
    ix1 = np.minimum(a[:, None, 2], b[None, :, 2])
    iy1 = np.minimum(a[:, None, 3], b[None, :, 3])
    inter = np.clip(ix1 - ix0, 0, None) * np.clip(iy1 - iy0, 0, None)
    area_a = np.clip(a[:, 2] - a[:, 0], 0, None) * np.clip(a[:, 3] - a[:, 1], 0, None)
    area_b = np.clip(b[:, 2] - b[:, 0], 0, None) * np.clip(b[:, 3] - b[:, 1], 0, None)
    union = area_a[:, None] + area_b[None, :] - inter
    return np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)


def _box(item) -> tuple[object, list[float]]:
    """``(class, x0, y0, x1, y1)`` (the data package's form) or ``(class, (x0, y0, x1, y1))``."""
    if len(item) == 5:
        return item[0], [float(v) for v in item[1:]]
    return item[0], [float(v) for v in item[1]]


def _split(boxes) -> tuple[list, np.ndarray]:
    """A list of boxes (see :func:`_box`) -> (classes, array [n, 4])."""
    items = [_box(b) for b in (boxes or ())]
    return [c for c, _ in items], np.array([b for _, b in items], np.float64).reshape(-1, 4)


def _class_aware_iou(pred, true) -> np.ndarray:
    pc, pb = _split(pred)
    tc, tb = _split(true)
    iou = box_iou(tb, pb)
    same = np.array([[a == b for b in pc] for a in tc], bool).reshape(len(tc), len(pc))
    return np.where(same, iou, 0.0)


def box_matched_iou(predicted: Sequence, truth: Sequence) -> dict:
    """Mean IoU of ground-truth boxes with their Hungarian-matched predictions (module docstring).

    ``predicted[i]`` and ``truth[i]``: lists of ``(class, (x0, y0, x1, y1))`` for image i.
    """
    from scipy.optimize import linear_sum_assignment

    if len(predicted) != len(truth):
        raise ValueError(f"{len(predicted)} predictions but {len(truth)} truths")
    scores = []
    for pred, true in zip(predicted, truth):
        iou = _class_aware_iou(pred, true)  # [n_true, n_pred]
        per_gt = np.zeros(iou.shape[0])
        if iou.size:
            rows, cols = linear_sum_assignment(iou, maximize=True)
            per_gt[rows] = iou[rows, cols]
        scores.extend(per_gt.tolist())
    return {"mean_iou": float(np.mean(scores)) if scores else None, "num_gt": len(scores)}


def _ap_all_point(tp: np.ndarray, num_gt: int) -> float:
    if num_gt == 0:
        return float("nan")
    if tp.size == 0:
        return 0.0
    ctp = np.cumsum(tp)
    recall = ctp / num_gt
    precision = ctp / np.arange(1, tp.size + 1)
    # precision envelope: max precision at any recall >= r (from the right)
    env = np.maximum.accumulate(precision[::-1])[::-1]
    prev = np.concatenate([[0.0], recall[:-1]])
    return float(np.sum((recall - prev) * env))


def average_precision(predicted: Sequence, truth: Sequence, scores: Sequence | None = None,
                      iou_threshold: float = 0.5) -> dict:
    """Class-aware AP at ``iou_threshold`` with all-point interpolation (module docstring).

    ``scores[i][j]``: confidence of ``predicted[i][j]``; None: generation order (score = -j).
    Returns ``{"map": float | None, "per_class": {class: AP}}``.
    """
    if len(predicted) != len(truth):
        raise ValueError(f"{len(predicted)} predictions but {len(truth)} truths")
    if scores is None:
        scores = [[-j for j in range(len(p or ()))] for p in predicted]
    if len(scores) != len(predicted) or any(len(s) != len(p or ()) for s, p in zip(scores, predicted)):
        raise ValueError("scores must give one confidence per predicted box")
    predicted = [_split(p) for p in predicted]
    truth = [_split(t) for t in truth]
    gt_count = collections.Counter(c for classes, _ in truth for c in classes)
    dets = collections.defaultdict(list)  # class -> [(score, image, pred index)]
    for i, (classes, _) in enumerate(predicted):
        for j, c in enumerate(classes):
            dets[c].append((float(scores[i][j]), i, j))
    per_class = {}
    for c in sorted(gt_count, key=str):
        ranked = sorted(dets.get(c, []), key=lambda d: -d[0])  # stable: ties keep input order
        used = collections.defaultdict(set)
        tp = np.zeros(len(ranked))
        for k, (_, i, j) in enumerate(ranked):
            tb = [(n, truth[i][1][n]) for n, cc in enumerate(truth[i][0]) if cc == c]
            if not tb:
                continue
            ious = box_iou(predicted[i][1][j:j + 1], np.array([b for _, b in tb]))[0]
            best, best_n = -1.0, None
            for (n, _), v in zip(tb, ious):
                if n not in used[i] and v > best:
                    best, best_n = v, n
            if best_n is not None and best >= iou_threshold:
                used[i].add(best_n)
                tp[k] = 1.0
        per_class[c] = _ap_all_point(tp, gt_count[c])
    mean = float(np.mean(list(per_class.values()))) if per_class else None
    return {"map": mean, "per_class": per_class}


# ----------------------------------------------------------------------------------------------- masks
def segmentation_iou(predicted: Sequence[np.ndarray], truth: Sequence[np.ndarray],
                     classes: Sequence[str] = SEG_CLASSES) -> dict:
    """Per-class IoU and mIoU over a corpus of integer masks (module docstring).

    Returns ``{"miou": float | None, "per_class": {name: IoU or None}, "pixel_acc": float}``.
    """
    if len(predicted) != len(truth):
        raise ValueError(f"{len(predicted)} predictions but {len(truth)} truths")
    k = len(classes)
    conf = np.zeros((k, k), np.int64)  # [true, pred]
    for p, t in zip(predicted, truth):
        p = np.asarray(p).astype(np.int64).ravel()
        t = np.asarray(t).astype(np.int64).ravel()
        if p.shape != t.shape:
            raise ValueError(f"mask shapes differ: {p.shape} vs {t.shape}")
        ok = (t >= 0) & (t < k) & (p >= 0) & (p < k)
        conf += np.bincount(t[ok] * k + p[ok], minlength=k * k).reshape(k, k)
    tp = np.diag(conf).astype(np.float64)
    union = conf.sum(0) + conf.sum(1) - tp
    per_class = {name: (float(tp[c] / union[c]) if union[c] > 0 else None) for c, name in enumerate(classes)}
    present = [v for v in per_class.values() if v is not None]
    total = conf.sum()
    return {"miou": float(np.mean(present)) if present else None, "per_class": per_class,
            "pixel_acc": float(tp.sum() / total) if total else None}
