"""Fits that respect the IsoFLOP design: the design-keeping bootstrap, known-law recovery, interval coverage, the
convention table, Approach 2's degenerate draws and spline check, Approach 1's winners, and the holdout check.

The simulated studies (``study``): 6 budgets over 3 decades, 5 sizes per budget spread +-0.5 decades around
the law's optimum (off by up to 10^0.1, as a real design centred on a previous fit is), 3 seeds at the centre
size, lognormal noise of 1% on the loss. Tolerances below are multiples of spreads measured on this design
(40 studies per law, coarse start grid): SD of the fitted a = 0.023 (law X) / 0.028 (law Y), alpha 0.025 /
0.041, beta 0.029 / 0.025.
"""

import json
import math
import os
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
from _fit_synth import LAW_X, LAW_Y, isoflop_design
from scipy.stats import t as student_t

from medscale.analysis import (
    allocation,
    approach3,
    conventions,
    envelope,
    fitting,
    holdout,
    isoflop,
    resample,
)
from medscale.laws import ChinchillaLaw

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EPS = np.finfo(np.float64).eps
COARSE = approach3.start_grid(alphas=[0.25, 0.5, 1.0], betas=[0.25, 0.5, 1.0], es=[-1.0, 0.0, 1.0],
                              as_=[0.0, 5.0, 10.0], bs=[0.0, 5.0, 10.0])
# 4 x the across-study SD measured for this design (module docstring): a run of the test fails only when the
# fit is off by more than a 4-sigma sampling error
TOL = {"x": {"a": 0.094, "b": 0.094, "alpha": 0.10, "beta": 0.12},
       "y": {"a": 0.11, "b": 0.11, "alpha": 0.17, "beta": 0.10}}


def study(law, seed, budgets=None, sizes=5, span=0.5, noise=0.01, seeds=3, extra=None):
    """One simulated IsoFLOP study of ``law`` (module docstring); ``extra(n) -> dict`` adds columns per size."""
    return isoflop_design(law, np.logspace(17, 20, 6) if budgets is None else budgets, n_sizes=sizes, span=span,
                          noise=noise, seed=seed, offset=0.1, centre_seeds=seeds, extra=extra, seed_ids=True)


# ------------------------------------------------------------------------------------------ resampling


def test_design_counts_keep_budgets_cells_and_seeds():
    """Every draw keeps each budget's number of cells; a drawn cell brings r seed draws per copy; runs never
    move between budgets; seeds of one cell vary within the cell (seed noise enters)."""
    p = study(LAW_X, 0)
    gid, cell = resample.cells(p)
    B = 400
    W = resample.design_counts(p, B, seed=5)
    assert W.shape == (B, len(p)) and (W >= 0).all() and np.array_equal(W, np.round(W))
    for c in np.unique(cell):
        rows = np.flatnonzero(cell == c)
        copies = W[:, rows].sum(1) / len(rows)
        assert np.array_equal(copies, np.round(copies))  # a cell comes in whole copies of its r draws
    for g in np.unique(gid):
        cells_g = np.unique(cell[gid == g])
        copies = np.stack([W[:, cell == c].sum(1) / (cell == c).sum() for c in cells_g], 1)
        assert np.array_equal(copies.sum(1), np.full(B, len(cells_g)))  # k cells drawn per budget, every draw
    centre = np.flatnonzero(np.bincount(cell)[cell] == 3)
    assert len(centre) == 18  # 6 budgets x 3 seeds
    one_cell = centre[:3]
    drawn = W[:, one_cell].sum(1) > 0
    assert np.std(W[drawn][:, one_cell], axis=0).min() > 0.3  # the seeds are redrawn, not copied together
    assert resample.describe(p)["cells_with_replicates"] == 6


