"""Task metrics of a model on held-out examples, and of a finished run (stored in its ``summary.json``).

``task_metrics(decoder, tokenizers, examples, image_size)`` decodes every modality whose registry entry
(``medscale.modalities``) names ``metrics`` -- caption, boxes and segmentation from the image alone, the answer
from the image and its question -- (greedy;
one parallel pass for the mask unless ``refine_steps`` > 1) in fixed-size batches (the last one padded by
repeating examples, so nothing recompiles) and scores them with its ``metrics`` function (here
:func:`caption_metrics`, :func:`boxes_metrics`, :func:`segmentation_metrics`, on
:mod:`medscale.generate.metrics`). The result is a flat
dict of scalars (``None`` where undefined), keys named ``<target>/<metric>``:

- ``caption/bleu4`` (corpus BLEU-4, unsmoothed), ``caption/bleu4_add1`` (add-one smoothed),
  ``caption/rouge_l`` (mean sentence ROUGE-L, beta 1.2);
- ``answer/closed_acc``, ``answer/open_acc``, ``answer/overall_acc`` (VQA-RAD / SLAKE convention: exact match
  after answer normalisation, :func:`medscale.generate.metrics.vqa_accuracy`; on examples with a question);
- ``caption/style_acc``, ``caption/region_acc``, ``caption/count_acc``, ``caption/location_f1``,
  ``caption/location_size_f1``, ``caption/all_correct`` (finding accuracy; only when examples carry ``facts``);
- ``boxes/mean_iou`` (Hungarian-matched IoU per ground-truth box), ``boxes/ap50`` (class-aware AP@0.5, ranked by
  each box's mean token log-probability), ``boxes/num_pred_per_image``;
- ``segmentation/miou``, ``segmentation/pixel_acc``, ``segmentation/iou_<class>``.

Only metrics go into that dict (the report plots each of its keys against compute); what was evaluated goes
into ``task_eval``: ``num_examples``, ``checkpoint_step``, ``split``, ``boxes_true_per_image``, ``decoding``.

``evaluate_run(workdir, num_examples)`` does this for a run directory (its latest checkpoint, its held-out
split) and writes ``task_metrics`` and ``task_eval`` into its ``summary.json`` (atomic rewrite: temp file +
``os.replace``).
"""

from __future__ import annotations

import logging
import os
import time

import jax
import numpy as np

from medscale import modalities, rundir
from medscale.data.synthetic import parse_caption
from medscale.errors import UserError
from medscale.generate import metrics as M
from medscale.generate.predict import DecodeOptions, predict
from medscale.generate.run import HELDOUT_SPLIT, heldout_examples, load_run

log = logging.getLogger(__name__)


def _batches(items: list, size: int):
    for s in range(0, len(items), size):
        chunk = items[s:s + size]
        yield chunk + [chunk[-1]] * (size - len(chunk)), len(chunk)


def caption_metrics(preds: list[dict], examples: list[dict]) -> dict:
    """BLEU-4 (unsmoothed and add-one) on examples with a caption; finding accuracy where they carry facts."""
    res: dict = {}
    idx = [i for i, e in enumerate(examples) if e.get("caption")]
    if idx:
        hyp = [preds[i]["caption"] for i in idx]
        ref = [examples[i]["caption"] for i in idx]
        res["caption/bleu4"] = M.corpus_bleu(hyp, ref)["bleu"]
        res["caption/bleu4_add1"] = M.corpus_bleu(hyp, ref, smooth="add1")["bleu"]
        res["caption/rouge_l"] = M.corpus_rouge_l(hyp, ref)
    idx = [i for i, e in enumerate(examples) if e.get("facts")]
    if idx:
        found = M.finding_scores([parse_caption(preds[i]["caption"]) for i in idx],
                                 [examples[i]["facts"] for i in idx])
        res.update({f"caption/{k}": v for k, v in found.items() if k != "n"})
    return res


def answer_metrics(preds: list[dict], examples: list[dict]) -> dict:
    """Closed, open and overall answer accuracy (exact match after normalisation) on examples with a question
    and an answer."""
    idx = [i for i, e in enumerate(examples) if e.get("question") and e.get("answer")]
    if not idx:
        return {}
    acc = M.vqa_accuracy([preds[i].get("answer") or "" for i in idx], [examples[i]["answer"] for i in idx],
                         [examples[i].get("answer_type") or "" for i in idx])
    return {"answer/closed_acc": acc["closed"], "answer/open_acc": acc["open"],
            "answer/overall_acc": acc["overall"]}


