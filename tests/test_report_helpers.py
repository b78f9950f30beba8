"""Registry-format run folders generated from a known law, for the report/plot/notebook tests.

``write_runs(root)`` writes ``root/<sweep>/<run_id>/{config.json, metrics.jsonl, summary.json}`` per
docs/interfaces.md: an IsoFLOP design (4 budgets x up to 9 sizes), a sequence-length group, one failed run.
Total eval loss follows TRUTH (a Chinchilla-form law in N non-embedding, D tokens) times a small seeded noise;
each modality follows its own law; FLOPs are K x N x D (the accounting's encoder-decoder factor is not 6).
"""

import json
import math
import os

import numpy as np

TRUTH = {"E": 1.6, "A": 300.0, "B": 1500.0, "alpha": 0.36, "beta": 0.33}
MODALITY_TRUTH = {
    "image": {"E": 2.2, "A": 250.0, "B": 1200.0, "alpha": 0.34, "beta": 0.31},
    "caption": {"E": 1.0, "A": 400.0, "B": 2500.0, "alpha": 0.38, "beta": 0.36},
}
K = 4.2
SIZES = {f"n{i}": float(round(n)) for i, n in enumerate(np.logspace(math.log10(5e4), math.log10(3e7), 9))}
BUDGETS = (2e13, 6e13, 2e14, 6e14)
SWEEP = "synthetic"


def law(p, n, d):
    return p["E"] + p["A"] / n ** p["alpha"] + p["B"] / d ** p["beta"]


def _write(path, obj):
    with open(path, "w") as fh:
        json.dump(obj, fh)


def _run(root, run_id, size, n, d, budget, enc_len, dec_len, rng, status="done", noise=0.004):
    run_dir = os.path.join(root, SWEEP, run_id)
    os.makedirs(run_dir, exist_ok=True)
    batch = 16
    per_step = batch * (enc_len + dec_len)
    steps = max(1, round(d / per_step))
    seq_penalty = 1.0 + 0.02 * math.log2(256 / (enc_len + dec_len)) if enc_len + dec_len != 256 else 1.0
    cfg = {"model": {"size": size}, "data": {"enc_len": enc_len, "dec_len": dec_len},
           "train": {"batch_size": batch, "tokens": d}, "sweep": {"budget": budget}}
    _write(os.path.join(run_dir, "config.json"), cfg)
    _write(os.path.join(run_dir, "sweep.json"), {"run_id": run_id, "sweep": SWEEP, "size": size, "budget": budget,
                                                 "enc_len": enc_len, "dec_len": dec_len, "batch_size": batch})
    rows = []
    for frac in (0.1, 0.2, 0.4, 0.7, 1.0):
        dt = d * frac
        row = {"kind": "eval", "step": int(steps * frac), "tokens": dt, "flops": K * n * dt,
               "loss": law(TRUTH, n, dt) * seq_penalty}
        for m, p in MODALITY_TRUTH.items():
            row[f"loss/{m}"] = law(p, n, dt)
        rows.append(row)
    with open(os.path.join(run_dir, "metrics.jsonl"), "w") as fh:
        fh.writelines(json.dumps(r) + "\n" for r in rows)
    eps = lambda: float(np.exp(rng.normal(0, noise)))
    loss = law(TRUTH, n, d) * seq_penalty * eps()
    by_mod = {m: law(p, n, d) * eps() for m, p in MODALITY_TRUTH.items()}
    flops = K * n * d
    summary = {
        "run_id": run_id, "sweep": SWEEP, "status": status, "error": None if status == "done" else "boom",
        "config": cfg, "size": size, "budget": budget,
        "params": {"total": int(n * 1.3), "embedding": int(n * 0.3), "non_embedding": int(n), "heads": 0},
        "enc_len": enc_len, "dec_len": dec_len, "batch_size": batch, "steps": steps, "tokens": d,
        "model_flops": flops, "hardware_flops": flops * 1.2, "xla_flops": None, "pf_days": flops / 8.64e19,
        "wall_s": flops / 2e10, "device_kind": "cpu", "device_count": 1, "hardware": "cpu", "mfu": 0.21,
        "final_train_loss": loss * 0.99 if status == "done" else None,
        "final_eval_loss": loss if status == "done" else None,
        "final_train_loss_by_modality": by_mod, "final_eval_loss_by_modality": by_mod,
        "task_metrics": {"caption": {"bleu4": 1.0 / (1.0 + loss / 3)}, "boxes": {"iou": 1.2 / (2.0 + loss / 3)},
                         "segmentation": {"miou": 1.5 / (2.0 + loss / 3)}},
    }
    _write(os.path.join(run_dir, "summary.json"), summary)


def write_runs(root, seed=0, budgets=BUDGETS):
    """Write the synthetic sweep under ``root``; return the sweep folder."""
    rng = np.random.default_rng(seed)
    for b in budgets:
        for size, n in SIZES.items():
            d = b / (K * n)
            if 0.5 <= d / n <= 2000.0:
                _run(root, f"iso{b:.0e}-{size}", size, n, d, b, 128, 64, rng)
    for enc, dec in ((64, 32), (128, 64), (256, 128)):
        for size in ("n3", "n5"):
            n = SIZES[size]
            _run(root, f"seq{enc + dec}-{size}", size, n, 20 * n, None, enc, dec, rng)
    _run(root, "failed-n4", "n4", SIZES["n4"], 1e6, None, 128, 64, rng, status="failed")
    return os.path.join(root, SWEEP)


def test_write_runs_follows_the_law(tmp_path):
    sweep = write_runs(str(tmp_path))
    with open(os.path.join(sweep, "iso2e+14-n3", "summary.json")) as fh:
        s = json.load(fh)
    n, d = s["params"]["non_embedding"], s["tokens"]
    assert abs(math.log(s["final_eval_loss"] / law(TRUTH, n, d))) < 0.03
    assert s["model_flops"] == K * n * d
