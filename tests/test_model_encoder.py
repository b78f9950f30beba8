"""``model.encoder=per_modality``: one encoder stack per input modality, each over its own modality's tokens (at
most its fixed share, ``data.enc_split``), outputs concatenated for the decoder. Parameter count = accounting,
FLOP formula, the stacks really see only their modality, the masker's caps, bad settings as `error:` lines,
and (slow) a killed + relaunched per-modality run equal to an uninterrupted one."""

import json
import os
import signal
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from medscale import accounting, memory
from medscale.configs import load_config, spec_from_config
from medscale.data.masking import Masker
from medscale.errors import UserError
from medscale.model.encdec import EncoderDecoder
from medscale.spec import ModelSpec, default_split

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHAPE = {"d_model": 32, "enc_layers": 2, "dec_layers": 1, "num_heads": 2, "d_ff": 64, "enc_len": 64, "dec_len": 16}


def _n_params(spec):
    model = nnx.eval_shape(lambda: EncoderDecoder(spec, rngs=nnx.Rngs(0)))
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


@pytest.mark.parametrize("split", [(), (32, 16, 0, 16, 0, 0)])
def test_parameters_equal_the_accounting(split):
    uni = ModelSpec(**SHAPE)
    per = ModelSpec(**SHAPE, encoder="per_modality", enc_split=split)
    assert _n_params(per) == accounting.param_counts(per)["total"]
    assert sum(c * int(np.prod(s)) for _, s, _, c in memory.weights(per)) == accounting.param_counts(per)["total"]
    stacks = sum(1 for s in per.encoder_split if s > 0)
    assert stacks == (3 if split else 5)  # the answer (target-only) has no stack
    d, f = SHAPE["d_model"], SHAPE["d_ff"]
    one_stack = SHAPE["enc_layers"] * (4 * d * d + 2 * d * f + 4 * d) + 2 * d
    assert accounting.param_counts(per)["non_embedding"] - accounting.param_counts(uni)["non_embedding"] == \
        (stacks - 1) * one_stack


def test_flops_follow_each_stacks_tokens():
    uni = ModelSpec(**SHAPE, enc_split=(32, 16, 0, 16, 0, 0))
    per = uni.replace(encoder="per_modality")
    b = 4
    fu, fp = accounting.step_flops(uni, b), accounting.step_flops(per, b)
    for k in accounting.COMPONENTS:  # same tokens through the same-width weights: only the encoder scores differ
        if k != "enc_attn_scores":
            assert fp["components"][k] == fu["components"][k], k
    d, ne = SHAPE["d_model"], SHAPE["enc_layers"]
    assert fu["components"]["enc_attn_scores"] == 3 * ne * 4 * b * 64 * 64 * d
    assert fp["components"]["enc_attn_scores"] == 3 * ne * 4 * b * (32 ** 2 + 16 ** 2 + 16 ** 2) * d
    local = accounting.step_flops(per, b, attention="local", window=20)["components"]["enc_attn_scores"]
    assert local == 3 * ne * 4 * b * (32 * 20 + 16 * 16 + 16 * 16) * d


def test_default_split_and_bad_settings():
    assert default_split(64, [64, 48, 24, 64]) == (21, 15, 8, 20)
    for e in (7, 64, 100, 200):
        s = default_split(e, [64, 48, 24, 64])
        assert sum(s) == min(e, 200) and all(0 <= x <= m for x, m in zip(s, [64, 48, 24, 64]))
    with pytest.raises(UserError, match="model.encoder must be one of"):
        ModelSpec(**SHAPE, encoder="separate")
    with pytest.raises(UserError, match="sum to data.enc_len 64"):
        ModelSpec(**SHAPE, enc_split=(32, 16, 0, 8, 0, 0))
    with pytest.raises(UserError, match="one encoder token budget per modality"):
        ModelSpec(**SHAPE, enc_split=(32, 32))
    with pytest.raises(UserError, match="more than the"):
        ModelSpec(**SHAPE, enc_split=(0, 0, 40, 24, 0, 0))  # boxes hold 32 tokens


def test_cli_errors_are_one_line(cli):
    for setting, words in (("model.encoder=separate", "model.encoder must be one of"),
                           ("data.enc_split=(1,2)", "one encoder token budget per modality")):
        proc = cli("flops", "--config", "tiny", "--set", setting, env={"PYTHONPATH": REPO})
        assert proc.returncode == 2, proc.stderr
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and words in lines[0], proc.stderr


