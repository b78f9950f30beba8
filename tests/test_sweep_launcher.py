"""The local launcher end to end with the real trainer: a failing run, and SIGKILL of the launcher + relaunch.

Tiny runs (d_model 16, one layer each side, tens of steps). Two sweeps with the same runs but different names
share run ids (ids hash the base and overrides, not the sweep name) and one results root, so the interrupted
sweep is compared run by run with the uninterrupted one.
"""

import json
import os
import random
import signal
import time

import pytest
from _sweeps import launch as _launch
from _sweeps import write_sweep

from medscale.sweep import registry


def _write(tmp_path, name):
    # d16l1h2 asks for an unsupported dtype: that run's training raises
    return write_sweep(tmp_path, name, sets=["train.log_every=5"], per_size={"d16l1h2": ["model.dtype=float8"]})


def _summaries(sweep_dir):
    out = {}
    for run_id in sorted(os.listdir(sweep_dir)):
        path = os.path.join(sweep_dir, run_id, "summary.json")
        if os.path.exists(path):
            with open(path) as fh:
                out[run_id] = json.load(fh)  # parses: never half-written
    return out


@pytest.mark.slow
def test_kill_and_relaunch_matches_the_uninterrupted_sweep_and_failures_are_recorded(tmp_path):
    results = tmp_path / "results"
    t0 = time.time()
    proc = _launch(_write(tmp_path, "straight"), results)
    out, err = proc.communicate(timeout=600)
    straight_wall = time.time() - t0
    assert proc.returncode == 1, err  # one run failed, the sweep still finished the others
    report = json.loads(out)
    assert report["counts"] == {"done": 2, "failed": 2}, report
    ref = _summaries(results / "straight")
    failed = {k: v for k, v in ref.items() if v["status"] == "failed"}
    assert len(failed) == 2 and all("float8" in v["error"] for v in failed.values())
    df = registry.load_sweep(str(results / "straight"))
    assert sorted(df.status) == ["done"] * 2 + ["failed"] * 2
    assert df[df.status == "failed"].error.str.contains("dtype").all()

    # the same runs under another sweep name: kill the launcher at a seeded random moment, then relaunch
    sweep = _write(tmp_path, "killed")
    delay = random.Random(1234).uniform(0.15, 0.6) * straight_wall
    proc = _launch(sweep, results)
    time.sleep(delay)
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    killed_dir = results / "killed"
    children = []
    for run_id in os.listdir(killed_dir) if killed_dir.exists() else []:
        lock = registry.read_json(os.path.join(killed_dir, run_id, "run.lock")) if os.path.exists(
            os.path.join(killed_dir, run_id, "run.lock")) else None
        if lock and lock.get("child_pid"):
            children.append(lock["child_pid"])
    time.sleep(1.0)
    for pid in children:  # training processes died with their launcher
        from medscale.rundir import pid_alive

        assert not pid_alive(pid), f"orphan training process {pid}"
    proc = _launch(sweep, results)
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 1, err
    again = _summaries(killed_dir)
    assert set(again) == set(ref)
    for run_id, summary in ref.items():
        assert again[run_id]["status"] == summary["status"]
        if summary["status"] == "done":
            assert again[run_id]["steps"] == summary["steps"]
            assert again[run_id]["final_eval_loss"] == summary["final_eval_loss"], run_id
            assert again[run_id]["final_train_loss"] == summary["final_train_loss"], run_id
    status = registry.load_sweep(str(killed_dir)).status.tolist()
    assert sorted(status) == ["done"] * 2 + ["failed"] * 2
    assert not any(os.path.exists(os.path.join(killed_dir, r, "run.lock")) for r in again)

    # a third launch trains nothing: everything is done or failed
    proc = _launch(sweep, results)
    out, _ = proc.communicate(timeout=300)
    report = json.loads(out)
    assert report["counts"] == {"done": 2, "failed": 2} and report["wall_s"] < 30
