"""``medscale data prepare|show`` and ``medscale bench data`` through the CLI (in-process, one subprocess)."""

import json

from medscale.cli import main

SMALL = ["--set", "data.num_train=96", "--set", "data.num_eval=16", "--set", "data.tokenizer_examples=96",
         "--set", "data.vq_iters=2", "--set", "data.image_vocab=32", "--set", "data.seg_vocab=32"]


def last_json(capsys):
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 1, lines  # --json: exactly one line on stdout, nothing else
    return json.loads(lines[0])


def test_prepare_show_and_bench(tmp_path, capsys):
    common = ["--config", "tiny", "--set", f"data.data_dir={tmp_path}", *SMALL, "--quiet", "--json"]
    assert main(["data", "prepare", *common]) == 0
    out = last_json(capsys)
    assert out["examples"] == {"train": 96, "validation": 16, "test": 16}
    assert out["text_vocab"]["trained"] <= out["text_vocab"]["configured"] == 512
    assert 0 < out["image_vq"]["rmse"] < 0.2 and out["segmentation"]["pixel_accuracy"] > 0.8
    assert main(["data", "show", *common, "--index", "3"]) == 0
    ex = last_json(capsys)
    assert ex["caption_detokenized"] == " ".join(ex["caption"].split()) or len(ex["tokens/caption"]) == 48
    assert len(ex["tokens/image"]) == 64 and ex["has_mask"]
    assert main(["data", "show", *common, "--index", "99"]) == 2
    assert capsys.readouterr().err.strip() == "error: --index 99 is outside split 'validation' (0..15)"
    assert main(["bench", "data", *common, "--batches", "3"]) == 0
    b = last_json(capsys)
    assert b["iterator_t0_batches_per_s"] > 0 and b["masking_batches_per_s"] > 0


def test_bad_dataset_is_one_line_error(cli, tmp_path):
    r = cli("data", "prepare", "--set", f"data.data_dir={tmp_path}", "--set", "data.dataset=roco",
            "--set", f"data.manual_dir={tmp_path / 'missing'}", "--quiet")
    assert r.returncode == 2 and r.stderr.startswith("error: data.manual_dir") and "Traceback" not in r.stderr