def _batch(spec, rng, b=2):
    """A packed batch: per example, each modality's encoder tokens (as many as its share) in modality order."""
    e, ld = spec.enc_len, spec.dec_len
    out = {k: np.zeros((b, e), np.int32) for k in ("enc_tokens", "enc_modality", "enc_pos")}
    out["enc_valid"] = np.zeros((b, e), bool)
    for i in range(b):
        p = 0
        for m, n in enumerate(spec.encoder_split):
            n = n - i  # the second example leaves a place of each stack empty (padding)
            if n <= 0:
                continue
            out["enc_tokens"][i, p:p + n] = rng.integers(0, spec.modalities[m].vocab_size, n)
            out["enc_modality"][i, p:p + n] = m
            out["enc_pos"][i, p:p + n] = np.arange(n)
            out["enc_valid"][i, p:p + n] = True
            p += n
    out.update(dec_input=np.zeros((b, ld), np.int32), dec_target=rng.integers(0, 100, (b, ld)).astype(np.int32),
               dec_modality=np.ones((b, ld), np.int32), dec_pos=np.tile(np.arange(ld, dtype=np.int32), (b, 1)),
               dec_valid=np.ones((b, ld), bool), dec_causal=np.ones((b, ld), bool))
    return out


def test_each_stack_sees_only_its_modality():
    spec = ModelSpec(**SHAPE, encoder="per_modality", enc_split=(32, 16, 0, 16, 0, 0))
    model = EncoderDecoder(spec, rngs=nnx.Rngs(0))
    rng = np.random.default_rng(0)
    batch = _batch(spec, rng)
    enc, seg = model.encode({k: jnp.asarray(v) for k, v in batch.items()})
    assert enc.shape == (2, 64, 32) and seg.shape == (2, 64)
    # outputs in modality order, each stack's share: padding exactly where the example has fewer tokens
    np.testing.assert_array_equal(np.asarray(seg[1]), np.r_[np.zeros(31), -1, np.zeros(15), -1, np.zeros(15), -1])
    # change the caption (modality 1) tokens: the image and segmentation stacks' outputs do not move
    other = dict(batch)
    other["enc_tokens"] = np.where(batch["enc_modality"] == 1, (batch["enc_tokens"] + 7) % 100, batch["enc_tokens"])
    other["enc_tokens"] = np.where(batch["enc_valid"], other["enc_tokens"], 0)
    enc2, _ = model.encode({k: jnp.asarray(v) for k, v in other.items()})
    diff = np.abs(np.asarray(enc2 - enc)).max(axis=(0, 2))
    assert diff[:32].max() == 0 and diff[48:].max() == 0 and diff[32:47].min() > 0
    # where the tokens sit in the packed sequence does not matter: reverse every example's valid tokens
    rev = {k: v.copy() for k, v in batch.items()}
    for i in range(2):
        n = int(batch["enc_valid"][i].sum())
        for k in ("enc_tokens", "enc_modality", "enc_pos", "enc_valid"):
            rev[k][i, :n] = batch[k][i, :n][::-1]
    enc3, _ = model.encode({k: jnp.asarray(v) for k, v in rev.items()})
    # a stack reads its tokens in packed order, so reversed order = the same tokens attended as a set; the outputs
    # come back in the reversed order within each stack's places
    eps = float(jnp.finfo(jnp.float32).eps)
    for i in range(2):
        for lo, n in ((0, 32 - i), (32, 16 - i), (48, 16 - i)):
            a, b = np.asarray(enc[i, lo:lo + n]), np.asarray(enc3[i, lo:lo + n])[::-1]
            np.testing.assert_allclose(b, a, atol=64 * eps * np.abs(a).max())


def test_unified_encoder_mixes_modalities():
    spec = ModelSpec(**SHAPE, enc_split=(32, 16, 0, 16, 0, 0))
    model = EncoderDecoder(spec, rngs=nnx.Rngs(0))
    batch = _batch(spec, np.random.default_rng(0))
    enc, _ = model.encode({k: jnp.asarray(v) for k, v in batch.items()})
    other = dict(batch, enc_tokens=np.where(batch["enc_modality"] == 1, (batch["enc_tokens"] + 7) % 100,
                                            batch["enc_tokens"]))
    enc2, _ = model.encode({k: jnp.asarray(v) for k, v in other.items()})
    assert np.abs(np.asarray(enc2 - enc))[:, :31].max() > 0  # the image's outputs move with the caption


