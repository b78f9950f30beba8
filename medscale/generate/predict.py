"""From raw inputs to raw outputs: tokenise the given modalities, decode the asked ones, detokenise.

Raw forms (those of the data package): ``image`` uint8 ``[S, S]``; ``caption`` str; ``boxes`` a list of
``(class, x0, y0, x1, y1)`` in pixels (x1, y1 exclusive); ``segmentation`` uint8 ``[S, S]`` class mask
(``medscale.data.synthetic.MASK_CLASSES``). ``tokenizers`` maps ``"text"``, ``"image"`` and
``"segmentation"`` to the run's tokenizers (``medscale.data.tokenizers``).

Each predicted box carries a confidence: the mean log-probability of its tokens (its four coordinates and
its class words) under the model, which ``metrics.average_precision`` uses to rank boxes.
"""

from __future__ import annotations

import dataclasses
import itertools

import numpy as np

from medscale.errors import UserError

SEQUENCE_TEXT = ("caption", "boxes")  # sequence modalities written in the shared text vocabulary


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
    :meth:`medscale.generate.decode.Decoder.encoder_inputs`."""
    out = {}
    for name, values in raw.items():
        mod = spec.modalities[spec.modality_index(name)]
        if name == "image":
            out[name] = np.asarray(_tok(tokenizers, "image").encode(np.stack(values)), np.int32)
        elif name == "segmentation":
            out[name] = np.asarray(_tok(tokenizers, "segmentation").encode(np.stack(values)), np.int32)
        elif name in SEQUENCE_TEXT:
            text = _tok(tokenizers, "text")
            ids = np.zeros((len(values), mod.max_tokens), np.int32)
            valid = np.zeros(ids.shape, bool)
            for i, v in enumerate(values):
                s = v if name == "caption" else text.boxes_to_text(v, image_size)
                t = text.encode(s)[:mod.max_tokens]
                ids[i, :len(t)] = t
                valid[i, :len(t)] = True
            out[name] = (ids, valid)
        else:
            raise UserError(f"no tokenizer for input modality {name!r}")
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


def predict(decoder, tokenizers: dict, raw_inputs: dict[str, list], targets: list[str], image_size: int,
            options: DecodeOptions | None = None) -> list[dict]:
    """Decode ``targets`` for a batch of examples; one dict per example with the detokenised outputs:
    ``caption`` (str), ``boxes`` (list), ``box_scores`` (list), ``segmentation`` (uint8 ``[S, S]``),
    ``image`` (uint8 ``[S, S]``), and ``tokens`` per target (list of ids)."""
    options = options or DecodeOptions()
    spec = decoder.spec
    n = len(next(iter(raw_inputs.values())))
    enc = decoder.encoder_inputs(tokenize_inputs(spec, tokenizers, raw_inputs, image_size))
    results = [{} for _ in range(n)]
    seq_targets = [t for t in targets if spec.modalities[spec.modality_index(t)].kind == "sequence"]
    if seq_targets:  # all text targets share one vocabulary: decoded together, one compiled step
        text = _tok(tokenizers, "text")
        given = set(raw_inputs)
        seqs = decoder.generate_sequences(enc, seq_targets, start_id=text.start_id, eos_id=text.eos_id,
                                          temperature=options.temperature, top_k=options.top_k,
                                          seed=options.seed,
                                          banned_ids={t: banned_text_ids(text, t, given) for t in seq_targets},
                                          groups={"boxes": [box_start_ids(text)]})
        for target, seq in seqs.items():
            for i in range(n):
                ids = seq.tokens[i, :seq.lengths[i]]
                results[i].setdefault("tokens", {})[target] = ids.tolist()
                if target == "boxes":
                    boxes, scores = boxes_from_ids(text, ids, seq.logprobs[i, :seq.lengths[i]], image_size)
                    results[i]["boxes"], results[i]["box_scores"] = boxes, scores
                else:
                    results[i][target] = text.decode(ids)
    for target in targets:
        if target in seq_targets:
            continue
        grid = decoder.generate_grid(enc, target, steps=options.refine_steps,
                                     temperature=options.temperature, seed=options.seed)
        key = "segmentation" if target == "segmentation" else "image"
        arrays = _tok(tokenizers, key).decode(grid.tokens, image_size)
        for i in range(n):
            results[i].setdefault("tokens", {})[target] = grid.tokens[i].tolist()
            results[i][target] = np.asarray(arrays[i])
    return results
