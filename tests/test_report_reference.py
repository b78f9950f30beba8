"""``medscale report`` on the committed reference sweep (results/reference): every figure of the issue and the
tables are produced, and the numbers are those ``medscale fit`` prints for the same runs."""

import json
import os
import subprocess
import sys

import pytest

from medscale.analysis import comparison, plots

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REFERENCE = os.path.join(REPO, "results", "reference")
REQUIRED = ("loss_vs_compute", "isoflop", "allocation", "loss_by_modality", "residuals", "holdout")


def _medscale(*args):
    return subprocess.run([sys.executable, "-m", "medscale", *map(str, args)], check=False, capture_output=True,
                          text=True, timeout=900, cwd=REPO)


@pytest.mark.slow
def test_report_on_the_reference_sweep(tmp_path):
    if not os.path.isdir(REFERENCE):
        pytest.skip("no committed reference sweep in this checkout (results/reference)")
    out = tmp_path / "report"
    res = _medscale("report", REFERENCE, "--bootstrap", 4, "--out", out, "--json", "--quiet")
    assert res.returncode == 0, res.stderr
    with open(out / "report.json") as fh:
        rep = json.load(fh)
    # every figure of the issue, as PNG and SVG; any other figure drawn or named with its reason
    for name in REQUIRED:
        for ext in ("png", "svg"):
            assert (out / "figures" / f"{name}.{ext}").stat().st_size > 1000, name
    assert set(rep["figures"]) | set(rep["figures_not_drawn"]) == set(plots.FIGURES)
    # the reference design trains one encoder length (sequence length is its own study): the figure is named
    # as not drawn, with the reason
    assert "one sequence length" in rep["figures_not_drawn"]["loss_vs_seqlen"]
    md = (out / "report.md").read_text()
    for section in ("## Recommendation", "### How much the answer moves", "## Fitted laws",
                    "## Earlier models on shared tasks", "### Secondary: earlier models by size and data",
                    "## Runs"):
        assert section in md
    assert sum(line.startswith(f"| {r['run_id']} |") for r in rep["runs"] for line in md.splitlines()) == \
        len(rep["runs"])
    assert set(rep["modality_laws"]) and all(f"| {m} |" in md for m in rep["modality_laws"])
    # the headline comparison holds the cited rows and medscale's rows (no benchmark is prepared here)
    assert {r["status"] for r in rep["shared_tasks"]} <= {"published", "local", *comparison.NOT_RUN_STATES}
    # the numbers are medscale fit's for the same runs, bootstrap, seed and budget
    fit_res = _medscale("fit", REFERENCE, *rep["fit_args"]["cli"], "--json", "--quiet")
    assert fit_res.returncode == 0, fit_res.stderr
    fit = json.loads(fit_res.stdout)
    for key in ("E", "A", "B", "alpha", "beta", "a", "b"):
        assert rep["fit"]["approach3"][key] == pytest.approx(fit["approach3"][key], rel=1e-12), key
        assert rep["fit"]["approach3"]["ci"][key] == pytest.approx(fit["approach3"]["ci"][key], rel=1e-12), key
    a3 = fit["approach3"]
    row = (a3.get("allocation_encdec") or a3["allocation"])[0]
    assert rep["recommendation"]["n_opt"]["value"] == pytest.approx(row["n_opt"], rel=1e-9)
    assert rep["recommendation"]["n_opt"]["ci"] == pytest.approx(row["ci"]["n_opt"], rel=1e-9)
    assert rep["budget"]["hardware"] == "v100-sxm2-32gb" and rep["budget"]["gpus"] == 8  # default: a DGX-1
    # its fp16 peak needs float16 compute (bfloat16 has no tensor cores on a V100), and the report says so
    assert rep["budget"]["precision"] == "fp16" and rep["budget"]["dtype"] == "float16"
    assert f"Compute dtype the recommendation assumes: {rep['budget']['dtype_note']}." in md
    assert "model.dtype=float16" in rep["budget"]["dtype_note"]
