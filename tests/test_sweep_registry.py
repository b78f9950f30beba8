"""The results registry and per-run locks, on run directories the test writes by hand."""

import json
import os
import socket
import subprocess
import sys
import time

import pandas as pd
import pytest

from medscale.errors import UserError
from medscale.rundir import RunLock, lock_live
from medscale.sweep import registry


def make_run(root, run_id, *, summary=None, metrics=(), plan=None, ckpt=False, lock=None):
    d = root / "sw" / run_id
    d.mkdir(parents=True)
    (d / "sweep.json").write_text(json.dumps(plan or {"run_id": run_id, "sweep": "sw", "size": "d32l1",
                                                       "budget": 1e12, "lr": 1e-3, "seed": 0,
                                                       "params": {"total": 10, "embedding": 4,
                                                                  "non_embedding": 5, "heads": 1},
                                                       "model_flops": 1e12, "tokens": 1000}))
    if summary is not None:
        (d / "summary.json").write_text(json.dumps(summary))
    if metrics:
        (d / "metrics.jsonl").write_text("".join(m if isinstance(m, str) else json.dumps(m) + "\n"
                                                 for m in metrics))
    if ckpt:
        (d / "checkpoints" / "100").mkdir(parents=True)
    if lock is not None:
        (d / "run.lock").write_text(json.dumps(lock))
    return d


def summary(run_id, status="done", loss=2.5, error=None):
    return {"run_id": run_id, "sweep": "sw", "status": status, "error": error, "size": "d32l1",
            "params": {"total": 100, "embedding": 40, "non_embedding": 50, "heads": 10}, "enc_len": 64,
            "dec_len": 48, "batch_size": 16, "steps": 10, "tokens": 17920, "model_flops": 2e12,
            "hardware_flops": 2.2e12, "xla_flops": None, "pf_days": 2e12 / 8.64e19, "wall_s": 12.5,
            "device_kind": "cpu", "device_count": 1, "mfu": 0.1, "final_train_loss": 2.4,
            "final_eval_loss": loss, "final_train_loss_by_modality": {"image": 3.0},
            "final_eval_loss_by_modality": {"image": 3.1, "caption": 2.0}}


def dead_pid():
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


@pytest.fixture
def results(tmp_path):
    make_run(tmp_path, "a-done", summary=summary("a-done"),
             metrics=[{"kind": "eval", "step": 5, "tokens": 10, "flops": 1e11, "loss": 4.0},
                      {"kind": "eval", "step": 5, "tokens": 10, "flops": 1e11, "loss": 3.5},  # resumed repeat
                      {"kind": "train", "step": 10, "tokens": 20, "flops": 2e11, "loss": 3.0},
                      {"kind": "eval", "step": 10, "tokens": 20, "flops": 2e11, "loss": 2.5}])
    make_run(tmp_path, "b-failed", summary=summary("b-failed", "failed", None, "ValueError: boom"))
    make_run(tmp_path, "c-interrupted", metrics=[{"kind": "train", "step": 3, "flops": 1.0, "loss": 5.0},
                                                 '{"kind": "eval", "st'])  # torn last line
    make_run(tmp_path, "d-pending")
    make_run(tmp_path, "e-running", metrics=[{"kind": "train", "step": 1, "loss": 5.0}],
             lock={"pid": os.getpid(), "host": socket.gethostname()})
    make_run(tmp_path, "f-stale", ckpt=True, lock={"pid": dead_pid(), "host": socket.gethostname()})
    make_run(tmp_path, "g-diverged", summary=summary("g-diverged", "diverged", float("nan")))
    return tmp_path


