"""medscale.analysis.plots: the numbers behind the figures (frontier, IsoFLOP minima, allocation under C = kND,
residuals) and what write_all draws or skips."""

import os

import numpy as np
import pandas as pd
import pytest
from test_report_helpers import TRUTH, K, write_runs

from medscale.analysis import plots, report
from medscale.laws import ChinchillaLaw

LAW = ChinchillaLaw("truth", **TRUTH)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    sweep = write_runs(str(tmp_path_factory.mktemp("runs")))
    return report.load_runs(sweep)


def test_compute_factor_and_allocation_under_knd(runs):
    df, _ = runs
    assert plots.compute_factor(df) == pytest.approx(K)
    c = 3e15
    n = float(plots.law_n_opt(LAW, c, K))
    d = float(plots.law_d_opt(LAW, c, K))
    assert K * n * d == pytest.approx(c, rel=1e-9)
    # brute force along the IsoFLOP line C = K N D
    grid = np.logspace(np.log10(n) - 1, np.log10(n) + 1, 20001)
    best = grid[np.argmin(LAW.loss(grid, c / (K * grid)))]
    assert n == pytest.approx(best, rel=2e-3)
    assert float(plots.law_frontier(LAW, c, K)) == pytest.approx(float(LAW.loss(n, d)))


def test_isoflop_minima_near_the_true_optimum(runs):
    df, _ = runs
    minima = plots.isoflop_minima(df)
    assert len(minima) == 4  # every budget has >= 3 sizes
    for budget, n_min, loss_min, count, d_min in minima:
        n_true = float(plots.law_n_opt(LAW, budget, K))
        assert abs(np.log(n_min / n_true)) < np.log(1.35), (budget, n_min, n_true)
        assert K * n_min * d_min == pytest.approx(budget, rel=0.05)  # on the IsoFLOP line
        assert count >= 3 and loss_min > TRUTH["E"]


def test_frontier_is_the_lower_envelope(runs):
    df, curves = runs
    c, loss = plots.frontier_points(df)
    assert np.all(np.diff(c) >= 0) and np.all(np.diff(loss) <= 0)
    done = plots.done_runs(df)
    for ci, li in zip(c, loss):  # no finished run beats the frontier at or below its compute
        assert not ((done["flops"] <= ci) & (done["loss"] < li - 1e-12)).any()
    cc, _ = plots.frontier_points(df, curves)
    assert len(cc) > len(c) and cc.min() < c.min()  # curves reach lower compute


def test_residuals_vanish_on_the_law():
    n = np.array([1e5, 1e6, 1e7])
    d = np.array([1e8, 3e8, 1e9])
    df = pd.DataFrame({"params": n, "tokens": d, "flops": 6 * n * d, "loss": LAW.loss(n, d), "status": "done"})
    assert np.allclose(plots.residuals(df, LAW), 0.0, atol=1e-12)
    df["loss"] *= np.exp(0.01)
    assert np.allclose(plots.residuals(df, LAW), 0.01)


def test_write_all_draws_what_the_data_allows(tmp_path):
    n = np.array([1e5, 3e5, 1e6, 3e6])
    d = np.array([3e8, 1e8, 3e7, 1e7])
    df = pd.DataFrame({"run_id": list("abcd"), "params": n, "tokens": d, "flops": 6 * n * d,
                       "loss": LAW.loss(n, d), "status": "done"})
    out = plots.write_all(df, str(tmp_path), law=None, formats=("svg",))
    assert set(out) == {"loss_vs_compute", "isoflop", "allocation"}  # no lengths, modalities, metrics, law
    assert sorted(os.listdir(tmp_path)) == ["allocation.svg", "isoflop.svg", "loss_vs_compute.svg"]  # no temp files


def test_task_metric_table_flattens_summaries(runs):
    df, _ = runs
    tm = plots.task_metric_table(df)
    assert set(tm.columns) == {"task/caption/bleu4", "task/boxes/iou", "task/segmentation/miou"}
    done = plots.done_runs(df)
    assert len(tm) == len(done) and np.isfinite(tm.to_numpy()).all()


