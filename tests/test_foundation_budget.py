"""The compute-budget calculator against published statements and hand arithmetic."""

import json
import math

import pytest

from medscale import accounting, laws
from medscale.analysis import budget
from medscale.cli import main
from medscale.errors import UserError


def _budget_json(capsys, *args):
    assert main(["budget", *args, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_chinchilla_gopher_budget_is_about_40b():
    # Hoffmann et al. 2022, Sec. 3.3 / Table 3: approach 3 puts the compute-optimal model for Gopher's budget
    # (5.76e23 FLOPs) at about 40B parameters.
    plan = budget.budget_plan("chinchilla", flops=5.76e23)
    assert 38e9 < plan["n_params_opt"] < 42e9
    assert plan["tokens_opt"] == pytest.approx(5.76e23 / (6 * plan["n_params_opt"]))
    rounded = budget.budget_plan("chinchilla-rounded", flops=5.76e23)
    assert 30e9 < rounded["n_params_opt"] < 50e9


def test_dgx1_week_by_hand(capsys):
    out = _budget_json(capsys, "--hardware", "v100-sxm2-32gb", "--gpus", "8", "--days", "7", "--mfu", "0.35",
                       "--precision", "fp16", "--law", "chinchilla")
    assert set(out) == {"flops", "pf_days", "gpu_hours", "n_params_opt", "tokens_opt", "tokens_per_param",
                        "predicted_loss", "law", "ladder", "days", "dtype", "dtype_note"}
    assert set(out["ladder"]) == {"name", "params", "tokens"}
    C = 8 * 125e12 * 0.35 * 7 * 86400  # 8 V100 x 125 TFLOP/s fp16 tensor x MFU x one week
    assert out["flops"] == pytest.approx(C, rel=1e-12)
    assert out["pf_days"] == pytest.approx(C / (1e15 * 86400))
    assert out["gpu_hours"] == pytest.approx(8 * 7 * 24)
    assert out["days"] == pytest.approx(7)
    # Chinchilla approach 3, unrounded: E=1.69, A=406.4, B=410.7, alpha=0.3392, beta=0.2849
    alpha, beta, A, B = 0.3392, 0.2849, 406.4, 410.7
    G = (alpha * A / (beta * B)) ** (1 / (alpha + beta))
    n = G * (C / 6) ** (beta / (alpha + beta))
    d = C / (6 * n)
    assert out["n_params_opt"] == pytest.approx(n, rel=1e-9)
    assert out["tokens_opt"] == pytest.approx(d, rel=1e-9)
    assert out["tokens_per_param"] == pytest.approx(d / n)
    assert out["predicted_loss"] == pytest.approx(1.69 + A / n**alpha + B / d**beta)
    assert 0.9e9 < n < 1.3e9  # ~1.1B parameters on ~32B tokens
    # nearest ladder size by total parameters (Chinchilla's N counts all parameters), and its optimal tokens
    specs = {s.name: s for s in accounting.ladder_specs()}
    lad = out["ladder"]
    assert lad["params"] == accounting.param_counts(specs[lad["name"]])["total"]
    dist = {k: abs(math.log(accounting.param_counts(s)["total"] / n)) for k, s in specs.items()}
    assert lad["name"] == min(dist, key=dist.get)
    c_lad = 6 * (lad["params"] / G) ** ((alpha + beta) / beta)  # invert N = G (C/6)^a
    assert lad["tokens"] == pytest.approx(c_lad / (6 * lad["params"]), rel=1e-9)


def test_pf_days_and_flops_agree():
    a = budget.budget_plan("epoch2024", pf_days=10)
    b = budget.budget_plan("epoch2024", flops=10 * 8.64e19)
    assert a["n_params_opt"] == pytest.approx(b["n_params_opt"])
    assert a["gpu_hours"] is None and a["days"] is None  # no hardware, no time


def test_epoch_replication_near_20_tokens_per_param():
    # Besiroglu et al. 2024: their fit implies roughly 20 tokens per parameter at Chinchilla's scale
    plan = budget.budget_plan("epoch2024", flops=5.76e23)
    assert 15 < plan["tokens_per_param"] < 26


def test_kaplan_one_pf_day_is_1_3b():
    # Kaplan et al. 2020, Eq. 6.1: N_opt = 1.3e9 (C / PF-day)^0.73; N non-embedding
    plan = budget.budget_plan("kaplan2020", pf_days=1)
    assert plan["n_params_opt"] == pytest.approx(1.3e9)
    assert plan["details"]["n_convention"] == "non_embedding"
    spec = {s.name: s for s in accounting.ladder_specs()}[plan["ladder"]["name"]]
    assert plan["ladder"]["params"] == accounting.param_counts(spec)["non_embedding"]


def test_reverse_mode_round_trip_and_days():
    fwd = budget.budget_plan("chinchilla", flops=3e21)
    rev = budget.budget_plan("chinchilla", params=fwd["n_params_opt"], hardware="dgx-1", mfu=0.5)
    assert rev["flops"] == pytest.approx(3e21, rel=1e-9)
    assert rev["tokens_opt"] == pytest.approx(fwd["tokens_opt"], rel=1e-9)
    assert rev["days"] == pytest.approx(3e21 / (8 * 125e12 * 0.5) / 86400)  # dgx-1: 8 x V100 SXM2, fp16 default
    assert rev["gpu_hours"] == pytest.approx(rev["days"] * 24 * 8)


def test_fit_file_with_convention(tmp_path, capsys):
    path = tmp_path / "fit.json"
    law = {"form": "chinchilla", "E": 1.5, "A": 300.0, "B": 500.0, "alpha": 0.3, "beta": 0.3,
           "n_convention": "total"}
    path.write_text(json.dumps({"law": law, "ci": {}}))
    out = _budget_json(capsys, "--flops", "1e20", "--law", str(path))
    n = (0.3 * 300 / (0.3 * 500)) ** (1 / 0.6) * (1e20 / 6) ** 0.5
    assert out["n_params_opt"] == pytest.approx(n)
    assert out["predicted_loss"] == pytest.approx(1.5 + 300 / n**0.3 + 500 / (1e20 / 6 / n) ** 0.3)
    law.pop("n_convention")  # default: the project's fits count non-embedding parameters
    path.write_text(json.dumps({"law": law}))
    assert laws.load_law_with_convention(str(path))[1] == "non_embedding"
    law["n_convention"] = "everything"
    path.write_text(json.dumps({"law": law}))
    with pytest.raises(UserError, match="n_convention"):
        laws.load_law_with_convention(str(path))


def test_human_table_names_the_essentials(capsys):
    assert main(["budget", "--hardware", "dgx-1", "--days", "7", "--mfu", "0.35", "--precision", "fp16"]) == 0
    text = capsys.readouterr().out
    for word in ("N_opt", "D_opt", "PF-days", "GPU-hours", "predicted loss", "nearest ladder size", "steps"):
        assert word in text
