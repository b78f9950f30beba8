"""Precision honesty: the peak a run is charged against is the one of the dtype it really computes in; bfloat16
on a device without bf16 tensor cores (V100) is a one-line error naming float16, in training and in
``medscale budget``; budget and report state the compute dtype their figures assume."""

import json
import os
import subprocess
import sys

import pytest

from medscale import hardware as hw
from medscale.analysis import budget, report
from medscale.errors import UserError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(REPO, "medscale", "configs", "tiny.py")
T = 1e12

# (device, dtype) -> (precision, dense peak FLOP/s per device from the datasheets; None: an error naming float16)
MAPPING = {
    ("v100-sxm2-32gb", "float32"): ("fp32", 15.7 * T),  # no TF32 on Volta: CUDA cores
    ("v100-sxm2-32gb", "float16"): ("fp16", 125 * T),
    ("v100-sxm2-32gb", "bfloat16"): None,
    ("v100-pcie-16gb", "float32"): ("fp32", 14 * T),
    ("v100-pcie-16gb", "float16"): ("fp16", 112 * T),
    ("v100-pcie-16gb", "bfloat16"): None,
    ("a100-80gb", "float32"): ("tf32", 156 * T),  # JAX's default matmul precision: TF32 on Ampere
    ("a100-80gb", "float16"): ("fp16", 312 * T),
    ("a100-80gb", "bfloat16"): ("bf16", 312 * T),
    ("h100-sxm", "float32"): ("tf32", 494.7 * T),
    ("h100-sxm", "float16"): ("fp16", 989.4 * T),
    ("h100-sxm", "bfloat16"): ("bf16", 989.4 * T),
    ("h100-pcie", "float32"): ("tf32", 378 * T),
    ("h100-pcie", "bfloat16"): ("bf16", 756 * T),
}


def _one_line_error(text):
    lines = text.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in text, text
    return lines[0]


@pytest.mark.parametrize("device, dtype", list(MAPPING))
def test_every_mapping(device, dtype):
    want = MAPPING[(device, dtype)]
    if want is None:
        for call in (lambda: hw.precision_for_dtype(device, dtype), lambda: hw.device_peak(device, dtype),
                     lambda: hw.device_peak(device, dtype, required=True),
                     lambda: hw.check_compute_dtype(device, dtype)):
            with pytest.raises(UserError) as exc:
                call()
            msg = str(exc.value)
            assert "\n" not in msg and device in msg and "bfloat16 tensor cores" in msg, msg
            assert "model.dtype=float16" in msg and "loss scaling" in msg, msg
        return
    precision, peak = want
    assert hw.precision_for_dtype(device, dtype) == precision
    assert hw.check_compute_dtype(device, dtype) == (device, precision)
    name, got = hw.device_peak(device, dtype)
    assert name == device and got == pytest.approx(peak, rel=1e-12)
    # the budget's side of the same mapping: the peak's dtype is the run's dtype
    assert hw.dtype_for_precision(device, precision)[0] == dtype


def test_systems_and_unknown_dtypes():
    with pytest.raises(UserError, match="model.dtype=float16"):
        hw.check_compute_dtype("dgx-1", "bfloat16")
    assert hw.check_compute_dtype("dgx-1", "float16") == ("v100-sxm2-32gb", "fp16")
    with pytest.raises(UserError, match="unknown compute dtype"):
        hw.precision_for_dtype("a100-80gb", "float64")


