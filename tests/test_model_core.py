"""The model: exact parameter counts, the 4M masks (by perturbation), the sliced-softmax loss, remat, bf16, and
the plain path's train step (no custom call, no optimization barrier).

The model runs with the ops the training step would choose here (the CPU kernels, or the plain path with
``MEDSCALE_CPU_KERNELS=0``). Float32 tolerances: ``FACTOR * sqrt(TERMS) * eps`` relative to the largest
magnitude compared, for results whose summation order the implementation (and the CPU's vector width) chooses.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from medscale.configs.ladder import ladder_names, ladder_shape
from medscale.model.encdec import EncoderDecoder, position_table
from medscale.model.sharding import make_mesh
from medscale.spec import ModelSpec
from medscale.train.batches import random_batch
from medscale.train.step import choose_ops, count_params, init_params

SMALL = ModelSpec(d_model=32, enc_layers=1, dec_layers=2, num_heads=2, d_ff=64, enc_len=40, dec_len=24)
EPS = float(np.finfo(np.float32).eps)
FACTOR = 8
# the longest float32 sums in SMALL's loss and gradients: a weight gradient over the 72 decoder tokens of a
# 3-row batch (d_ff is 64); a gradient passes through at most 4 such stages (head, 2 decoder layers, encoder)
TERMS = 72 * 4
REL = FACTOR * np.sqrt(TERMS) * EPS
CHANGED = 8 * EPS  # hidden states are O(1) (after LayerNorm): a perturbation that reaches one moves it more


def _assert_close(got, want):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    assert np.abs(got - want).max() <= REL * np.abs(want).max(), (np.abs(got - want).max(), np.abs(want).max())


def _model(spec=SMALL, **kw):
    return EncoderDecoder(spec, rngs=nnx.Rngs(0), **kw)


class Jitted:
    """The model's methods as jit-ed functions of (params, batch) (eager NNX is slow on 2 cores)."""

    def __init__(self, **kw):
        ops = choose_ops(kw.get("dtype", "float32"), make_mesh((1, 1, 1), jax.devices()[:1]))
        self.graphdef, self.params = init_params(SMALL, 0, ops=ops, **kw)
        g = self.graphdef
        self.hidden = jax.jit(lambda p, b: nnx.merge(g, p).hidden(b))
        self.logits = jax.jit(lambda p, b: nnx.merge(g, p)(b))
        self.loss = jax.jit(lambda p, b: nnx.merge(g, p).loss(b))
        self.grad = jax.jit(jax.value_and_grad(lambda p, b: nnx.merge(g, p).loss(b)[0]))


def _batch(spec=SMALL, b=3, seed=1):
    return {k: jnp.asarray(v) for k, v in random_batch(spec, b, seed).items()}


@pytest.mark.parametrize("name", ladder_names())
def test_param_count_equals_accounting_for_every_ladder_size(name):
    from medscale import accounting

    mlps = ("gelu", "swiglu") if ladder_names().index(name) < 3 else ("gelu",)
    for mlp in mlps:
        spec = ModelSpec(**dict(ladder_shape(name), mlp=mlp), name=name)
        assert count_params(spec) == accounting.param_counts(spec)["total"], (name, mlp)


def test_param_count_by_hand():
    d, f, m, v = 32, 64, SMALL.num_modalities, SMALL.vocab_total
    enc = 2 * 2 * d + 4 * d * d + 2 * d * f
    dec = 3 * 2 * d + 8 * d * d + 2 * d * f
    expected = v * d + 2 * m * d + d + enc + 2 * dec + 2 * 2 * d + d * v
    assert count_params(SMALL) == expected
    sw = SMALL.replace(mlp="swiglu")
    assert count_params(sw) == expected + 3 * d * f


def test_positions_are_constants_2d_for_images_1d_for_sequences():
    t = position_table(SMALL).reshape(SMALL.num_modalities, -1, SMALL.d_model)
    # image grid 8x8: tokens in one row share the row half of the channels
    img = t[0, :64].reshape(8, 8, -1)
    half = SMALL.d_model // 2
    assert np.allclose(img[3, 0, :half], img[3, 7, :half]) and not np.allclose(img[3, 0, half:], img[3, 7, half:])
    assert np.allclose(img[0, 5, half:], img[6, 5, half:])
    # sequence: distinct 1D rows
    assert not np.allclose(t[1, 3], t[1, 4])
    _, state = nnx.split(nnx.eval_shape(lambda: _model()))
    sizes = [int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.to_pure_dict(state))]
    assert t.size not in sizes  # not a parameter


