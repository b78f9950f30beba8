"""SIGKILL at the dangerous moments of a sweep, through the test hook of ``medscale.train.loop.test_kill``:

- a worker killed mid-run (between two checkpoints) costs that run its steps since its last checkpoint and
  nothing else: the launcher starts a new worker, the run resumes from its checkpoint, the sweep finishes;
- the launcher killed (with its workers) after a run's last evaluation, after its last checkpoint and before its
  summary, relaunched each time: every run's summary.json and metrics.jsonl end equal to an uninterrupted
  sweep's (wall-clock and timing fields aside; no null loss, no duplicate row).

Tiny runs (d_model 16, one layer each side, 30 steps, a checkpoint every 5). Sweeps with the same runs under
different names share run ids, so each is compared run by run with the uninterrupted one.
"""

import json
import os
import signal
import subprocess

import pytest
from _sweeps import REPO, sweep_argv, sweep_env, write_sweep

WALL_CLOCK = {"wall_s", "step_s", "mfu", "time", "sweep"}
TIMING = {"step_s", "tokens_per_s", "tflops_per_device", "mfu"}


def _launch(tmp_path, name, results, **env):
    sweep = write_sweep(tmp_path, name, sets=["train.log_every=1", "train.task_eval_examples=2"])
    return subprocess.run(sweep_argv(sweep, results), check=False, cwd=REPO, env=sweep_env(**env),
                          capture_output=True, text=True, timeout=900)


def _records(sweep_dir):
    out = {}
    for run_id in sorted(os.listdir(sweep_dir)):
        d = os.path.join(sweep_dir, run_id)
        if not os.path.isdir(d) or run_id.startswith("."):
            continue
        with open(os.path.join(d, "summary.json")) as fh:
            summary = {k: v for k, v in json.load(fh).items() if k not in WALL_CLOCK}
        (summary.get("task_eval") or {}).pop("seconds", None)
        with open(os.path.join(d, "metrics.jsonl")) as fh:
            rows = [{k: v for k, v in json.loads(line).items() if k not in TIMING} for line in fh]
        out[run_id] = (summary, rows)
    return out


def _same(got, ref):
    assert set(got) == set(ref)
    for run_id, (summary, rows) in ref.items():
        assert got[run_id][0]["status"] == "done" and got[run_id][0]["final_train_loss"] is not None
        assert got[run_id][0] == summary, run_id
        assert got[run_id][1] == rows, run_id  # no row doubled, none lost


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("straight")
    proc = _launch(tmp, "straight", tmp / "results")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["counts"] == {"done": 4}
    return _records(tmp / "results" / "straight")


@pytest.mark.slow
def test_a_killed_worker_costs_its_run_the_steps_since_its_checkpoint(tmp_path, straight):
    results = tmp_path / "results"
    proc = _launch(tmp_path, "worker", results, MEDSCALE_TEST_KILL_AT="step:12",
                   MEDSCALE_TEST_KILL_ONCE=str(tmp_path / "fired"))
    assert proc.returncode == 0, proc.stderr
    assert os.path.exists(tmp_path / "fired")
    report = json.loads(proc.stdout)
    assert report["counts"] == {"done": 4}, report
    logs = {r: (results / "worker" / r / "train.log").read_text() for r in straight}
    killed = [r for r, text in logs.items() if "killed by signal 9" in text]
    assert len(killed) == 1, logs
    assert "retrying from the last checkpoint (step 10)" in logs[killed[0]]
    _same(_records(results / "worker"), straight)


@pytest.mark.slow
def test_the_launcher_killed_at_the_dangerous_points_and_relaunched_ends_as_if_never_killed(tmp_path, straight):
    results = tmp_path / "results"
    for point in ("after_last_eval", "after_last_checkpoint", "before_summary"):
        proc = _launch(tmp_path, "killed", results, MEDSCALE_TEST_KILL_AT=point, MEDSCALE_TEST_KILL_PARENT="1",
                       MEDSCALE_TEST_KILL_ONCE=str(tmp_path / f"fired-{point}"))
        assert proc.returncode == -signal.SIGKILL, (point, proc.stderr)
        assert os.path.exists(tmp_path / f"fired-{point}")
    proc = _launch(tmp_path, "killed", results)
    assert proc.returncode == 0, proc.stderr
    _same(_records(results / "killed"), straight)
    assert not any(os.path.exists(results / "killed" / r / "run.lock") for r in straight)