@pytest.fixture
def cpu_peak(tmp_path, monkeypatch):
    """A known cached CPU peak (the measurement itself is tested in test_foundation_cli.py)."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setattr(hw, "measure_cpu_flops", lambda n=1024, repeats=5: 2.5e11)
    return hw.cpu_peak_flops()


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_cpu_charges_every_dtype_against_its_measured_fp32_peak(cpu_peak, dtype):
    assert hw.precision_for_dtype("cpu", dtype) == "fp32"
    assert hw.device_peak("cpu", dtype) == ("cpu", cpu_peak)
    assert hw.device_peak("auto", dtype) == ("cpu", cpu_peak)  # the JAX devices here are CPUs
    with pytest.raises(UserError, match="cpu has no bf16 peak"):  # the table itself has no 16-bit CPU peak
        hw.peak_flops("cpu", "bf16")


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_xla_cpu_multiplies_16bit_dots_in_float32(dtype):
    """Why the CPU's fp32 peak is the right ceiling for a 16-bit run: XLA's CPU backend converts the operands and
    runs a float32 dot (if it ever gains native 16-bit dots on this CPU, the charge above must change)."""
    import jax
    import jax.numpy as jnp

    a = jnp.ones((64, 64), dtype)
    hlo = jax.jit(lambda x, y: x @ y).lower(a, a).compile().as_text()
    dots = [line for line in hlo.splitlines() if " dot(" in line]
    assert dots and all("= f32[" in line for line in dots), dots


# ---------------------------------------------------------------- medscale budget


def _budget(*args):
    return subprocess.run([sys.executable, "-m", "medscale", "budget", *args], check=False, capture_output=True,
                          text=True, cwd=REPO, env={**os.environ, "PYTHONPATH": REPO}, timeout=120)


@pytest.mark.parametrize("hardware", ["v100-sxm2-32gb", "dgx-1", "v100-pcie-16gb"])
def test_budget_bf16_on_v100_is_one_line_naming_fp16(hardware):
    res = _budget("--hardware", hardware, "--days", "7", "--precision", "bf16")
    assert res.returncode == 2 and res.stdout == ""
    line = _one_line_error(res.stderr)
    assert "bfloat16 tensor cores" in line and "fp16" in line and "model.dtype=float16" in line, line


def test_budget_fp16_on_a_dgx1_states_float16(capsys):
    res = _budget("--hardware", "v100-sxm2-32gb", "--gpus", "8", "--days", "7", "--mfu", "0.35", "--precision",
                  "fp16", "--json")
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    assert out["flops"] == pytest.approx(8 * 125e12 * 0.35 * 7 * 86400, rel=1e-12)
    assert out["dtype"] == "float16"
    assert "model.dtype=float16" in out["dtype_note"] and "loss scaling" in out["dtype_note"]
    assert "bfloat16 has no tensor cores on v100-sxm2-32gb" in out["dtype_note"]
    # without --precision a V100's default is its fp16 tensor-core peak, with the same statement
    default = budget.budget_plan("chinchilla", hardware="dgx-1", days=7, mfu=0.35)
    assert default["details"]["precision"] == "fp16" and default["flops"] == pytest.approx(out["flops"])
    assert (default["dtype"], default["dtype_note"]) == (out["dtype"], out["dtype_note"])
    text = _budget("--hardware", "dgx-1", "--days", "7")
    assert text.returncode == 0, text.stderr
    rows = [r for r in text.stdout.splitlines() if r.startswith("assumes ")]
    assert len(rows) == 1 and "model.dtype=float16" in rows[0] and "bfloat16 has no tensor cores" in rows[0]


@pytest.mark.parametrize("hardware, precision, dtype, words", [
    ("h100-sxm", None, "bfloat16", "model.dtype=bfloat16"),
    ("a100-80gb", "fp16", "float16", "model.dtype=float16"),
    ("a100-80gb", "tf32", "float32", "TF32"),
    ("a100-80gb", "fp32", "float32", "CUDA-core"),
    ("v100-sxm2-16gb", "fp32", "float32", "no tensor cores"),
])
def test_budget_states_the_dtype_elsewhere(hardware, precision, dtype, words):
    plan = budget.budget_plan("chinchilla", hardware=hardware, days=1, precision=precision)
    assert plan["dtype"] == dtype and words in plan["dtype_note"], plan["dtype_note"]
    assert "bfloat16 has no tensor cores" not in plan["dtype_note"]  # only where that is so


def test_budget_without_hardware_assumes_no_dtype():
    plan = budget.budget_plan("chinchilla", flops=1e20)
    assert plan["dtype"] is None and plan["dtype_note"] is None
    assert set(budget.BUDGET_JSON_KEYS) >= {"dtype", "dtype_note"}


# ---------------------------------------------------------------- the report's budget


def test_report_budget_states_the_dtype():
    b = report.resolve_budget()  # one DGX-1 for a week
    assert b["precision"] == "fp16" and b["dtype"] == "float16"
    assert "model.dtype=float16" in b["dtype_note"] and "bfloat16 has no tensor cores" in b["dtype_note"]
    assert report.resolve_budget(hardware="h200", days=1)["dtype"] == "bfloat16"
    given = report.resolve_budget(flops=1e20)
    assert given["dtype"] is None and given["dtype_note"] is None
    with pytest.raises(UserError, match="fp16") as exc:
        report.resolve_budget(hardware="dgx-1", precision="bf16")
    assert "\n" not in str(exc.value)


# ---------------------------------------------------------------- training


def test_training_bfloat16_on_a_v100_fails_before_writing(tmp_path):
    workdir = tmp_path / "run"
    env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu", MEDSCALE_TENSORBOARD="0")
    res = subprocess.run([sys.executable, "-m", "medscale", "train", "--config", TINY, "--workdir", str(workdir),
                          "--quiet", "--set", "hardware=v100-sxm2-32gb", "--set", "model.dtype=bfloat16"],
                         check=False, capture_output=True, text=True, env=env, cwd=REPO, timeout=300)
    assert res.returncode == 2 and res.stdout == "", res.stderr[-2000:]
    line = _one_line_error(res.stderr)
    assert "v100-sxm2-32gb has no bfloat16 tensor cores" in line and "model.dtype=float16" in line, line
    assert not workdir.exists()


def test_training_mfu_peak_is_the_run_dtype(cpu_peak):
    """validate accepts float32 on a V100 and the MFU peak is the CUDA-core one; bfloat16 on an A100 is bf16."""
    from medscale.configs import load_config
    from medscale.train import loop

    cfg = load_config(TINY, ["hardware=v100-sxm2-32gb"])
    loop.validate(cfg)
    assert loop._peak(cfg) == ("v100-sxm2-32gb", 15.7 * T)
    cfg = load_config(TINY, ["hardware=a100-80gb", "model.dtype=bfloat16"])
    loop.validate(cfg)
    assert loop._peak(cfg) == ("a100-80gb", 312 * T)
    with pytest.raises(UserError, match="model.dtype=float16"):
        loop.validate(load_config(TINY, ["hardware=dgx-1", "model.dtype=bfloat16"]))
    cfg = load_config(TINY, ["model.dtype=bfloat16"])  # hardware auto: this CPU, at its measured fp32 peak
    loop.validate(cfg)
    assert loop._peak(cfg) == ("cpu", cpu_peak)