def test_states_and_columns(results):
    df = registry.load_sweep(str(results / "sw"))
    state = dict(zip(df.run_id, df.status))
    assert state == {"a-done": "done", "b-failed": "failed", "c-interrupted": "interrupted",
                     "d-pending": "pending", "e-running": "running", "f-stale": "interrupted",
                     "g-diverged": "diverged"}
    assert list(df.columns[:len(registry.COLUMNS)]) == registry.COLUMNS
    a = df.set_index("run_id").loc["a-done"]
    assert (a.params, a.params_total, a.params_embedding) == (50, 100, 40)
    assert a.loss == 2.5 and a.train_loss == 2.4 and a.flops == 2e12 and a.budget == 1e12
    assert a["loss/image"] == 3.1 and a["loss/caption"] == 2.0
    assert a.pf_days == pytest.approx(2e12 / 86400e15)
    pend = df.set_index("run_id").loc["d-pending"]
    assert pend.params == 5 and pend.flops == 1e12 and pd.isna(pend.loss)  # the plan until a summary exists
    assert df.set_index("run_id").loc["b-failed"].error == "ValueError: boom"
    # the same table from the results root (several sweeps) and from a single run dir
    assert len(registry.load_sweep(str(results))) == 7
    assert registry.load_sweep(str(results / "sw" / "a-done")).run_id.tolist() == ["a-done"]


def test_curves_keep_the_last_row_per_step_and_skip_torn_lines(results):
    curves = registry.load_curves(str(results / "sw"))
    a = curves[curves.run_id == "a-done"]
    assert a.step.tolist() == [5, 10] and a.loss.tolist() == [3.5, 2.5]
    assert set(a.params) == {50}
    assert curves[curves.run_id == "c-interrupted"].empty  # its only eval line is torn


def test_export_round_trips(results, tmp_path):
    for ext in ("csv", "parquet"):
        out = registry.export(str(results / "sw"), str(tmp_path / f"out.{ext}"))
        back = pd.read_csv(out) if ext == "csv" else pd.read_parquet(out)
        assert len(back) == 7 and set(registry.COLUMNS) <= set(back.columns)
        assert not [f for f in os.listdir(tmp_path) if f.endswith(".tmp")]
    with pytest.raises(UserError, match=".csv or .parquet"):
        registry.export(str(results / "sw"), str(tmp_path / "out.txt"))
    with pytest.raises(UserError, match="not found"):
        registry.load_sweep(str(tmp_path / "nowhere"))


def test_corrupt_summary_is_failed_not_a_crash(results):
    (results / "sw" / "a-done" / "summary.json").write_text('{"status": "do')
    df = registry.load_sweep(str(results / "sw")).set_index("run_id")
    assert df.loc["a-done"].status == "failed" and "not valid JSON" in df.loc["a-done"].error


def test_lock_excludes_a_second_holder_and_reclaims_a_dead_ones(tmp_path):
    d = str(tmp_path / "run")
    first = RunLock(d)
    assert first.acquire()
    assert not RunLock(d).acquire()  # live: held by this process
    first.release()
    assert not os.path.exists(os.path.join(d, "run.lock"))
    # a lock left by a dead launcher is reclaimed
    with open(os.path.join(d, "run.lock"), "w") as fh:
        json.dump({"pid": dead_pid(), "host": socket.gethostname(), "start": None}, fh)
    assert not lock_live(os.path.join(d, "run.lock"))
    second = RunLock(d)
    assert second.acquire() and second.owned()
    # a recycled pid (same pid, other start time) is not the owner
    with open(os.path.join(d, "run.lock"), "w") as fh:
        json.dump({"pid": os.getpid(), "host": socket.gethostname(), "start": "1"}, fh)
    assert not lock_live(os.path.join(d, "run.lock"))
    second.release()  # no longer ours: left alone
    assert os.path.exists(os.path.join(d, "run.lock"))


def test_lock_from_another_host_goes_stale_by_heartbeat_age(tmp_path):
    path = tmp_path / "run.lock"
    path.write_text(json.dumps({"pid": 1, "host": "elsewhere"}))
    assert lock_live(str(path), stale_after_s=60)
    old = time.time() - 120
    os.utime(path, (old, old))
    assert not lock_live(str(path), stale_after_s=60)


def test_two_processes_racing_for_one_lock(tmp_path):
    """Eight processes try to take the same (stale) lock at once: exactly one wins."""
    d = tmp_path / "run"
    d.mkdir()
    (d / "run.lock").write_text(json.dumps({"pid": dead_pid(), "host": socket.gethostname()}))
    code = ("import sys, time; from medscale.rundir import RunLock; l = RunLock(sys.argv[1]); "
            "ok = l.acquire(); print(int(ok), flush=True); time.sleep(1.5)")
    env = dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    procs = [subprocess.Popen([sys.executable, "-c", code, str(d)], stdout=subprocess.PIPE, text=True, env=env)
             for _ in range(8)]
    wins = sum(int(p.communicate()[0].strip()) for p in procs)
    assert wins == 1