def test_runs_that_are_not_an_isoflop_design_are_resampled_as_one_stratum():
    """A grid of sizes x token counts (each run at its own compute, so each budget group holds one size):
    stratifying would redraw nothing; the runs are resampled as one stratum and the draws vary."""
    rows = [{"params": n, "tokens": d, "loss": float(LAW_X.loss(n, d)), "flops": 6 * n * d}
            for n in np.geomspace(1e5, 1e8, 5) for d in np.geomspace(1e8, 1e11, 5)]
    p = pd.DataFrame(rows)
    info = resample.describe(p)
    assert not info["stratified_by_budget"] and info["cells"] == 25
    W = resample.design_counts(p, 200, seed=1)
    assert np.array_equal(W.sum(1), np.full(200, 25.0))
    assert (W.std(0) > 0.5).all()  # every run is redrawn (multinomial(25, 1/25): SD 0.98)
    assert resample.describe(study(LAW_X, 0))["stratified_by_budget"]


# ------------------------------------------------------------------------------------------ recovery


@pytest.mark.parametrize("law", [LAW_X, LAW_Y], ids=["x", "y"])
def test_known_law_recovered_from_an_isoflop_design(law):
    """Approach 3 (the paper's start grid) on a noisy simulated sweep recovers a, b, alpha, beta within 4 SD of
    the design's sampling error; the two laws' exponents (a = 0.52 vs 0.38) are told apart."""
    p = study(law, seed=11)
    res = fitting.fit_approach3(p)
    tol = TOL[law.name]
    for key in ("a", "b", "alpha", "beta"):
        assert abs(res[key] - getattr(law, key)) < tol[key], (key, res[key], getattr(law, key))
    assert res["converged"]


def test_two_laws_are_told_apart():
    ax = fitting.fit_approach3(study(LAW_X, seed=11), starts=COARSE)["a"]
    ay = fitting.fit_approach3(study(LAW_Y, seed=11), starts=COARSE)["a"]
    assert ax - ay > 0.07  # true difference 0.14; each within 0.03 (1 SD) here


# ------------------------------------------------------------------------------------------ coverage


def test_bootstrap_interval_for_a_covers_the_truth_in_95_percent_of_studies():
    """50 simulated studies of law X, each fitted (from the true parameters: the test is about the interval,
    not the search) with 100 design-keeping bootstrap refits; the 95% percentile interval for a must cover the
    true a in at least 43 of 50 studies. With a true coverage of 95% the count is Binomial(50, 0.95):
    P(count <= 42) = 0.3%; an interval that ignores the seed or design noise (too narrow) fails it. The mean
    width must also stay below 1.6 x (3.92 x the across-study SD of the fitted a): a 95% interval of a normal
    estimate is 3.92 SD wide, so this catches intervals made wide enough to cover anything."""
    true = approach3.law_to_theta(LAW_X.E, LAW_X.A, LAW_X.B, LAW_X.alpha, LAW_X.beta)[None]
    covered, est, widths = 0, [], []
    for i in range(50):
        p = study(LAW_X, seed=100 + i)
        n, d, loss = (p[c].to_numpy() for c in ("params", "tokens", "loss"))
        f = approach3.fit(n, d, loss, starts=true)
        th, _, conv = approach3.bootstrap(n, d, loss, f, 100, seed=i, counts=resample.design_counts(p, 100, i))
        a = th[conv, 4] / (th[conv, 3] + th[conv, 4])
        lo, hi = np.percentile(a, [2.5, 97.5])
        covered += lo <= LAW_X.a <= hi
        est.append(f.a)
        widths.append(hi - lo)
    assert covered >= 43, covered
    assert np.mean(widths) < 1.6 * 3.92 * np.std(est), (np.mean(widths), np.std(est))


# ------------------------------------------------------------------------------------------ conventions


