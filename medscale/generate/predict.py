"""From raw inputs to raw outputs: tokenise the given modalities, decode the asked ones, detokenise.

Raw forms (those of the data package): ``image`` uint8 ``[S, S]``; ``caption`` str; ``boxes`` a list of
``(class, x0, y0, x1, y1)`` in pixels (x1, y1 exclusive); ``segmentation`` uint8 ``[S, S]`` class mask
(``medscale.data.synthetic.MASK_CLASSES``); other registered modalities as their registry entry reads them.
``tokenizers`` maps tokenizer names (``"text"``, ``"image"``, ``"segmentation"``, ...; a modality's
``tokenizer_name`` in ``medscale.modalities``) to the run's tokenizers. Each modality is encoded and decoded
through its registry entry; sequence targets are generated with their entry's ``decoding`` hooks.

Each predicted box carries a confidence: the mean log-probability of its tokens (its four coordinates and
its class words) under the model, which ``metrics.average_precision`` uses to rank boxes.
"""

from __future__ import annotations

import dataclasses
import itertools

import numpy as np

from medscale import modalities
from medscale.errors import UserError


@dataclasses.dataclass(frozen=True)
class DecodeOptions:
    temperature: float = 0.0  # 0: greedy
    top_k: int = 0  # 0: no truncation
    refine_steps: int = 1  # image-like targets: 1 = one parallel pass; N = MaskGIT schedule with N passes
    seed: int = 0


def _tok(tokenizers: dict, key: str):
    if key not in tokenizers:
        raise UserError(f"the run has no {key} tokenizer")
    return tokenizers[key]


def tokenize_inputs(spec, tokenizers: dict, raw: dict[str, list], image_size: int) -> dict:
    """``{modality: [raw value per example]}`` -> ``{modality: tokens}`` / ``(tokens, valid)`` for
    :meth:`medscale.generate.decode.Decoder.encoder_inputs` (each modality through its registry entry)."""
    out = {}
    for name, values in raw.items():
        mod = spec.modalities[spec.modality_index(name)]
        entry = modalities.get(name)
        ids = entry.encode_values(_tok(tokenizers, entry.tokenizer_name), list(values), image_size)
        if mod.kind == "image":
            out[name] = np.asarray(ids, np.int32)
            continue
        arr = np.zeros((len(values), mod.max_tokens), np.int32)
        valid = np.zeros(arr.shape, bool)
        for i, t in enumerate(ids):
            t = list(t)[:mod.max_tokens]
            arr[i, :len(t)] = t
            valid[i, :len(t)] = True
        out[name] = (arr, valid)
    return out


def banned_text_ids(text_tok, target: str, given: set) -> list[int]:
    """Local ids a text target may not produce: padding, unknown and start always; when ``target`` is not
    also an input, the span sentinels (they only mark infilling); for captions the box-coordinate ids; and
    ids above the trained sentencepiece vocabulary (unused rows of ``text_vocab``)."""
    ids = [text_tok.pad_id, text_tok.unk_id, text_tok.start_id]
    if target not in given:
        ids += [int(i) for i in text_tok.sentinel_ids]
    if target == "caption":
        ids += list(range(text_tok.coord_id(0, 0), text_tok.coord_id(3, text_tok.box_bins - 1) + 1))
    ids += list(range(text_tok.trained_size, text_tok.vocab_size))
    return ids


def box_start_ids(text_tok) -> list[int]:
    """The ids that start a box (``v0=0 .. v0={bins-1}``): one choice for grouped greedy decoding."""
    return [text_tok.coord_id(0, i) for i in range(text_tok.box_bins)]


def boxes_from_ids(text_tok, ids, logprobs, image_size: int) -> tuple[list, list]:
    """Generated box-text ids (EOS already cut) -> ([(class, x0, y0, x1, y1)], [confidence]).

    A box starts at each ``v0=`` coordinate token and runs to the next one; a span that does not parse as
    ``v0 v1 v2 v3 class``, or whose far corner is not below and right of its near corner, is dropped."""
    ids = [int(i) for i in ids]
    v0_lo, v0_hi = text_tok.coord_id(0, 0), text_tok.coord_id(0, text_tok.box_bins - 1)
    starts = [k for k, i in enumerate(ids) if v0_lo <= i <= v0_hi] + [len(ids)]
    boxes, scores = [], []
    for a, b in itertools.pairwise(starts):
        parsed = text_tok.text_to_boxes(text_tok.decode(ids[a:b]), image_size)
        if len(parsed) == 1 and parsed[0][3] > parsed[0][1] and parsed[0][4] > parsed[0][2]:
            boxes.append(parsed[0])
            scores.append(float(np.mean(logprobs[a:b])))
    return boxes, scores


