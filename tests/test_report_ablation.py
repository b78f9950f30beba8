"""``medscale report DIR --ablation`` (medscale/analysis/ablation.py): two families of IsoFLOP runs whose
frontiers follow known power laws -> the fitted exponents, the better family named when the gap is real, "not
distinguished" when the families are the same up to noise; bad folders are one `error:` line."""

import json
import math
import os

import numpy as np
import pytest

from medscale import rundir
from medscale.analysis import ablation

BUDGETS = [1e10, 3e10, 1e11, 3e11]
SIZES = {"s": 1e4, "m": 3e4, "l": 1e5}


def _family(root, name, A, a, noise, seed):
    """Runs at every budget and size: loss = A C^-a at the best size, higher for the others, times noise."""
    rng = np.random.default_rng(seed)
    for budget in BUDGETS:
        for i, (size, n) in enumerate(SIZES.items()):
            penalty = 1.0 + 0.03 * abs(i - 1)  # the middle size is the optimum
            loss = A * budget ** -a * penalty * math.exp(noise * rng.standard_normal())
            run = os.path.join(root, name, f"{size}-c{budget:g}")
            os.makedirs(run)
            rundir.write_json(os.path.join(run, "summary.json"), {
                "status": "done", "final_eval_loss": loss, "model_flops": budget, "size": size,
                "params": {"non_embedding": n, "total": 2 * n}})


def test_the_better_family_is_named_with_its_exponent(tmp_path):
    _family(tmp_path, "unified", 40.0, 0.05, 0.002, 0)
    _family(tmp_path, "per_modality", 36.0, 0.05, 0.002, 1)  # 10% lower at every compute
    r = ablation.compare(str(tmp_path), ["unified", "per_modality"], n_boot=300)
    for fam in ("unified", "per_modality"):
        f = r["fits"][fam]
        assert abs(f["a"] - 0.05) < 0.005 and f["a_ci"][0] <= f["a"] <= f["a_ci"][1]
        assert [p["size"] for p in f["frontier"]] == ["m"] * len(BUDGETS)
        assert not any(p["edge"] for p in f["frontier"])  # the middle size: bracketed
    assert abs(r["difference"]["log_loss"] - math.log(0.9)) < 0.01
    assert r["difference"]["ci"][1] < 0 and r["verdict"] == "per_modality is better"
    assert r["budget"]["hardware"] and r["extrapolation"] > 1e6  # default budget: one DGX-1, 7 days
    assert len(r["measured"]) == len(BUDGETS)
    assert all(abs(m["log_ratio"] - math.log(0.9)) < 0.01 for m in r["measured"])  # noise 0.002 each
    paths = ablation.write(r, str(tmp_path))
    with open(paths["markdown"]) as fh:
        text = fh.read()
    assert "**Verdict: per_modality is better**" in text and "| 1e10 |" in text and "not bracketed" not in text
    with open(paths["json"]) as fh:
        assert json.load(fh)["verdict"] == "per_modality is better"


def test_same_family_twice_is_not_distinguished(tmp_path):
    _family(tmp_path, "a", 40.0, 0.05, 0.01, 0)
    _family(tmp_path, "b", 40.0, 0.05, 0.01, 1)
    r = ablation.compare(str(tmp_path), n_boot=300, flops=1e15)
    lo, hi = r["difference"]["ci"]
    assert lo < 0 < hi and r["verdict"] == "not distinguished"


def test_cli_and_bad_folders(tmp_path, cli):
    _family(tmp_path, "unified", 40.0, 0.05, 0.002, 0)
    proc = cli("report", str(tmp_path), "--ablation", "--bootstrap", "50")
    assert proc.returncode == 2 and proc.stderr.strip().startswith("error: ") \
        and len(proc.stderr.strip().splitlines()) == 1 and "compares two" in proc.stderr
    _family(tmp_path, "per_modality", 36.0, 0.05, 0.002, 1)
    proc = cli("report", str(tmp_path), "--ablation", "--bootstrap", "50", "--json")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["verdict"] == "unified is better" or out["families"] == ["per_modality", "unified"]
    assert os.path.exists(tmp_path / "ablation.md")
    proc = cli("report", str(tmp_path / "missing"), "--ablation")
    assert proc.returncode == 2 and "not found" in proc.stderr


def test_a_family_at_one_budget_is_an_error(tmp_path):
    _family(tmp_path, "a", 40.0, 0.05, 0.002, 0)
    for d in os.listdir(tmp_path / "a"):
        if not d.endswith("c1e+10"):
            for f in os.listdir(tmp_path / "a" / d):
                os.remove(tmp_path / "a" / d / f)
            os.rmdir(tmp_path / "a" / d)
    _family(tmp_path, "b", 40.0, 0.05, 0.002, 1)
    with pytest.raises(ablation.UserError, match="at least two"):
        ablation.compare(str(tmp_path), n_boot=10)
