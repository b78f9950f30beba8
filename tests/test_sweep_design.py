"""Sweep designs: run ids, IsoFLOP budgets through the accounting, grid products, validation."""

import json
import os
import textwrap

import pytest

from medscale import accounting
from medscale.configs import load_config, spec_from_config
from medscale.errors import UserError
from medscale.sweep import design

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def write_sweep(tmp_path, body, name="s.py"):
    path = tmp_path / name
    path.write_text("import ml_collections\n\ndef get_config():\n    c = ml_collections.ConfigDict()\n"
                    + textwrap.indent(textwrap.dedent(body), "    ") + "    return c\n")
    return str(path)


ISO = """
c.name = "iso"
c.base = "tiny"
c.design = "isoflop"
c.sizes = ["d16l1", "d32l1", "d48l1", "d64l1", "d64l2", "d96l2", "d128l2"]
c.enc_lens = [32, 64]
c.budgets = [1e11, 1e12]
c.per_budget = 3
c.spread = 16.0
c.lr = {"default": 2e-3, "d16l1": 5e-3}
c.evals_per_run = 4
"""


def test_isoflop_runs_spend_their_budget_through_the_accounting(tmp_path):
    runs = design.expand(design.load_definition(write_sweep(tmp_path, ISO)))
    assert {r.budget for r in runs} == {1e11, 1e12}
    for r in runs:
        cfg = load_config("tiny", r.overrides)
        spec = spec_from_config(cfg)
        per_step = accounting.step_flops(spec, cfg.train.batch_size)["model_flops"]
        assert cfg.train.steps == r.steps and spec.enc_len == r.enc_len
        assert r.model_flops == pytest.approx(per_step * r.steps)
        assert abs(r.model_flops - r.budget) <= per_step / 2 + 1e-6  # within half a step of the budget
        assert cfg.train.eval_every == max(1, r.steps // 4)
        assert cfg.train.lr == (5e-3 if r.size == "d16l1" else 2e-3)
    for budget in (1e11, 1e12):
        for enc in (32, 64):
            sizes = [r.size for r in runs if r.budget == budget and r.enc_len == enc]
            assert len(sizes) == len(set(sizes)) == 3
    # a bigger budget picks bigger models (the expected optimum grows with C)
    mean = {b: sum(r.params["total"] for r in runs if r.budget == b) for b in (1e11, 1e12)}
    assert mean[1e12] > mean[1e11]
    assert [r.model_flops for r in runs] == sorted(r.model_flops for r in runs)  # cheapest first


def test_run_ids_are_stable_readable_and_change_with_the_run(tmp_path):
    path = write_sweep(tmp_path, ISO)
    a = design.expand(design.load_definition(path))
    b = design.expand(design.load_definition(path))
    assert [r.run_id for r in a] == [r.run_id for r in b]
    r = a[0]
    assert r.run_id.startswith(f"{r.size}-e{r.enc_len}-c") and len(r.run_id.rsplit("-", 1)[1]) == 8
    changed = design.expand(design.load_definition(write_sweep(tmp_path, ISO.replace("2e-3", "1e-3"), "t.py")))
    same_lr = {x.run_id for x in changed if x.size == "d16l1"}
    assert same_lr <= {x.run_id for x in a}  # d16l1 keeps its own lr, so its ids are unchanged
    assert not ({x.run_id for x in changed if x.size != "d16l1"} & {x.run_id for x in a})


def test_grid_is_the_full_product_with_seeds(tmp_path):
    path = write_sweep(tmp_path, """
        c.name = "grid"
        c.base = "tiny"
        c.design = "grid"
        c.sizes = ["tiny", "d32l2h4f64"]
        c.enc_lens = [32, 64]
        c.tokens = [2e5, 4e5]
        c.seeds = [0, 1]
        c.batch_size = 8
    """)
    runs = design.expand(design.load_definition(path))
    assert len(runs) == 2 * 2 * 2 * 2
    for r in runs:
        assert r.budget is None and r.batch_size == 8
        assert abs(r.tokens - r.token_budget) <= r.batch_size * (r.enc_len + r.dec_len) / 2
        cfg = load_config("tiny", r.overrides)
        assert cfg.seed == r.seed
    custom = load_config("tiny", next(r for r in runs if r.size == "d32l2h4f64").overrides)
    spec = spec_from_config(custom)
    assert (spec.d_model, spec.enc_layers, spec.dec_layers, spec.num_heads, spec.d_ff) == (32, 2, 2, 4, 64)
    assert spec_from_config(load_config("tiny", next(r for r in runs if r.size == "tiny").overrides)).name == "tiny"


@pytest.mark.parametrize("body,match", [
    ('c.name = "x"\nc.base = "tiny"\nc.sizes = ["huge"]\nc.enc_lens = [32]\nc.tokens = [1e5]\n', "unknown size"),
    ('c.name = "x"\nc.base = "tiny"\nc.design = "isoflop"\nc.sizes = ["tiny"]\nc.enc_lens = [32]\n', "budgets"),
    ('c.name = "x"\nc.base = "tiny"\nc.sizes = ["tiny"]\nc.enc_lens = [32]\nc.tokens = [1e5]\nc.bogus = 1\n',
     "unknown sweep field"),
    ('c.name = "x y"\nc.base = "tiny"\nc.sizes = ["tiny"]\nc.enc_lens = [32]\nc.tokens = [1e5]\n', "sweep name"),
    ('raise RuntimeError("boom")\n', "get_config\\(\\) failed: RuntimeError: boom"),
])
def test_bad_definitions_are_user_errors(tmp_path, body, match):
    with pytest.raises(UserError, match=match):
        design.load_definition(write_sweep(tmp_path, body))


def test_budgets_per_encoder_length(tmp_path):
    body = ISO.replace("c.budgets = [1e11, 1e12]", 'c.budgets = {"32": [1e11], "64": [3e11, 1e12]}')
    sweep = design.load_definition(write_sweep(tmp_path, body))
    runs = design.expand(design.normalize(sweep))  # normalizing twice keeps the per-length budgets
    assert {(r.enc_len, r.budget) for r in runs} == {(32, 1e11), (64, 3e11), (64, 1e12)}
    with pytest.raises(UserError, match="enc_lens"):
        design.load_definition(write_sweep(tmp_path, ISO.replace("c.budgets = [1e11, 1e12]",
                                                                 'c.budgets = {"32": [1e11]}'), "u.py"))


def test_missing_file_and_only_filter(tmp_path):
    with pytest.raises(UserError, match="not found"):
        design.load_definition(str(tmp_path / "nope.py"))
    runs = design.expand(design.load_definition(write_sweep(tmp_path, ISO)))
    some = design.filter_runs(runs, "d32l1-e64-*")
    assert some and all(r.run_id.startswith("d32l1-e64-") for r in some)
    with pytest.raises(UserError, match="matches no run"):
        design.filter_runs(runs, "zzz*")


def test_cli_dry_run_json(tmp_path, capsys):
    from medscale.cli import main

    assert main(["sweep", "run", write_sweep(tmp_path, ISO), "--dry-run", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["sweep"] == "iso" and len(out["runs"]) == 12
    assert main(["sweep", "run", str(tmp_path / "missing.py")]) == 2


def test_scaled_batch_centre_seeds_and_run_sized_evaluations(tmp_path):
    body = ISO.replace("c.enc_lens = [32, 64]", "c.enc_lens = [64]") + """
c.batch_per_budget = [8, 32]
c.center_seeds = [1, 2]
c.eval_fraction = 0.05
c.evals_per_run = None
c.eval_batch_size = 32
c.task_eval_fraction = 0.005
c.set = ["train.task_eval_examples=16", "train.eval_batches=4"]
"""
    runs = design.expand(design.load_definition(write_sweep(tmp_path, body)))
    for budget, batch in ((1e11, 8), (1e12, 32)):
        group = [r for r in runs if r.budget == budget]
        assert {r.batch_size for r in group} == {batch}
        # one size (the one nearest the law's expected optimum) gets the extra seeds; the others seed 0 only
        by_size = {}
        for r in group:
            by_size.setdefault(r.size, []).append(r.seed)
        centred = [s for s, seeds in by_size.items() if sorted(seeds) == [0, 1, 2]]
        assert len(centred) == 1 and all(seeds == [0] for s, seeds in by_size.items() if s not in centred)
        for r in group:
            cfg = load_config("tiny", r.overrides)
            assert cfg.train.batch_size == batch and cfg.train.eval_batch_size == 32
            # evaluations: a forward pass over 4 x 32 examples, each a third of a training example's FLOPs, at
            # most 5% of the run (up to the rounding of eval_every to whole steps)
            evals = r.steps // cfg.train.eval_every
            assert evals >= 1 and (evals == 1 or evals * 4 * 32 / 3 <= 0.05 * r.steps * batch * 1.1)
            # task metrics on 16 examples only where 16 <= 0.5% of the run's examples
            assert cfg.train.task_eval_examples == (16 if 16 <= 0.005 * r.steps * batch else 0)
    assert {r.batch_size for r in runs} == {8, 32}
    assert any(load_config("tiny", r.overrides).train.task_eval_examples == 16 for r in runs)
    assert any(load_config("tiny", r.overrides).train.task_eval_examples == 0 for r in runs)
    # batch_steps: each run's batch the largest power of two in [batch_min, batch_max] leaving >= batch_steps steps
    ruled = design.expand(design.load_definition(write_sweep(tmp_path, body.replace(
        "c.batch_per_budget = [8, 32]", "c.batch_steps = 200\nc.batch_min = 4\nc.batch_max = 64"), "r.py")))
    for r in ruled:
        b, examples = r.batch_size, r.tokens / (r.enc_len + r.dec_len)
        assert 4 <= b <= 64 and b & (b - 1) == 0
        assert b == 4 or examples / b >= 200 * 0.99
        assert b == 64 or examples / (2 * b) < 200 * 1.01
    assert len({r.batch_size for r in ruled}) > 2
    with pytest.raises(UserError, match="batch_per_budget"):
        design.load_definition(write_sweep(tmp_path, body.replace("[8, 32]", "[8]"), "b.py"))
    with pytest.raises(UserError, match="center_seeds"):
        design.load_definition(write_sweep(tmp_path, body.replace("[1, 2]", "[0, 1]"), "c.py"))


def test_learning_rate_grid(tmp_path):
    body = """
        c.name = "tune"
        c.base = "tiny"
        c.design = "grid"
        c.sizes = ["d32l2", "d64l2"]
        c.enc_lens = [64]
        c.tokens = [2e5]
        c.lrs = [1e-3, 4e-3]
    """
    runs = design.expand(design.load_definition(write_sweep(tmp_path, body)))
    assert sorted((r.size, r.lr) for r in runs) == [("d32l2", 1e-3), ("d32l2", 4e-3), ("d64l2", 1e-3),
                                                    ("d64l2", 4e-3)]
    for r in runs:
        assert load_config("tiny", r.overrides).train.lr == r.lr and f"-lr{design._fmt_num(r.lr)}-" in r.run_id
    factors = design.expand(design.load_definition(write_sweep(tmp_path, body.replace(
        "c.lrs = [1e-3, 4e-3]", 'c.lr = {"d32l2": 8e-3, "d64l2": 4e-3}\n        c.lr_factors = [0.5, 2]'), "f.py")))
    assert sorted((r.size, r.lr) for r in factors) == [("d32l2", 4e-3), ("d32l2", 1.6e-2), ("d64l2", 2e-3),
                                                       ("d64l2", 8e-3)]
    assert all("-x0.5-" in r.run_id or "-x2-" in r.run_id for r in factors)
    with pytest.raises(UserError, match="either lr or lrs"):
        design.load_definition(write_sweep(tmp_path, body.replace("c.lrs", "c.lr = 1e-3\n        c.lrs"), "x.py"))


def test_quickstart_design_is_sound():
    """Two decades of budgets, five sizes of d_model >= 32 and 2+2 layers per budget, three seeds of one size per
    budget, fresh data, per-width learning rates, one batch per budget growing with it."""
    from medscale.analysis.quickstart import lr_for, quickstart_sweep

    sweep = quickstart_sweep()
    runs = design.expand(sweep)
    budgets = sorted({r.budget for r in runs})
    assert sweep.design == "isoflop" and budgets[-1] / budgets[0] >= 100
    assert "data.num_train=0" in sweep.set
    for b in budgets:
        group = [r for r in runs if r.budget == b]
        sizes = {r.size for r in group}
        assert len(sizes) >= 5
        assert all(r.steps >= sweep.min_steps for r in group)
        assert max(len([r for r in group if r.size == s]) for s in sizes) == 3
        assert len({r.batch_size for r in group}) == 1
        for r in group:
            shape = design.shape_of(r.size)
            assert shape["d_model"] >= 32 and shape["enc_layers"] >= 2 and shape["dec_layers"] >= 2
            assert r.lr == lr_for(shape["d_model"])
    assert [max(r.batch_size for r in runs if r.budget == b) for b in budgets] == sorted(
        max(r.batch_size for r in runs if r.budget == b) for b in budgets)
    assert lr_for(32) > lr_for(64) > lr_for(128)
    # the sweeps/ files name the same design
    same = design.expand(design.load_definition(os.path.join(REPO, "sweeps", "quickstart.py")))
    assert [r.run_id for r in same] == [r.run_id for r in runs]
    ref = design.expand(design.load_definition(os.path.join(REPO, "sweeps", "reference.py")))
    assert {r.sweep for r in ref} == {"reference"} and len(ref) == len(runs)
