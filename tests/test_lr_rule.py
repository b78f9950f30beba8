"""The learning-rate rule: the best rate per width from a tuning grid, the power law through them, and the
quickstart's constants against the committed tuning sweep."""

import math
import os

import numpy as np
import pytest

from medscale.analysis import lr_rule
from medscale.analysis.quickstart import D_REF, LR_EXPONENT, LR_REF, lr_for
from medscale.errors import UserError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_best_rate_is_the_parabola_vertex_and_edges_are_flagged():
    rates = [1e-3, 2e-3, 4e-3, 8e-3, 1.6e-2]
    best = math.log(5e-3)
    losses = [2.0 + 0.3 * (math.log(r) - best) ** 2 for r in rates]
    got = lr_rule.best_rate(rates, losses)
    assert not got["edge"] and got["lr"] == pytest.approx(5e-3, rel=1e-9) and got["loss"] == pytest.approx(2.0)
    # a minimum at the grid's end is not extrapolated
    edge = lr_rule.best_rate(rates, [3, 2.5, 2.2, 2.1, 2.0])
    assert edge["edge"] and edge["lr"] == pytest.approx(1.6e-2, rel=1e-12)


def test_fit_rule_recovers_a_power_law():
    widths = [32, 64, 128]
    rule = lr_rule.fit_rule(widths, [4e-3 * (64 / d) ** 0.7 for d in widths])
    assert rule["lr_ref"] == pytest.approx(4e-3, rel=1e-9) and rule["exponent"] == pytest.approx(0.7, rel=1e-9)
    with pytest.raises(UserError):
        lr_rule.fit_rule([64], [1e-3])


def test_quickstart_constants_are_the_committed_tuning_sweeps_fit():
    rule = lr_rule.rule_from_sweep(os.path.join(REPO, "results", "lr_tune"), d_ref=D_REF)
    assert len(rule["widths"]) >= 3 and not any(w["edge"] for w in rule["widths"].values())
    # the constants in medscale/analysis/quickstart.py are the fit, rounded to 2 significant digits
    assert LR_REF == pytest.approx(rule["lr_ref"], rel=0.01) and LR_EXPONENT == pytest.approx(rule["exponent"],
                                                                                           abs=0.01)
    for d, best in rule["widths"].items():
        # the rule lands within a factor 1.5 of every width's own best rate
        assert abs(np.log(lr_for(d) / best["lr"])) < np.log(1.5), (d, lr_for(d), best["lr"])