class SequenceDecoding:
    """How a sequence modality is generated (a registry entry's ``decoding``): the ids it may not produce, the
    id groups of grouped greedy decoding, and the prediction entries made of its generated ids. This default
    bans padding, unknown and start, the sentinels when the modality is not also an input, and unused rows
    above a trained vocabulary; its output is the decoded value under the modality's name."""

    def banned(self, tok, target: str, given: set) -> list[int]:
        ids = [getattr(tok, "pad_id", 0), getattr(tok, "unk_id", 1), getattr(tok, "start_id", 2)]
        if target not in given:
            ids += [int(i) for i in getattr(tok, "sentinel_ids", ())]
        trained = getattr(tok, "trained_size", None)
        if trained is not None:
            ids += list(range(trained, tok.vocab_size))
        return ids

    def groups(self, tok) -> list[list[int]]:
        return []

    def outputs(self, entry, tok, ids, logprobs, image_size: int) -> dict:
        return {entry.name: entry.decode_ids(tok, ids, image_size)}


class CaptionDecoding(SequenceDecoding):
    """Captions: :func:`banned_text_ids` (no box coordinates)."""

    def banned(self, tok, target, given):
        return banned_text_ids(tok, target, given)


class BoxesDecoding(SequenceDecoding):
    """Boxes: boxes start at a ``v0=`` coordinate (one group); outputs ``boxes`` and their ``box_scores``."""

    def banned(self, tok, target, given):
        return banned_text_ids(tok, target, given)

    def groups(self, tok):
        return [box_start_ids(tok)]

    def outputs(self, entry, tok, ids, logprobs, image_size):
        boxes, scores = boxes_from_ids(tok, ids, logprobs, image_size)
        return {"boxes": boxes, "box_scores": scores}


def decoding(entry) -> SequenceDecoding:
    """The generation hooks of a sequence modality's registry entry (default :class:`SequenceDecoding`)."""
    hooks = modalities.resolve(entry.decoding) if entry.decoding is not None else SequenceDecoding
    return hooks() if isinstance(hooks, type) else hooks


def predict(decoder, tokenizers: dict, raw_inputs: dict[str, list], targets: list[str], image_size: int,
            options: DecodeOptions | None = None) -> list[dict]:
    """Decode ``targets`` for a batch of examples; one dict per example with the detokenised outputs
    (per the registry: ``caption`` (str), ``boxes`` (list), ``box_scores`` (list), ``segmentation`` (uint8
    ``[S, S]``), ``image`` (uint8 ``[S, S]``), ...) and ``tokens`` per target (list of ids)."""
    options = options or DecodeOptions()
    spec = decoder.spec
    n = len(next(iter(raw_inputs.values())))
    enc = decoder.encoder_inputs(tokenize_inputs(spec, tokenizers, raw_inputs, image_size))
    results = [{} for _ in range(n)]
    seq_targets = [t for t in targets if spec.modalities[spec.modality_index(t)].kind == "sequence"]
    by_tokenizer: dict[str, list[str]] = {}
    for t in seq_targets:
        by_tokenizer.setdefault(modalities.get(t).tokenizer_name, []).append(t)
    given = set(raw_inputs)
    for tok_name, group in by_tokenizer.items():  # targets sharing a vocabulary: decoded together, one step
        tok = _tok(tokenizers, tok_name)
        entries = {t: modalities.get(t) for t in group}
        hooks = {t: decoding(entries[t]) for t in group}
        seqs = decoder.generate_sequences(enc, group, start_id=tok.start_id, eos_id=tok.eos_id,
                                          temperature=options.temperature, top_k=options.top_k,
                                          seed=options.seed,
                                          banned_ids={t: hooks[t].banned(tok, t, given) for t in group},
                                          groups={t: g for t in group if (g := hooks[t].groups(tok))})
        for target, seq in seqs.items():
            for i in range(n):
                ids = seq.tokens[i, :seq.lengths[i]]
                results[i].setdefault("tokens", {})[target] = ids.tolist()
                results[i].update(hooks[target].outputs(entries[target], tok, ids, seq.logprobs[i, :seq.lengths[i]],
                                                        image_size))
    for target in targets:
        if target in seq_targets:
            continue
        entry = modalities.get(target)
        tok = _tok(tokenizers, entry.tokenizer_name)
        grid = decoder.generate_grid(enc, target, steps=options.refine_steps,
                                     temperature=options.temperature, seed=options.seed)
        for i in range(n):
            results[i].setdefault("tokens", {})[target] = grid.tokens[i].tolist()
            results[i][target] = np.asarray(entry.decode_ids(tok, grid.tokens[i], image_size))
    return results
