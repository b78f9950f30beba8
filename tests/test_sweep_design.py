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


def test_quickstart_design_is_an_isoflop_sweep_over_two_lengths_and_several_budgets():
    from medscale.analysis.quickstart import quickstart_sweep

    sweep = quickstart_sweep()
    runs = design.expand(sweep)
    assert sweep.design == "isoflop" and len({r.enc_len for r in runs}) == 2
    for enc in {r.enc_len for r in runs}:
        budgets = sorted({r.budget for r in runs if r.enc_len == enc})
        assert len(budgets) >= 3
        for b in budgets:
            group = [r for r in runs if r.budget == b]
            assert {r.enc_len for r in group} == {enc}  # an IsoFLOP group holds one encoder length
            assert len(group) >= 3 and len({r.size for r in group}) == len(group)
            assert all(r.steps >= sweep.min_steps for r in group)
    # the sweeps/ files name the same design
    same = design.expand(design.load_definition(os.path.join(REPO, "sweeps", "quickstart.py")))
    assert [r.run_id for r in same] == [r.run_id for r in runs]
    ref = design.expand(design.load_definition(os.path.join(REPO, "sweeps", "reference.py")))
    assert {r.sweep for r in ref} == {"reference"} and len(ref) == len(runs)
