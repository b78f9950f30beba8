"""The quickstart's fit wrapper (every approach the runs support) and its exponent table, on runs drawn from a
known law (the sweep itself is exercised by test_sweep_launcher; the full quickstart is timed in docs/sweep.md)."""

import numpy as np
import pandas as pd
import pytest

from medscale.laws import ChinchillaLaw


def law_runs(seed=0):
    law = ChinchillaLaw("truth", E=1.8, A=300.0, B=900.0, alpha=0.35, beta=0.3)
    rng = np.random.default_rng(seed)
    rows = []
    for budget in (1e15, 1e16, 1e17, 1e18):
        for n in np.logspace(np.log10(budget) / 2 - 3.2, np.log10(budget) / 2 - 1.2, 6):
            d = budget / (6 * n)
            rows.append({"run_id": f"r{len(rows)}", "status": "done", "params": n, "tokens": d, "flops": budget,
                         "budget": budget, "loss": float(law.loss(n, d)) * (1 + 0.002 * rng.standard_normal())})
    return law, pd.DataFrame(rows)


def test_the_fit_drops_what_the_runs_cannot_support():
    from medscale.analysis import report
    from medscale.analysis.fitting import fit_all
    from medscale.analysis.quickstart import exponents

    law, df = law_runs()
    fit = report.run_fit(fit_all, df, None, approaches=report.default_approaches(df, None))  # no curves: no 1
    assert "approach1" not in fit and {"approach2", "approach3"} <= set(fit)
    a3 = fit["approach3"]
    assert a3["alpha"] == pytest.approx(law.alpha, abs=0.05) and a3["beta"] == pytest.approx(law.beta, abs=0.05)
    rows = {(app, name): value for app, name, value, _ in exponents(fit)}
    assert rows[("approach3", "a")] == pytest.approx(law.a, abs=0.05)
    assert rows[("approach2", "a")] == pytest.approx(law.a, abs=0.08)


def test_exponent_rows_carry_intervals():
    from medscale.analysis.quickstart import exponents

    fit = {"approach3": {"alpha": 0.3, "beta": 0.4, "a": 0.57, "b": 0.43, "ci": {"a": [0.5, 0.6]}},
           "approach2": {"a": 0.5, "b": 0.5, "ci": {}}}
    rows = exponents(fit)
    assert ("approach3", "a", 0.57, [0.5, 0.6]) in rows and ("approach2", "b", 0.5, None) in rows
    assert [r[0] for r in rows] == ["approach2"] * 2 + ["approach3"] * 4
