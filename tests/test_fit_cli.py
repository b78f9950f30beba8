"""``medscale fit`` from the command line: output, fit file, and every bad input as one ``error:`` line."""

import json
import os

import numpy as np
import pytest
from _fit_synth import LAW_Y, curves, isoflop_design

from medscale.cli import main


def _one_error(capsys, argv):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


@pytest.fixture
def sweep_csv(tmp_path):
    df = isoflop_design(LAW_Y, budgets=np.logspace(17, 20, 6), n_sizes=7, noise=0.01, seed=4)
    df = df.rename(columns={"params": "N", "loss": "final loss"})
    path = tmp_path / "runs.csv"
    df.to_csv(path, index=False)
    return path


def test_json_and_fit_file(sweep_csv, tmp_path, capsys):
    out = tmp_path / "law.json"
    argv = [str(sweep_csv), "--col", "params=N", "--col", "loss=final loss", "--approach", "all",
            "--bootstrap", "50", "--budget-flops", "1e21", "--starts", "coarse", "--out", str(out), "--json"]
    # approach 1 needs curves: with "all" on a one-row-per-run table that is an error, not a silent skip
    msg = _one_error(capsys, ["fit", *argv])
    assert "approach 1 needs loss curves" in msg
    argv[argv.index("all")] = "3,2"
    assert main(["fit", *argv]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["n_points"] == 42 and set(res) >= {"approach3", "approach2", "warnings"}
    a3 = res["approach3"]
    assert {"E", "A", "B", "alpha", "beta", "a", "b", "objective", "converged", "ci"} <= set(a3)
    assert set(a3["ci"]) >= {"E", "A", "B", "alpha", "beta", "a", "b"}
    assert a3["allocation"][0]["C"] == 1e21 and "n_opt" in a3["allocation"][0]["ci"]
    assert {"a", "b", "parabola", "spline", "groups"} <= set(res["approach2"])
    from medscale.laws import load_law

    law = load_law(str(out))
    assert law.alpha == pytest.approx(a3["alpha"]) and law.E == pytest.approx(a3["E"])
    doc = json.loads(out.read_text())
    assert doc["data"]["columns"][:2] == ["run_id", "params"] and len(doc["data"]["rows"]) == 42
    assert doc["ci"]["alpha"] == a3["ci"]["alpha"]
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".fit-")]  # no temp file left