def _known(examples: list[dict]) -> list[int]:
    # boxes and masks are known together (the data package: boxes, possibly none, where a mask is)
    return [i for i, e in enumerate(examples) if e.get("mask") is not None]


def boxes_metrics(preds: list[dict], examples: list[dict]) -> dict:
    """Matched IoU, AP@0.5 and predicted boxes per image, on examples whose boxes are known."""
    known = _known(examples)
    if not known:
        return {}
    pb = [preds[i]["boxes"] for i in known]
    tb = [list(examples[i].get("boxes") or ()) for i in known]
    return {"boxes/mean_iou": M.box_matched_iou(pb, tb)["mean_iou"],
            "boxes/ap50": M.average_precision(pb, tb, [preds[i]["box_scores"] for i in known])["map"],
            "boxes/num_pred_per_image": float(np.mean([len(b) for b in pb]))}


def segmentation_metrics(preds: list[dict], examples: list[dict]) -> dict:
    """mIoU, pixel accuracy and per-class IoU on examples with a mask."""
    known = _known(examples)
    if not known:
        return {}
    seg = M.segmentation_iou([preds[i]["segmentation"] for i in known], [examples[i]["mask"] for i in known])
    return {"segmentation/miou": seg["miou"], "segmentation/pixel_acc": seg["pixel_acc"],
            **{f"segmentation/iou_{k}": v for k, v in seg["per_class"].items()}}


SOURCE = "image"  # every scored modality is decoded from the image, with its entry's further task inputs


def _scored(names: list[str]) -> list[tuple[str, tuple, object]]:
    """(target, its task inputs, metrics function) of every scored modality of a model's ``names``."""
    out = []
    for n in names:
        if n == SOURCE or n not in modalities.names() or modalities.get(n).metrics is None:
            continue
        entry = modalities.get(n)
        inputs = tuple(entry.task_inputs)
        if all(i in names for i in inputs):
            out.append((n, inputs, modalities.resolve(entry.metrics)))
    return out


def task_metrics(decoder, tokenizers: dict, examples: list[dict], image_size: int, *, batch_size: int = 16,
                 options: DecodeOptions | None = None, progress=None) -> dict:
    """Metrics (module docstring) of ``decoder`` on ``examples`` (raw example dicts): every modality of the
    model whose registry entry has ``metrics`` is decoded from its ``task_inputs`` (the image, and the question
    for the answer) and scored by them. Targets with the same inputs are decoded together, on the examples
    that hold their inputs and their ground truth (a target no example holds, or whose tokenizer the data could
    not train, is not decoded)."""
    options = options or DecodeOptions()
    if not examples:
        raise UserError("no examples to evaluate; ask for at least one")
    names = [m.name for m in decoder.spec.modalities]
    if SOURCE not in names:
        raise UserError("task metrics decode from the image; this run's model has no image modality")
    scored = _scored(names)
    groups: dict[tuple, list[str]] = {}
    for n, inputs, _ in scored:
        groups.setdefault(inputs, []).append(n)
    preds = [{} for _ in examples]
    counted = False  # the progress bar counts the examples of the first group decoded
    for inputs, group in groups.items():
        extra = [i for i in inputs if i != SOURCE]
        # a target is decoded where it can be scored: its inputs and its ground truth present, its tokenizer
        # trained (real data has no masks, so no boxes and no segmentation tokenizer; VQA data no captions)
        has = {t: [k for k, e in enumerate(examples) if all(e.get(i) for i in extra)
                   and modalities.get(t).value(e) is not None]
               for t in group if modalities.get(t).tokenizer_name in tokenizers}
        targets = [t for t in group if has.get(t)]
        which = sorted(set().union(*(has[t] for t in targets)))
        if not which:
            continue
        for chunk, real in _batches(which, min(batch_size, len(which))):
            raw = {i: [examples[k][i] for k in chunk] for i in inputs}
            out = predict(decoder, tokenizers, raw, targets, image_size, options)
            for k, p in zip(chunk[:real], out[:real]):
                tokens = {**preds[k].get("tokens", {}), **p.pop("tokens", {})}
                preds[k].update(p, tokens=tokens)
            if progress is not None and not counted:
                progress(real)
        counted = True
    res: dict = {}
    for _, _, metrics in scored:
        res.update(metrics(preds, examples))
    return res


