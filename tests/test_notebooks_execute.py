"""The analysis notebooks are what make_notebooks.py writes, and they execute headless against a results
folder given as a parameter (MEDSCALE_RESULTS), in a kernel that runs this interpreter."""

import json
import os
import subprocess
import sys

import pytest
from test_report_helpers import write_runs

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ANALYSIS = os.path.join(REPO, "analysis")
NOTEBOOKS = ("scaling_curves", "isoflop", "seqlen")


def test_notebooks_are_generated_by_the_script(tmp_path):
    res = subprocess.run([sys.executable, os.path.join(ANALYSIS, "make_notebooks.py"), str(tmp_path)],
                         check=False, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    for name in NOTEBOOKS:
        with open(tmp_path / f"{name}.ipynb") as a, open(os.path.join(ANALYSIS, f"{name}.ipynb")) as b:
            assert a.read() == b.read(), f"analysis/{name}.ipynb is stale: run python analysis/make_notebooks.py"


@pytest.fixture
def kernel_env(tmp_path, monkeypatch):
    """A 'python3' kernelspec for this interpreter, found first through JUPYTER_PATH."""
    spec_dir = tmp_path / "jupyter" / "kernels" / "python3"
    spec_dir.mkdir(parents=True)
    (spec_dir / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "Python 3 (tests)", "language": "python"}))
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
    monkeypatch.setenv("PYTHONPATH", REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return tmp_path


def test_notebooks_execute(kernel_env, monkeypatch):
    """isoflop runs on a sweep given by MEDSCALE_RESULTS; scaling_curves and seqlen on their default, the committed
    reference sweep (or on the given sweep when this checkout has no results/reference)."""
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    import asyncio

    sweep = write_runs(str(kernel_env / "runs"), budgets=(2e13, 2e14, 6e14))  # fewer runs: faster fits
    reference = os.path.join(REPO, "results", "reference")
    env = {k: v for k, v in os.environ.items() if k != "MEDSCALE_RESULTS"}
    env["MEDSCALE_BOOTSTRAP"] = "2"
    given = dict(env, MEDSCALE_RESULTS=sweep)
    envs = {"isoflop": given}
    for name in ("scaling_curves", "seqlen"):
        envs[name] = env if os.path.isdir(reference) else given
    nbs = {name: nbformat.read(os.path.join(ANALYSIS, f"{name}.ipynb"), as_version=4) for name in NOTEBOOKS}

    async def run_all():  # three kernels at once: their start-up and imports overlap
        await asyncio.gather(*(nbclient.NotebookClient(nb, timeout=300, kernel_name="python3",
                                                       resources={"metadata": {"path": ANALYSIS}}
                                                       ).async_execute(env=envs[name])
                               for name, nb in nbs.items()))

    asyncio.run(run_all())
    for name, nb in nbs.items():
        outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
        assert not [o for o in outputs if o.get("output_type") == "error"]
        text = "".join(o.get("text", "") for o in outputs if o.get("output_type") == "stream")
        expected = envs[name].get("MEDSCALE_RESULTS") or reference
        assert os.path.abspath(expected) in text or expected in text, (name, text[:300])  # the folder it was meant to read
        images = [o for o in outputs if "image/png" in o.get("data", {})]
        assert len(images) >= (1 if name == "seqlen" else 2), name
