"""The caption grammar's exact entropy against Monte-Carlo, and the per-token floors.

Monte-Carlo check: N captions sampled by the grammar itself (``write_caption`` with a real generator) for fixed
facts; the plug-in entropy ``H_hat`` of their empirical distribution. For K equally likely captions (the
grammar's choices are uniform ``integers(k)`` draws, and every exact distribution below is uniform) ``H_hat <=
log K = H`` always, and ``2 N (H - H_hat)`` is asymptotically chi-square with K - 1 degrees of freedom (the
G-test statistic); its 1 - 1e-6 quantile for K - 1 <= 5 is below 36, so ``0 <= H - H_hat <= 18 / N`` fails by
chance with probability under 1e-6. A wrong exact value (a choice missed or counted twice) is off by at least
log(3/2) = 0.405 nats, far outside that band."""

import math

import numpy as np
import pytest

from medscale.configs import load_config, spec_from_config
from medscale.data import entropy
from medscale.data.masking import Masker
from medscale.data.pipeline import build_data
from medscale.data.synthetic import write_caption

N = 20_000
EPS = 8 * np.finfo(np.float64).eps  # sums and logs of a few probabilities in float64
NORMAL = {"style": "ct", "region": "head", "n_lesions": 0, "lesions": []}
LESION = {"size": "small", "shape": "oval", "intensity": "dark", "location": "right upper", "organ": "liver",
          "mm": 15}
ONE = {"style": "xray", "region": "abdomen", "n_lesions": 1, "lesions": [LESION]}
THREE = {"style": "mri", "region": "chest", "n_lesions": 3, "lesions": [LESION, dict(LESION, size="large"),
                                                                       dict(LESION, intensity="bright")]}


@pytest.mark.parametrize(("facts", "k"), [(NORMAL, 6), (ONE, 2), (THREE, 2)])
def test_exact_entropy_matches_monte_carlo(facts, k):
    variants = entropy.caption_variants(facts)
    assert len(variants) == k and math.isclose(sum(p for _, p in variants), 1.0, rel_tol=1e-12)
    exact = entropy.caption_entropy(facts)
    assert math.isclose(exact, math.log(k), rel_tol=4 * np.finfo(np.float64).eps)
    rng = np.random.default_rng(7)
    counts: dict = {}
    for _ in range(N):
        c = write_caption(facts, rng)
        counts[c] = counts.get(c, 0) + 1
    assert set(counts) == {t for t, _ in variants}  # the enumeration is the grammar's support
    plug_in = entropy.entropy(np.array(list(counts.values())) / N)
    assert 0.0 <= exact - plug_in <= 18.0 / N, (exact, plug_in)


def test_enumeration_refuses_draws_it_cannot_enumerate():
    rng = entropy._Scripted((1,))
    assert rng.integers(3) == 1 and rng.integers(2, 5) == 2 and rng.arities == [3, 3]
    with pytest.raises(TypeError, match="rng.random"):
        rng.random()


class Words:
    """A tokenizer of whole words (ids from 10), enough to count target tokens by hand."""

    def __init__(self):
        self.ids: dict = {}

    def encode(self, text):
        return [self.ids.setdefault(w, 10 + len(self.ids)) for w in text.split()]


def test_target_terms_count_prefixes_spans_and_eos():
    tok = Words()
    masker = Masker([("caption", "sequence", 64)], 32, 32)
    v = entropy.token_variants(NORMAL, tok, 64)
    lengths = sorted(len(ids) for ids, _ in v)  # "ct scan"/"ct image" x three tails
    # whole caption as target: entropy log 6, tokens the mean length + </s>
    h, t = entropy.target_terms(v, 0, 64)
    assert h == pytest.approx(math.log(6), rel=EPS) and t == pytest.approx(np.mean(lengths) + 1, rel=EPS)
    # a one-token prefix: "ct" in every variant -> no entropy; two tokens: "scan" / "image" -> log 2
    assert entropy.target_terms(v, 0, 1) == (pytest.approx(0.0, abs=EPS), pytest.approx(1.0, rel=EPS))
    h, t = entropy.target_terms(v, 0, 2)
    assert h == pytest.approx(math.log(2), rel=EPS) and t == pytest.approx(2.0, rel=EPS)
    # not a target: nothing; span-masked: entropy 0, tokens = sentinels + masked + </s>
    assert entropy.target_terms(v, 5, 0) == (0.0, 0.0)
    h, t = entropy.target_terms(v, 4, 6, masker)
    want = np.mean([min(sum(masker.span_sizes(len(ids), min(4, len(ids)), 6)) + 1, 6) for ids, _ in v])
    assert h == 0.0 and t == pytest.approx(want, rel=EPS)
    # a caption cut by the token cache (max_tokens - 1 tokens) keeps its first choice only
    cut = entropy.token_variants(NORMAL, tok, 4)  # 3 tokens: "ct scan of" / "ct image of"
    assert len(cut) == 2
    assert entropy.target_terms(cut, 0, 64) == (pytest.approx(math.log(2), rel=EPS), pytest.approx(4.0, rel=EPS))
    assert entropy.target_terms(cut, 0, 3) == (pytest.approx(math.log(2), rel=EPS), pytest.approx(3.0, rel=EPS))


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("e")
    cfg = load_config("tiny", [f"data.data_dir={root}", "data.num_eval=64", "data.tokenizer_examples=200",
                               "data.vq_iters=2", "data.image_vocab=16", "data.seg_vocab=16", "data.stream_chunk=64"])
    return build_data(cfg, spec_from_config(cfg))


def test_floors_on_the_validation_set(data):
    facts = [e["facts"] for e in data.examples("validation")]
    whole = data.caption_target_floor()
    hs = [entropy.caption_entropy(f) for f in facts]
    # per caption: log 2 (style synonym), plus log 3 (normal-study phrasing) without lesions
    assert whole["nats_per_caption"] == pytest.approx(np.mean(hs), rel=64 * EPS)
    assert all(h == pytest.approx(math.log(2) + (math.log(3) if f["n_lesions"] == 0 else 0.0), rel=EPS)
               for h, f in zip(hs, facts))
    assert 0 < whole["nats_per_token"] < whole["nats_per_caption"] / 10  # captions hold > 10 tokens
    floor = data.caption_entropy_floor("validation", 16, 4)
    assert floor is not None and 0 < floor < 1
    assert data.caption_entropy_floor("validation", 16, 4) == floor  # memoised, deterministic
    # the budgets the floor reads are the ones the eval batches were masked with
    batches = data.eval_batches("validation", 16, 4)
    cap = data.spec.modality_index("caption")
    arrays = data.tokens("validation")
    budgets = []
    for b in range(4):
        idx = np.arange(b * 16, (b + 1) * 16) % len(arrays["caption"])
        again = data.masker({k: v[idx] for k, v in arrays.items()}, np.random.default_rng([20240611, b]),
                            budgets)
        assert all(np.array_equal(again[k], batches[b][k]) for k in again)
    measured = sum(int(((b["dec_modality"] == cap) & b["dec_valid"]).sum()) for b in batches)
    expected = 0.0
    for f, rec in zip(facts, budgets):
        a, bb = rec["caption"]
        expected += entropy.target_terms(entropy.token_variants(f, data.tokenizers.text, 48), a, bb,
                                         data.masker)[1]
    # the expected target tokens the floor divides by are the measured ones up to the grammar's choices (the
    # synonyms differ by a token or two in ~30 and only in part of the captions: 0.3% measured on 64 captions)
    assert expected == pytest.approx(measured, rel=0.02)
