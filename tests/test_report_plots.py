"""medscale.analysis.plots: the numbers behind the figures (frontier, IsoFLOP minima, allocation under C = kND,
residuals) and what write_all draws or skips."""

import os

import numpy as np
import pandas as pd
import pytest
from test_report_helpers import TRUTH, K, write_runs

from medscale.analysis import plots, report
from medscale.analysis.laws import ChinchillaLaw

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
    pytest.importorskip("medscale.analysis.allocation")
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

    def fake_fit(points, approaches, bootstrap=0, seed=0):
        calls.append(approaches)
        if "2" in approaches:
            raise UserError("approach 2 needs IsoFLOP groups at 2 or more compute budgets")
        return {"approach3": {}, "approach1": {}}

    fit = report.run_fit(fake_fit, None, approaches=("3", "2", "1"))
    assert calls == [("3", "2", "1"), ("3", "1")]  # approach 1 kept
    assert any("approach 2 left out" in w for w in fit["warnings"])
    with pytest.raises(UserError):
        report.run_fit(lambda p, approaches, bootstrap=0, seed=0: (_ for _ in ()).throw(UserError("x")), None,
                       approaches=("3",))