def _two_sequence_batch():
    """Decoder: segmentation (image-like) slots 0..5, caption (causal) 6..13, boxes (causal) 14..19, pad."""
    spec = SMALL
    b = {k: np.array(v) for k, v in random_batch(spec, 1, 3).items()}
    mod = np.zeros(spec.dec_len, np.int32)
    mod[0:6], mod[6:14], mod[14:20] = 3, 1, 2
    pos = np.zeros(spec.dec_len, np.int32)
    pos[0:6] = [1, 4, 9, 10, 20, 33]
    pos[6:14] = np.arange(8)
    pos[14:20] = np.arange(6)
    valid = np.arange(spec.dec_len) < 20
    causal = (mod == 1) | (mod == 2)
    causal &= valid
    rng = np.random.default_rng(0)
    b["dec_modality"][0] = np.where(valid, mod, 0)
    b["dec_pos"][0] = np.where(valid, pos, 0)
    b["dec_valid"][0] = valid
    b["dec_causal"][0] = causal
    b["dec_input"][0] = np.where(causal, rng.integers(0, 64, spec.dec_len), 0)
    b["dec_target"][0] = np.where(valid, rng.integers(0, 64, spec.dec_len), 0)
    return b


@pytest.fixture(scope="module")
def f32():
    return Jitted()


def test_decoder_mask_by_perturbation(f32):
    model = f32
    base = _two_sequence_batch()

    def hidden(batch):
        return np.asarray(model.hidden(model.params, {k: jnp.asarray(v) for k, v in batch.items()}))[0]

    h0 = hidden(base)
    # 1. a caption token cannot see later caption tokens
    b = {k: v.copy() for k, v in base.items()}
    b["dec_input"][0, 10] += 1
    h = hidden(b)
    changed = np.abs(h - h0).max(-1) > CHANGED
    assert not changed[6:10].any(), "caption positions before 10 saw a later token"
    assert changed[10:14].all(), "caption positions from 10 on must see it"
    # 2. ... nor other modalities' decoder tokens (boxes, segmentation)
    assert not changed[14:20].any() and not changed[0:6].any()
    b = {k: v.copy() for k, v in base.items()}
    b["dec_input"][0, 15] += 1
    changed = np.abs(hidden(b) - h0).max(-1) > CHANGED
    assert not changed[:15].any() and changed[15:20].all()
    # 3. image-like targets attend bidirectionally within their modality only
    b = {k: v.copy() for k, v in base.items()}
    b["dec_pos"][0, 5] = 40
    changed = np.abs(hidden(b) - h0).max(-1) > CHANGED
    assert changed[0:6].all() and not changed[6:20].any()
    # 4. encoder padding is invisible; encoder content is visible to all valid decoder positions
    b = {k: v.copy() for k, v in base.items()}
    pad = np.flatnonzero(~b["enc_valid"][0])[0]
    b["enc_tokens"][0, pad] = 7
    b["enc_modality"][0, pad] = 1
    assert np.abs(hidden(b) - h0).max() < CHANGED
    b = {k: v.copy() for k, v in base.items()}
    b["enc_tokens"][0, 0] = (b["enc_tokens"][0, 0] + 1) % 64
    assert (np.abs(hidden(b) - h0).max(-1)[:20] > CHANGED).all()


