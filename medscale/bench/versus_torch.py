"""``medscale bench torch``: the training step of medscale against a PyTorch encoder-decoder of the same shapes,
on the same machine, in one run.

Each round runs both benchmarks as fresh processes, one after the other, alternating which goes first (ABBA),
so that a machine whose speed drifts (shared or virtual CPUs) does not favour either side. Each process times
its own step (median over ``steps`` timed steps after warm-up; compile excluded). The result is the per-round
step times, the median of each side over rounds, and ``speedup`` = torch's median / medscale's median
(> 1: medscale is faster).
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

from medscale.bench.step import WARMUP_STEPS, bench_spec
from medscale.errors import UserError

TORCH_SCRIPT = Path(__file__).with_name("torch_encdec.py")


def _run_json(cmd: list[str], what: str, timeout: float) -> dict:
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    except FileNotFoundError:
        raise UserError(f"{what}: cannot run {cmd[0]!r} (give an existing Python interpreter)") from None
    except subprocess.TimeoutExpired:
        raise UserError(f"{what}: no result within {timeout:.0f} s") from None
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise UserError(f"{what} failed (exit {proc.returncode}): {tail}")
    return json.loads(lines[-1])


def check_torch(python: str) -> str:
    """torch's version under ``python``, or a UserError naming what to change."""
    out = _run_json([python, "-c", "import json, torch; print(json.dumps({'v': torch.__version__}))"],
                    f"--python {python}", timeout=120)
    return out["v"]


def compare(python: str, *, d_model=256, enc_layers=4, dec_layers=4, heads=4, d_ff=1024, vocab="2048,2048,2048,2048,256,256",
            enc_len=256, dec_len=64, batch=16, steps=5, rounds=3, progress=None, timeout=1800.0) -> dict:
    """Run ``rounds`` alternating pairs; return per-round times, medians and the speedup of medscale."""

    if rounds < 1 or steps < 1:
        raise UserError("--rounds and --steps must be positive")
    spec = bench_spec(d_model, enc_layers, dec_layers, heads, d_ff, vocab, enc_len, dec_len)  # validates --vocab
    torch_version = check_torch(python)
    shape = ["--d-model", d_model, "--enc-layers", enc_layers, "--dec-layers", dec_layers, "--heads", heads,
             "--d-ff", d_ff, "--enc-len", enc_len, "--dec-len", dec_len, "--batch", batch, "--steps", steps]
    shape = [str(x) for x in shape]
    torch_cmd = [python, str(TORCH_SCRIPT), *shape, "--vocab-total", str(spec.vocab_total),
                 "--warmup", str(WARMUP_STEPS), "--json"]
    ours_cmd = [sys.executable, "-m", "medscale", "bench", "step", *shape, "--vocab", str(vocab), "--json"]
    env_note = os.environ.get("XLA_FLAGS", "")
    rows = []
    for r in range(rounds):
        order = ("torch", "medscale") if r % 2 == 0 else ("medscale", "torch")
        row = {"round": r + 1, "first": order[0]}
        for side in order:
            cmd = torch_cmd if side == "torch" else ours_cmd
            out = _run_json(cmd, f"the {side} benchmark", timeout)
            row[f"{side}_step_s"] = out["step_s"]
            row[f"{side}_step_s_all"] = out.get("step_s_all")
            if progress:
                progress(f"round {r + 1}/{rounds}: {side} {out['step_s']:.3f} s/step")
        rows.append(row)
    t_med = statistics.median(r["torch_step_s"] for r in rows)
    m_med = statistics.median(r["medscale_step_s"] for r in rows)
    return {"rounds": rows, "torch_step_s": t_med, "medscale_step_s": m_med, "speedup": t_med / m_med,
            "medscale_faster_rounds": sum(r["medscale_step_s"] < r["torch_step_s"] for r in rows),
            "torch": torch_version, "tokens_per_step": batch * (enc_len + dec_len),
            "vocab_total": spec.vocab_total, "xla_flags": env_note}