def write_task_metrics(workdir: str, metrics: dict, meta: dict | None = None) -> dict:
    """Set ``task_metrics`` (and ``task_eval`` when given) in ``workdir/summary.json`` (atomic); returns the
    summary."""
    path = rundir.path(workdir, rundir.SUMMARY)
    if not os.path.exists(path):
        raise UserError(f"{workdir} has no summary.json: the run has not finished; evaluate it when it has")
    try:
        summary = rundir.read_json(path)
    except UserError as exc:
        raise UserError(f"{path} is unreadable ({exc}); re-run the training to rewrite it") from None
    summary["task_metrics"] = metrics
    if meta is not None:
        summary["task_eval"] = meta
    rundir.write_json(path, summary)
    return summary


def evaluate_run(workdir: str, num_examples: int = 64, *, checkpoint: int | None = None, write: bool = True,
                 batch_size: int = 16, progress: bool = False, data=None, refine_steps: int = 1,
                 split: str = HELDOUT_SPLIT) -> dict:
    """Task metrics of run ``workdir`` on ``num_examples`` held-out examples; stored in its summary.json
    under ``task_metrics`` when ``write`` (see the module docstring). Returns the metrics. ``data``: the
    run's ``medscale.data.pipeline.Data`` when the caller (the training loop) already has it."""
    return evaluate_run_with_meta(workdir, num_examples, checkpoint=checkpoint, write=write,
                                  batch_size=batch_size, progress=progress, data=data,
                                  refine_steps=refine_steps, split=split)[0]


def evaluate_run_with_meta(workdir: str, num_examples: int = 64, *, checkpoint: int | None = None,
                           write: bool = True, batch_size: int = 16, progress: bool = False,
                           data=None, refine_steps: int = 1, split: str = HELDOUT_SPLIT) -> tuple[dict, dict]:
    """:func:`evaluate_run`, also returning what was evaluated (``task_eval``)."""
    if num_examples < 1:
        raise UserError(f"--num must be at least 1, got {num_examples}")
    if refine_steps < 1:
        raise UserError(f"--refine-steps must be at least 1, got {refine_steps}")
    if write and not os.path.exists(rundir.path(workdir, rundir.SUMMARY)) and os.path.isdir(workdir):
        raise UserError(f"{workdir} has no summary.json: the run has not finished; evaluate it when it has "
                        "(or pass --no-write)")
    run = load_run(workdir, checkpoint, data=data)
    if split not in run.data.splits:
        raise UserError(f"--split {split!r}: the run's dataset {run.data.key} has splits "
                        f"{', '.join(run.data.splits)}")
    examples = heldout_examples(run, num_examples, split)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(examples), desc="evaluate", unit="ex", leave=False)
    try:
        res = task_metrics(run.decoder, run.tokenizers, examples, run.image_size, batch_size=batch_size,
                           options=DecodeOptions(refine_steps=refine_steps),
                           progress=bar.update if bar is not None else None)
    finally:
        if bar is not None:
            bar.close()
    known = [e for e in examples if e.get("mask") is not None]
    qa = [e for e in examples if e.get("question") and e.get("answer")]
    meta = {"num_examples": len(examples), "checkpoint_step": run.step, "split": split,
            "boxes_true_per_image": float(np.mean([len(e.get("boxes") or ()) for e in known])) if known else None,
            "questions": {"closed": sum(str(e.get("answer_type")).lower() == "closed" for e in qa),
                          "open": sum(str(e.get("answer_type")).lower() == "open" for e in qa)} if qa else None,
            "decoding": "greedy (boxes: grouped greedy), segmentation "
                        + ("one parallel pass" if refine_steps == 1 else f"{refine_steps} MaskGIT passes")}
    if write:
        write_task_metrics(workdir, res, meta)
    return res, meta


def task_eval(cfg, workdir: str, data=None) -> dict:
    """The end-of-run evaluation a training run's caller passes to ``medscale.train.loop.train`` as
    ``finish``: task metrics of the finished run on ``cfg.train.task_eval_examples`` held-out examples (0
    turns it off), as summary keys ``task_metrics`` / ``task_eval``. A failure is logged and recorded in
    ``task_eval``, never fails the run."""
    n = int(cfg.train.get("task_eval_examples", 0) or 0)
    if n <= 0:
        return {}
    if jax.process_count() > 1:
        log.info("task metrics are not computed inside a multi-process run; run `medscale evaluate --workdir %s`",
                 workdir)
        return {}
    t0 = time.time()
    try:
        metrics, meta = evaluate_run_with_meta(workdir, n, write=False, data=data)
    except Exception as exc:  # a finished run stays done; the error is logged and kept in the summary
        log.exception("task metrics of %s failed", workdir)
        return {"task_eval": {"error": f"{type(exc).__name__}: {exc}"}}
    return {"task_metrics": metrics, "task_eval": dict(meta, seconds=time.time() - t0)}
