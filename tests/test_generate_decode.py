"""Cached decoding against the model's own forward pass; fixed shapes (no recompilation); sampling rules."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from medscale.spec import ModelSpec, default_modalities

B = 3


@pytest.fixture(scope="module")
def decoder():
    from flax import nnx

    from medscale.generate.decode import Decoder
    from medscale.model.encdec import EncoderDecoder

    mods = default_modalities(text_vocab=96, image_vocab=32, seg_vocab=16, grid=(4, 4), caption_tokens=12,
                              box_tokens=8)
    spec = ModelSpec(d_model=32, enc_layers=1, dec_layers=2, num_heads=2, d_ff=64, modalities=mods,
                     enc_len=16, dec_len=16, name="t")
    return Decoder(EncoderDecoder(spec, rngs=nnx.Rngs(0)))


def _enc(decoder, seed=0):
    rng = np.random.default_rng(seed)
    img = rng.integers(0, 32, (B, 16))
    cap = rng.integers(4, 96, (B, 5))
    valid = np.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]], bool)
    return decoder.encoder_inputs({"image": img, "caption": (cap, valid)})


def _forward_logits(decoder, enc, target, dec_input, dec_pos, causal):
    from flax import nnx

    spec = decoder.spec
    m = spec.modality_index(target)
    b, t = dec_input.shape
    batch = dict(enc)
    batch.update(dec_input=dec_input.astype(np.int32), dec_target=np.zeros((b, t), np.int32),
                 dec_modality=np.full((b, t), m, np.int32), dec_pos=dec_pos.astype(np.int32),
                 dec_valid=np.ones((b, t), bool), dec_causal=np.full((b, t), causal))
    fwd = jax.jit(lambda state, batch: nnx.merge(decoder.graphdef, state)(batch))
    logits = np.asarray(fwd(decoder.state, {k: jnp.asarray(v) for k, v in batch.items()}))
    off, size = spec.vocab_offsets[m], spec.vocab_sizes[m]
    return logits[..., off:off + size]


def test_cached_greedy_equals_full_forward(decoder):
    enc = _enc(decoder)
    res = decoder.generate_sequence(enc, "caption", start_id=2, eos_id=None)
    t = decoder.spec.modalities[1].max_tokens
    assert res.tokens.shape == (B, t) and res.tokens.dtype == np.int32
    assert (res.lengths == t).all() and (res.tokens >= 0).all() and (res.tokens < 96).all()
    # teacher-force the generated sequence through the model's full (uncached) forward pass
    dec_input = np.concatenate([np.full((B, 1), 2), res.tokens[:, :-1]], 1)
    logits = _forward_logits(decoder, enc, "caption", dec_input, np.tile(np.arange(t), (B, 1)), True)
    np.testing.assert_array_equal(logits.argmax(-1), res.tokens)
    logp = np.asarray(jax.nn.log_softmax(logits, -1))
    np.testing.assert_allclose(np.take_along_axis(logp, res.tokens[..., None], -1)[..., 0], res.logprobs,
                               atol=2e-5)


def test_eos_stops_rows_and_pads(decoder):
    enc = _enc(decoder, 1)
    free = decoder.generate_sequence(enc, "caption", start_id=2, eos_id=None)
    eos = int(free.tokens[0, 2])
    res = decoder.generate_sequence(enc, "caption", start_id=2, eos_id=eos)
    for r in range(B):
        hits = np.flatnonzero(free.tokens[r] == eos)
        want = int(hits[0]) if hits.size else free.tokens.shape[1]
        assert res.lengths[r] == want
        np.testing.assert_array_equal(res.tokens[r, :want], free.tokens[r, :want])
        assert (res.tokens[r, want:] == -1).all()
    assert res.lengths[0] <= 2


def test_joint_decoding_equals_separate(decoder):
    # caption and boxes decoded as rows of one batch give what each gives alone
    enc = _enc(decoder, 7)
    both = decoder.generate_sequences(enc, ["caption", "boxes"], start_id=2, eos_id=5)
    for t in ("caption", "boxes"):
        alone = decoder.generate_sequence(enc, t, start_id=2, eos_id=5)
        np.testing.assert_array_equal(both[t].tokens, alone.tokens)
        np.testing.assert_array_equal(both[t].lengths, alone.lengths)
        np.testing.assert_allclose(both[t].logprobs, alone.logprobs, atol=1e-5)
    assert both["boxes"].tokens.shape == (B, 8) and (both["boxes"].lengths <= 8).all()


def test_step_compiles_once_across_calls_and_options(decoder):
    from flax import nnx

    enc = _enc(decoder, 2)
    decoder.generate_sequence(enc, "caption", start_id=2, eos_id=None, max_len=4)
    n_step = decoder.step._cache_size()
    n_prefill = decoder.prefill._cache_size()
    for kw in ({"temperature": 1.0, "top_k": 5, "seed": 3}, {"temperature": 0.7, "top_k": 0, "seed": 4}, {}):
        decoder.generate_sequence(_enc(decoder, 5), "caption", start_id=2, eos_id=3, **kw)
        decoder.generate_sequence(_enc(decoder, 5), "caption", start_id=2, eos_id=3, banned_ids=[7, 8], **kw)
    assert decoder.step._cache_size() == n_step
    # a second Decoder of the same architecture (another checkpoint) reuses the compiled functions
    from medscale.generate.decode import Decoder

    other = Decoder(nnx.merge(decoder.graphdef, jax.tree.map(lambda x: x * 0.5, decoder.state)))
    other.generate_sequence(enc, "caption", start_id=2, eos_id=None, max_len=4)
    assert other.step is decoder.step and decoder.step._cache_size() == n_step
    assert decoder.prefill._cache_size() == n_prefill
    decoder.generate_grid(enc, "segmentation", steps=1)
    n_par = decoder.parallel._cache_size()
    decoder.generate_grid(_enc(decoder, 6), "segmentation", steps=4, temperature=1.0, seed=1)
    assert decoder.parallel._cache_size() == n_par


def test_sampling_rules(decoder):
    enc = _enc(decoder, 3)
    greedy = decoder.generate_sequence(enc, "caption", start_id=2, eos_id=None)
    top1 = decoder.generate_sequence(enc, "caption", start_id=2, eos_id=None, temperature=1.5, top_k=1, seed=9)
    np.testing.assert_array_equal(greedy.tokens, top1.tokens)  # top-1 sampling is greedy
    a = decoder.generate_sequence(enc, "caption", start_id=2, eos_id=None, temperature=2.0, seed=1)
    b = decoder.generate_sequence(enc, "caption", start_id=2, eos_id=None, temperature=2.0, seed=2)
    a2 = decoder.generate_sequence(enc, "caption", start_id=2, eos_id=None, temperature=2.0, seed=1)
    np.testing.assert_array_equal(a.tokens, a2.tokens)  # seeded
    assert (a.tokens != b.tokens).any()  # and random (96 ids, 36 draws at temperature 2)
    assert ((a.tokens >= 0) & (a.tokens < 96)).all()
    from medscale.generate.decode import _sample

    # constrained decoding: banned ids never appear, whatever the temperature
    banned = sorted(set(greedy.tokens.ravel().tolist()))
    for kw in ({}, {"temperature": 3.0, "seed": 5}):
        c = decoder.generate_sequence(enc, "caption", start_id=2, eos_id=None, banned_ids=banned, **kw)
        assert not np.isin(c.tokens, banned).any()
    # grouped greedy: singleton groups are argmax; a group of many small ids beats one larger id
    logits = jnp.log(jnp.asarray([[0.3, 0.2, 0.2, 0.2, 0.1]]))
    assert int(_sample(logits, jax.random.key(0), jnp.float32(0), jnp.int32(0))[0]) == 0
    group = jnp.asarray([[0, 1, 1, 1, 4]])  # ids 1-3 together hold 0.6 > 0.3
    assert int(_sample(logits, jax.random.key(0), jnp.float32(0), jnp.int32(0), group)[0]) == 1
    # top-k: every sampled token is among the k best of its step's logits

    logits = jax.random.normal(jax.random.key(0), (64, 50))
    s = np.asarray(_sample(logits, jax.random.key(1), jnp.float32(1.0), jnp.int32(3)))
    top3 = np.argsort(-np.asarray(logits), -1)[:, :3]
    assert all(s[i] in top3[i] for i in range(64))


def test_grid_one_pass_is_argmax_and_refinement_fills_all(decoder):
    enc = _enc(decoder, 4)
    one = decoder.generate_grid(enc, "segmentation", steps=1)
    assert one.tokens.shape == (B, 16) and one.tokens.dtype == np.int32
    logits = _forward_logits(decoder, enc, "segmentation", np.zeros((B, 16)), np.tile(np.arange(16), (B, 1)),
                             False)
    np.testing.assert_array_equal(one.tokens, logits.argmax(-1))
    ref = decoder.generate_grid(enc, "segmentation", steps=4)
    assert ref.tokens.shape == (B, 16) and ((ref.tokens >= 0) & (ref.tokens < 16)).all()
    assert (ref.confidence > 0).all()  # every position was fixed by some step
    # the first step keeps the most confident one-pass predictions: n - floor(n cos(pi/8)) = 2 per row
    for r in range(B):
        best = np.argsort(-one.confidence[r], kind="stable")[:2]
        np.testing.assert_array_equal(ref.tokens[r, best], one.tokens[r, best])


def test_bad_requests(decoder):
    enc = _enc(decoder)
    with pytest.raises(ValueError, match="image-like"):
        decoder.generate_sequence(enc, "segmentation", start_id=2, eos_id=3)
    with pytest.raises(ValueError, match="sequence"):
        decoder.generate_grid(enc, "caption")
    with pytest.raises(ValueError, match="unknown input"):
        decoder.encoder_inputs({"ultrasound": np.zeros((1, 3))})