def test_loss_is_log_softmax_over_own_modality_slice_and_grads_match_autodiff(f32):
    model = f32
    batch = _batch()
    loss, aux = model.loss(model.params, batch)
    logits = np.asarray(model.logits(model.params, batch), np.float64)
    spec = SMALL
    mod = np.asarray(batch["dec_modality"])
    idx = np.asarray(spec.vocab_offsets)[mod] + np.asarray(batch["dec_target"])
    valid = np.asarray(batch["dec_valid"])
    for m, (o, s) in enumerate(zip(spec.vocab_offsets, spec.vocab_sizes)):
        inside = np.isfinite(logits[mod == m])
        assert inside[:, o:o + s].all() and inside.sum() == inside.shape[0] * s
    mx = logits.max(-1, keepdims=True)
    lsm = logits - mx - np.log(np.exp(logits - mx).sum(-1, keepdims=True))
    nll = -np.take_along_axis(lsm, idx[..., None], -1)[..., 0]
    assert np.isclose(float(loss), (nll * valid).sum() / valid.sum(), rtol=REL, atol=0)
    for m in range(spec.num_modalities):
        sel = valid & (mod == m)
        assert np.isclose(float(aux["count"][m]), sel.sum())
        assert np.isclose(float(aux["sum"][m]), (nll * sel).sum(), rtol=REL, atol=0)

    params = model.params

    def reference(p):
        lg = model.logits(p, batch)
        ls = jax.nn.log_softmax(jnp.where(jnp.isfinite(lg), lg, -1e30), -1)
        n = -jnp.take_along_axis(ls, jnp.asarray(idx)[..., None], -1)[..., 0]
        return jnp.sum(n * valid) / valid.sum()

    g_ref = jax.jit(jax.grad(reference))(params)
    g = model.grad(params, batch)[1]
    for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(g_ref)):
        _assert_close(a, b)


@pytest.mark.slow
def test_remat_gives_the_same_loss_and_grads(f32):
    batch = _batch()
    l0, g0 = f32.grad(f32.params, batch)
    for remat in ("full", "save_dots"):
        m = Jitted(remat=remat)
        l1, g1 = m.grad(m.params, batch)
        assert np.isclose(float(l0), float(l1), rtol=REL, atol=0)
        for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g0)):
            _assert_close(a, b)


def test_bfloat16_compute_keeps_float32_params_and_is_close(f32):
    batch = _batch()
    m32, m16 = f32, Jitted(dtype="bfloat16")
    assert {x.dtype for x in jax.tree.leaves(m16.params)} == {jnp.dtype(jnp.float32)}
    l32, l16 = float(m32.loss(m32.params, batch)[0]), float(m16.loss(m16.params, batch)[0])
    # a few bfloat16 roundings (eps 2**-7) of the loss at most
    assert np.isfinite(l16) and abs(l16 - l32) < 4 * float(jnp.finfo(jnp.bfloat16).eps) * l32


@pytest.mark.slow
def test_attention_implementations_agree_with_dense(f32):
    """blockwise is the same function; local with a window wider than the encoder equals dense, and its
    decoder self- and cross-attention sites use the exact function (site_implementation)."""
    batch = _batch()
    ref = float(f32.loss(f32.params, batch)[0])
    for kw in ({"attention": "blockwise", "attention_block": 16},
               {"attention": "local", "attention_window": 4 * SMALL.enc_len, "attention_block": 16}):
        m = Jitted(**kw)
        assert np.isclose(float(m.loss(f32.params, batch)[0]), ref, rtol=REL, atol=0), kw


def test_plain_step_has_no_custom_call_and_no_optimization_barrier(monkeypatch):
    """With the CPU kernels off, the default model's train step lowers to plain XLA operations only."""
    from medscale.configs import spec_from_config
    from medscale.configs.base import get_config
    from medscale.kernels.cpu import CpuOps
    from medscale.train import step as S

    monkeypatch.setenv("MEDSCALE_CPU_KERNELS", "0")
    spec = spec_from_config(get_config())
    prog = S.build(spec, S.OptConfig())
    text = prog.step.lower(prog.abstract_state, S.abstract_batch(prog, 2)).as_text()
    assert "stablehlo.dot_general" in text
    for op in ("optimization_barrier", "custom_call", "custom-call"):
        assert op not in text, op
    # the CPU implementation, even without its native kernels, is not plain (so the checks above can fail)
    graphdef, params = init_params(SMALL, 0, ops=CpuOps(attention_kernel=False, matmul_kernel=False))
    batch = _batch()
    cpu = jax.jit(jax.grad(lambda p: nnx.merge(graphdef, p).loss(batch)[0])).lower(params).as_text()
    assert "optimization_barrier" in cpu