def test_convention_table_moves_n_opt_by_the_known_factor():
    """Noise-free data of a law in non-embedding N. With heads = 0.5 N, N counted with heads is N' = 1.5 N: the
    law in N' has the same exponents and A' = A 1.5^alpha, so G' = 1.5^b G, and under C = 6 N' D the optimum at
    the same C moves to N'_opt = 1.5^b N_opt, D'_opt = 1.5^-b D_opt (b = alpha / (alpha + beta)). With a constant
    embedding table of 3x the smallest size (total = N + K), the total count grows slower than N across the
    sweep, so the fitted a drops (the Kaplan/Chinchilla direction)."""
    law = LAW_X
    K = None

    def extra(n):
        return {"params_heads": 0.5 * n, "params_total": 1.5 * n + K}

    p0 = study(law, 0, noise=0.0, seeds=1, extra=lambda n: {"params_heads": 0.5 * n, "params_total": n})
    K = 3 * float(p0["params"].min())
    p = study(law, 0, noise=0.0, seeds=1, extra=extra)
    C = 1e22
    res = fitting.fit_all(p, approaches=("3", "2"), budgets=[C], starts=COARSE)
    rows = {(r["n_convention"], r["flops_convention"]): r for r in res["conventions"]}
    assert len(rows) == 6 and all(r["available"] for r in rows.values())
    ref, heads, total = rows[("non_embedding", "6ND")], rows[("with_heads", "6ND")], rows[("total", "6ND")]
    assert ref["a"] == pytest.approx(law.a, abs=1e-4)
    assert ref["n_opt"] == pytest.approx(float(law.n_opt(C)), rel=1e-3)
    assert heads["a"] == pytest.approx(ref["a"], abs=1e-4)
    assert heads["n_opt"] / ref["n_opt"] == pytest.approx(1.5 ** law.b, rel=1e-3)
    assert heads["d_opt"] / ref["d_opt"] == pytest.approx(1.5 ** -law.b, rel=1e-3)
    assert total["a"] < ref["a"] - 0.03
    shifts = res["conventions_info"]["shifts"]
    assert shifts["with_heads/6ND"]["n_opt_ratio"] == pytest.approx(1.5 ** law.b, rel=1e-3)
    # the accounted rows: N_opt minimises L(N, C / flops_per_token(N)) along the ladder family (brute force)
    acc = rows[("non_embedding", "accounted")]
    fam = allocation.ladder_family("non_embedding")
    ln = np.linspace(np.log(1e5), np.log(1e12), 200_001)
    loss = law.loss(np.exp(ln), C / np.exp(allocation.log_flops_per_token(ln, fam)))
    assert acc["n_opt"] == pytest.approx(float(np.exp(ln[np.argmin(loss)])), rel=2e-3)
    assert acc["approach2_a"] is not None and rows[("non_embedding", "6ND")]["approach2_a"] is None


def test_convention_rows_say_why_when_a_count_is_missing():
    p = study(LAW_X, 0, seeds=1)
    rows = conventions.table(p, 1e21)
    missing = [r for r in rows if not r["available"]]
    assert {r["n_convention"] for r in missing} == {"total", "with_heads"}
    assert all("params_" in r["reason"] for r in missing)


# ------------------------------------------------------------------------------------------ approach 2 and 1


def test_degenerate_draws_counted_where_budgets_have_3_sizes():
    """3 sizes per budget (2 budgets), noise-free convex profiles: a draw keeps a budget's minimum exactly when
    all 3 sizes were drawn (3 points fix the parabola), so the degenerate draws are the draws in which some
    budget missed a size -- counted from the same resampling counts, and reported in the JSON and the
    warnings. (P(all 3 drawn) = 2/9 per budget: about 95% of the draws are degenerate.)"""
    law = LAW_X
    p = study(law, 0, budgets=[1e18, 1e20], sizes=3, span=0.4, noise=0.0, seeds=1)
    B, seed = 300, 4
    res = fitting.fit_all(p, approaches=("2",), bootstrap=B, seed=seed)
    a2 = res["approach2"]
    W = resample.design_counts(p, B, seed)
    gid, _ = resample.cells(p)
    missed = np.zeros(B, bool)
    for g in np.unique(gid):
        missed |= (W[:, gid == g] > 0).sum(1) < 3
    assert a2["draws"] == B and a2["degenerate_draws"] == int(missed.sum())
    assert 0 < a2["degenerate_draws"] < B
    assert a2["bootstrap"]["degenerate_draws"] == a2["degenerate_draws"]
    assert sum(g["fewer_than_3_sizes"] for g in a2["bootstrap"]["degenerate_by_group"]) >= a2["degenerate_draws"]
    assert any(f"{a2['degenerate_draws']} of {B} draws are degenerate" in w for w in res["warnings"])


