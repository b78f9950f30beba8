"""``medscale report``: the numbers in report.json/report.md equal the fit's, every figure is written, the
recommendation follows the law, the budget and bad input behave."""

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from test_report_helpers import TRUTH, K, write_runs

from medscale.analysis import plots, report
from medscale.laws import PUBLISHED, ChinchillaLaw

BOOT = 8
SEED = 3
BUDGET = 1e17


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _medscale(*args):
    return subprocess.run([sys.executable, "-m", "medscale", *map(str, args)], check=False, capture_output=True,
                          text=True, timeout=600, cwd=REPO)


def test_report_on_a_synthetic_sweep(tmp_path):
    """One build (the expensive part: ``medscale report`` itself), checked from every side below."""
    sweep = write_runs(str(tmp_path))
    out = str(tmp_path / "report")
    res = _medscale("report", sweep, "--flops", BUDGET, "--bootstrap", BOOT, "--seed", SEED, "--out", out,
                    "--json", "--quiet")
    assert res.returncode == 0, res.stderr
    printed = json.loads(res.stdout)
    assert "runs" not in printed and printed["budget"]["flops"] == BUDGET
    with open(os.path.join(out, "report.json")) as fh:
        rep = json.load(fh)  # every check reads the numbers back from the file
    built = (sweep, out, rep)
    check_numbers_equal_the_fit(built)
    check_recommendation_follows_the_law(built)
    check_every_figure_written(built)
    check_per_modality_laws_and_runs_table(built)
    check_extrapolation_warning_only_when_far(built)
    check_budget_states_the_compute_dtype(built)
    check_data_paragraph_conventions_and_holdout(built)
    check_data_constrained_recommendation(built)


def check_data_constrained_recommendation(built):
    """Beside the unconstrained answer: the one bounded by ROCO's published size (the default dataset), the
    repetition module's optimum for the fitted law at C6 = 6C/k, in report.json and report.md."""
    from medscale.analysis import repetition

    _, out, rep = built
    dc = rep["data_constrained"]
    assert dc["dataset"]["dataset"] == "roco" and dc["dataset"]["method"] == "estimate"
    a3 = rep["fit"]["approach3"]
    law = ChinchillaLaw("fit", a3["E"], a3["A"], a3["B"], a3["alpha"], a3["beta"])
    again = repetition.optimum(law, dc["budget_flops_6nd"], dc["unique_tokens"])
    assert dc["n_params_opt"]["value"] == pytest.approx(again["n_params_opt"], rel=1e-12)
    assert dc["predicted_loss"]["value"] == pytest.approx(again["predicted_loss"], rel=1e-12)
    assert dc["predicted_loss"]["value"] >= dc["unconstrained"]["predicted_loss"]
    md = Path(os.path.join(out, "report.md")).read_text()
    assert "### With a finite dataset" in md and "Muennighoff" in md


def check_data_paragraph_conventions_and_holdout(built):
    """The first paragraph names the data and the decades of extrapolation; the convention table and the
    holdout for K = 1, 2 are in report.json and report.md, the holdout equal to ``medscale fit --holdout-top``."""
    _, out, rep = built
    md = Path(os.path.join(out, "report.md")).read_text()
    first = md.split("\n\n")[1]
    assert first.startswith("**Data**") and "not recorded" in first
    assert f"{report.fmt(rep['recommendation']['extrapolation']['decades'], 2)} decades" in first
    assert {(r["n_convention"], r["flops_convention"]) for r in rep["fit"]["conventions"]} >= {
        ("non_embedding", "6ND"), ("non_embedding", "accounted")}
    assert "### How the answer moves with the counting conventions" in md
    a2 = rep["fit"]["approach2"]  # the synthetic sweep is an IsoFLOP design
    assert a2["draws"] == rep["fit_args"]["bootstrap"]
    assert f"- Approach 2 bootstrap: {a2['degenerate_draws']} of {a2['draws']} draws degenerate" in md
    assert "Parabola-vs-spline check" in md
    assert set(rep["holdout"]) == {"1", "2"} and "## Validated extrapolation" in md
    h = rep["holdout"]["1"]
    assert {"k", "runs", "mean_abs_log_error", "coverage", "noise"} <= set(h)
    res = _medscale(*h["command"].split()[1:], "--quiet")
    assert res.returncode == 0, res.stderr
    again = json.loads(res.stdout)["holdout"]
    assert again["mean_abs_log_error"] == pytest.approx(h["mean_abs_log_error"], rel=1e-9)
    assert [r["lo"] for r in again["runs"]] == pytest.approx([r["lo"] for r in h["runs"]], rel=1e-9)
    assert os.path.isfile(os.path.join(out, rep["holdout_figure"][0]))


