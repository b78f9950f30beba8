"""``medscale bench gpu``: its CPU error path, and its checks rehearsed on 8 simulated CPU devices
(``--platform cpu``): sharded == unsharded (meshes 8x1x1 and 2x2x2, weights really split; float32, and float16
with loss scaling and micro-batches), dense and blockwise
attention in bfloat16/float16 against float32, float16 loss-scaled training, and the MFU step."""

import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _medscale(args, devices=None, timeout=900):
    env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu")
    if devices:
        env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    return subprocess.run([sys.executable, "-m", "medscale", *args], capture_output=True, text=True, env=env,
                          cwd=REPO, timeout=timeout, check=False)


def test_no_gpu_is_one_error_line():
    proc = _medscale(["bench", "gpu", "--json"])
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: no GPU"), proc.stderr


def test_unknown_size_is_an_error():
    proc = _medscale(["bench", "gpu", "--platform", "cpu", "--sizes", "tiny,huge"])
    assert proc.returncode == 2 and proc.stderr.strip() == (
        proc.stderr.strip().splitlines()[0]) and "huge" in proc.stderr, proc.stderr[-2000:]


@pytest.mark.slow
def test_checks_on_eight_simulated_devices():
    proc = _medscale(["bench", "gpu", "--platform", "cpu", "--json", "--steps", "30", "--sizes", "tiny",
                      "--batch", "8", "--budget-s", "3600"], devices=8, timeout=3600)
    assert proc.returncode in (0, 1), proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["devices"] == 8 and out["platform"] == "cpu"

    shard = out["sharding"]
    assert shard["ok"], shard
    meshes = shard["meshes"]
    assert set(meshes) == {"1x1x1", "8x1x1", "2x2x2"}
    ref = meshes["1x1x1"]["losses"]
    assert ref[-1] < ref[0]  # the steps do train
    for name in ("8x1x1", "2x2x2"):
        for a, b in zip(ref, meshes[name]["losses"]):
            assert abs(a - b) <= 1e-5 * abs(a), (name, ref, meshes[name]["losses"])
        assert abs(meshes[name]["head_sum"] - meshes["1x1x1"]["head_sum"]) <= 1e-4 * (1 + abs(meshes["1x1x1"]["head_sum"]))
    # on 2x2x2 the MLP weight [embed, mlp] is really split over fsdp and tensor (born sharded)
    assert meshes["2x2x2"]["up_shard_shape"] == [16, 32] and "fsdp" in meshes["2x2x2"]["up_spec"]
    assert meshes["8x1x1"]["up_shard_shape"] == [32, 64]  # pure data parallelism: replicated weights
    # float16 with loss scaling and 2 micro-batches (each spread over the data axes): 1 device vs 2x2x2
    f16 = shard["float16"]
    assert set(f16) == {"1x1x1", "2x2x2"} and shard["float16_skipped_steps"] == 0
    assert 0 <= shard["float16_max_rel_loss_diff"] <= shard["float16_rtol"]
    assert f16["2x2x2"]["losses"][-1] < f16["2x2x2"]["losses"][0]

    att = out["attention"]["results"]
    for dtype in ("bfloat16", "float16"):
        for impl in ("dense", "blockwise"):
            r = att[f"{impl}/{dtype}"]
            assert r["ok"] and 0 < r["out_err"] <= r["bound"] and r["grad_err"] <= r["bound"], (impl, dtype, r)
        assert "skipped" in att[f"cudnn/{dtype}"]
    # the bound is the dtype's: float16 has 3 more mantissa bits than bfloat16
    assert att["dense/float16"]["bound"] * 8 == pytest.approx(att["dense/bfloat16"]["bound"])

    f16 = out["float16"]
    assert f16["ok"] and f16["status"] == "done" and f16["steps"] == 30, f16
    assert f16["final_train_loss"] < f16["first_train_loss"]
    assert f16["loss_scale"] >= 1 and f16["skipped_steps"] >= 0

    mfu = out["mfu"]
    assert mfu["ok"] and mfu["size"] == "tiny" and mfu["step_s"] > 0 and mfu["peak_bytes"] > 0, mfu
    assert out["ok"] and proc.returncode == 0
