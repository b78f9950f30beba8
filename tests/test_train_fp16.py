"""float16 training: dynamic loss scaling (a real float16 overflow is skipped, the scale halves and the state
stays; the scale doubles after its period; a collapsed scale ends the run as diverged), gradient accumulation
over micro-batches equals the one-batch step, kill -9 and resume of a float16 run is bit-exact, and the tiny
config trains in float16 to the float32 run's loss.

Float tolerances: ``FACTOR * sqrt(TERMS) * eps`` of the dtype, relative to the largest magnitude compared."""

import json
import math
import os
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from medscale.cli import main
from medscale.spec import ModelSpec, default_modalities
from medscale.train.batches import random_batch
from medscale.train.step import LossScale, OptConfig, adjust_loss_scale, build, init_loss_scale

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(REPO, "medscale", "configs", "tiny.py")
FAST = ["data.num_train=256", "data.num_eval=32", "train.eval_batches=2", "train.warmup_steps=5",
        "train.task_eval_examples=0"]

MODS = default_modalities(text_vocab=64, image_vocab=32, seg_vocab=16, grid=(4, 4), caption_tokens=12,
                          box_tokens=8)
SPEC = ModelSpec(d_model=32, enc_layers=1, dec_layers=1, num_heads=2, d_ff=64, modalities=MODS, enc_len=24,
                 dec_len=16)
BATCH = 8
# warmup 0: the first update already moves every parameter with a gradient (an unchanged state means skipped)
OPT = OptConfig(lr=1e-2, warmup_steps=0, total_steps=100)


def _leaves_equal(a, b) -> bool:
    return all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b),
                                                                           strict=True))


def _copy(tree):
    return jax.tree.map(lambda x: np.array(x), tree)


# ---------------------------------------------------------------------------------------------- the scale rule
def test_scale_doubles_after_period_and_halves_on_overflow():
    ls = LossScale(init=8.0, factor=2.0, period=3)
    state = init_loss_scale(ls)
    scales, skipped = [], []
    for finite in (True, True, True, True, True, True, False, True, True, True):
        state = adjust_loss_scale(ls, state, jnp.asarray(finite))
        scales.append(float(state["scale"]))
        skipped.append(int(state["skipped"]))
    # doubles after the 3rd and 6th consecutive finite step, halves at the overflow, doubles 3 finite steps later
    assert scales == [8, 8, 16, 16, 16, 32, 16, 16, 16, 32]
    assert skipped == [0, 0, 0, 0, 0, 0, 1, 1, 1, 1]
    # a grown scale that is no longer a finite float32 is not taken
    big = {"scale": jnp.asarray(np.finfo(np.float32).max, jnp.float32), "good_steps": jnp.asarray(2, jnp.int32),
           "skipped": jnp.asarray(0, jnp.int32)}
    assert float(adjust_loss_scale(ls, big, jnp.asarray(True))["scale"]) == float(np.finfo(np.float32).max)


# ---------------------------------------------------------------------------------------------- the real step
@pytest.fixture(scope="module")
def overflowing():
    """A float16 step (2 micro-batches) whose first scale, 2^60, overflows float16 in the backward pass."""
    ls = LossScale(init=2.0**60, factor=2.0, period=2)
    return build(SPEC, OPT, dtype="float16", microbatches=2, loss_scale=ls, donate=False), ls


def test_a_float16_overflow_skips_the_update_and_halves_the_scale(overflowing):
    prog, ls = overflowing
    batches = [random_batch(SPEC, BATCH, seed) for seed in range(4)]
    state = prog.init(0)
    skipped_before, grown, steps = 0, 0, 70
    scale = ls.init
    for i in range(steps):
        before = _copy(state)
        state, m = prog.step(state, prog.put_batch(batches[i % len(batches)]))
        m = jax.device_get(m)
        assert int(state["step"]) == i + 1  # the step counter advances either way
        assert math.isfinite(float(m["loss"]))  # the forward pass is finite: the overflow is the gradient's
        finite = int(m["skipped_steps"]) == skipped_before
        if not finite:
            assert not math.isfinite(float(m["grad_norm"]))
            # the update is skipped: parameters and optimizer state (its count, so the lr schedule) unchanged
            assert _leaves_equal(state["params"], before["params"])
            assert _leaves_equal(state["opt"], before["opt"])
            assert float(m["loss_scale"]) == scale / 2
        else:
            assert math.isfinite(float(m["grad_norm"]))
            assert not _leaves_equal(state["params"], before["params"])
            assert float(m["loss_scale"]) in (scale, scale * 2)
            grown += float(m["loss_scale"]) == scale * 2
        assert float(state["loss_scale"]["scale"]) == float(m["loss_scale"])
        # the rate of the update: the schedule at the number of updates applied before it
        assert float(m["lr"]) == pytest.approx(float(prog.schedule(i - skipped_before)), rel=1e-6)
        scale, skipped_before = float(m["loss_scale"]), int(m["skipped_steps"])
    # 2^60 overflowed: halved until the gradient fits float16, then grown and halved again around that scale
    assert 20 <= skipped_before < steps - 10, skipped_before
    assert grown >= 3
    assert 1 <= scale < 2.0**60


