"""TensorBoard event files (medscale/train/metrics.py), read back with tests/_events.py: every metrics.jsonl
number is a scalar at its step, float32-rounded as TensorBoard stores it; a restart hides the earlier attempt's
later steps; the parameter table is there; a disabled writer writes nothing."""

import json
import os

import jax
import numpy as np
from _events import expected_scalars, read_events, scalars_and_texts

from medscale.cli import main
from medscale.train.metrics import PARAMETERS_TAG, MetricWriter

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(REPO, "medscale", "configs", "tiny.py")
MODALITIES = ("image", "caption", "boxes", "segmentation")


def test_training_writes_every_metric_row_as_tensorboard_scalars(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("MEDSCALE_TENSORBOARD", raising=False)  # on by default
    sets = ["data.num_train=256", "data.num_eval=32", "train.eval_batches=2", "train.warmup_steps=5",
            "train.task_eval_examples=0", "train.steps=8", "train.log_every=1", "train.eval_every=4",
            "train.ckpt_every=4"]
    work = tmp_path / "run"
    code = main(["train", "--config", TINY, "--workdir", str(work), "--quiet", "--json",
                 *[a for s in sets for a in ("--set", s)]])
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert code == 0 and summary["status"] == "done"
    with open(work / "metrics.jsonl") as f:
        rows = [json.loads(line) for line in f]
    assert sorted(r["step"] for r in rows if r["kind"] == "train") == list(range(1, 9))
    assert sorted(r["step"] for r in rows if r["kind"] == "eval") == [4, 8]

    scalars, texts = scalars_and_texts(read_events(work / "tb"))
    assert scalars == expected_scalars(rows)
    # the figures a run is watched by are all there, at the last step
    for key in ("loss", "lr", "grad_norm", "tokens", "flops", "step_s", "tokens_per_s", "tflops_per_device",
                "mfu", *(f"loss/{m}" for m in MODALITIES)):
        assert ("train/" + key, 8) in scalars, key
    for key in ("loss", *(f"loss/{m}" for m in MODALITIES)):
        assert ("eval/" + key, 8) in scalars, key
    assert scalars[("train/tokens", 8)] == 8 * 16 * (64 + 48)
    # the parameter table (clu.parameter_overview) at the start step, totalling the analytic count
    (table,) = [t for (tag, step), t in texts.items() if tag.startswith(PARAMETERS_TAG) and step == 0]
    assert f"Total: {summary['params']['total']:,} -- {4 * summary['params']['total']:,} bytes" in table


def _row(kind, step, loss):
    return {"kind": kind, "step": step, "tokens": 7 * step, "loss": loss, "step_s": None, "mfu": 0.25}


def test_a_restart_hides_the_earlier_attempts_later_steps(tmp_path):
    params = {"dense": {"kernel": jax.ShapeDtypeStruct((3, 5), np.float32)}}
    first = MetricWriter(str(tmp_path / "metrics.jsonl"), str(tmp_path / "tb"))
    first.begin(0, params)
    for s in range(1, 5):
        first.write(_row("train", s, 1.0 / s))
    first.write(_row("eval", 4, 0.3))
    first.flush()  # as before a checkpoint at step 4: what was written is in the file
    with open(tmp_path / "metrics.jsonl") as f:
        assert scalars_and_texts(read_events(tmp_path / "tb"))[0] == expected_scalars(map(json.loads, f))
    for s in range(5, 7):  # steps after the checkpoint, then the process ends
        first.write(_row("train", s, 1.0 / s))
    first.close()
    again = MetricWriter(str(tmp_path / "metrics.jsonl"), str(tmp_path / "tb"))
    again.begin(4, params)
    for s in range(5, 9):
        again.write(_row("train", s, 2.0 + s))
    again.close()

    with open(tmp_path / "metrics.jsonl") as f:
        rows = [json.loads(line) for line in f]
    assert len(rows) == 6 + 1 + 4
    scalars, texts = scalars_and_texts(read_events(tmp_path / "tb"))
    assert scalars == expected_scalars(rows)
    assert scalars[("train/loss", 4)] == np.float32(0.25) and scalars[("train/loss", 5)] == np.float32(7.0)
    assert ("eval/loss", 4) in scalars and ("train/step_s", 1) not in scalars
    assert sorted(step for _, step in texts) == [0, 4]
    assert "Total: 15 -- 60 bytes" in texts[(PARAMETERS_TAG + "/text_summary", 0)]


def test_disabled_writer_writes_nothing(tmp_path):
    w = MetricWriter(str(tmp_path / "metrics.jsonl"), str(tmp_path / "tb"), enabled=False)
    w.begin(0, {"w": jax.ShapeDtypeStruct((2,), np.float32)})
    w.write(_row("train", 1, 1.0))
    w.close()
    assert os.listdir(tmp_path) == []
