"""``medscale data prepare|show`` and ``medscale bench data`` through the CLI."""

import json

SMALL = ["--set", "data.num_train=96", "--set", "data.num_eval=16", "--set", "data.tokenizer_examples=96",
         "--set", "data.vq_iters=2"]


def test_prepare_show_and_bench(cli, tmp_path):
    common = ["--config", "tiny", "--set", f"data.data_dir={tmp_path}", *SMALL, "--quiet", "--json"]
    r = cli("data", "prepare", *common)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["examples"] == {"train": 96, "validation": 16, "test": 16}
    assert out["text_vocab"]["trained"] <= out["text_vocab"]["configured"] == 512
    assert 0 < out["image_vq"]["rmse"] < 0.2 and out["segmentation"]["pixel_accuracy"] > 0.8
    r = cli("data", "show", *common, "--index", "3")
    assert r.returncode == 0, r.stderr
    ex = json.loads(r.stdout.strip().splitlines()[-1])
    assert ex["caption_detokenized"] == " ".join(ex["caption"].split()) or len(ex["tokens/caption"]) == 48
    r = cli("data", "show", *common, "--index", "99")
    assert r.returncode == 2 and r.stderr.strip().startswith("error: --index 99")
    r = cli("bench", "data", *common, "--batches", "5")
    assert r.returncode == 0, r.stderr
    b = json.loads(r.stdout.strip().splitlines()[-1])
    assert b["iterator_t0_batches_per_s"] > 0 and b["masking_batches_per_s"] > 0


def test_bad_dataset_is_one_line_error(cli, tmp_path):
    r = cli("data", "prepare", "--set", f"data.data_dir={tmp_path}", "--set", "data.dataset=roco",
            "--set", f"data.manual_dir={tmp_path / 'missing'}", "--quiet")
    assert r.returncode == 2 and r.stderr.startswith("error: data.manual_dir") and "Traceback" not in r.stderr