# ---------------------------------------------------------------------------------------------- micro-batches
@pytest.mark.slow  # 4 (float32) or 2 (float16) compilations of the tiny step: ~1-2 min on 2 busy cores
@pytest.mark.parametrize("dtype, microbatches", [("float32", 4), ("float16", 2)])
def test_microbatches_equal_one_batch(dtype, microbatches):
    batch = random_batch(SPEC, BATCH, 7)
    out = []
    for mb in (1, microbatches):
        prog = build(SPEC, OPT, dtype=dtype, microbatches=mb, donate=False, cpu_kernels=False,
                     loss_scale=LossScale(init=2.0**8))
        state = prog.init(0)
        loss, aux, grads = jax.device_get(prog.grad(state["params"], prog.put_batch(batch)))
        update = None
        if dtype == "float32":  # the update from the step itself (one compilation more per program)
            new, m = prog.step(state, prog.put_batch(batch))
            assert float(m["loss"]) == float(loss)
            update = jax.tree.map(lambda a, b: np.asarray(a, np.float64) - np.asarray(b, np.float64),
                                  new["params"], state["params"])
        out.append((float(loss), aux, grads, update))
    (l1, a1, g1, u1), (l2, a2, g2, u2) = out
    # float16 compute: the activations' rounding; float32: the sums' order. A loss or gradient element sums at
    # most the batch's 128 decoder tokens over 3 stages (head, decoder, encoder)
    eps = float(np.finfo(np.float16 if dtype == "float16" else np.float32).eps)
    rel = 8 * np.sqrt(128 * 3) * eps
    assert abs(l2 - l1) <= rel * l1
    np.testing.assert_array_equal(a2["count"], a1["count"])  # integer counts
    np.testing.assert_allclose(a2["sum"], a1["sum"], rtol=rel)
    for path, x, y in zip(jax.tree.leaves_with_path(g1), jax.tree.leaves(g1), jax.tree.leaves(g2), strict=True):
        x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
        assert np.abs(x - y).max() <= rel * np.abs(x).max(), (jax.tree_util.keystr(path[0]), np.abs(x - y).max())
    assert sum(np.abs(x).sum() for x in jax.tree.leaves(g1)) > 0
    if dtype != "float32":
        return
    # the same update: Adam's first step is lr * g / (|g| + 1e-8), ~lr * sign(g) where |g| is clearly above
    # 1e-8, so the parameters agree wherever the gradient's sign is determined beyond its rounding
    for x, a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(u1), jax.tree.leaves(u2), strict=True):
        x = np.asarray(x, np.float64)
        sure = np.abs(x) > 4 * rel * np.abs(x).max() + 1e-6
        np.testing.assert_allclose(b[sure], a[sure], rtol=0, atol=1e-3 * OPT.lr)


def test_float32_and_bfloat16_states_have_no_loss_scale():
    for dtype in ("float32", "bfloat16"):
        prog = build(SPEC, OPT, dtype=dtype, donate=False)
        assert prog.loss_scale is None and "loss_scale" not in prog.abstract_state
    assert build(SPEC, OPT, dtype="float16", donate=False).loss_scale == LossScale()


# ---------------------------------------------------------------------------------------------- the CLI
def _cmd(workdir, *sets):
    args = [sys.executable, "-m", "medscale", "train", "--config", TINY, "--workdir", str(workdir), "--quiet",
            "--json"]
    for s in (*FAST, "model.dtype=float16", *sets):
        args += ["--set", s]
    return args


def _env():
    return dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu", MEDSCALE_TENSORBOARD="0")


def _rows(workdir, kind="train"):
    rows = {}
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        for line in f:
            r = json.loads(line)
            if r["kind"] == kind:
                rows[r["step"]] = r
    return rows


def _error(capsys, *sets):
    argv = ["train", "--config", TINY, "--workdir", "/nonexistent/never-written", "--quiet"]
    for s in sets:
        argv += ["--set", s]
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: ") and len(err.strip().splitlines()) == 1, err
    return err


def test_bad_microbatches_and_loss_scale_are_one_line_errors(capsys):
    assert "microbatches" in _error(capsys, "train.microbatches=3")  # batch 16
    assert "microbatches" in _error(capsys, "train.microbatches=0")
    assert "loss_scale_init" in _error(capsys, "model.dtype=float16", "train.loss_scale_init=0.5")
    assert "loss_scale_factor" in _error(capsys, "model.dtype=float16", "train.loss_scale_factor=1.0")
    assert "loss_scale_period" in _error(capsys, "model.dtype=float16", "train.loss_scale_period=0")