def test_readable_table_and_budget_law(sweep_csv, tmp_path, capsys):
    out = tmp_path / "law.json"
    assert main(["fit", str(sweep_csv), "--col", "params=N", "--col", "loss=final loss", "--approach", "3",
                 "--starts", "coarse", "--bootstrap", "20", "--budget-flops", "1e20", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "Approach 3" in text and "converged: yes" in text and "95% interval" in text and "C=1e+20" in text
    assert main(["budget", "--law", str(out), "--flops", "1e20", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan  # the budget calculator accepted the fit file


def test_tokens_from_flops_and_remap(tmp_path, capsys):
    df = isoflop_design(LAW_Y, budgets=np.logspace(17, 20, 4), n_sizes=7, seed=5)
    df = df[["params", "flops", "loss"]].rename(columns={"params": "Model Size", "flops": "Training FLOP"})
    path = tmp_path / "pub.csv"
    df.to_csv(path, index=False)
    assert main(["fit", str(path), "--col", "params=Model Size", "--col", "flops=Training FLOP", "--approach",
                 "2", "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["source"]["conventions"]["tokens"] == "flops / (6 params)"
    assert res["approach2"]["n_groups"] == 4
    assert abs(res["approach2"]["a"] - LAW_Y.a) < 0.05
    # the same table as Parquet (no budget column in either: groups come from clustering the FLOPs)
    pq = tmp_path / "pub.parquet"
    df.to_parquet(pq)
    assert main(["fit", str(pq), "--col", "params=Model Size", "--col", "flops=Training FLOP", "--approach",
                 "2", "--json", "--quiet"]) == 0
    res2 = json.loads(capsys.readouterr().out)
    assert res2["approach2"]["groups_from"].startswith("flops clustered")
    assert res2["approach2"]["a"] == pytest.approx(res["approach2"]["a"])


def test_errors_are_one_line(tmp_path, capsys):
    good = isoflop_design(LAW_Y, budgets=np.logspace(17, 20, 4), n_sizes=7, seed=6)

    def write(df, name="x.csv"):
        p = tmp_path / name
        df.to_csv(p, index=False)
        return str(p)

    assert "needs at least 6 runs" in _one_error(capsys, ["fit", write(good.head(5)), "--approach", "3"])
    bad = good.copy()
    bad.loc[3, "loss"] = np.nan
    assert "column loss has 1 NaN or non-positive" in _one_error(capsys, ["fit", write(bad)])
    bad = good.copy()
    bad.loc[2, "params"] = -1.0
    assert "column params" in _one_error(capsys, ["fit", write(bad)])
    assert "missing column(s) loss" in _one_error(capsys, ["fit", write(good.drop(columns=["loss"]))])
    no_d = good.drop(columns=["tokens", "flops"])
    assert "tokens (or flops)" in _one_error(capsys, ["fit", write(no_d)])
    one = good[good["budget"] == good["budget"].iloc[0]]
    assert "one" in _one_error(capsys, ["fit", write(one), "--approach", "2"])
    assert "not found" in _one_error(capsys, ["fit", write(good), "--col", "params=nope"])
    assert "CANONICAL=SOURCE" in _one_error(capsys, ["fit", write(good), "--col", "params"])
    assert "use 1, 2, 3 or all" in _one_error(capsys, ["fit", write(good), "--approach", "4"])
    txt = tmp_path / "x.json"
    txt.write_text("{}")
    assert ".csv" in _one_error(capsys, ["fit", str(txt)])
    assert "not found" in _one_error(capsys, ["fit", str(tmp_path / "absent.csv")])
    assert "does not exist" in _one_error(capsys, ["fit", write(good), "--approach", "3", "--starts", "coarse",
                                                   "--out", str(tmp_path / "no" / "law.json")])
    empty = tmp_path / "results"
    empty.mkdir()
    _one_error(capsys, ["fit", str(empty)])   # a results folder without finished runs (or without registry)


def test_non_convergence_is_said(tmp_path, capsys):
    p = tmp_path / "r.csv"
    isoflop_design(LAW_Y, budgets=np.logspace(17, 20, 4), n_sizes=7, seed=7).to_csv(p, index=False)
    assert main(["fit", str(p), "--approach", "3", "--starts", "coarse", "--max-iter", "1"]) == 0
    cap = capsys.readouterr()
    assert "converged: NO" in cap.out and "did NOT converge" in cap.out
    assert main(["fit", str(p), "--approach", "3", "--starts", "coarse", "--max-iter", "1", "--json"]) == 0
    cap = capsys.readouterr()
    assert json.loads(cap.out)["approach3"]["converged"] is False and "did NOT converge" in cap.err


def test_curves_table_gives_approach1(tmp_path, capsys):
    p = tmp_path / "curves.csv"
    curves(LAW_Y, np.geomspace(1e7, 3e9, 12)).to_csv(p, index=False)
    assert main(["fit", str(p), "--approach", "1", "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["n_points"] == 12 and abs(res["approach1"]["a"] - LAW_Y.a) < 0.06


def test_exit_status_in_a_subprocess(cli, tmp_path):
    p = tmp_path / "r.csv"
    isoflop_design(LAW_Y, budgets=np.logspace(17, 20, 4), n_sizes=7, seed=8).head(4).to_csv(p, index=False)
    r = cli("fit", p)
    assert r.returncode == 2 and r.stderr.strip().startswith("error: ") and len(r.stderr.strip().splitlines()) == 1
