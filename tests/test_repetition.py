"""Data-constrained allocation (budget --unique-tokens / --dataset), the repetition fit (fit --repetition) and the
repetition sweep's design."""

import json
import math
import os

import numpy as np
import pytest

from medscale.analysis import datasets
from medscale.analysis import repetition as rep
from medscale.analysis import repetition_fit as rf
from medscale.cli import main
from medscale.errors import UserError
from medscale.laws import PUBLISHED, ChinchillaLaw

DGX = ["budget", "--hardware", "v100-sxm2-32gb", "--gpus", "8", "--days", "7", "--mfu", "0.35",
       "--precision", "fp16", "--law", "chinchilla"]
EPS = np.finfo(np.float64).eps


def _budget_json(capsys, *extra):
    assert main([*DGX, *extra, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def _loss_by_hand(law, n, d, u, r_d=rep.PUBLISHED_R_D, r_n=rep.PUBLISHED_R_N):
    """The issue's formula written out again, scalar by scalar (independent of repetition.py's arrays)."""
    d_eff = d if d <= u else u + u * r_d * (1.0 - math.exp(-(d / u - 1.0) / r_d))
    # the law's compute-optimal N for u tokens: D_opt(C) = u  =>  C/6 = (u G)^(1/b), N = G (C/6)^a
    c6 = (u * law.G) ** (1.0 / law.b)
    u_n = min(n, law.G * c6 ** law.a)
    n_eff = n if n <= u_n else u_n + u_n * r_n * (1.0 - math.exp(-(n / u_n - 1.0) / r_n))
    return law.E + law.A / n_eff ** law.alpha + law.B / d_eff ** law.beta


def test_effective_data_and_params_follow_the_formula():
    u, r = 1e9, rep.PUBLISHED_R_D
    assert rep.effective_data(5e8, u, r) == 5e8  # no repetition: D' = D
    assert rep.effective_data(2e9, u, r) == pytest.approx(u + u * r * (1 - math.exp(-1 / r)), rel=1e-14)
    assert rep.effective_data(1e15, u, r) == pytest.approx(u * (1 + r), rel=1e-12)  # saturates
    assert rep.effective_params(3e8, 1e8, 5.309) == pytest.approx(1e8 + 1e8 * 5.309 * (1 - math.exp(-2 / 5.309)))
    law = PUBLISHED["chinchilla"]
    # the size the law trains compute-optimally on u tokens: its D_opt is u
    n_u = float(rep.params_for_tokens(law, u))
    c = 6 * n_u * u
    assert float(law.n_opt(c)) == pytest.approx(n_u, rel=1e-9)
    assert float(law.d_opt(c)) == pytest.approx(u, rel=1e-9)


def test_far_more_unique_tokens_than_d_opt_gives_the_unconstrained_answer(capsys):
    free = _budget_json(capsys)
    bounded = _budget_json(capsys, "--unique-tokens", "1e15")
    for key in ("n_params_opt", "tokens_opt", "predicted_loss", "flops", "ladder", "days"):
        assert bounded[key] == free[key]
    assert bounded["epochs"] == pytest.approx(free["tokens_opt"] / 1e15, rel=1e-12)
    assert bounded["repetition"]["loss_lost_to_repetition"] == 0.0
    # and the grid search (used when the data bind) finds the same optimum when they do not
    law = PUBLISHED["chinchilla"]
    ln, loss = rep._argmin_n(law, [free["flops"]], 1e15, rep.Constants())
    assert float(np.exp(ln[0])) == pytest.approx(free["n_params_opt"], rel=1e-4)
    assert float(loss[0]) == pytest.approx(free["predicted_loss"], rel=1e-12)


@pytest.mark.parametrize("law_name", ["chinchilla", "epoch2024"])
@pytest.mark.parametrize("epochs_unlimited", [3.0, 30.0, 300.0])
def test_data_constrained_optimum_matches_brute_force(capsys, law_name, epochs_unlimited):
    law = PUBLISHED[law_name]
    free = _budget_json(capsys, "--law", law_name)
    u = free["tokens_opt"] / epochs_unlimited
    out = _budget_json(capsys, "--law", law_name, "--unique-tokens", repr(u))
    c = out["flops"]
    assert out["n_params_opt"] * out["tokens_opt"] * 6 == pytest.approx(c, rel=1e-12)
    assert out["epochs"] == pytest.approx(out["tokens_opt"] / u, rel=1e-12)
    # brute force: the formula by hand at 60,001 sizes over +-3 decades of the unconstrained optimum
    grid = free["n_params_opt"] * np.logspace(-3, 3, 60_001)
    losses = np.array([_loss_by_hand(law, n, c / (6 * n), u) for n in grid])
    k = int(np.argmin(losses))
    assert 0 < k < len(grid) - 1  # an interior minimum
    mine = _loss_by_hand(law, out["n_params_opt"], out["tokens_opt"], u)
    assert out["predicted_loss"] == pytest.approx(mine, rel=64 * EPS)
    assert mine <= losses[k] * (1 + 64 * EPS)  # at least as good as the brute force's best
    assert mine == pytest.approx(losses[k], rel=1e-9)
    # the size lies among the brute force's near-best sizes (the minimum is flat: compare where the losses tie)
    near = np.nonzero(losses <= losses[k] * (1 + 1e-9))[0]
    assert grid[near.min() - 1] <= out["n_params_opt"] <= grid[near.max() + 1]
    assert out["predicted_loss"] > free["predicted_loss"]
    assert out["repetition"]["loss_lost_to_repetition"] == pytest.approx(
        out["predicted_loss"] - free["predicted_loss"], rel=1e-12)


def test_warns_above_four_epochs_and_says_when_compute_stops_helping(capsys):
    free = _budget_json(capsys)
    few = _budget_json(capsys, "--unique-tokens", repr(free["tokens_opt"] / 2))
    assert few["epochs"] <= rep.EPOCH_WARNING and not few["repetition"]["warnings"]
    many = _budget_json(capsys, "--unique-tokens", "1e7")
    assert many["epochs"] > rep.EPOCH_WARNING
    warnings = many["repetition"]["warnings"]
    assert any("epochs" in w for w in warnings) and any("no longer helps" in w for w in warnings)
    # the threshold's defining property: just above it a doubling gains < 1%, just below it >= 1%
    law, cstar = PUBLISHED["chinchilla"], many["repetition"]["diminishing_flops"]
    assert cstar < many["flops"]

    def gain(c):
        a, b = rep.best_loss(law, [c, 2 * c], 1e7)
        return 1 - b / a

    assert gain(cstar * 1.01) < rep.DOUBLING_GAIN <= gain(cstar / 1.01)
    # with unlimited data the same point lies further out
    assert many["repetition"]["diminishing_flops_unlimited"] > 100 * cstar
    assert main([*DGX, "--unique-tokens", "1e7"]) == 0
    text = capsys.readouterr().out
    assert "data-constrained" in text and "warning: the optimum repeats" in text


def test_repetition_constants_file(tmp_path, capsys):
    path = tmp_path / "rep.json"
    path.write_text(json.dumps({"repetition": {"r_star_d": 2.0}}))
    const = rep.load_constants(str(path))
    assert (const.r_d, const.r_n) == (2.0, rep.PUBLISHED_R_N)
    free = _budget_json(capsys)
    u = repr(free["tokens_opt"] / 20)
    published = _budget_json(capsys, "--unique-tokens", u)
    own = _budget_json(capsys, "--unique-tokens", u, "--repetition-constants", str(path))
    assert own["repetition"]["constants"]["r_star_d"] == 2.0
    assert own["predicted_loss"] > published["predicted_loss"]  # repeated tokens worth less: a higher loss
    for bad, why in (({"r_star_n": 1}, "r_star_d"), ({"r_star_d": -1}, "positive"), ("[1]", "r_star_d")):
        path.write_text(json.dumps(bad) if not isinstance(bad, str) else bad)
        with pytest.raises(UserError, match=why):
            rep.load_constants(str(path))
    path.write_text("{not json")
    assert main([*DGX, "--unique-tokens", "1e9", "--repetition-constants", str(path)]) == 2
    assert capsys.readouterr().err.startswith("error: --repetition-constants")


@pytest.mark.parametrize("argv", [["--unique-tokens", "0"], ["--unique-tokens", "1e9", "--dataset", "roco"],
                                  ["--dataset", "imagenet"], ["--dataset", "roco:x"],
                                  ["--dataset", "medmnist:nosuch"], ["--repetition-constants", "x.json"]])
def test_bad_input_is_one_line(capsys, argv):
    assert main([*DGX, *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1


def test_reverse_mode_with_unique_tokens_is_an_error(capsys):
    assert main(["budget", "--params", "1e9", "--unique-tokens", "1e9"]) == 2
    assert "--params" in capsys.readouterr().err


def test_named_datasets_estimate_from_published_sizes(tmp_path, capsys):
    empty = [f"data.data_dir={tmp_path}"]
    roco = datasets.unique_tokens("roco", "base", empty)
    # base: 64 image tokens + a caption at its cap of 63 tokens, under enc_len + dec_len = 192
    assert (roco["method"], roco["examples"], roco["tokens_per_example"]) == ("estimate", 65_460, 127.0)
    assert roco["unique_tokens"] == 65_460 * 127.0 and "Pelka" in roco["source"]
    assert datasets.unique_tokens("rocov2", "base", empty)["examples"] == 59_958
    tiny = datasets.unique_tokens("medmnist:pathmnist", "tiny", empty)
    assert tiny["examples"] == 89_996 and tiny["tokens_per_example"] == 64 + 47  # under tiny's 64 + 48
    assert datasets.unique_tokens("medmnist", "tiny", empty)["examples"] == sum(datasets.MEDMNIST_TRAIN.values())
    out = _budget_json(capsys, "--dataset", "roco", "--set", f"data.data_dir={tmp_path}")
    assert out["unique_tokens"] == roco["unique_tokens"]
    assert out["repetition"]["dataset"]["method"] == "estimate"


def test_named_dataset_counted_from_a_prepared_token_cache(tmp_path):
    folder = tmp_path / "tokens" / "roco_default_1.0.0"
    folder.mkdir(parents=True)
    image_len = np.full(5, 64)
    caption_len = np.array([10, 47, 0, 30, 47])
    np.savez(folder / "train-abc123-c48-b24-v2.npz", image=np.zeros((5, 64)), image_len=image_len,
             caption=np.zeros((5, 48)), caption_len=caption_len, boxes_len=np.zeros(5, int),
             segmentation_len=np.zeros(5, int))
    np.savez(folder / "train-abc123-c64-b32-v2.npz", image_len=image_len)  # other lengths: not this config's
    got = datasets.unique_tokens("roco", "tiny", [f"data.data_dir={tmp_path}"])
    assert got["method"] == "counted" and got["examples"] == 5
    # per example image + caption, capped at tiny's enc_len + dec_len = 112
    assert got["unique_tokens"] == float(np.minimum(image_len + caption_len, 112).sum())


def _simulated(law, sizes, u, const, noise, seed=0):
    rows = []
    for n in sizes:
        for e in (1, 4, 16, 64):
            rows.append((n, e * u, u))  # e epochs of the fixed set
            if e > 1:
                rows.append((n, e * u, e * u))  # the same tokens, fresh
    n, d, u = (np.array(v, np.float64) for v in zip(*rows))
    loss = rep.constrained_loss(law, n, d, u, const)
    return n, d, loss * np.exp(np.random.default_rng(seed).normal(0.0, noise, len(loss))), u


def test_repetition_fit_recovers_r_star_d_per_size_model():
    # sizes below what the set trains compute-optimally, as the per-size model assumes
    law = ChinchillaLaw("sim", E=1.0, A=300.0, B=20.0, alpha=0.35, beta=0.35)
    u = 512 * 112.0
    assert rep.params_for_tokens(law, u) > 2.3e5
    n, d, loss, uu = _simulated(law, [5.8e4, 2.3e5], u, rep.Constants(6.0, 5.309), noise=0.002)
    res = rf.fit_repetition(n, d, loss, uu)
    assert res["model"] == "per-size" and res["r_star_n"] is None and not res["r_star_n_identified"]
    lo, hi = res["r_star_d_ci"]
    assert lo < 6.0 < hi and res["r_star_d"] == pytest.approx(6.0, rel=0.25)
    # noiseless: exact
    exact = rf.fit_repetition(*_simulated(law, [5.8e4, 2.3e5], u, rep.Constants(6.0, 5.309), noise=0.0))
    assert exact["r_star_d"] == pytest.approx(6.0, rel=1e-3)


def test_repetition_fit_says_when_the_design_cannot_pin_it_down():
    law = ChinchillaLaw("sim", E=1.0, A=300.0, B=20.0, alpha=0.35, beta=0.35)
    # R*_D far above what 64 epochs can show: the interval is open above
    n, d, loss, u = _simulated(law, [5.8e4, 2.3e5], 512 * 112.0, rep.Constants(5000.0, 5.309), noise=0.01)
    res = rf.fit_repetition(n, d, loss, u)
    assert res["r_star_d_ci"][1] is None and not res["r_star_d_identified"]
    assert any("cannot pin" in note for note in res["notes"])


@pytest.mark.slow
def test_repetition_fit_recovers_both_constants_with_the_law_model():
    law = ChinchillaLaw("sim", E=1.0, A=60.0, B=60.0, alpha=0.35, beta=0.35)
    u = 512 * 112.0
    sizes = [1e4, 4e4, 1.6e5, 6.4e5]  # the top two well above what the set trains compute-optimally
    assert rep.params_for_tokens(law, u) < 1.6e5
    res = rf.fit_repetition(*_simulated(law, sizes, u, rep.Constants(6.0, 3.0), noise=0.002))
    assert res["model"] == "law"
    assert res["r_star_d_ci"][0] < 6.0 < res["r_star_d_ci"][1]
    assert res["r_star_n_ci"][0] < 3.0 < res["r_star_n_ci"][1]


def test_fit_cli_repetition_writes_constants_budget_reads(tmp_path, capsys):
    import pandas as pd

    law = ChinchillaLaw("sim", E=1.0, A=300.0, B=20.0, alpha=0.35, beta=0.35)
    n, d, loss, u = _simulated(law, [5.8e4, 2.3e5], 512 * 112.0, rep.Constants(6.0, 5.309), noise=0.0)
    table = tmp_path / "runs.csv"
    pd.DataFrame({"params": n, "tokens": d, "loss": loss, "epochs": d / u}).to_csv(table, index=False)
    out = tmp_path / "rep.json"
    assert main(["fit", str(table), "--repetition", "--out", str(out), "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["r_star_d"] == pytest.approx(6.0, rel=1e-3)
    assert rep.load_constants(str(out)).r_d == pytest.approx(res["r_star_d"])
    assert main([*DGX, "--unique-tokens", "1e9", "--repetition-constants", str(out), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["repetition"]["constants"]["r_star_d"] == pytest.approx(6.0, 1e-3)
    pd.DataFrame({"params": n, "tokens": d, "loss": loss}).to_csv(table, index=False)
    assert main(["fit", str(table), "--repetition"]) == 2
    assert "unique_tokens (or epochs)" in capsys.readouterr().err
    fresh = pd.DataFrame({"params": n, "tokens": d, "loss": loss, "epochs": np.ones_like(d)})
    fresh.to_csv(table, index=False)
    assert main(["fit", str(table), "--repetition"]) == 2
    assert "no run repeats" in capsys.readouterr().err


def test_repetition_sweep_design():
    from medscale.sweep.design import expand, load_definition

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    runs = expand(load_definition(os.path.join(root, "sweeps", "repetition.py") + ":256"))
    assert len(runs) == 2 * 4 * 2  # sizes x epochs x (fixed set, fresh)
    per_example = 64 + 48
    for r in runs:
        n_train = [o for o in r.overrides if o.startswith("data.num_train=")]
        assert len(n_train) == 1
        unique = int(n_train[0].split("=")[1])
        assert r.run_id.split("-")[3] == f"u{unique}"
        assert r.tokens % (256 * per_example) == 0
        if unique:
            assert unique == 256 and r.tokens // (256 * per_example) in (1, 4, 16, 64)
        assert "data.tokenizer_examples=256" in r.overrides
    with pytest.raises(UserError, match="num_trains"):
        from medscale.sweep.design import normalize

        cfg = load_definition(os.path.join(root, "sweeps", "repetition.py"))
        cfg.num_trains = (-1,)
        normalize(cfg)


def test_dataset_folder_is_prepared_and_counted(tmp_path, capsys):
    """A MedMNIST download (the folder layout docs/data.md names): prepared with the configured tokenizers and
    counted: per example its image and caption tokens, capped at enc_len + dec_len."""
    from medscale.configs import load_config, spec_from_config
    from medscale.data.pipeline import build_data

    manual = tmp_path / "mm"
    manual.mkdir()
    rng = np.random.default_rng(0)
    arrays = {}
    for split, n in (("train", 12), ("val", 4), ("test", 4)):
        arrays[f"{split}_images"] = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        arrays[f"{split}_labels"] = rng.integers(0, 2, (n, 1))
    np.savez(manual / "pneumoniamnist.npz", **arrays)
    fast = [f"data.data_dir={tmp_path / 'cache'}", "data.tokenizer_examples=64", "data.vq_iters=2",
            "data.image_vocab=16", "data.seg_vocab=16", "data.modalities=('image','caption')"]
    got = datasets.unique_tokens(str(manual), "tiny", fast)
    assert (got["dataset"], got["method"], got["examples"]) == ("medmnist", "counted", 12)
    cfg = load_config("tiny", [*fast, "data.dataset=medmnist", f"data.manual_dir={manual}"])
    toks = build_data(cfg, spec_from_config(cfg)).tokens("train")
    per = toks["image_len"] + toks["caption_len"]
    assert (toks["image_len"] == 64).all() and (toks["caption_len"] > 0).all()
    assert got["unique_tokens"] == float(np.minimum(per, 64 + 48).sum())
    argv = ["budget", "--pf-days", "1", "--dataset", str(manual), "--data-config", "tiny"]
    for item in fast:
        argv += ["--set", item]
    assert main([*argv, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["unique_tokens"] == got["unique_tokens"]


def test_report_finite_data_flags_are_checked(capsys, tmp_path):
    assert main(["report", str(tmp_path), "--unique-tokens", "1e9", "--dataset", "roco"]) == 2
    assert "either --unique-tokens or --dataset" in capsys.readouterr().err
    assert main(["report", str(tmp_path), "--unique-tokens", "-5"]) == 2
    assert "--unique-tokens must be positive" in capsys.readouterr().err
