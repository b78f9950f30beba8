"""`medscale train`: loss falls on tiny.py (real synthetic data), kill -9 + relaunch equals an uninterrupted
run bit for bit (metrics.jsonl and the TensorBoard view of it), absurd lr -> diverged, bad configs -> `error:`
and exit 2."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from _events import expected_scalars, read_events, scalars_and_texts

from medscale.cli import main

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(REPO, "medscale", "configs", "tiny.py")
# a smaller tiny: fewer training examples to prepare, short runs
FAST = ["data.num_train=256", "data.num_eval=32", "train.eval_batches=2", "train.warmup_steps=5",
        "train.task_eval_examples=0"]


def _cmd(workdir, *sets):
    args = [sys.executable, "-m", "medscale", "train", "--config", TINY, "--workdir", str(workdir), "--quiet",
            "--json"]
    for s in (*FAST, *sets):
        args += ["--set", s]
    return args


def _env(**extra):
    env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu", MEDSCALE_TENSORBOARD="0")
    env.update(extra)
    return env


def _rows(workdir, kind):
    rows = {}
    for r in _all_rows(workdir):
        if r["kind"] == kind:
            rows[r["step"]] = r  # readers keep the last row per (kind, step)
    return rows


def _all_rows(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def _tensorboard(workdir):
    """The scalars TensorBoard shows for the run (a killed process may leave a file ending inside a record)."""
    return scalars_and_texts(read_events(os.path.join(workdir, "tb"), truncated_tail_ok=True))[0]


@pytest.mark.slow
def test_loss_falls_and_kill_resume_is_bit_exact(tmp_path):
    sets = ["train.steps=60", "train.ckpt_every=10", "train.eval_every=30", "train.log_every=1"]
    full, cut = tmp_path / "full", tmp_path / "cut"
    tb = _env(MEDSCALE_TENSORBOARD="1")
    ref = subprocess.run(_cmd(full, *sets), check=False, capture_output=True, text=True, env=tb, cwd=REPO, timeout=900)
    assert ref.returncode == 0, ref.stderr[-2000:]
    summary = json.loads(ref.stdout.strip().splitlines()[-1])
    assert summary["status"] == "done" and summary["steps"] == 60
    with open(full / "summary.json") as f:
        assert json.load(f) == summary
    train = _rows(full, "train")
    assert sorted(train) == list(range(1, 61))
    # the loss falls clearly on the synthetic data
    first = sum(train[s]["loss"] for s in range(1, 4)) / 3
    last = sum(train[s]["loss"] for s in range(58, 61)) / 3
    assert last < 0.75 * first, (first, last)
    for key in ("tokens", "flops", "lr", "grad_norm", "step_s", "tokens_per_s", "tflops_per_device", "mfu",
                "loss/caption", "loss/image"):
        assert key in train[60]
    assert train[60]["tokens"] == 60 * 16 * (64 + 48)
    for key in ("run_id", "params", "model_flops", "hardware_flops", "pf_days", "mfu", "final_eval_loss",
                "final_train_loss_by_modality", "final_eval_loss_by_modality", "device_kind", "wall_s"):
        assert key in summary
    assert summary["params"]["total"] > 0 and summary["final_eval_loss"] < first

    # the same command, killed with SIGKILL after a checkpoint, then relaunched
    proc = subprocess.Popen(_cmd(cut, *sets), stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=tb,
                            cwd=REPO)
    ckpt = cut / "checkpoints"
    deadline = time.time() + 600
    while time.time() < deadline and proc.poll() is None:
        done = [d for d in (os.listdir(ckpt) if ckpt.exists() else []) if d.isdigit()]
        if done:
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.02)
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed after a checkpoint"
    assert not (cut / "summary.json").exists()
    killed_at = max(_rows(cut, "train"))
    assert killed_at < 60
    again = subprocess.run(_cmd(cut, *sets), check=False, capture_output=True, text=True, env=tb, cwd=REPO, timeout=900)
    assert again.returncode == 0, again.stderr[-2000:]
    resumed = json.loads(again.stdout.strip().splitlines()[-1])
    for key in ("final_train_loss", "final_eval_loss", "final_train_loss_by_modality",
                "final_eval_loss_by_modality", "steps", "tokens", "status"):
        assert resumed[key] == summary[key], key  # same float bits
    cut_rows = _rows(cut, "train")
    for s in range(1, 61):
        assert cut_rows[s]["loss"] == train[s]["loss"], s
    # TensorBoard shows what metrics.jsonl holds, the killed attempt's later steps hidden by the relaunch
    full_tb, cut_tb = _tensorboard(full), _tensorboard(cut)
    assert full_tb == expected_scalars(_all_rows(full)) and cut_tb == expected_scalars(_all_rows(cut))
    for s in range(1, 61):
        assert cut_tb[("train/loss", s)] == full_tb[("train/loss", s)], s


def _error(capsys, *argv):
    code = main(["train", "--config", TINY, "--workdir", "/nonexistent/never-written", "--quiet", *argv])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: ") and len(err.strip().splitlines()) == 1, err
    return err


def test_bad_configs_are_one_line_errors(capsys, tmp_path):
    assert "divisible" in _error(capsys, "--set", "model.num_heads=3", "--set", "model.d_model=64")
    assert "mesh" in _error(capsys, "--set", "mesh.shape=(3,1,1)")
    assert "mesh" in _error(capsys, "--set", "mesh.shape=(-1,-1,1)")
    assert "unknown config key" in _error(capsys, "--set", "train.no_such_key=1")
    assert "unknown config key" in _error(capsys, "--set", "nosuch.lr=1")
    assert "model.dtype" in _error(capsys, "--set", "model.dtype=float64")
    assert "tokens" in _error(capsys, "--set", "train.tokens=10")
    broken = tmp_path / "broken.py"
    broken.write_text("def get_config(:\n")
    code = main(["train", "--config", str(broken), "--workdir", str(tmp_path / "w")])
    assert code == 2 and "does not load" in capsys.readouterr().err
    assert not os.path.exists("/nonexistent/never-written")


def test_a_run_another_live_process_holds_is_not_trained(capsys, tmp_path):
    """One lock per run (medscale.rundir.RunLock): while a live process holds run.lock, medscale train refuses
    the workdir with a one-line error and writes nothing; once released, the lock is free again."""
    from medscale.rundir import RunLock

    workdir = tmp_path / "held"
    holder = RunLock(str(workdir))
    assert holder.acquire()  # this (live) process holds the run
    args = ["train", "--config", TINY, "--workdir", str(workdir), "--quiet"]
    for s in FAST:
        args += ["--set", s]
    code = main(args)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("error: ") and "run.lock" in err[0], err
    assert sorted(os.listdir(workdir)) == ["run.lock"]  # no config.json, no metrics
    holder.release()
    assert not (workdir / "run.lock").exists()


def test_batch_not_divisible_by_data_axes_exits_2(tmp_path):
    env = _env(XLA_FLAGS="--xla_force_host_platform_device_count=8")
    proc = subprocess.run(_cmd(tmp_path / "w", "train.batch_size=12"), check=False, capture_output=True, text=True, env=env,
                          cwd=REPO, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.startswith("error: ") and "batch_size 12" in proc.stderr
    assert not (tmp_path / "w").exists()


def test_absurd_learning_rate_diverges(tmp_path, capsys):
    code = main(["train", "--config", TINY, "--workdir", str(tmp_path / "d"), "--quiet", "--json",
                 *[a for s in (*FAST, "train.steps=40", "train.lr=1e4", "train.clip_norm=0.0") for a in ("--set", s)]])
    out = capsys.readouterr().out
    summary = json.loads(out.strip().splitlines()[-1])
    assert code == 1 and summary["status"] == "diverged" and summary["error"]
    with open(tmp_path / "d" / "summary.json") as f:
        assert json.load(f)["status"] == "diverged"