def check_budget_states_the_compute_dtype(built):
    """A budget on hardware names the model.dtype its peak needs (float16 on a V100, where bfloat16 has no tensor
    cores), in report.json and report.md; a budget in FLOPs assumes none."""
    _, out, rep = built
    assert rep["budget"]["dtype"] is None and rep["budget"]["dtype_note"] is None  # --flops: no hardware
    with open(os.path.join(out, "report.md")) as fh:
        assert "Compute dtype" not in fh.read()
    on_dgx1 = report.resolve_budget(hardware="dgx-1", flops=rep["budget"]["flops"], mfu=0.35)
    assert on_dgx1["dtype"] == "float16"
    md = report.render_markdown(dict(rep, budget=on_dgx1))
    assert ("Compute dtype the recommendation assumes: float16 mixed precision (model.dtype=float16, dynamic loss "
            "scaling); bfloat16 has no tensor cores on v100-sxm2-32gb.") in md


def check_numbers_equal_the_fit(built):
    """The law, its intervals and the allocation at the budget are what ``medscale fit`` prints for the same
    runs, bootstrap, seed and budget."""
    sweep, out, rep = built
    points, _, _ = report.fit_points(sweep)
    args = rep["fit_args"]
    res = _medscale("fit", sweep, *args["cli"], "--json", "--quiet")  # the command report.md prints
    assert res.returncode == 0, res.stderr
    fit = json.loads(res.stdout)
    for name in ("approach2", "approach1"):
        if name[-1] in args["approaches"]:
            for key in ("a", "b", "k_n", "k_d"):
                assert rep["fit"][name][key] == pytest.approx(fit[name][key], rel=1e-12)
    a3 = fit["approach3"]
    row = (a3.get("allocation_encdec") or a3["allocation"])[0]
    rec = rep["recommendation"]
    assert rec["n_opt"]["value"] == pytest.approx(row["n_opt"], rel=1e-9)
    assert rec["d_opt"]["value"] == pytest.approx(row["d_opt"], rel=1e-9)
    assert rec["n_opt"]["ci"] == pytest.approx(row["ci"]["n_opt"], rel=1e-9)
    assert rec["d_opt"]["ci"] == pytest.approx(row["ci"]["d_opt"], rel=1e-9)
    for key in ("E", "A", "B", "alpha", "beta", "a", "b"):
        assert rep["fit"]["approach3"][key] == pytest.approx(fit["approach3"][key], rel=1e-12), key
        assert rep["fit"]["approach3"]["ci"][key] == pytest.approx(fit["approach3"]["ci"][key], rel=1e-12), key
    # the loss interval's draws are the fit's own bootstrap refits: their percentiles are the fit's intervals
    draws = report.bootstrap_laws(fit) or report.reproduce_draws(fit, points, seed=SEED)
    assert len(draws) >= BOOT - 1
    for key in ("alpha", "beta", "E"):
        lo, hi = np.percentile([getattr(g, key) for g in draws], [2.5, 97.5])
        assert [lo, hi] == pytest.approx(fit["approach3"]["ci"][key], rel=1e-6), key
    # the markdown shows the same numbers
    md = Path(os.path.join(out, "report.md")).read_text()
    total_row = next(line for line in md.splitlines() if line.startswith("| total |"))
    assert report.fmt(fit["approach3"]["E"], 4) in total_row
    assert report.fmt(fit["approach3"]["alpha"], 4) in total_row
    # the fitted law is close to the law the runs were drawn from (the whole pipeline sees the right columns)
    assert rep["fit"]["approach3"]["alpha"] == pytest.approx(TRUTH["alpha"], abs=0.05)
    assert rep["fit"]["approach3"]["beta"] == pytest.approx(TRUTH["beta"], abs=0.05)


