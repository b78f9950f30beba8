"""End to end on a briefly trained tiny run (the real data pipeline and training loop, a few steps):
``medscale generate`` and ``medscale evaluate``, their outputs' types and shapes, and their user errors."""

import json
import os
import shutil

import numpy as np
import pytest

from medscale.cli import main

pytestmark = pytest.mark.slow  # trains a tiny run through the real loop (module fixture)

SIZE = 64


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    from medscale.configs import load_config
    from medscale.generate.evaluate import task_eval
    from medscale.train.loop import train

    root = tmp_path_factory.mktemp("gen")
    cfg = load_config("tiny", [f"data.data_dir={root / 'data'}", "data.num_train=48", "data.num_eval=8",
                               "train.steps=3", "train.batch_size=4", "train.eval_every=3", "train.ckpt_every=3",
                               "train.eval_batches=1", "train.warmup_steps=1", "train.task_eval_examples=4"])
    workdir = str(root / "run")
    summary = train(cfg, workdir, progress=False, finish=lambda w, data: task_eval(cfg, w, data))
    assert summary["status"] == "done"
    # the end-of-run hook (as medscale train passes it) stored the task metrics
    assert summary["task_eval"]["num_examples"] == 4 and summary["task_eval"]["checkpoint_step"] == 3
    assert {"caption/bleu4", "caption/rouge_l", "boxes/mean_iou", "boxes/ap50", "segmentation/miou",
            "answer/overall_acc"} <= set(summary["task_metrics"])
    with open(os.path.join(workdir, "summary.json")) as f:
        assert json.load(f)["task_metrics"] == summary["task_metrics"]
    return workdir


def _json(capsys, argv):
    code = main(argv)
    cap = capsys.readouterr()
    assert code == 0, cap.err
    return json.loads(cap.out.strip().splitlines()[-1])


def _error(capsys, argv):
    code = main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


def _check_boxes(boxes):
    for b in boxes:
        assert isinstance(b[0], str) and len(b) == 5
        x0, y0, x1, y1 = b[1:]
        assert 0 <= x0 < x1 <= SIZE and 0 <= y0 < y1 <= SIZE


def test_generate_example_writes_picture_and_outputs(run_dir, tmp_path, capsys):
    from PIL import Image

    out = _json(capsys, ["generate", "--workdir", run_dir, "--example", "validation:1", "--out", str(tmp_path),
                         "--json", "--refine-steps", "3"])
    assert out["checkpoint_step"] == 3 and out["targets"] == ["caption", "boxes", "segmentation"]
    assert isinstance(out["caption"], str)
    _check_boxes(out["boxes"])
    assert len(out["box_scores"]) == len(out["boxes"]) and all(s <= 0 for s in out["box_scores"])
    seg = out["segmentation"]
    assert seg["shape"] == [SIZE, SIZE] and sum(seg["class_fractions"].values()) == pytest.approx(1.0)
    mask = np.asarray(Image.open(seg["path"]))
    assert mask.shape == (SIZE, SIZE) and mask.max() <= 3
    assert isinstance(out["truth"]["caption"], str) and out["truth"]["caption"]
    with Image.open(out["picture"]) as im:
        assert im.format == "PNG" and im.size[0] > 300
    assert not [f for f in os.listdir(tmp_path) if ".tmp" in f]


def test_generate_any_image_and_any_subset(run_dir, tmp_path, capsys):
    from PIL import Image

    rng = np.random.default_rng(0)
    path = tmp_path / "scan.jpg"
    Image.fromarray(rng.integers(0, 255, (37, 100, 3), dtype=np.uint8), "RGB").save(path)
    out = _json(capsys, ["generate", "--workdir", run_dir, "--image", str(path), "--targets", "boxes",
                         "--out", str(tmp_path / "o"), "--json", "--temperature", "1.0", "--top-k", "5"])
    assert set(out) >= {"boxes", "picture"} and "caption" not in out and "truth" not in out
    _check_boxes(out["boxes"])
    assert os.path.basename(out["picture"]) == "scan.png"
    # text -> segmentation (caption given from the example, mask decoded)
    out = _json(capsys, ["generate", "--workdir", run_dir, "--example", "validation:0", "--inputs", "caption",
                         "--targets", "segmentation", "--out", str(tmp_path / "o"), "--json"])
    assert out["inputs"] == ["caption"] and out["segmentation"]["shape"] == [SIZE, SIZE]
    # mask -> image tokens (VQ-decoded) and caption
    out = _json(capsys, ["generate", "--workdir", run_dir, "--example", "validation:2", "--inputs", "segmentation",
                         "--targets", "image,caption", "--out", str(tmp_path / "o"), "--json", "--refine-steps", "2"])
    img = np.asarray(Image.open(out["image"]["path"]))
    assert img.shape == (SIZE, SIZE) and img.dtype == np.uint8 and isinstance(out["caption"], str)


