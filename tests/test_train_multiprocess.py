"""One run trained by two processes (``jax.distributed``, JAX's CPU collectives) x 4 simulated CPU devices each
equals the same run trained by one process on 8 simulated devices: same metrics rows, same summary (wall-clock
fields aside). Process 1 SIGKILLed mid-run (a node dying) takes process 0 down with it, and a relaunch of both
resumes from the last checkpoint and ends bit-exactly as the uninterrupted two-process run (both in the fast
tier, which CI runs).

Real ``medscale train`` processes on a tiny model (d_model 16, one layer each side, 8 steps of batch 8,
checkpoints and evaluations every 4 steps) on the synthetic stream."""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from medscale import rundir
from medscale.errors import UserError
from medscale.model.sharding import distributed_settings

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SETTINGS = ["model.size=", "model.d_model=16", "model.enc_layers=1", "model.dec_layers=1", "model.num_heads=1",
            "model.d_ff=64", "train.batch_size=8", "train.eval_batch_size=8", "data.stream_chunk=64",
            "data.num_eval=16", "train.eval_batches=2", "train.log_every=1", "train.warmup_steps=2",
            "train.steps=8", "train.eval_every=4", "train.ckpt_every=4", "train.task_eval_examples=0"]
WALL_CLOCK = {"wall_s", "step_s", "mfu", "time", "run_id", "sweep"}
TIMING = {"step_s", "tokens_per_s", "tflops_per_device", "mfu"}
FLOAT32_EPS = float(np.finfo(np.float32).eps)


def _argv(workdir):
    argv = [sys.executable, "-m", "medscale", "train", "--config", "tiny", "--workdir", str(workdir), "--quiet"]
    for s in SETTINGS:
        argv += ["--set", s]
    return argv


