"""``medscale fit`` on a results folder (run directory contract of docs/interfaces.md), through
``medscale.sweep.registry``; skipped until that module is installed."""

import json
import os

import numpy as np
from _fit_synth import LAW_X

from medscale.cli import main


def _write_run(root, run_id, n, d, c, loss, status="done", curve=True):
    run = root / "sw" / run_id
    run.mkdir(parents=True)
    summary = {"run_id": run_id, "sweep": "sw", "status": status, "error": None,
               "params": {"total": 1.1 * n, "embedding": 0.1 * n, "non_embedding": n, "heads": 0.05 * n},
               "tokens": d, "model_flops": c, "final_eval_loss": loss, "enc_len": 128, "dec_len": 64}
    (run / "summary.json").write_text(json.dumps(summary))
    (run / "sweep.json").write_text(json.dumps({"run_id": run_id, "sweep": "sw", "budget": c}))
    if curve:
        rows = [{"kind": "eval", "step": 0, "tokens": 0, "flops": 0, "loss": 9.0}]
        for s, frac in enumerate(np.geomspace(1e-3, 1.0, 20), start=1):
            rows.append({"kind": "eval", "step": s, "tokens": frac * d, "flops": frac * c,
                         "loss": float(LAW_X.loss(n, frac * d))})
        (run / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")


def test_results_folder(tmp_path, capsys):
    rng = np.random.default_rng(0)
    k = 0
    for c in np.logspace(17, 20, 4):
        for n in LAW_X.n_opt(c) * np.geomspace(0.25, 4, 7):
            d = c / (6 * n)
            _write_run(tmp_path, f"r{k}", n, d, c, float(LAW_X.loss(n, d)) * np.exp(0.005 * rng.standard_normal()))
            k += 1
    _write_run(tmp_path, "broken", 1e8, 1e9, 6e17, 99.0, status="diverged")   # never fitted
    assert main(["fit", str(tmp_path), "--approach", "all", "--starts", "coarse", "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["n_points"] == 28 and res["source"]["kind"] == "registry"
    assert abs(res["approach3"]["a"] - LAW_X.a) < 0.05
    assert abs(res["approach2"]["a"] - LAW_X.a) < 0.03 and res["approach2"]["n_groups"] == 4
    assert res["approach1"]["n_runs"] == 28
    assert os.path.isdir(tmp_path / "sw" / "broken")
