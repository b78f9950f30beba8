"""``medscale bench step``: the real step of the real model, timed; the JSON line's figures agree with each other
and with the accounting."""

import json

import pytest

from medscale import accounting, kernels
from medscale.bench.step import bench_spec


def test_bench_step_json_line_is_consistent(cli):
    shape = ["--d-model", 32, "--enc-layers", 1, "--dec-layers", 1, "--heads", 2, "--d-ff", 64,
             "--vocab", "32,32,32,32,32,32", "--enc-len", 16, "--dec-len", 8, "--batch", 4]
    proc = cli("bench", "step", *shape, "--steps", 2, "--json")
    assert proc.returncode == 0, proc.stderr
    lines = [ln for ln in proc.stdout.splitlines() if ln.strip()]
    assert len(lines) == 1
    out = json.loads(lines[0])
    assert len(out["step_s_all"]) == 2 and out["step_s"] > 0 and out["compile_s"] > 0
    assert abs(out["tokens_per_s"] - 4 * (16 + 8) / out["step_s"]) < 1e-6 * out["tokens_per_s"]
    flops = accounting.step_flops(bench_spec(32, 1, 1, 2, 64, "32,32,32,32,32,32", 16, 8), 4)
    assert out["model_flops_per_step"] == float(flops["model_flops"])
    assert out["model_tflops_per_s"] * 1e12 * out["step_s"] == pytest.approx(out["model_flops_per_step"])
    assert out["mfu"] == pytest.approx(out["model_tflops_per_s"] / out["peak_tflops_per_s"])
    assert out["hardware"] == "cpu" and out["cpu"]
    # the JSON says whether the native kernels ran, as this process would decide
    assert out["cpu_kernels"] == {"attention": kernels.attention_targets() is not None,
                                  "matmul": kernels.matmul_target() is not None}


def test_bench_step_bad_flags_are_one_line_errors(cli):
    proc = cli("bench", "step", "--heads", 3, "--json")  # 256 is not divisible by 3
    assert proc.returncode == 2 and proc.stderr.strip().startswith("error:") and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
