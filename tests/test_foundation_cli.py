"""medscale flops / budget through the CLI: --json schemas, every error case of the issue, light imports;
and the hardware table."""

import json
import os
import subprocess
import sys

import pytest

from medscale import accounting, hardware
from medscale.cli import main
from medscale.errors import UserError
from medscale.spec import default_modalities

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHAPE = ["--d-model", "64", "--enc-layers", "2", "--dec-layers", "1", "--heads", "4"]


def _one_line_error(capsys, argv, match):
    assert main(argv) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), captured.err
    assert match in lines[0], lines[0]
    assert captured.out == ""


@pytest.mark.parametrize("argv, match", [
    (["budget", "--hardware", "tpu-v9", "--days", "1"], "v100-sxm2-32gb"),  # lists the known names
    (["budget", "--hardware", "dgx-1", "--days", "7", "--mfu", "0"], "--mfu"),
    (["budget", "--hardware", "dgx-1", "--days", "7", "--mfu", "1.2"], "--mfu"),
    (["budget", "--hardware", "dgx-1", "--days", "7", "--mfu", "-0.3"], "--mfu"),
    (["budget", "--hardware", "dgx-1", "--days", "0"], "--days"),
    (["budget", "--hardware", "dgx-1", "--days", "-2"], "--days"),
    (["budget", "--flops", "0"], "--flops"),
    (["budget", "--flops", "-1e20"], "--flops"),
    (["budget", "--pf-days", "-3"], "--pf-days"),
    (["budget", "--params", "0"], "--params"),
    (["budget", "--hardware", "v100-sxm2-32gb", "--gpus", "0", "--days", "7"], "--gpus"),
    (["budget", "--hardware", "v100-sxm2-32gb", "--gpus", "-8", "--days", "7"], "--gpus"),
    (["budget", "--flops", "1e20", "--law", "gopher"], "chinchilla"),  # unknown law lists the known ones
    (["budget"], "exactly one budget"),
    (["budget", "--flops", "1e20", "--pf-days", "3"], "exactly one budget"),
    (["budget", "--days", "3"], "--hardware"),
    (["budget", "--flops", "1e20", "--gpus", "8"], "--hardware"),
    (["budget", "--hardware", "v100-sxm2-32gb", "--days", "7", "--precision", "bf16"], "fp16"),
    (["budget", "--hardware", "cpu", "--days", "1", "--precision", "fp16"], "fp32"),
    (["flops", "--d-model", "100", "--enc-layers", "1", "--dec-layers", "1", "--heads", "3"], "divisible"),
    (["flops", "--d-model", "64", "--enc-layers", "0", "--dec-layers", "1", "--heads", "4"], "enc_layers"),
    (["flops", "--d-model", "64", "--enc-layers", "1", "--dec-layers", "-1", "--heads", "4"], "dec_layers"),
    (["flops", "--size", "gigantic"], "tiny"),
    (["flops", "--d-model", "64"], "--enc-layers"),
    (["flops", *SHAPE, "--vocab", "1,2"], "--vocab"),
    (["flops", *SHAPE, "--batch", "0"], "batch"),
    (["flops", *SHAPE, "--window", "8"], "--attention local"),
    (["flops", "--mlp", "relu"], "relu"),
])
def test_errors_are_one_line(capsys, argv, match):
    _one_line_error(capsys, argv, match)


