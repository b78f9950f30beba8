"""Sharded equals unsharded: 3 train steps on 1 device vs 8 simulated CPU devices (meshes 8x1x1, 2x2x2); float16
with loss scaling and 2 micro-batches on 1 device vs 2x2x2."""

import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SCRIPT = r"""
import json
import jax
import numpy as np
from medscale.model.sharding import make_mesh
from medscale.spec import ModelSpec, default_modalities
from medscale.train.batches import random_batch
from medscale.train.step import DEFAULT_RULES, OptConfig, build

assert jax.device_count() == 8
mods = default_modalities(text_vocab=64, image_vocab=32, seg_vocab=16, grid=(4, 4), caption_tokens=12,
                          box_tokens=8)
spec = ModelSpec(d_model=32, enc_layers=1, dec_layers=1, num_heads=2, d_ff=64, modalities=mods, enc_len=24,
                 dec_len=16)
batches = [random_batch(spec, 8, seed) for seed in range(3)]
out = {}
for name, shape, devices in (("1", (1, 1, 1), jax.devices()[:1]), ("8x1x1", (8, 1, 1), None),
                             ("2x2x2", (2, 2, 2), None)):
    mesh = make_mesh(shape, devices)
    prog = build(spec, OptConfig(lr=1e-2, warmup_steps=1, total_steps=3), mesh=mesh, rules=DEFAULT_RULES)
    state = prog.init(0)
    up = state["params"]["encoder"][0]["mlp"]["up"]
    info = {"up_spec": str(up.sharding.spec), "up_shards": len(up.addressable_shards),
            "up_shard_shape": list(up.addressable_shards[0].data.shape)}
    losses = []
    for b in batches:
        state, m = prog.step(state, prog.put_batch(b))
        losses.append(float(m["loss"]))
    out[name] = dict(info, losses=losses, head_sum=float(np.asarray(state["params"]["head"]).sum()))
# float16 with loss scaling and 2 micro-batches: each micro-batch spread over the data axes
for name, shape, devices in (("fp16-1", (1, 1, 1), jax.devices()[:1]), ("fp16-2x2x2", (2, 2, 2), None)):
    prog = build(spec, OptConfig(lr=1e-2, warmup_steps=1, total_steps=3), mesh=make_mesh(shape, devices),
                 rules=DEFAULT_RULES, dtype="float16", microbatches=2)
    state = prog.init(0)
    losses = []
    for b in batches:
        state, m = prog.step(state, prog.put_batch(b))
        losses.append(float(m["loss"]))
    out[name] = dict(losses=losses, skipped=int(m["skipped_steps"]))
print("RESULT " + json.dumps(out))
"""


@pytest.mark.slow
def test_sharded_equals_unsharded():
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", PYTHONPATH=REPO,
               JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "-c", SCRIPT], check=False, capture_output=True, text=True, env=env, cwd=REPO,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")][-1]
    res = json.loads(line[len("RESULT "):])
    ref = res["1"]["losses"]
    assert ref[2] < ref[0]  # the steps do train
    for name in ("8x1x1", "2x2x2"):
        for a, b in zip(ref, res[name]["losses"]):
            assert abs(a - b) <= 1e-5 * abs(a), (name, ref, res[name]["losses"])
        assert abs(res[name]["head_sum"] - res["1"]["head_sum"]) <= 1e-4 * (1 + abs(res["1"]["head_sum"]))
    # on 2x2x2 the MLP weight [embed, mlp] is really split over fsdp and tensor (born sharded)
    assert res["2x2x2"]["up_shard_shape"] == [16, 32] and "fsdp" in res["2x2x2"]["up_spec"]
    assert res["8x1x1"]["up_shard_shape"] == [32, 64]  # pure data parallelism: replicated weights
    # float16 micro-batched steps agree to float16 rounding (8 * sqrt(n) * eps16, n: the 128 decoder tokens
    # summed over 3 stages), with no step skipped
    rel16 = 8 * (128 * 3) ** 0.5 * 2.0**-10
    assert res["fp16-1"]["skipped"] == 0 and res["fp16-2x2x2"]["skipped"] == 0
    for a, b in zip(res["fp16-1"]["losses"], res["fp16-2x2x2"]["losses"]):
        assert abs(a - b) <= rel16 * abs(a), (res["fp16-1"], res["fp16-2x2x2"])
