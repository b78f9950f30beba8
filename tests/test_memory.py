"""medscale.memory (the per-device estimate and the planner) and ``medscale memory``: the weights it counts are
the model's; sharding, micro-batches and remat move the bytes the way they must; the estimate is within 20% of
XLA's compiled peak of the real step; the plan for 3xl on 8 x V100 32 GB fits; errors are one line."""

import json
import math
import os
import subprocess
import sys

import pytest

from medscale import accounting, memory
from medscale.cli import main
from medscale.configs.ladder import ladder_names, ladder_shape
from medscale.spec import ModelSpec

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOLERANCE = 0.20  # the acceptance bound: estimate within 20% of XLA's compiled peak
REF = ["memory", "--size", "3xl", "--hardware", "v100-sxm2-32gb", "--gpus", "8", "--batch", "256",
       "--enc-len", "64", "--dec-len", "48", "--dtype", "float16"]


def _spec(size, enc=64, dec=48):
    return ModelSpec(**ladder_shape(size), enc_len=enc, dec_len=dec, name=size)


@pytest.mark.parametrize("size", ladder_names())
def test_weights_are_the_models_parameters(size):
    spec = _spec(size)
    assert sum(c * math.prod(s) for _, s, _, c in memory.weights(spec)) == accounting.param_counts(spec)["total"]


def test_sharding_divides_what_the_rules_shard():
    spec = _spec("3xl")  # d_model 1280, 20 heads, d_ff 5120, vocab 4864: all divisible by 2, 4, 8 (heads: 2, 4)
    total = accounting.param_counts(spec)["total"]
    norms = sum(c * math.prod(s) for _, s, a, c in memory.weights(spec) if a == ("norm",))
    one = memory.param_elements(spec, {"data": 1, "fsdp": 1, "tensor": 1})["total"]
    assert one == total
    # data parallelism replicates; fsdp shards every 'embed' axis (all but the LayerNorms and the kv-only axes)
    assert memory.param_elements(spec, {"data": 8, "fsdp": 1, "tensor": 1})["total"] == total
    assert memory.param_elements(spec, {"data": 1, "fsdp": 8, "tensor": 1})["total"] == (total - norms) // 8 + norms
    # tensor shards heads / mlp / vocab: every weight but the norms and the small modality tables and mask vector
    t4 = memory.param_elements(spec, {"data": 1, "fsdp": 1, "tensor": 4})["total"]
    small = norms + 2 * spec.num_modalities * spec.d_model + spec.d_model
    assert t4 == (total - small) // 4 + small


def test_microbatches_and_remat_move_the_bytes():
    s = memory.Setting(_spec("small", 128, 64), 256, "float16", "none", "dense")
    one, two = memory.estimate(s, (1, 1, 1), 1), memory.estimate(s, (1, 1, 1), 2)
    assert two["micro_batch"] == one["micro_batch"] // 2
    # activations and the head halve with the micro-batch; the float32 accumulator is one more gradient
    assert two["parts"]["activations"] == pytest.approx(one["parts"]["activations"] / 2, rel=1e-9)
    assert two["parts"]["head"] == pytest.approx(one["parts"]["head"] / 2, rel=1e-9)
    assert one["phase"] == two["phase"] == "forward_end"
    n = accounting.param_counts(s.spec)["total"]
    assert two["parts"]["grads"] - one["parts"]["grads"] == 4 * n
    for b in (1, 4):  # the kept activations are linear in the micro-batch
        assert memory.activation_bytes(s, 2 * b, 1)["kept"] == pytest.approx(
            2 * memory.activation_bytes(s, b, 1)["kept"], rel=1e-12)
    by_remat = {r: memory.estimate(memory.Setting(s.spec, 256, "float16", r, "dense"))["total"]
                for r in ("none", "save_dots", "full")}
    assert by_remat["full"] < by_remat["save_dots"] < by_remat["none"]
    dense = memory.estimate(s)["parts"]["activations"]
    flash = memory.estimate(memory.Setting(s.spec, 256, "float16", "none", "blockwise"))["parts"]["activations"]
    assert flash < dense
    # float32 compute: no weight copies without fsdp; float16: one 2-byte copy of every weight
    assert memory.estimate(memory.Setting(s.spec, 256, "float32"))["parts"]["weight_copies"] == 0
    assert memory.estimate(s)["parts"]["weight_copies"] == 2 * accounting.param_counts(s.spec)["total"]