def check_recommendation_follows_the_law(built):
    sweep, out, rep = built
    law = report.fitted_law(rep["fit"])
    rec = rep["recommendation"]
    assert rec["compute_factor_k"] == pytest.approx(K, rel=1e-6)  # flops = K N D in the synthetic runs
    model = report.compute_model(report.load_runs(sweep)[0])
    assert rec["compute_model"] == model.label
    n_opt, d_opt = rec["n_opt"]["value"], rec["d_opt"]["value"]
    if isinstance(model, plots.KND):  # the closed form with C = k N D, computed here independently
        assert n_opt == pytest.approx(law.G * (BUDGET / K) ** law.a, rel=1e-9)
        assert d_opt == pytest.approx(BUDGET / (K * n_opt), rel=1e-9)
    else:  # the project's accounting: the budget buys D_opt tokens of a model of N_opt parameters
        from medscale import accounting

        assert d_opt * model.flops_per_token(n_opt) == pytest.approx(BUDGET, rel=1e-9)
        spec = accounting.ladder_specs(enc_len=128, dec_len=64)[3]  # at a ladder size the model is exact
        n_l = accounting.param_counts(spec)["non_embedding"]
        assert model.flops_per_token(n_l) == pytest.approx(accounting.flops_per_token(spec), rel=1e-9)
    assert rec["loss"]["value"] == pytest.approx(float(law.loss(n_opt, d_opt)), rel=1e-9)
    # the optimum is a minimum of the law along the budget's line
    for f in (0.8, 1.25):
        assert law.loss(n_opt * f, float(model.tokens(n_opt * f, BUDGET))) > rec["loss"]["value"]
    lo, hi = rec["n_opt"]["ci"]
    assert lo <= hi and lo > 0
    # the optimum is a minimum of the law along the IsoFLOP line
    # extrapolation factor
    c_max = max(r["flops"] for r in rep["runs"] if r["status"] == "done")
    assert rec["extrapolation"]["factor"] == pytest.approx(BUDGET / c_max)
    assert "extrapolated" in rec["extrapolation"]["warning"]
    assert f"{report.fmt(BUDGET / c_max)}x" in Path(os.path.join(out, "report.md")).read_text()
    # the nearest ladder size, its tokens fill the budget, steps of the stated batch
    from medscale import accounting

    lad = rec["ladder"]
    specs = accounting.ladder_specs(enc_len=lad["enc_len"], dec_len=lad["dec_len"])
    dist = {s.name: abs(math.log(accounting.param_counts(s)["non_embedding"] / n_opt)) for s in specs}
    assert lad["name"] == min(dist, key=dist.get)
    spec = next(s for s in specs if s.name == lad["name"])
    assert lad["tokens"] == pytest.approx(BUDGET / accounting.flops_per_token(spec))
    assert lad["steps"] == math.ceil(lad["tokens"] / (lad["batch_size"] * (lad["enc_len"] + lad["dec_len"])))
    assert lad["loss"]["value"] == pytest.approx(float(law.loss(lad["params_non_embedding"], lad["tokens"])))
    # published laws in the spread are evaluated as published
    assert rec["spread"]["chinchilla"]["n_opt"] == pytest.approx(float(PUBLISHED["chinchilla"].n_opt(BUDGET)))


def check_every_figure_written(built):
    _, out, rep = built
    for name in plots.FIGURES:
        for ext, magic in (("png", b"\x89PNG"), ("svg", b"<?xml")):
            path = os.path.join(out, "figures", f"{name}.{ext}")
            assert os.path.getsize(path) > 1000, path
            with open(path, "rb") as fh:
                assert fh.read(5).startswith(magic)
        assert f"figures/{name}.png" in rep["figures"][name]
    svg = Path(os.path.join(out, "figures", "loss_vs_compute.svg")).read_text()
    assert "PF-days" in svg and "model FLOPs" in svg
    md = Path(os.path.join(out, "report.md")).read_text()
    for name in plots.FIGURES:
        assert f"](figures/{name}.png)" in md


