"""``medscale bench seqlen``: argument parsing, errors, and a small real run of the compiled train step."""

import json
import os

import pytest

from medscale import cli
from medscale.bench.seqlen import ROW_KEYS, parse_bytes, parse_lengths
from medscale.errors import UserError

SMALL = ["--d-model", "32", "--heads", "2", "--enc-layers", "1", "--dec-layers", "1", "--vocab", "256",
         "--dec-len", "16", "--batch", "2", "--steps", "1", "--block", "32", "--quiet"]


def test_parse_lengths():
    assert parse_lengths("256,512,...,8192") == [256, 512, 1024, 2048, 4096, 8192]
    assert parse_lengths("100,300,...,2700") == [100, 300, 900, 2700]
    assert parse_lengths("64, 96,128") == [64, 96, 128]
    for bad in ("256,384,...,1024", "256,512,...,3000", "...,512", "a,b", "0,64", ""):
        with pytest.raises(UserError):
            parse_lengths(bad)


def test_parse_bytes():
    assert parse_bytes("8GiB") == 8 * 2 ** 30
    assert parse_bytes("500MB") == 500_000_000
    assert parse_bytes("5e9") == 5_000_000_000
    for bad in ("lots", "-1GiB", "0"):
        with pytest.raises(UserError):
            parse_bytes(bad)


@pytest.mark.parametrize("argv,message", [
    (["--lengths", "256,384,...,1024"], "ratio"),
    (["--attention", "dense,flash"], "--attention"),
    (["--remat", "some"], "--remat"),
    (["--memory-limit", "plenty"], "--memory-limit"),
])
def test_bad_input_is_one_line_error(capsys, argv, message):
    assert cli.main(["bench", "seqlen", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and message in err and "\n" not in err


def test_bench_batch_follows_the_contract():
    from medscale.bench.seqlen import bench_batch, bench_spec
    from medscale.data.batch import check_batch

    spec = bench_spec(300, d_model=32, enc_layers=1, dec_layers=1, heads=2, d_ff=64, vocab=256, dec_len=16)
    assert spec.modalities[0].max_tokens >= 300
    batch = bench_batch(spec, 3)
    check_batch(batch, 3, 300, 16)
    assert batch["enc_valid"].all() and batch["enc_pos"].max() == 299
    assert batch["dec_causal"].any() and not batch["dec_causal"].all()


def test_real_run_json_rows(capsys):
    assert cli.main(["bench", "seqlen", "--lengths", "256", "--attention", "dense,blockwise", "--json",
                     *SMALL]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1
    rows = json.loads(out[0])
    assert [(r["attention"], r["length"], r["remat"]) for r in rows] == [("dense", 256, "none"),
                                                                       ("blockwise", 256, "none")]
    for r in rows:
        assert set(ROW_KEYS) <= set(r)
        assert r["fits"] is True and r["step_s"] > 0 and r["tokens_per_s"] > 0
        assert r["peak_bytes"] == r["argument_bytes"] + r["output_bytes"] - r["alias_bytes"] + r["temp_bytes"]
        assert r["model_flops"] > 0
    dense, blockwise = rows
    # dense keeps the 256 x 256 float32 probabilities per (example, head) for its backward (1 MiB here); blockwise
    # (block 32) keeps only O(L) statistics, its block scores being far smaller
    lxl = 2 * 2 * 256 * 256 * 4
    assert dense["temp_bytes"] > lxl
    assert blockwise["temp_bytes"] < dense["temp_bytes"] - lxl // 2
    assert abs(blockwise["loss"] - dense["loss"]) < 1e-3 * abs(dense["loss"])  # same function, same batch


def test_cells_over_the_limit_are_not_run_and_files_are_written(tmp_path, capsys):
    out = tmp_path / "bench"
    assert cli.main(["bench", "seqlen", "--lengths", "64", "--attention", "blockwise", "--memory-limit", "1KiB",
                     "--out", str(out), *SMALL]) == 0
    table = capsys.readouterr().out
    assert "blockwise" in table and " no " in table
    saved = json.loads((out / "seqlen.json").read_text())
    (row,) = saved["rows"]
    assert row["fits"] is False and row["step_s"] is None and row["peak_bytes"] > 1024
    assert saved["info"]["memory_limit"] == 1024
    assert (out / "seqlen.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(os.listdir(out)) == ["seqlen.json", "seqlen.png", "seqlen.txt"]