def test_masker_caps_each_modality_inputs():
    mods = [("image", "image", 64), ("caption", "sequence", 48), ("boxes", "sequence", 24),
            ("segmentation", "image", 64)]
    caps = (21, 15, 8, 20)
    rng = np.random.default_rng(1)
    b = 64
    lens = {"image": np.full(b, 64), "caption": rng.integers(5, 47, b), "boxes": rng.integers(0, 23, b),
            "segmentation": np.where(rng.random(b) < 0.8, 64, 0)}
    ex = {}
    for name, _, t in mods:
        ex[name] = rng.integers(20, 100, (b, t)).astype(np.int32)
        ex[name + "_len"] = lens[name]
    capped = Masker(mods, 64, 48, mixture="all2all:0.5,image2all:0.5", enc_caps=caps)(ex, np.random.default_rng(2))
    free = Masker(mods, 64, 48, mixture="all2all:0.5,image2all:0.5")(ex, np.random.default_rng(2))
    for m, cap in enumerate(caps):
        counts = ((capped["enc_modality"] == m) & capped["enc_valid"]).sum(1)
        assert counts.max() <= cap
        assert counts.max() == cap  # and reached somewhere
    assert ((free["enc_modality"] == 0) & free["enc_valid"]).sum(1).max() > caps[0]  # uncapped goes beyond
    # image-like inputs fill their places: with image and segmentation present, each holds its share
    both = (lens["segmentation"] > 0)
    for m in (0, 3):
        counts = ((capped["enc_modality"] == m) & capped["enc_valid"]).sum(1)
        assert (counts[both] <= caps[m]).all()
    # targets never among inputs and task batches cut to the caps
    task = Masker(mods, 64, 48, enc_caps=caps).task(ex, ["image", "caption"], ["boxes"])
    assert ((task["enc_modality"] == 0) & task["enc_valid"]).sum(1).max() == 21


SETTINGS = ["model.size=", "model.d_model=16", "model.enc_layers=1", "model.dec_layers=1", "model.num_heads=1",
            "model.d_ff=64", "train.batch_size=4", "data.stream_chunk=64", "data.num_eval=16",
            "train.eval_batches=1", "train.log_every=1", "train.warmup_steps=5", "train.steps=16",
            "train.eval_every=8", "train.ckpt_every=5", "train.task_eval_examples=0", "model.encoder=per_modality"]
TIMING = {"step_s", "tokens_per_s", "tflops_per_device", "mfu", "wall_s", "time"}


def _train(workdir, **env):
    argv = [sys.executable, "-m", "medscale", "train", "--config", "tiny", "--workdir", str(workdir), "--quiet"]
    for s in SETTINGS:
        argv += ["--set", s]
    full = dict(os.environ, PYTHONPATH=REPO, MEDSCALE_TENSORBOARD="0", JAX_PLATFORMS="cpu", **env)
    return subprocess.run(argv, check=False, cwd=REPO, env=full, capture_output=True, text=True, timeout=900)


def _record(workdir):
    with open(os.path.join(workdir, "summary.json")) as fh:
        summary = {k: v for k, v in json.load(fh).items() if k not in TIMING | {"run_id", "sweep"}}
    with open(os.path.join(workdir, "metrics.jsonl")) as fh:
        rows = [{k: v for k, v in json.loads(line).items() if k not in TIMING} for line in fh]
    return summary, rows


@pytest.mark.slow
def test_per_modality_run_trains_and_resumes_bit_exact(tmp_path):
    straight, cut = tmp_path / "straight", tmp_path / "cut"
    proc = _train(straight)
    assert proc.returncode == 0, proc.stderr[-2000:]
    proc = _train(cut, MEDSCALE_TEST_KILL_AT="step:12")
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    proc = _train(cut)
    assert proc.returncode == 0, proc.stderr[-2000:]
    summary, rows = _record(straight)
    assert _record(cut) == (summary, rows)
    spec = ModelSpec(d_model=16, enc_layers=1, dec_layers=1, num_heads=1, d_ff=64, enc_len=64, dec_len=48,
                     modalities=spec_from_config(load_config("tiny")).modalities, encoder="per_modality")
    assert summary["params"]["total"] == accounting.param_counts(spec)["total"]
    assert summary["model_flops"] == 16 * accounting.step_flops(spec, 4)["model_flops"]
    train = [r for r in rows if r["kind"] == "train"]
    assert train[-1]["loss"] < train[0]["loss"]

