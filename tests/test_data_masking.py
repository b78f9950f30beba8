"""4M masking invariants on tokenised examples the test makes itself."""

import numpy as np
import pytest

from medscale.data.batch import check_batch
from medscale.data.masking import EOS, START, Masker, parse_mixture
from medscale.errors import UserError

MODS = [("image", "image", 64), ("caption", "sequence", 48), ("boxes", "sequence", 24),
        ("segmentation", "image", 64)]
SENT = 4  # first sentinel id


def make_examples(B, rng, cap_lens=None, box_lens=None, present=(1, 1, 1, 1)):
    ex = {}
    for (name, kind, n), p in zip(MODS, present):
        if kind == "image":
            ex[name] = rng.integers(0, 100, (B, n)).astype(np.int32)
            ex[name + "_len"] = np.full(B, n * p, np.int32)
        else:
            lens = (cap_lens if name == "caption" else box_lens)
            lens = rng.integers(1, n + 1, B) if lens is None else np.full(B, lens)
            lens = lens * p
            toks = rng.integers(100, 500, (B, n)).astype(np.int32)  # never special ids
            toks[np.arange(n)[None] >= lens[:, None]] = 0
            ex[name], ex[name + "_len"] = toks, lens.astype(np.int32)
    return ex


def segments(batch, i, side, m):
    valid = batch[f"{side}_valid"][i] & (batch[f"{side}_modality"][i] == m)
    return np.nonzero(valid)[0]


@pytest.mark.parametrize("mixture", ["all2all:1", "image2all:1", "all2all:0.5,image2all:0.5"])
def test_fixed_shapes_budgets_and_disjoint_image_targets(mixture):
    rng = np.random.default_rng(0)
    B, Le, Ld = 64, 64, 48
    masker = Masker(MODS, Le, Ld, alpha=0.5, mixture=mixture, num_sentinels=16)
    ex = make_examples(B, rng)
    batch = masker(ex, np.random.default_rng(1))
    check_batch(batch, B, Le, Ld)
    full_enc = 0
    for i in range(B):
        # padding carries zeros; counts per modality sum to the valid totals which never exceed the budgets
        for side, L in (("enc", Le), ("dec", Ld)):
            v = batch[f"{side}_valid"][i]
            assert v.sum() <= L
            assert sum(len(segments(batch, i, side, m)) for m in range(4)) == v.sum()
            assert (batch[f"{side}_modality"][i][~v] == 0).all() and (batch[f"{side}_pos"][i][~v] == 0).all()
            # each modality's tokens are contiguous
            mods = batch[f"{side}_modality"][i][v]
            assert (np.diff(mods) >= 0).all()
        full_enc += batch["enc_valid"][i].all()
        for m, (name, kind, n) in enumerate(MODS):
            e, d = segments(batch, i, "enc", m), segments(batch, i, "dec", m)
            assert (batch["enc_pos"][i][e] < n).all() and (batch["dec_pos"][i][d] < n).all()
            if kind == "image":
                ep, dp = batch["enc_pos"][i][e], batch["dec_pos"][i][d]
                assert not set(ep) & set(dp), "image targets among image inputs"
                assert len(set(ep)) == len(ep) and len(set(dp)) == len(dp)
                assert np.array_equal(batch["enc_tokens"][i][e], ex[name][i][ep])
                assert np.array_equal(batch["dec_target"][i][d], ex[name][i][dp])
                assert not batch["dec_causal"][i][d].any() and (batch["dec_input"][i][d] == 0).all()
            elif len(d):
                assert batch["dec_causal"][i][d].all()
                assert np.array_equal(batch["dec_pos"][i][d], np.arange(len(d)))
                tgt, inp = batch["dec_target"][i][d], batch["dec_input"][i][d]
                assert inp[0] == START and np.array_equal(inp[1:], tgt[:-1])
        if mixture == "image2all:1":
            assert (batch["enc_modality"][i][batch["enc_valid"][i]] == 0).all()
            assert len(segments(batch, i, "dec", 0)) == 0
    # with 64 + 64 + sequences available, the encoder budget is filled almost always
    assert full_enc >= 0.9 * B