def test_ladder_accounting_compute_model():
    from medscale import accounting
    from medscale.analysis import comparison

    model = plots.LadderAccounting(128, 64)
    specs = accounting.ladder_specs(enc_len=128, dec_len=64)
    for spec in specs[2:5]:  # exact at the ladder sizes
        n = accounting.param_counts(spec)["non_embedding"]
        assert model.flops_per_token(n) == pytest.approx(accounting.flops_per_token(spec), rel=1e-9)
    c = 1e19
    n, d = model.optimum(LAW, c)
    assert d * model.flops_per_token(n) == pytest.approx(c, rel=1e-9)
    grid = np.logspace(np.log10(n) - 0.5, np.log10(n) + 0.5, 2001)
    best = grid[np.argmin(LAW.loss(grid, model.tokens(grid, c)))]
    assert n == pytest.approx(best, rel=5e-3)
    # the D our law gives a 198M model is the D_opt of the budget whose N_opt is 198M
    d_for = comparison.d_opt_for_n(LAW, 198e6, model)
    n_back, d_back = model.optimum(LAW, d_for * model.flops_per_token(198e6))
    assert n_back == pytest.approx(198e6, rel=2e-3) and d_back == pytest.approx(d_for, rel=2e-3)


def test_run_fit_leaves_out_the_approach_that_cannot_be_fitted():
    from medscale.errors import UserError

    calls = []

    def fake_fit(points, approaches, bootstrap=0, seed=0, budgets=(), curves=None):
        calls.append(approaches)
        if "2" in approaches:
            raise UserError("approach 2 needs IsoFLOP groups at 2 or more compute budgets")
        return {"approach3": {}, "approach1": {}}

    fit = report.run_fit(fake_fit, None, approaches=("3", "2", "1"))
    assert calls == [("3", "2", "1"), ("3", "1")]  # approach 1 kept
    assert any("approach 2 left out" in w for w in fit["warnings"])
    with pytest.raises(UserError):
        report.run_fit(lambda p, **kw: (_ for _ in ()).throw(UserError("x")), None,
                       approaches=("3",))


def _curved_fpt_sweep(seed=0):
    """IsoFLOP groups whose FLOPs per token is far from 6N and not a power law of N (an extra 2e6 per token, as
    attention/embedding work that does not scale with N), losses off the law by a few percent."""
    rng = np.random.default_rng(seed)
    rows = []
    for c in (1e15, 1e16, 1e17):
        for n in np.logspace(4, 7, 7):
            d = c / (6 * n + 2e6)
            rows.append({"params": n, "tokens": d, "flops": c * (1 + 0.003 * rng.standard_normal()), "budget": c,
                         "loss": float(LAW.loss(n, d)) * np.exp(0.03 * rng.standard_normal()), "status": "done"})
    return pd.DataFrame(rows)


def _assert_curves_pass_through_runs(df, law, k):
    curves = plots.isoflop_law_curves(df, law, k)
    iso, groups = plots.isoflop_groups(df)
    assert sorted(curves) == sorted(float(b) for b in np.unique(groups))
    for b, (ns, ds, ls) in curves.items():
        g = iso[groups == b]
        assert np.all(np.diff(ns) > 0) and np.all(np.isfinite(ls)) and np.all(ds > 0)
        for n, d in zip(g["params"].astype(float), g["tokens"].astype(float)):
            i = np.flatnonzero(np.isclose(ns, n, rtol=1e-12))
            assert len(i) == 1, (b, n)  # every run's N is on the curve's grid
            # the dashed curve at a run's N is the law at that run's own (N, D), not at a compute model's D
            assert ls[i[0]] == pytest.approx(float(law.loss(n, d)), rel=1e-9), (b, n)
            assert ds[i[0]] == pytest.approx(d, rel=1e-9)
        assert ns.min() < g["params"].min() and ns.max() > g["params"].max()  # drawn a little beyond the runs


def test_isoflop_law_curve_is_the_law_at_the_runs_own_n_and_d():
    df = _curved_fpt_sweep()
    _assert_curves_pass_through_runs(df, LAW, 6.0)  # a compute model (C = 6ND) that is wrong for these runs
    # beyond the sampled sizes D follows the compute model's slope from the end run, continuously
    (ns, ds, _), = [v for b, v in plots.isoflop_law_curves(df, LAW, 6.0).items() if b == 1e16]
    out = ns > df["params"].max()
    assert np.allclose(ns[out] * ds[out], ns[out][0] * ds[out][0], rtol=1e-9)  # C = 6ND: N D constant


def test_isoflop_law_curve_on_the_reference_sweep():
    ref = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "results", "reference")
    if not os.path.isdir(ref):
        pytest.skip("no committed reference sweep in this checkout")
    df, _ = report.load_runs(ref)
    law = ChinchillaLaw("ref", E=2.2e-9, A=20.19, B=366.5, alpha=0.37, beta=0.416)  # its reported fit
    _assert_curves_pass_through_runs(df, law, report.figure_model(df, report.compute_model(df)))
