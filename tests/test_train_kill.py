"""A training run SIGKILLed at its dangerous points (``medscale.train.loop.test_kill``: between checkpoints,
after its last evaluation, after its last checkpoint, before its summary) and relaunched ends with the same
record as an uninterrupted run: summary.json equal but for wall-clock fields, metrics.jsonl equal line for
line but for timing fields (no duplicate row, no null loss).

Real ``medscale train`` processes on a tiny model (d_model 16, one layer each side, 22 steps; checkpoints every 5, evaluations every 10)
on the unbounded synthetic stream in chunks of 64 scenes (the 88 examples it reads cross a chunk boundary)."""

import json
import os
import signal
import subprocess
import sys

import pytest

from medscale import rundir

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SETTINGS = ["model.size=", "model.d_model=16", "model.enc_layers=1", "model.dec_layers=1", "model.num_heads=1",
            "model.d_ff=64", "train.batch_size=4", "data.stream_chunk=64", "data.num_eval=16",
            "train.eval_batches=1", "train.log_every=1", "train.warmup_steps=5", "train.steps=22",
            "train.eval_every=10", "train.ckpt_every=5", "train.task_eval_examples=0"]
WALL_CLOCK = {"wall_s", "step_s", "mfu", "time"}
TIMING = {"step_s", "tokens_per_s", "tflops_per_device", "mfu"}


def _train(workdir, **env):
    argv = [sys.executable, "-m", "medscale", "train", "--config", "tiny", "--workdir", str(workdir), "--quiet"]
    for s in SETTINGS:
        argv += ["--set", s]
    full = dict(os.environ, PYTHONPATH=REPO, MEDSCALE_TENSORBOARD="0", **env)
    return subprocess.run(argv, check=False, cwd=REPO, env=full, capture_output=True, text=True, timeout=600)


def _record(workdir):
    with open(os.path.join(workdir, "summary.json")) as fh:
        summary = json.load(fh)
    summary = {k: v for k, v in summary.items() if k not in WALL_CLOCK}
    summary.get("task_eval", {}).pop("seconds", None)
    summary.pop("run_id"), summary.pop("sweep")  # named after the folders
    with open(os.path.join(workdir, "metrics.jsonl")) as fh:
        rows = [{k: v for k, v in json.loads(line).items() if k not in TIMING} for line in fh]
    return summary, rows


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("straight") / "run"
    proc = _train(workdir)
    assert proc.returncode == 0, proc.stderr
    return _record(workdir)


@pytest.mark.slow
@pytest.mark.parametrize("point", ["step:12", "after_last_eval", "after_last_checkpoint", "before_summary"])
def test_a_run_killed_at_a_dangerous_point_ends_as_if_never_killed(tmp_path, reference, point):
    workdir = tmp_path / "run"
    proc = _train(workdir, MEDSCALE_TEST_KILL_AT=point)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert not os.path.exists(workdir / "summary.json")
    last_checkpoint = {"step:12": 10, "after_last_eval": 20}.get(point, 22)
    assert max(rundir.checkpoint_steps(str(workdir))) == last_checkpoint
    with open(workdir / "metrics.jsonl") as fh:
        logged = max(json.loads(line)["step"] for line in fh)
    assert logged == {"step:12": 12}.get(point, 22)  # rows past the last checkpoint, to be replaced
    proc = _train(workdir)
    assert proc.returncode == 0, proc.stderr
    summary, rows = _record(workdir)
    ref_summary, ref_rows = reference
    assert summary["final_train_loss"] is not None and summary["final_eval_loss"] is not None
    assert summary["data"]["unique_examples"] == 22 * 4 and summary["data"]["epochs"] == 1.0
    assert summary == ref_summary
    assert rows == ref_rows  # same rows in the same order: none doubled, none lost
    assert len({(r["kind"], r["step"]) for r in rows}) == len(rows)
