"""The learning-rate schedule rides in the train state: it equals optax's warmup-cosine schedule, the step equals
optax's AdamW with that schedule, and one compiled step serves runs of different lengths and peak rates."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from medscale.spec import ModelSpec
from medscale.train import step as S
from medscale.train.batches import random_batch

EPS = float(np.finfo(np.float32).eps)
SPEC = ModelSpec(d_model=32, enc_layers=1, dec_layers=1, num_heads=2, d_ff=64, enc_len=16, dec_len=8)


@pytest.mark.parametrize("lr,warm,total,ratio", [(3e-3, 10, 100, 0.1), (1e-2, 0, 7, 0.0), (5e-4, 99, 100, 0.5),
                                                 (2e-3, 200, 50, 0.1)])
def test_lr_at_equals_optax_warmup_cosine(lr, warm, total, ratio):
    oc = S.OptConfig(lr=lr, warmup_steps=warm, total_steps=total, final_lr_ratio=ratio)
    w = max(0, min(warm, total - 1))
    want = optax.warmup_cosine_decay_schedule(init_value=0.0 if w else lr, peak_value=lr, warmup_steps=w,
                                              decay_steps=max(total, w + 1), end_value=lr * ratio)
    sched = jax.jit(S.lr_schedule(oc))
    for count in [0, 1, w - 1, w, w + 1, total // 2, total - 1, total, total + 5]:
        if count < 0:
            continue
        # float32 arithmetic on both sides (a division, a cosine): a few ulps of the peak rate
        assert float(sched(count)) == pytest.approx(float(want(count)), abs=16 * EPS * lr), count


def _batches(n, seed=0):
    return [{k: jnp.asarray(v) for k, v in random_batch(SPEC, 4, seed + i).items()} for i in range(n)]


def test_one_compiled_step_serves_every_schedule_and_equals_optax_adamw(monkeypatch):
    monkeypatch.setenv("MEDSCALE_CPU_KERNELS", "0")  # the plain path, so the reference below runs the same ops
    prog = S.build(SPEC, S.OptConfig(total_steps=1000, warmup_steps=50), donate=False)
    batches = _batches(4)
    runs = {}
    for oc in (S.OptConfig(lr=1e-2, warmup_steps=1, total_steps=4), S.OptConfig(lr=3e-3, warmup_steps=2,
                                                                                  total_steps=40)):
        state = prog.init(0, S.schedule_hyperparams(oc))
        lrs = []
        for b in batches:
            state, m = prog.step(state, b)
            lrs.append(float(m["lr"]))
        runs[oc] = (state, lrs)
        # the reference: optax.adamw with optax's schedule, on the same gradients
        tx = optax.chain(optax.clip_by_global_norm(oc.clip_norm),
                         optax.adamw(optax.warmup_cosine_decay_schedule(0.0, oc.lr, oc.warmup_steps, oc.total_steps,
                                                                        oc.lr * oc.final_lr_ratio),
                                     b1=oc.b1, b2=oc.b2, weight_decay=oc.weight_decay,
                                     mask=lambda p: jax.tree.map(lambda x: x.ndim >= 2, p)))
        params = prog.init(0, S.schedule_hyperparams(oc))["params"]
        opt = tx.init(params)
        for b in batches:
            _, _, grads = prog.grad(params, b)
            upd, opt = tx.update(grads, opt, params)
            params = optax.apply_updates(params, upd)
        got = jax.tree.leaves(state["params"])
        want = jax.tree.leaves(params)
        scale = max(float(jnp.abs(w).max()) for w in want)
        # 4 updates of size ~lr each, computed in a different order: a few ulps of the weights' scale per update
        assert max(float(jnp.abs(g - w).max()) for g, w in zip(got, want)) <= 64 * EPS * scale
        assert lrs == pytest.approx([float(optax.warmup_cosine_decay_schedule(
            0.0, oc.lr, oc.warmup_steps, oc.total_steps, oc.lr * oc.final_lr_ratio)(i)) for i in range(4)],
            abs=16 * EPS * oc.lr)
    (_, l1), (_, l2) = runs.values()
    assert l1 != l2  # the schedules differ ...
    assert prog.step._cache_size() == 1  # ... and one compiled step ran both
