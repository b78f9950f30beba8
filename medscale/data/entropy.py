"""The synthetic captions' irreducible entropy: what no model can predict even knowing every scene fact.

The caption grammar (``synthetic.write_caption``) writes a caption from the scene's facts and a few uniform random
choices (a synonym for the imaging style; one of three phrasings of a normal study). Given the facts, the
caption's distribution is therefore known exactly: :func:`caption_variants` enumerates it by running the grammar
itself with every sequence of choices (a stand-in generator answers its ``integers(k)`` calls), and
:func:`caption_entropy` is its entropy in nats.

Per token (docs/data.md, "The caption entropy floor"): the caption loss is measured per decoder target token,
so a floor per token is ``sum_i H_i / sum_i E[T_i]`` over the evaluated examples, ``H_i`` the entropy of example
``i``'s caption target given the facts and ``T_i`` its target tokens (``</s>`` included). :func:`target_floor`
gives it for whole captions as targets (the ``image -> caption`` task); :func:`masked_floor` for the targets
4M masking actually makes (a prefix cut to the target budget; span-masked captions, whose visible part may
reveal the choices, counted with entropy 0), a lower bound of the measured caption loss in expectation over
the grammar's choices.
"""

from __future__ import annotations

import math

from medscale.data.masking import EOS
from medscale.data.synthetic import write_caption


class _Scripted:
    """Stands in for the generator ``write_caption`` draws from: answers ``integers`` with scripted choices
    (0 past the script) and records each draw's number of outcomes."""

    def __init__(self, script):
        self.script, self.arities = tuple(script), []

    def integers(self, low, high=None):
        lo, hi = (0, int(low)) if high is None else (int(low), int(high))
        k = len(self.arities)
        self.arities.append(hi - lo)
        return lo + (self.script[k] if k < len(self.script) else 0)

    def __getattr__(self, name):
        raise TypeError(f"the caption grammar draws with rng.{name}; caption_variants enumerates "
                        "rng.integers(k) only (uniform choices)")


def caption_variants(facts: dict) -> list[tuple[str, float]]:
    """Every caption the grammar can write for ``facts``, with its probability (distinct strings; sums to 1)."""
    out: dict[str, float] = {}

    def walk(script):
        rng = _Scripted(script)
        text = write_caption(facts, rng)
        if len(rng.arities) > len(script):
            for c in range(rng.arities[len(script)]):
                walk((*script, c))
            return
        p = math.prod(1.0 / a for a in rng.arities)
        out[text] = out.get(text, 0.0) + p

    walk(())
    return sorted(out.items())


def entropy(probs) -> float:
    """Shannon entropy in nats of a distribution (probabilities)."""
    return float(-sum(p * math.log(p) for p in probs if p > 0))


def caption_entropy(facts: dict) -> float:
    """H(caption | facts) in nats: the entropy of the grammar's choices that give distinct captions."""
    return entropy(p for _, p in caption_variants(facts))


def token_variants(facts: dict, tokenizer, max_tokens: int) -> list[tuple[tuple[int, ...], float]]:
    """The caption's distribution as the token caches hold it: whitespace collapsed, encoded by ``tokenizer``,
    cut to ``max_tokens - 1`` tokens (room for ``</s>``); equal token sequences merged."""
    out: dict[tuple[int, ...], float] = {}
    for text, p in caption_variants(facts):
        ids = tuple(tokenizer.encode(" ".join(text.split()))[: int(max_tokens) - 1])
        out[ids] = out.get(ids, 0.0) + p
    return list(out.items())


def target_terms(variants, a: int, b: int, masker=None) -> tuple[float, float]:
    """(entropy H in nats, expected tokens E[T]) of one example's caption target under the budgets ``a``
    (input, before it is cut to the caption's length; 0: not an input) and ``b`` (target; 0: not a target), as
    ``masking.Masker`` makes it: input only -> no target; target only -> the first ``b`` of caption + ``</s>``;
    both -> span masking (the spans' sentinels, tokens and ``</s>``, cut to ``b``), entropy counted as 0 (the
    visible part may give the choices away; 0 keeps the bound valid)."""
    if b <= 0:
        return 0.0, 0.0
    targets: dict[tuple[int, ...], float] = {}
    expected, spans = 0.0, False
    for ids, p in variants:
        n = len(ids)
        if a == 0 or n < 2:
            t = (*ids, EOS)[:b]
            targets[t] = targets.get(t, 0.0) + p
            expected += p * len(t)
        else:
            spans = True
            k, s = masker.span_sizes(n, min(a, n), b)
            expected += p * min(s + k + 1, b)
    return (0.0 if spans else entropy(targets.values())), expected


def target_floor(facts_list, tokenizer, max_tokens: int) -> dict:
    """The floor of whole captions as targets (every token and ``</s>``) over the scenes ``facts_list``:
    ``{"nats_per_caption", "tokens_per_caption", "nats_per_token"}`` (means over the scenes; per token: the
    ratio of the sums)."""
    h = t = 0.0
    for facts in facts_list:
        hi, ti = target_terms(token_variants(facts, tokenizer, max_tokens), 0, int(max_tokens))
        h, t = h + hi, t + ti
    n = max(len(facts_list), 1)
    return {"nats_per_caption": h / n, "tokens_per_caption": t / n, "nats_per_token": h / t if t else None}


def masked_floor(facts_list, budgets, tokenizer, max_tokens: int, masker, name: str = "caption") -> float | None:
    """The floor of the caption targets of masked batches: ``sum H_i / sum E[T_i]`` over the examples
    (``facts_list[i]`` and ``budgets[i]``, the ``Masker``'s record of the batches, in the same order); None when
    no example has a caption target."""
    h = t = 0.0
    for facts, rec in zip(facts_list, budgets):
        if name not in rec:
            continue
        a, b = rec[name]
        hi, ti = target_terms(token_variants(facts, tokenizer, max_tokens), a, b, masker)
        h, t = h + hi, t + ti
    return h / t if t > 0 else None