def test_spline_check_always_reports_per_budget():
    """Budgets with 4 sizes are skipped with the reason; with 5+ sizes in 2+ budgets the check runs."""
    p4 = study(LAW_X, 0, sizes=4, seeds=1)
    sc = isoflop.fit(p4)["spline_check"]
    assert sc["status"] == "not run" and sc["parabola_minus_spline_a"] is None
    assert all(g["status"] == "skipped" and "4 distinct size(s)" in g["reason"] for g in sc["groups"])
    p7 = study(LAW_X, 0, sizes=7, span=0.6, noise=0.0, seeds=3)
    sc = isoflop.fit(p7)["spline_check"]
    assert sc["status"] == "ran" and sc["groups_compared"] >= 2
    assert all(g["status"] in ("ok", "failed") for g in sc["groups"])
    assert sc["parabola_minus_spline_a"] == pytest.approx(sc["parabola_a"] - sc["spline_a"], abs=4 * EPS)


def test_approach1_winners_count_sizes_not_seeds():
    """Two seeds of each size with identical curves: the envelope's winners are sizes (each counted once)."""
    law = LAW_X
    rows = []
    for i, n in enumerate([1e6, 1e7, 1e8]):
        for s in range(2):
            for k, d in enumerate(np.geomspace(1e7, 1e11, 40)):
                rows.append({"run_id": f"n{i}s{s}", "step": k, "params": n, "tokens": d, "flops": 6 * n * d,
                             "loss": float(law.loss(n, d))})
    base = envelope.fit(pd.DataFrame(rows))
    assert base["winners"] == 3
    assert base["winner_runs"] >= base["winners"]


# ------------------------------------------------------------------------------------------ holdout


def test_holdout_summary_matches_hand_computed_values():
    obs, pred = [1.0, 2.0, 4.0], [1.1, 1.9, 4.0]
    lo, hi = [0.9, 1.95, 4.1], [1.2, 2.5, 5.0]
    s = holdout.summarise(["a", "b", "c"], obs, pred, lo, hi)
    errs = [math.log(1.1), math.log(1.9 / 2.0), 0.0]
    assert s["mean_abs_log_error"] == pytest.approx(sum(abs(e) for e in errs) / 3, rel=8 * EPS)
    assert s["max_abs_log_error"] == pytest.approx(math.log(1.1), rel=8 * EPS)
    assert s["coverage"] == pytest.approx(2 / 3, rel=8 * EPS)  # c: 4.0 lies below [4.1, 5.0]
    assert [r["covered"] for r in s["runs"]] == [True, True, False]
    s2 = holdout.summarise(["a"], [1.0], [1.5], [1.2], [1.8])
    assert s2["coverage"] == 0.0 and s2["runs"][0]["covered"] is False
    line = holdout.summary_line({**s, "k": 1, "level": 0.95, "n_held_out": 3, "noise": {"source": "seed replicates"}})
    assert line == ("holdout top 1: mean |log error| 0.049 (max 0.095), 95% intervals cover 67% of 3 held-out runs "
                    "(noise from seed replicates)")
    assert holdout.summary_line({"k": 4, "error": "too few"}) == "holdout top 4: not run (too few)"


def test_holdout_interval_adds_parameter_and_noise_spread_in_quadrature():
    logp = np.array([0.0, 1.0])
    draws = np.array([[-0.2, 0.9], [0.0, 1.0], [0.3, 1.2]] * 40)  # percentiles inside the spread of the draws
    sigma, df = 0.05, 7
    lo, hi = holdout.interval(logp, draws, sigma, df)
    p_lo, p_hi = np.percentile(draws, [2.5, 97.5], axis=0)
    tn = student_t.ppf(0.975, df) * sigma
    assert np.log(lo) == pytest.approx(logp - np.sqrt((logp - p_lo) ** 2 + tn ** 2), abs=16 * EPS)
    assert np.log(hi) == pytest.approx(logp + np.sqrt((p_hi - logp) ** 2 + tn ** 2), abs=16 * EPS)
    _lo0, hi0 = holdout.interval(logp, np.tile(logp, (10, 1)), sigma, df)  # no parameter spread: noise only
    assert np.log(hi0) - logp == pytest.approx(np.full(2, tn), rel=16 * EPS)