def _env(devices, **extra):
    env = dict(os.environ, PYTHONPATH=REPO, MEDSCALE_TENSORBOARD="0",
               XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", **extra)
    for name in ("MEDSCALE_COORDINATOR", "JAX_COORDINATOR_ADDRESS", "SLURM_NTASKS", "JOB_COMPLETION_INDEX"):
        env.pop(name, None)
    return env


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch_pair(workdir, **env):
    """Start the run's two processes (4 devices each); returns the Popen objects, process 0 first."""
    coordinator = f"127.0.0.1:{_free_port()}"
    return [subprocess.Popen(_argv(workdir) + ["--coordinator", coordinator, "--num-processes", "2",
                                                "--process-id", str(i)],
                             cwd=REPO, env=_env(4, **env), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True) for i in range(2)]


def _finish(procs, timeout=900):
    outs = []
    for p in procs:
        try:
            out, err = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
        outs.append((p.returncode, out, err))
    return outs


def _record(workdir):
    with open(os.path.join(workdir, "summary.json")) as fh:
        summary = {k: v for k, v in json.load(fh).items() if k not in WALL_CLOCK}
    with open(os.path.join(workdir, "metrics.jsonl")) as fh:
        rows = [{k: v for k, v in json.loads(line).items() if k not in TIMING} for line in fh]
    return summary, rows


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The run trained by one process x 8 devices and, at the same time, by two processes x 4 devices."""
    root = tmp_path_factory.mktemp("runs")
    single = subprocess.Popen(_argv(root / "single"), cwd=REPO, env=_env(8), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
    pair = _launch_pair(root / "pair")
    outs = _finish([single, *pair])
    for rc, _, err in outs:
        assert rc == 0, err[-3000:]
    return root / "single", root / "pair", outs[1:]


def _close(a, b, path=""):
    """Equal structure; floats equal to float32 round-off (the cross-process all-reduce sums in another order)."""
    if isinstance(a, float) and isinstance(b, float):
        assert abs(a - b) <= 16 * FLOAT32_EPS * max(abs(a), abs(b), 1.0), (path, a, b)
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), path
        for k in a:
            _close(a[k], b[k], f"{path}/{k}")
    elif isinstance(a, list):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            _close(x, y, f"{path}[{i}]")
    else:
        assert a == b, (path, a, b)


def test_two_processes_train_the_run_one_process_trains(runs):
    single, workdir, outs = runs
    ref_summary, ref_rows = _record(single)
    summary, rows = _record(workdir)
    assert summary["device_count"] == 8 and summary["status"] == "done" and summary["steps"] == 8
    assert summary["data"]["unique_examples"] == 8 * 8  # the global batch, not one process's half
    # one writer: every row once (two writers would double them), in the single process's order
    assert [(r["kind"], r["step"]) for r in rows] == [(r["kind"], r["step"]) for r in ref_rows]
    _close(rows, ref_rows)
    _close(summary, ref_summary)
    # both processes report the run's summary; the files were written by process 0 alone
    assert outs[0][1].strip().splitlines()[-1] == outs[1][1].strip().splitlines()[-1]
    assert outs[0][1].strip().splitlines()[-1].startswith("status done")
    assert not os.path.exists(workdir / rundir.LOCK)
    assert rundir.checkpoint_steps(str(workdir)) == [4, 8]
    # the checkpoint's data position is the run's (the global batch's), the one a single process saves
    positions = []
    for run in (workdir, single):
        with open(run / "checkpoints" / "8" / "data" / "metadata") as fh:
            positions.append(json.load(fh))
    assert positions[0] == positions[1] and positions[0]["shard_count"] == 1 and positions[0]["batch_size"] == 8


def test_a_process_killed_mid_run_and_both_relaunched_resume_bit_exactly(tmp_path, runs):
    workdir = tmp_path / "run"
    procs = _launch_pair(workdir, MEDSCALE_TEST_KILL_AT="step:6", MEDSCALE_TEST_KILL_PROCESS="1",
                         MEDSCALE_HEARTBEAT_S="5")
    t0 = time.time()
    (rc0, _, err0), (rc1, _, err1) = _finish(procs, timeout=900)
    assert rc1 == -signal.SIGKILL, err1[-3000:]
    assert rc0 != 0  # the survivor stops by itself once process 1 stops answering
    assert not os.path.exists(workdir / "summary.json")
    assert rundir.checkpoint_steps(str(workdir)) == [4]
    print(f"survivor stopped {time.time() - t0:.0f} s after launch: {err0.strip().splitlines()[-1]}")
    outs = _finish(_launch_pair(workdir))
    for rc, _, err in outs:
        assert rc == 0, err[-3000:]
    assert _record(workdir) == _record(runs[1])  # bit-exact: same rows, same summary


def test_distributed_settings_from_flags_and_environment():
    assert distributed_settings(env={}) is None
    assert distributed_settings(env={"SLURM_NTASKS": "4"}) == {}  # left to jax's SLURM detection
    assert distributed_settings("h:1234", 2, 1, env={}) == {"coordinator_address": "h:1234", "num_processes": 2,
                                                            "process_id": 1}
    k8s = {"MEDSCALE_COORDINATOR": "job-0.svc:5000", "MEDSCALE_NUM_PROCESSES": "3", "JOB_COMPLETION_INDEX": "2",
           "MEDSCALE_HEARTBEAT_S": "30"}
    assert distributed_settings(env=k8s) == {"coordinator_address": "job-0.svc:5000", "num_processes": 3,
                                             "process_id": 2, "heartbeat_timeout_seconds": 30}
    slurm = {"MEDSCALE_COORDINATOR": "node1:6000", "SLURM_NTASKS": "16", "SLURM_PROCID": "9",
             "MEDSCALE_LOCAL_DEVICE_IDS": "1"}
    assert distributed_settings(env=slurm) == {"coordinator_address": "node1:6000", "num_processes": 16,
                                               "process_id": 9, "local_device_ids": [1]}
    assert distributed_settings(env={**slurm, "MEDSCALE_DISTRIBUTED": "0"}) is None
    for args, env in [(("h:1234", 2, 2), {}), (("nohost", 2, 0), {}), (("h:0", 2, 0), {}), ((None, 2, 1), {}),
                      ((), {"MEDSCALE_COORDINATOR": "h:1"}), ((), {**k8s, "MEDSCALE_HEARTBEAT_S": "soon"})]:
        with pytest.raises(UserError):
            distributed_settings(*args, env=env)
