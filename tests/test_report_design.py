"""The report's data paragraph, caption floor and per-modality consistency check (numpy/pandas only)."""

import math

import numpy as np
import pandas as pd
import pytest

from medscale.analysis import modality, report
from medscale.laws import ChinchillaLaw

EPS = np.finfo(np.float64).eps
MODS = ("caption", "image")
LAWS = {"caption": ChinchillaLaw("caption", E=1.0, A=300.0, B=900.0, alpha=0.30, beta=0.28),
        "image": ChinchillaLaw("image", E=2.0, A=100.0, B=500.0, alpha=0.35, beta=0.25)}


def runs_table(weights_by_len, data=None):
    """Finished runs whose eval loss is the token-weighted mean of the modality losses (fixed weights per
    encoder length), as the training loop's evaluation makes it."""
    rows = []
    rng = np.random.default_rng(0)
    for enc_len, w in weights_by_len.items():
        for i in range(8):
            n, d = 10 ** rng.uniform(5, 7), 10 ** rng.uniform(7, 9)
            by = {m: float(LAWS[m].loss(n, d)) * math.exp(0.01 * rng.standard_normal()) for m in MODS}
            row = {"run_id": f"e{enc_len}r{i}", "status": "done", "params": n, "tokens": d, "flops": 8 * n * d,
                   "enc_len": enc_len, "dec_len": 48, "loss": sum(w[m] * by[m] for m in MODS),
                   **{f"loss/{m}": by[m] for m in MODS}}
            row.update(data(i) if data else {})
            rows.append(row)
    return pd.DataFrame(rows)


def test_eval_weights_recovered_per_configuration():
    w32, w64 = {"caption": 0.3, "image": 0.7}, {"caption": 0.25, "image": 0.75}
    runs = runs_table({32: w32, 64: w64})
    for enc_len, w in ((32, w32), (64, w64)):
        got = modality.weights(runs, MODS, enc_len, 48)
        assert got["n_runs"] == 8 and got["identity_residual"] < 64 * EPS
        for m in MODS:
            assert got["weights"][m] == pytest.approx(w[m], abs=64 * EPS)
    mixed = modality.weights(runs, MODS)  # two configurations pooled: the identity no longer holds
    assert mixed["identity_residual"] > report.IDENTITY_TOL
    assert modality.weights(runs.iloc[:2], MODS) is None  # fewer runs than modalities + 1


def test_check_against_hand_computed_relative_differences():
    w = {"caption": 0.4, "image": 0.6}
    total = ChinchillaLaw("t", E=1.6, A=180.0, B=640.0, alpha=0.32, beta=0.27)
    pts = pd.DataFrame({"params": [1e5, 1e6], "tokens": [1e8, 1e9]})
    pts["loss"] = [float(total.loss(n, d)) for n, d in zip(pts["params"], pts["tokens"])]
    res = modality.check(total, LAWS, w, 1e9, 1e11, pts, loss_ci=[0.9 * float(total.loss(1e9, 1e11)),
                                                                  1.05 * float(total.loss(1e9, 1e11))])
    expect_t = (0.4 * LAWS["caption"].loss(1e9, 1e11) + 0.6 * LAWS["image"].loss(1e9, 1e11)) / total.loss(1e9, 1e11)
    assert res["at_budget"]["relative_difference"] == pytest.approx(float(expect_t) - 1, abs=16 * EPS)
    assert res["at_budget"]["threshold"] == pytest.approx(0.1, rel=1e-12)  # the larger half-width
    assert res["at_budget"]["flagged"] == (abs(float(expect_t) - 1) > 0.1)
    rel = [(0.4 * LAWS["caption"].loss(n, d) + 0.6 * LAWS["image"].loss(n, d)) / total.loss(n, d) - 1
           for n, d in zip(pts["params"], pts["tokens"])]
    assert res["at_runs"]["max_abs_relative_difference"] == pytest.approx(max(abs(float(r)) for r in rel),
                                                                          abs=16 * EPS)
    assert res["at_runs"]["threshold"] == 0.0 and res["at_runs"]["flagged"]  # exact data: any difference flags


def test_data_paragraph_with_and_without_the_summaries_data():
    plain = runs_table({32: {"caption": 0.3, "image": 0.7}})
    d0 = report.data_summary(plain)
    assert d0["unique_examples"] is None and d0["epochs"] is None and d0["synthetic"] is None
    p0 = report._data_paragraph({"data": d0, "recommendation": {"extrapolation": {
        "decades": 2.5, "fitted_flops_max": 1e15}}, "budget": {"flops": 10 ** 17.5}})
    assert "unique examples seen: not recorded" in p0 and "epochs: not recorded" in p0 and "2.5 decades" in p0
    rich = runs_table({32: {"caption": 0.3, "image": 0.7}}, data=lambda i: {
        "data_source": "synthetic", "unique_examples": 1000 * (i + 1), "epochs": 1.0 if i < 7 else float("nan"),
        "caption_entropy_floor": 0.8})
    d1 = report.data_summary(rich)
    assert d1["synthetic"] is True and d1["sources"] == ["synthetic"]
    assert d1["unique_examples"] == {"min": 1000.0, "median": 4500.0, "max": 8000.0}
    assert d1["epochs"] == {"median": 1.0, "max": 1.0} and d1["runs_recorded"] == 7
    fit = {"approach3": {"E": 0.85, "ci": {"E": [0.7, 0.95]}}}
    cf = report.caption_floor(rich, {"caption": {"fit": fit}})
    assert cf["floor"] == 0.8 and cf["E_minus_floor"] == pytest.approx(0.05, abs=8 * EPS)
    assert cf["floor_inside_E_interval"] is True
    assert report.caption_floor(plain, {}) is None


def test_an_n_opt_at_the_allocation_search_floor_is_flagged():
    from medscale.analysis import allocation

    floor = allocation.N_SEARCH_MIN
    assert "not a size to train" in report.size_floor_note(0.981 * floor)
    assert report.size_floor_note(1.2 * floor) is None and report.size_floor_note(None) is None
    # the search really stops there: a law without an N term puts N_opt at the floor
    fam = allocation.ladder_family("non_embedding", 64, 48)
    n, _ = allocation.n_opt_encdec(1.0, 1e-30, 300.0, 6.0, 0.4, 2e20, fam)
    assert report.size_floor_note(float(np.ravel(n)[0])) is not None