def test_span_masking_reconstructs_the_sequence():
    rng = np.random.default_rng(5)
    mods = [("caption", "sequence", 40)]
    masker = Masker(mods, 64, 64, alpha=1.0, mixture="all2all:1", num_sentinels=16)
    ex = {"caption": rng.integers(100, 500, (32, 40)).astype(np.int32), "caption_len": np.full(32, 40, np.int32)}
    spans = 0
    for seed in range(10):
        batch = masker(ex, np.random.default_rng(seed))
        for i in range(32):
            inp = batch["enc_tokens"][i][batch["enc_valid"][i]]
            tgt = batch["dec_target"][i][batch["dec_valid"][i]]
            if len(inp) == 0 or len(tgt) == 0 or tgt[0] != SENT:
                continue
            # budgets allow the whole sequence here, so nothing is cut: rebuild it from sentinels
            assert tgt[-1] == EOS
            pieces, k = {}, None
            for t in tgt[:-1]:
                if SENT <= t < SENT + 16:
                    k = t
                    pieces[k] = []
                else:
                    pieces[k].append(t)
            out = []
            for t in inp:
                out.extend(pieces[t] if SENT <= t < SENT + 16 else [t])
            assert np.array_equal(out, ex["caption"][i]), (inp, tgt)
            assert list(pieces) == sorted(pieces) and len(inp) + len(tgt) == 40 + 2 * len(pieces) + 1
            spans += 1
    assert spans > 20


def test_budget_larger_than_tokens_pads():
    rng = np.random.default_rng(2)
    masker = Masker(MODS, 64, 48, mixture="all2all:1")
    ex = make_examples(8, rng, cap_lens=3, box_lens=2, present=(0, 1, 1, 0))
    batch = masker(ex, np.random.default_rng(0))
    check_batch(batch, 8, 64, 48)
    total = batch["enc_valid"].sum(1) + batch["dec_valid"].sum(1)
    # caption: 3 tokens + at most 2 sentinels on each side + eos; boxes: 2 + 1 + 1 + eos
    assert (total <= (3 + 2 * 2 + 1) + (2 + 2 * 1 + 1)).all()
    assert (batch["enc_valid"].sum(1) < 64).all()
    # no modality at all -> all padding, no crash
    ex0 = make_examples(4, rng, present=(0, 0, 0, 0))
    b0 = masker(ex0, np.random.default_rng(0))
    assert not b0["enc_valid"].any() and not b0["dec_valid"].any()


def test_seeded_and_deterministic():
    ex = make_examples(16, np.random.default_rng(3))
    m = Masker(MODS, 64, 48, mixture="all2all:0.5,image2all:0.5")
    a, b = m(ex, np.random.default_rng(7)), m(ex, np.random.default_rng(7))
    c = m(ex, np.random.default_rng(8))
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert any(not np.array_equal(a[k], c[k]) for k in a)


def test_task_batch_puts_all_tokens_in_place():
    ex = make_examples(4, np.random.default_rng(4))
    m = Masker(MODS, 64, 48)
    b = m.task(ex, inputs=("image",), targets=("caption",))
    check_batch(b, 4, 64, 48)
    assert b["enc_valid"].all() and (b["enc_modality"] == 0).all()
    for i in range(4):
        n = ex["caption_len"][i]
        d = b["dec_valid"][i]
        assert d.sum() == min(n + 1, 48) and (n == 48 or b["dec_target"][i][n] == EOS)
        assert np.array_equal(b["dec_target"][i][:min(n, 48)], ex["caption"][i][:min(n, 48)])
        assert (b["dec_pos"][i][d] < 48).all()
    with pytest.raises(UserError):
        m.task(ex, inputs=("xray",), targets=("caption",))


def test_mixture_errors():
    names = ("image", "caption")
    assert parse_mixture("all2all:0.5,image2all:0.5", names) == [(None, 0.5), ("image", 0.5)]
    for bad in ("all2all:x", "foo2all:1", "all2all:0", "image:1", ""):
        with pytest.raises(UserError):
            parse_mixture(bad, names)
    with pytest.raises(UserError):
        Masker(MODS, 64, 48, alpha=0.0)
