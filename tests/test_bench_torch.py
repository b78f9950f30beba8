"""``medscale bench torch``: argument and interpreter errors are one-line; the comparison itself runs when an
interpreter with torch is given in MEDSCALE_TORCH_PYTHON (torch is not a dependency)."""

import json
import os
import sys

import pytest

from medscale.bench import versus_torch
from medscale.cli import main


@pytest.mark.parametrize("argv,needle", [
    (["--python", "/nonexistent/python"], "cannot run '/nonexistent/python'"),
    (["--python", sys.executable, "--rounds", "0"], "--rounds and --steps must be positive"),
    (["--python", sys.executable, "--vocab", "1,2"], "--vocab '1,2'"),
])
def test_bad_input_is_one_error_line(argv, needle, capsys):
    assert main(["bench", "torch", *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and needle in err[0]


def test_interpreter_without_torch_is_named(capsys, tmp_path):
    """An interpreter that runs but cannot import torch: the error names it and the import failure."""
    fake = tmp_path / "python-without-torch"
    fake.write_text(f"#!/bin/sh\nexec {sys.executable} -S -I \"$@\"\n")
    fake.chmod(0o755)
    env_torch = os.environ.get("MEDSCALE_TORCH_PYTHON")
    if env_torch:
        pytest.skip("a torch interpreter is configured; the no-torch path is tested without it")
    try:
        import torch  # noqa: F401
        pytest.skip("torch importable from this interpreter")
    except ImportError:
        pass
    assert main(["bench", "torch", "--python", str(fake)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --python") and "torch" in err


def test_torch_script_does_not_import_medscale():
    """The torch side runs under another interpreter: it must not need medscale (or JAX)."""
    src = versus_torch.TORCH_SCRIPT.read_text()
    assert versus_torch.TORCH_SCRIPT.exists() and "import medscale" not in src and "jax" not in src


@pytest.mark.skipif(not os.environ.get("MEDSCALE_TORCH_PYTHON"), reason="set MEDSCALE_TORCH_PYTHON to a torch python")
def test_comparison_runs_on_a_tiny_shape(capsys):
    assert main(["bench", "torch", "--python", os.environ["MEDSCALE_TORCH_PYTHON"], "--rounds", "2", "--steps", "1",
                 "--d-model", "32", "--enc-layers", "1", "--dec-layers", "1", "--heads", "2", "--d-ff", "64",
                 "--enc-len", "16", "--dec-len", "8", "--batch", "2", "--vocab", "64,64,64,64", "--json"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert [r["first"] for r in out["rounds"]] == ["torch", "medscale"]
    assert out["speedup"] == pytest.approx(out["torch_step_s"] / out["medscale_step_s"])
    assert out["vocab_total"] == 256