def test_the_3xl_plan_fits_eight_v100(capsys):
    assert main([*REF, "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    from medscale.commands.memory import JSON_KEYS

    assert set(out) == set(JSON_KEYS)
    chosen = out["chosen"]
    assert chosen["fits"] and chosen["bytes_per_device"] <= 0.9 * 32e9
    m = chosen["mesh"]
    assert m["data"] * m["fsdp"] * m["tensor"] == 8 and 256 % (m["data"] * m["fsdp"] * chosen["microbatches"]) == 0
    assert set(chosen["parts"]) == {"params", "adam", "batch", "grads", "weight_copies", "activations",
                                    "attention_workspace", "head", "workspace"}
    assert sum(chosen["parts"].values()) == pytest.approx(chosen["bytes_per_device"], rel=1e-9)
    # the chosen plan is the fastest that fits
    assert max(p["relative_speed"] for p in out["plans"] if p["fits"]) == chosen["relative_speed"]
    assert main(REF) == 0
    text = capsys.readouterr().out
    assert "chosen (*): mesh" in text and "fits" in text


@pytest.mark.parametrize("argv, match", [
    (["memory", "--size", "5xl", "--hardware", "v100-sxm2-16gb", "--gpus", "1", "--batch", "256"], "no plan fits"),
    (["memory", "--size", "huge"], "tiny"),
    ([*REF[:8], "7"], "divisible"),
    ([*REF, "--mesh", "3,1,1"], "mesh"),
    ([*REF, "--headroom", "1.5"], "--headroom"),
    (["memory", "--size", "xl", "--hardware", "tpu-v9"], "v100-sxm2-32gb"),
    ([*REF[:-1], "bfloat16"], "model.dtype=float16"),  # no bf16 tensor cores on V100
])
def test_errors_are_one_line(capsys, argv, match):
    assert main(argv) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), captured.err
    assert match in lines[0], lines[0]


def test_memory_without_xla_starts_without_jax():
    code = "import sys; import medscale.commands.memory, medscale.memory; print('jax' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True)
    assert out.stdout.strip() == "False"


# Small shapes (tiny and mini, compiled in seconds), remat none / save_dots / full, dense and blockwise, float32
# and bfloat16. One subprocess compiles them all: XLA:CPU reads its scheduler flag when its backend starts.
XLA_CASES = [
    ("tiny", 64, 128, 64, "float32", "none", "dense"),
    ("tiny", 64, 128, 64, "float32", "save_dots", "dense"),
    ("tiny", 64, 128, 64, "float32", "none", "blockwise"),
    ("tiny", 64, 128, 64, "bfloat16", "none", "dense"),
    ("tiny", 64, 128, 64, "bfloat16", "save_dots", "blockwise"),
    ("mini", 32, 128, 64, "float32", "full", "dense"),
    ("mini", 32, 128, 64, "bfloat16", "none", "dense"),
    ("tiny", 64, 128, 64, "float16", "save_dots", "dense"),  # float16: float32 residual stream, loss scale state
]
# sharded: per-device peaks on 8 simulated CPU devices (tensor, fsdp, data x tensor, fsdp x tensor)
XLA_SHARDED_CASES = [
    ("tiny", 64, 128, 64, "float32", "none", "dense", [1, 1, 2]),
    ("tiny", 64, 128, 64, "float32", "none", "dense", [1, 4, 1]),
    ("mini", 32, 128, 64, "bfloat16", "none", "dense", [2, 1, 4]),
    ("mini", 32, 128, 64, "float32", "save_dots", "blockwise", [1, 2, 2]),
]
_SCRIPT = """
import json, sys
from medscale.bench.memory import xla_memory
from medscale.configs.ladder import ladder_shape
from medscale.spec import ModelSpec
for size, b, e, l, dtype, remat, att, mesh in json.loads(sys.argv[1]):
    spec = ModelSpec(**ladder_shape(size), enc_len=e, dec_len=l, name=size)
    r = xla_memory(spec, b, dtype=dtype, remat=remat, attention=att, mesh_shape=mesh)
    print(json.dumps([size, b, e, l, dtype, remat, att, mesh, r["peak"], r["schedule"]]), flush=True)
"""


def _check_against_xla(cases, devices):
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    proc = subprocess.run([sys.executable, "-c", _SCRIPT, json.dumps(cases)], capture_output=True, text=True,
                          cwd=REPO, env=env, timeout=1800, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("[")]
    assert len(rows) == len(cases)
    bad = []
    for size, b, e, l, dtype, remat, att, mesh, peak, schedule in rows:
        assert schedule == "memory"
        est = memory.estimate(memory.Setting(_spec(size, e, l), b, dtype, remat, att), mesh)["total"]
        if abs(est / peak - 1) > TOLERANCE:
            bad.append((size, b, e, l, dtype, remat, att, mesh, peak, round(est / peak, 3)))
    assert not bad, bad


@pytest.mark.slow
def test_estimate_within_20_percent_of_xla():
    _check_against_xla([[*c, [1, 1, 1]] for c in XLA_CASES], 1)


@pytest.mark.slow
def test_sharded_estimate_within_20_percent_of_xla():
    _check_against_xla(XLA_SHARDED_CASES, 8)


@pytest.mark.slow
def test_xla_json_keys():
    proc = subprocess.run([sys.executable, "-m", "medscale", "memory", "--size", "tiny", "--batch", "32",
                           "--enc-len", "128", "--dec-len", "64", "--dtype", "float32", "--remat", "none", "--xla",
                           "--json"], capture_output=True, text=True, cwd=REPO, timeout=900, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout)
    assert {"estimate", "xla", "ratio", "mesh", "microbatches"} <= set(out)
    xla = out["xla"]
    assert xla["peak"] == xla["arguments"] + xla["outputs"] - xla["aliased"] + xla["temporaries"]
    assert xla["schedule"] == "memory"
    assert out["ratio"] == pytest.approx(out["estimate"]["bytes_per_device"] / xla["peak"])
    assert abs(out["ratio"] - 1) <= TOLERANCE


def test_budget_names_the_plan_of_the_recommended_size(capsys):
    assert main(["budget", "--hardware", "dgx-1", "--days", "7", "--precision", "fp16"]) == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if x.strip().startswith("memory plan"))
    assert "mesh " in line and "GB per device" in line and "float16" in line
    spec = _spec("3xl", 128, 64)
    # the summary is the planner's choice for the same batch
    text = memory.plan_summary(spec, "v100-sxm2-32gb", 8, "fp16", batch=256)
    chosen = memory.choose(memory.plans(memory.Setting(spec, 256, "float16"), "v100-sxm2-32gb", 8), "v100-sxm2-32gb")
    assert f"mesh {memory.mesh_name(chosen['mesh'])}" in text and f"remat {chosen['remat']}" in text
    # a size that fits nowhere says so instead of failing the budget
    assert "no plan fits" in memory.plan_summary(_spec("5xl", 128, 64), "v100-sxm2-16gb", 1, "fp16", batch=256)
    assert memory.batch_examples(2**19, spec, 8) % (8 * 64) == 0