def test_a_collapsed_loss_scale_ends_the_run_as_diverged(tmp_path, capsys):
    # 2^60 overflows float16 at once; one division by 2^61 leaves 0.5
    argv = ["train", "--config", TINY, "--workdir", str(tmp_path / "c"), "--quiet", "--json"]
    for s in (*FAST, "model.dtype=float16", "train.steps=20", "train.loss_scale_init=1.152921504606846976e18",
              "train.loss_scale_factor=2.305843009213693952e18"):
        argv += ["--set", s]
    code = main(argv)
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert code == 1 and summary["status"] == "diverged", summary
    assert summary["error"].startswith("float16 loss scale collapsed below 1 at step 1 (1 skipped steps)")
    assert summary["loss_scale"] == 0.5 and summary["skipped_steps"] == 1
    row = _rows(tmp_path / "c")[1]
    assert row["loss_scale"] == 0.5 and row["skipped_steps"] == 1 and row["grad_norm"] is None


@pytest.mark.slow
def test_float16_kill_resume_is_bit_exact(tmp_path):
    # a scale near tiny's float16 limit, doubled every 3 finite steps: skips and growths on both sides of the
    # checkpoint the run is killed after, so the resumed run must restore the scale state to match
    sets = ["train.steps=40", "train.ckpt_every=10", "train.eval_every=20", "train.log_every=1",
            "train.loss_scale_init=16777216.0", "train.loss_scale_period=3"]
    full, cut = tmp_path / "full", tmp_path / "cut"
    ref = subprocess.run(_cmd(full, *sets), check=False, capture_output=True, text=True, env=_env(), cwd=REPO,
                         timeout=900)
    assert ref.returncode == 0, ref.stderr[-2000:]
    summary = json.loads(ref.stdout.strip().splitlines()[-1])
    assert summary["status"] == "done" and summary["steps"] == 40
    train = _rows(full)
    assert sorted(train) == list(range(1, 41))
    skipped = [train[s]["skipped_steps"] for s in range(1, 41)]
    assert skipped[9] < skipped[-1], skipped  # steps are skipped after the checkpoint at step 10
    assert len({train[s]["loss_scale"] for s in range(11, 41)}) > 1  # and the scale moves there
    assert summary["skipped_steps"] == skipped[-1] and summary["loss_scale"] == train[40]["loss_scale"]

    proc = subprocess.Popen(_cmd(cut, *sets), stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=_env(), cwd=REPO)
    ckpt = cut / "checkpoints"
    deadline = time.time() + 600
    while time.time() < deadline and proc.poll() is None:
        if [d for d in (os.listdir(ckpt) if ckpt.exists() else []) if d.isdigit()]:
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.02)
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed after a checkpoint"
    assert max(_rows(cut)) < 40
    again = subprocess.run(_cmd(cut, *sets), check=False, capture_output=True, text=True, env=_env(), cwd=REPO,
                           timeout=900)
    assert again.returncode == 0, again.stderr[-2000:]
    resumed = json.loads(again.stdout.strip().splitlines()[-1])
    for key in ("final_train_loss", "final_eval_loss", "final_train_loss_by_modality",
                "final_eval_loss_by_modality", "steps", "status", "loss_scale", "skipped_steps"):
        assert resumed[key] == summary[key], key  # same float bits
    cut_rows = _rows(cut)
    for s in range(1, 41):
        for key in ("loss", "grad_norm", "lr", "loss_scale", "skipped_steps"):
            assert cut_rows[s][key] == train[s][key], (s, key)


@pytest.mark.slow
def test_tiny_trains_in_float16_to_the_float32_loss(tmp_path):
    """The acceptance run: tiny.py (300 steps) in float16 finishes done, its final eval loss within 3% of the
    float32 run's (about 4 minutes on 2 busy CPU cores, both runs)."""
    out = {}
    for dtype in ("float32", "float16"):
        args = [sys.executable, "-m", "medscale", "train", "--config", TINY, "--workdir", str(tmp_path / dtype),
                "--quiet", "--json", "--set", f"model.dtype={dtype}", "--set", "train.task_eval_examples=0"]
        proc = subprocess.run(args, check=False, capture_output=True, text=True, env=_env(), cwd=REPO, timeout=1200)
        assert proc.returncode == 0, proc.stderr[-2000:]
        out[dtype] = json.loads(proc.stdout.strip().splitlines()[-1])
    f16, f32 = out["float16"], out["float32"]
    assert f16["status"] == "done" and f16["steps"] == 300
    assert abs(f16["final_eval_loss"] - f32["final_eval_loss"]) <= 0.03 * f32["final_eval_loss"]
    assert f16["loss_scale"] >= 1 and f16["skipped_steps"] is not None
    assert f32["loss_scale"] is None and f32["skipped_steps"] is None