def test_law_files_that_do_not_parse(tmp_path, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    _one_line_error(capsys, ["budget", "--flops", "1e20", "--law", str(bad)], "does not parse")
    nolaw = tmp_path / "nolaw.json"
    nolaw.write_text(json.dumps({"E": 1.0}))
    _one_line_error(capsys, ["budget", "--flops", "1e20", "--law", str(nolaw)], "no 'law'")
    _one_line_error(capsys, ["budget", "--flops", "1e20", "--law", str(tmp_path / "missing.json")], "not found")


def test_xla_without_model_is_an_error_or_a_ratio(capsys):
    try:
        import medscale.train.step  # noqa: F401
        from medscale.train.step import xla_step_flops  # noqa: F401
    except ImportError:
        _one_line_error(capsys, ["flops", "--size", "tiny", "--xla"], "--xla needs the model")
    else:  # the model exists: XLA's count must be close to the analytic hardware count
        out = json.loads(_run_json(capsys, ["flops", "--size", "tiny", "--batch", "2", "--xla"]))
        assert 0.9 < out["xla_ratio"] < 1.3  # elementwise and optimizer work: measured 1.08 for tiny


def _run_json(capsys, argv):
    assert main([*argv, "--json"]) == 0
    return capsys.readouterr().out


def test_flops_json_schema_and_values(capsys):
    out = json.loads(_run_json(capsys, ["flops", *SHAPE, "--d-ff", "128", "--mlp", "swiglu", "--vocab", "100",
                                        "--enc-len", "32", "--dec-len", "16", "--batch", "4"]))
    assert set(out) == {"params", "model_flops_per_step", "hardware_flops_per_step", "components",
                        "flops_per_token", "ratio_to_6nd", "encoder", "encoder_split"}
    assert out["encoder"] == "unified" and out["encoder_split"] is None
    assert set(out["params"]) == {"total", "embedding", "non_embedding", "heads"}
    assert set(out["components"]) == set(accounting.COMPONENTS)
    # --vocab N: the text vocabulary (caption and boxes) of the default modalities; question and answer keep
    # their own qa vocabulary (256 each)
    V = 512 + 100 + 100 + 256 + 256 + 256
    assert out["params"]["heads"] == 64 * V
    assert out["components"]["heads"] == 3 * 2 * 4 * 16 * 64 * V
    assert out["model_flops_per_step"] == sum(out["components"].values())
    assert out["hardware_flops_per_step"] > out["model_flops_per_step"]  # dense decoder scores
    assert out["flops_per_token"] == pytest.approx(out["model_flops_per_step"] / (4 * 48))
    # four sizes: image, caption, boxes, segmentation
    each = json.loads(_run_json(capsys, ["flops", *SHAPE, "--vocab", "10,20,30,40,50,60"]))
    assert each["params"]["heads"] == 64 * 210


def test_flops_size_config_and_overrides(capsys):
    size = json.loads(_run_json(capsys, ["flops", "--size", "xs"]))
    spec = accounting.ladder_specs()[3]
    assert spec.name == "xs" and size["params"] == accounting.param_counts(spec)
    # explicit flags override the ladder shape
    wider = json.loads(_run_json(capsys, ["flops", "--size", "xs", "--d-ff", "2048"]))
    assert wider["params"]["non_embedding"] == size["params"]["non_embedding"] + 8 * 2 * 256 * 1024
    # remat full: more hardware FLOPs, same model FLOPs
    remat = json.loads(_run_json(capsys, ["flops", "--size", "xs", "--remat", "full"]))
    assert remat["model_flops_per_step"] == size["model_flops_per_step"]
    assert remat["hardware_flops_per_step"] > size["hardware_flops_per_step"]
    # a config file: tiny.py's vocabularies and lengths
    tiny = json.loads(_run_json(capsys, ["flops", "--config", "tiny"]))
    assert tiny["params"]["heads"] == 64 * (128 + 512 + 512 + 64 + 256 + 256)
    assert main(["flops", "--size", "tiny"]) == 0
    text = capsys.readouterr().out
    assert "enc_attn_scores" in text and "non_embedding" in text


def test_budget_does_not_import_jax():
    code = ("import sys; from medscale.cli import main; "
            "rc = main(['budget', '--hardware', 'v100-sxm2-32gb', '--gpus', '8', '--days', '7', '--mfu', '0.35', "
            "'--precision', 'fp16', '--law', 'chinchilla', '--json']); "
            "heavy = [m for m in ('jax', 'flax', 'ml_collections', 'pandas', 'scipy', 'tensorflow') "
            "if m in sys.modules]; print(heavy, file=sys.stderr); sys.exit(rc or (3 if heavy else 0))")
    proc = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True, cwd=REPO,
                          env={**os.environ, "PYTHONPATH": REPO}, timeout=60)
    assert proc.returncode == 0, proc.stderr
    json.loads(proc.stdout)


# ---------------------------------------------------------------- hardware table