def check_per_modality_laws_and_runs_table(built):
    _, out, rep = built
    assert set(rep["modality_laws"]) == {"image", "caption"}
    for d in rep["modality_laws"].values():
        law = report.fitted_law(d["fit"])
        assert d["loss_at_budget"] == pytest.approx(float(law.loss(d["n_opt"], d["d_opt"])))
    # caption was drawn with the larger exponents: its fit shows it
    assert rep["modality_laws"]["caption"]["fit"]["approach3"]["alpha"] > \
        rep["modality_laws"]["image"]["fit"]["approach3"]["alpha"]
    assert len(rep["runs"]) == rep["n_runs"] == rep["n_done"] + 1  # one failed run listed, not fitted
    md = Path(os.path.join(out, "report.md")).read_text()
    run_lines = [line for line in md.splitlines() if re.match(r"\| (iso|seq|failed-)", line)]
    assert len(run_lines) == len(rep["runs"])


def test_comparison_places_models_on_the_law():
    from medscale.analysis import comparison

    law = ChinchillaLaw("t", **TRUTH)
    rows = comparison.place_models(law, K)
    assert all(r["source"] and r["model"] for r in rows)
    names = {r["model"] for r in rows}
    assert {"PubMedCLIP (ViT-B/32)", "4M-B (4M-7)", "4M-L (4M-7)", "4M-XL (4M-7)", "T5-small", "T5-base"} <= names
    for r in rows:
        if r["params"] and r["tokens"]:
            assert r["predicted_loss"] == pytest.approx(float(law.loss(r["params"], r["tokens"])))
            # d_opt_for_n is the optimum's D for that N: N_opt at C = K N d_opt gives back N
            c = K * r["params"] * r["d_opt_for_n"]
            assert float(plots.law_n_opt(law, c, K)) == pytest.approx(r["params"], rel=1e-9)
        else:
            assert r["predicted_loss"] is None
            assert "not" in (r["seen_text"] + r["params_text"]) or r["tokens"] is None
    t5 = next(r for r in rows if r["model"] == "T5-small")
    assert t5["params"] == 60e6 and t5["tokens"] == pytest.approx(1.05e12, rel=0.01)


def check_extrapolation_warning_only_when_far(built):
    sweep, _, rep = built
    runs, _ = report.load_runs(sweep)
    c_max = float(plots.done_runs(runs)["flops"].max())
    near = report.recommend(rep["fit"], runs, {"flops": 2 * c_max, "days": None})
    assert near["extrapolation"]["warning"] is None
    assert near["extrapolation"]["factor"] == pytest.approx(2.0)


def test_budget_default_is_a_dgx1_week():
    from medscale import hardware as hw
    b = report.resolve_budget(measured_mfu=0.3, measured_on="cpu")
    peak = hw.peak_flops("v100-sxm2-32gb", hw.default_precision("v100-sxm2-32gb"))
    assert b["gpus"] == 8 and b["days"] == 7
    assert b["flops"] == pytest.approx(8 * peak * 0.3 * 7 * 86_400)
    assert "measured" in b["mfu_source"]
    stated = report.resolve_budget(hardware="dgx-1", days=1, mfu=0.5)
    assert stated["flops"] == pytest.approx(8 * peak * 0.5 * 86_400) and "stated" in stated["mfu_source"]


def test_bad_input_is_one_line_error(cli, tmp_path):
    res = cli("report", str(tmp_path / "nope"))
    assert res.returncode == 2
    assert res.stderr.strip().startswith("error: ") and len(res.stderr.strip().splitlines()) == 1
    empty = tmp_path / "empty"
    empty.mkdir()
    res = cli("report", str(empty), "--flops", "1e17")
    assert res.returncode == 2 and "no runs" in res.stderr
    res = cli("report", str(empty), "--flops", "-1")
    assert res.returncode == 2