def test_holdout_noise_from_seed_replicates_is_the_pooled_within_cell_sd():
    p = study(LAW_X, 3)
    nz = holdout.noise(p, np.zeros(len(p)))
    _, cell = resample.cells(p)
    y = np.log(p["loss"].to_numpy())
    ss = sum(((y[cell == c] - y[cell == c].mean()) ** 2).sum() for c in np.unique(cell) if (cell == c).sum() > 1)
    assert nz["source"] == "seed replicates" and nz["df"] == 12 and nz["cells"] == 6
    assert nz["sigma_log"] == pytest.approx(math.sqrt(ss / 12), rel=16 * EPS)
    r = np.array([0.1, -0.1, 0.2, 0.0, 0.0, 0.0, 0.1])
    nz1 = holdout.noise(study(LAW_X, 3, seeds=1).iloc[:7], r)
    assert nz1["source"] == "fit residuals" and nz1["df"] == 2
    assert nz1["sigma_log"] == pytest.approx(math.sqrt(0.07 / 2), rel=16 * EPS)


def test_holdout_on_noise_free_data_predicts_the_held_out_runs():
    """Data on a law with 0.01% noise: the law fitted on the lower budgets predicts the top ones to 0.1% and
    the intervals cover at least 8 of the 10 held-out runs."""
    law = ChinchillaLaw("z", E=1.5, A=300.0, B=900.0, alpha=0.33, beta=0.3)
    p = study(law, 2, noise=1e-4, seeds=1)
    h = holdout.holdout(p, 2, bootstrap=30, starts=COARSE)
    assert h["k"] == 2 and h["n_held_out"] == 10 and h["budgets_held_out"] == pytest.approx([1e19 * 10 ** 0.4, 1e20])
    assert h["mean_abs_log_error"] < 1e-3 and h["coverage"] >= 0.8
    assert h["noise"]["source"] == "fit residuals"


def _medscale(*args):
    return subprocess.run([sys.executable, "-m", "medscale", *map(str, args)], check=False, capture_output=True,
                          text=True, timeout=300, cwd=REPO)


def test_fit_cli_holdout_json_and_user_errors(tmp_path):
    p = study(LAW_Y, 5)
    path = tmp_path / "runs.csv"
    p.to_csv(path, index=False)
    res = _medscale("fit", path, "--approach", "3", "--starts", "coarse", "--bootstrap", 20, "--holdout-top", 1,
                    "--json", "--quiet")
    assert res.returncode == 0, res.stderr
    h = json.loads(res.stdout)["holdout"]
    assert h["k"] == 1
    top = p[p["budget"] == p["budget"].max()]
    assert sorted(r["run_id"] for r in h["runs"]) == sorted(top["run_id"])
    for r in h["runs"]:
        assert set(r) >= {"run_id", "observed", "predicted", "lo", "hi"}
        assert r["lo"] < r["predicted"] < r["hi"]
        assert r["observed"] == pytest.approx(float(top.loc[top["run_id"] == r["run_id"], "loss"].iloc[0]),
                                              rel=1e-12)
    errs = [abs(math.log(r["predicted"] / r["observed"])) for r in h["runs"]]
    assert h["mean_abs_log_error"] == pytest.approx(np.mean(errs), rel=1e-9)
    assert h["coverage"] == pytest.approx(np.mean([r["lo"] <= r["observed"] <= r["hi"] for r in h["runs"]]))
    assert h["noise"]["source"] == "seed replicates"
    for k, why in ((0, "at least 1"), (6, "hold out fewer than 6"), (5, "left to fit")):
        bad = _medscale("fit", path, "--approach", "3", "--holdout-top", k, "--json", "--quiet")
        assert bad.returncode == 2, (k, bad.stderr)
        lines = bad.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and why in lines[0], bad.stderr