def test_datasheet_peaks():
    assert hardware.peak_flops("v100-sxm2-32gb", "fp16") == 125e12
    assert hardware.peak_flops("v100-sxm2-16gb", "fp32") == 15.7e12
    assert hardware.peak_flops("v100-pcie-32gb", "fp16") == 112e12
    assert hardware.peak_flops("a100-80gb", "bf16") == 312e12
    assert hardware.peak_flops("a100-40gb", "tf32") == 156e12
    assert hardware.peak_flops("h100-sxm", "bf16") == pytest.approx(989.4e12)
    assert hardware.peak_flops("h200", "tf32") == hardware.peak_flops("h100-sxm", "tf32")
    assert hardware.memory_bytes("h200") == 141e9
    assert hardware.resolve("dgx-1") == ("v100-sxm2-32gb", 8)
    assert hardware.precision_for_dtype("a100-80gb", "float32") == "tf32"
    assert hardware.precision_for_dtype("v100-sxm2-32gb", "float32") == "fp32"
    with pytest.raises(UserError, match="no bfloat16 tensor cores.*model.dtype=float16"):
        hardware.precision_for_dtype("v100-sxm2-32gb", "bfloat16")
    assert hardware.precision_for_dtype("h200", "bfloat16") == "bf16"
    assert hardware.precision_for_dtype("cpu", "float32") == "fp32"
    assert hardware.precision_for_dtype("cpu", "bfloat16") == "fp32"  # the measured peak (tests/test_precision.py)
    assert hardware.PF_DAY == 8.64e19
    from medscale import laws

    assert laws.PF_DAY is hardware.PF_DAY
    with pytest.raises(UserError, match="h100-sxm"):
        hardware.peak_flops("b200", "bf16")


@pytest.mark.parametrize("kind, key", [
    ("NVIDIA H100 80GB HBM3", "h100-sxm"), ("NVIDIA H100 PCIe", "h100-pcie"), ("NVIDIA H200", "h200"),
    ("Tesla V100-SXM2-32GB", "v100-sxm2-32gb"), ("Tesla V100-SXM2-16GB", "v100-sxm2-16gb"),
    ("Tesla V100-PCIE-32GB", "v100-pcie-32gb"), ("NVIDIA A100-SXM4-80GB", "a100-80gb"),
    ("NVIDIA A100-SXM4-40GB", "a100-40gb"), ("cpu", "cpu"),
])
def test_device_kinds(kind, key):
    assert hardware.hardware_for_device_kind(kind) == key


def test_device_kind_errors():
    with pytest.raises(UserError, match="hardware"):
        hardware.hardware_for_device_kind("TPU v5 lite")

    class Dev:
        def __init__(self, kind):
            self.device_kind = kind

    assert hardware.hardware_for_jax_devices([Dev("cpu"), Dev("cpu")]) == "cpu"
    with pytest.raises(UserError, match="several kinds"):
        hardware.hardware_for_jax_devices([Dev("cpu"), Dev("NVIDIA H200")])


def test_cpu_peak_is_measured_once_and_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    calls = []
    real = hardware.measure_cpu_flops

    def small(n=1024, repeats=5):
        calls.append(n)
        return real(n=128, repeats=2)

    monkeypatch.setattr(hardware, "measure_cpu_flops", small)
    first = hardware.peak_flops("cpu", "fp32")
    assert first > 1e6 and calls == [1024]  # a real measurement (small matmul: far below the peak)
    cached = json.loads((tmp_path / "medscale" / "cpu_peak.json").read_text())
    assert cached[hardware.cpu_cache_key()]["fp32"] == first
    assert hardware.peak_flops("cpu", "fp32") == first and len(calls) == 1  # from the cache
    assert hardware.cpu_peak_flops(refresh=True) > 0 and len(calls) == 2


def test_cpu_peak_keeps_the_best_measurement(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setattr(hardware, "measure_cpu_flops", lambda n=1024, repeats=5: 5e10)
    assert hardware.cpu_peak_flops() == 5e10  # measured under load: low
    assert hardware.record_cpu_peak(2e11) == 2e11  # a later, better measurement replaces it
    assert hardware.peak_flops("cpu", "fp32") == 2e11
    assert hardware.record_cpu_peak(1e11) == 2e11  # a worse one does not
    cached = json.loads((tmp_path / "medscale" / "cpu_peak.json").read_text())
    assert cached[hardware.cpu_cache_key()]["fp32"] == 2e11


def test_default_modalities_vocab_is_base_config():
    assert [m.vocab_size for m in default_modalities()] == [512, 2048, 2048, 256, 256, 256]


def test_jax_devices_map_to_a_table_key():
    import jax

    key = hardware.hardware_for_jax_devices()
    assert key == hardware.hardware_for_device_kind(jax.devices()[0].device_kind)
    assert key in hardware.HARDWARE