def test_load_image_any_size_and_mode(tmp_path):
    from PIL import Image

    from medscale.generate.render import load_image

    p = tmp_path / "a.png"
    Image.fromarray(np.full((10, 30), 200, np.uint8), "L").save(p)
    img = load_image(str(p), SIZE)
    assert img.shape == (SIZE, SIZE) and img.dtype == np.uint8
    # padded to a square with black: the top and bottom thirds are background, the middle is the image
    assert img[:18].max() < 30 and img[28:36, 5:-5].min() > 150
    p16 = tmp_path / "b.png"
    Image.fromarray(np.arange(0, 4096 * 16, 16, dtype=np.uint16).reshape(64, 64)).save(p16)
    img = load_image(str(p16), 32)
    assert img.shape == (32, 32) and img.max() > 200 and img.min() < 30


def test_evaluate_stores_task_metrics(run_dir, capsys):
    out = _json(capsys, ["evaluate", "--workdir", run_dir, "--num", "5", "--batch-size", "4", "--json"])
    res, meta = out["task_metrics"], out["task_eval"]
    assert meta["num_examples"] == 5 and meta["checkpoint_step"] == 3 and meta["split"] == "validation"
    for key in ("caption/bleu4", "caption/style_acc", "caption/count_acc", "boxes/mean_iou", "boxes/ap50",
                "segmentation/miou", "segmentation/iou_background"):
        assert key in res and (res[key] is None or 0.0 <= res[key] <= 1.0), key
    with open(os.path.join(run_dir, "summary.json")) as f:
        summary = json.load(f)
    assert summary["task_metrics"] == res and summary["task_eval"] == meta and summary["status"] == "done"
    assert all(isinstance(v, float) or v is None for v in res.values())  # only metrics: plotted vs compute
    assert not [f for f in os.listdir(run_dir) if ".tmp" in f]


def test_user_errors(run_dir, tmp_path, capsys):
    bad = tmp_path / "notes.png"
    bad.write_text("this is not an image")
    assert "not a readable image" in _error(capsys, ["generate", "--workdir", run_dir, "--image", str(bad)])
    assert "no such file" in _error(capsys, ["generate", "--workdir", run_dir, "--image", str(tmp_path / "x")])
    assert "SPLIT:INDEX" in _error(capsys, ["generate", "--workdir", run_dir, "--example", "seven"])
    assert "no modality 'report'" in _error(capsys, ["generate", "--workdir", run_dir, "--example",
                                                      "validation:0", "--targets", "caption,report"])
    assert "either given or decoded" in _error(capsys, ["generate", "--workdir", run_dir, "--example",
                                                         "validation:0", "--inputs", "image,caption"])
    assert "not a run directory" in _error(capsys, ["generate", "--workdir", str(tmp_path), "--example",
                                                     "validation:0"])
    assert "--refine-steps" in _error(capsys, ["generate", "--workdir", run_dir, "--example", "validation:0",
                                               "--refine-steps", "0"])
    afile = tmp_path / "afile"
    afile.write_text("x")
    assert "--out" in _error(capsys, ["generate", "--workdir", run_dir, "--example", "validation:0",
                                      "--out", str(afile)])
    assert "--num" in _error(capsys, ["evaluate", "--workdir", run_dir, "--num", "0"])
    assert "available steps: 3" in _error(capsys, ["evaluate", "--workdir", run_dir, "--checkpoint", "7"])
    assert "out of range" in _error(capsys, ["generate", "--workdir", run_dir, "--example", "validation:999",
                                             "--out", str(tmp_path)])
    assert not (tmp_path / "validation-999.png").exists()
    # a run directory whose checkpoint is not one
    fake = tmp_path / "fake"
    (fake / "checkpoints" / "5").mkdir(parents=True)
    shutil.copy(os.path.join(run_dir, "config.json"), fake / "config.json")
    assert "does not restore" in _error(capsys, ["generate", "--workdir", str(fake), "--example",
                                                 "validation:0"])
    assert "no summary.json" in _error(capsys, ["evaluate", "--workdir", str(fake)])