def test_error_from_log_names_the_cause(tmp_path):
    from medscale.sweep.launcher import error_from_log

    log = tmp_path / "train.log"
    log.write_text("# launch 1\nerror: old failure\n")
    offset = log.stat().st_size
    with open(log, "a") as fh:
        fh.write("# launch 2\nTraceback (most recent call last):\n  File \"x.py\", line 1\n"
                 "FloatingPointError: nan in step 7\n")
    assert error_from_log(str(log), offset, 1) == "FloatingPointError: nan in step 7"  # this attempt's only
    assert error_from_log(str(log), 0, 2) == "old failure"  # a one-line user error wins over a traceback
    with open(log, "a") as fh:
        fh.write("# launch 3\n")
    assert error_from_log(str(log), log.stat().st_size - 11, -9) == "killed by signal 9"


def test_eta_models_overhead_and_flops():
    from medscale.sweep.launcher import eta_seconds

    assert eta_seconds([], [1e9], [], 2) is None
    # runs took 10 s + 1 s per GFLOP: two more of 4 GFLOP on one worker -> 28 s; one running for 5 s of 14 -> +9
    finished = [(1e9, 11.0), (2e9, 12.0), (6e9, 16.0)]
    assert eta_seconds(finished, [4e9, 4e9], [], 1) == pytest.approx(28.0)
    assert eta_seconds(finished, [4e9, 4e9], [(4e9, 5.0)], 1) == pytest.approx(37.0)
    assert eta_seconds(finished, [4e9, 4e9], [], 2) == pytest.approx(14.0)  # two workers share it


def test_status_cli(results, capsys):
    from medscale.cli import main

    assert main(["sweep", "status", str(results / "sw"), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["counts"]["done"] == 1 and len(out["runs"]) == 7
    done = next(r for r in out["runs"] if r["run_id"] == "a-done")
    assert done["loss"] == 2.5 and done["pf_days"] == pytest.approx(2e12 / 8.64e19)
    assert main(["sweep", "status", str(results / "sw")]) == 0
    text = capsys.readouterr()
    line = next(ln for ln in text.out.splitlines() if ln.startswith("a-done"))
    assert "done" in line and "2.5000" in line and "12s" in line and "10.0%" in line
    assert "b-failed: ValueError: boom" in text.err


def test_relaunch_clears_a_dead_launchers_lock_on_a_finished_run(tmp_path):
    """A launcher killed after its training process wrote the summary but before it released the run's lock:
    the next launcher skips the finished run and removes that lock; a live holder's lock stays."""
    from medscale.sweep.design import Run
    from medscale.sweep.launcher import Launcher

    def run(run_id):
        return Run(run_id=run_id, sweep="sw", design="grid", size="d16l1", base="tiny", overrides=[], enc_len=32,
                   dec_len=48, batch_size=4, steps=10, tokens=3200, model_flops=1e9, hardware_flops=1.1e9,
                   params={"total": 10, "embedding": 4, "non_embedding": 5, "heads": 1}, lr=1e-3, seed=0,
                   budget=None, token_budget=3200)

    dead, held = run("dead-lock"), run("live-lock")
    for r in (dead, held):
        d = r.workdir(str(tmp_path))
        os.makedirs(d)
        with open(os.path.join(d, "summary.json"), "w") as fh:
            json.dump(summary(r.run_id), fh)
    with open(os.path.join(dead.workdir(str(tmp_path)), "run.lock"), "w") as fh:
        json.dump({"pid": dead_pid(), "host": socket.gethostname(), "created": 1.0}, fh)
    live = RunLock(held.workdir(str(tmp_path)))
    assert live.acquire()
    report = Launcher([dead, held], str(tmp_path), progress=False).launch()
    assert report["counts"] == {"done": 2}
    assert not os.path.exists(os.path.join(dead.workdir(str(tmp_path)), "run.lock"))
    assert os.path.exists(live.path) and live.owned()
    live.release()
