"""Sequence length as a variable of the law (medscale.analysis.seqlen, docs/longseq.md): the length-independent
evaluation's input rule, the joint law's fit and form selection, the equal-compute recommendation against a
brute-force search, the report section, and ``medscale budget --law FILE`` with a length law."""

import json
import os
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

from medscale.analysis import seqlen
from medscale.analysis.allocation import ladder_family, log_flops_per_token
from medscale.data.masking import Masker, refit_inputs
from medscale.errors import UserError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LENGTHS = (32, 64, 128)
DEC = 48
# the truth: E falls with the encoder length, the rest is shared (the E(l) form)
TRUTH = {"A": 60.0, "B": 400.0, "alpha": 0.35, "beta": 0.32}
E_TRUE = {32: 1.3, 64: 1.1, 128: 1.0}


def _law(l, n, d):
    return E_TRUE[l] + TRUTH["A"] / n ** TRUTH["alpha"] + TRUTH["B"] / d ** TRUTH["beta"]


def _runs(noise=0.003, seed=0, budgets=(1e11, 1e12, 1e13)):
    rng = np.random.default_rng(seed)
    rows = []
    for l in LENGTHS:
        fam = ladder_family("non_embedding", l, DEC)
        for c in budgets:
            for n in np.geomspace(2e4, 2e6, 5):
                d = c / np.exp(log_flops_per_token(np.log(n), fam))
                rows.append({"run_id": f"e{l}-c{c:.0e}-n{n:.0f}", "status": "done", "params": n, "tokens": d,
                             "flops": c, "enc_len": l, "dec_len": DEC, "budget": c,
                             "fixed_loss": _law(l, n, d) * np.exp(rng.normal(0, noise)), "loss": np.nan,
                             "fixed_ref_enc_len": 128.0})
    return pd.DataFrame(rows)


# ------------------------------------------------------------------------------------------------ inputs
def _batch(enc_len, seed=0):
    mods = [("caption", "sequence", 32), ("image", "image", 64), ("seg", "image", 64)]
    m = Masker(mods, enc_len, DEC, alpha=0.5)
    rng = np.random.default_rng(seed)
    B = 8
    ex = {"caption": rng.integers(10, 90, (B, 32)), "caption_len": rng.integers(5, 31, B),
          "image": rng.integers(0, 50, (B, 64)), "image_len": np.full(B, 64),
          "seg": rng.integers(0, 4, (B, 64)), "seg_len": np.full(B, 64)}
    return m(ex, np.random.default_rng([7, 0])), [k for _, k, _ in mods]


def test_refit_inputs_keeps_targets_and_takes_inputs_from_the_reference():
    ref, kinds = _batch(128)
    kept = {}
    for L in (16, 32, 64, 128, 160):
        out = refit_inputs(ref, L, kinds, np.random.default_rng(3))
        for k in ref:
            if k.startswith("dec_"):
                np.testing.assert_array_equal(out[k], ref[k])  # the same targets at every length
        assert out["enc_tokens"].shape == (8, L)
        for i in range(8):
            n_ref = int(ref["enc_valid"][i].sum())
            v = out["enc_valid"][i]
            assert v.sum() == min(L, n_ref) and v[: v.sum()].all()  # valid first, then padding
            triples = set(zip(ref["enc_tokens"][i][ref["enc_valid"][i]], ref["enc_modality"][i][ref["enc_valid"][i]],
                              ref["enc_pos"][i][ref["enc_valid"][i]]))
            got = list(zip(out["enc_tokens"][i][v], out["enc_modality"][i][v], out["enc_pos"][i][v]))
            assert set(got) <= triples and len(set(got)) == len(got)
            # shares proportional to the reference blocks (largest remainder: within one token)
            mods_ref = ref["enc_modality"][i][ref["enc_valid"][i]]
            for m in np.unique(mods_ref):
                share = (mods_ref == m).sum() * min(L, n_ref) / n_ref
                assert abs((out["enc_modality"][i][v] == m).sum() - share) < 1.0 + 1e-9
                if kinds[m] == "sequence":  # a sequence keeps its first tokens
                    pos = out["enc_pos"][i][v][out["enc_modality"][i][v] == m]
                    ref_pos = ref["enc_pos"][i][ref["enc_valid"][i]][mods_ref == m]
                    np.testing.assert_array_equal(pos, ref_pos[: len(pos)])
            kept[(L, i)] = set(got)
    for i in range(8):  # nested: what a shorter encoder sees, a longer one sees too (shares grow here)
        assert kept[(16, i)] <= kept[(64, i)] or len(kept[(16, i)] - kept[(64, i)]) <= 1
        assert kept[(64, i)] <= kept[(128, i)]


# ------------------------------------------------------------------------------------------------ the law
def test_points_need_the_length_independent_eval_and_two_lengths():
    df = _runs()
    with pytest.raises(UserError, match="fixed_eval_enc_len"):
        seqlen.points_from_runs(df.assign(fixed_loss=np.nan))
    with pytest.raises(UserError, match="one encoder length"):
        seqlen.points_from_runs(df[df["enc_len"] == 64])
    with pytest.raises(UserError, match="reference lengths"):
        seqlen.points_from_runs(df.assign(fixed_ref_enc_len=df["enc_len"].astype(float)))
    pts, col = seqlen.points_from_runs(df)
    assert col == "fixed_loss" and len(pts) == len(df)


def test_layout_shares_and_splits_parameters():
    lay = seqlen.Layout("E,B(l)", 3)
    assert lay.size == 3 + 3 + 3  # a, alpha, beta shared; e, b per length
    per = np.arange(15, dtype=float).reshape(3, 5)
    back = lay.expand(lay.pack(per))
    np.testing.assert_allclose(back[:, 1], per[:, 1])
    np.testing.assert_allclose(back[:, 2], per[:, 2])
    np.testing.assert_allclose(back[:, 0], per[:, 0].mean())


def test_joint_law_recovers_the_truth_and_its_form_is_chosen_by_held_out_error():
    pts, _ = seqlen.points_from_runs(_runs())
    sel = seqlen.select_form(pts)
    assert sel["forms"]["pooled"]["mean_abs_log_error"] > 2 * sel["forms"]["E(l)"]["mean_abs_log_error"]
    assert sel["chosen"] in ("E(l)", "E,B(l)")
    fit = seqlen.fit_form(pts, "E(l)")
    laws = fit.laws()
    for l in LENGTHS:
        assert abs(laws[l]["E"] - E_TRUE[l]) < 0.05
        assert abs(laws[l]["alpha"] - TRUTH["alpha"]) < 0.05 and abs(laws[l]["beta"] - TRUTH["beta"]) < 0.05
    # the fit reaches the objective's minimum: no start of the grid does better
    g, lN, lD, lL = seqlen._arrays(pts, list(LENGTHS))
    w = np.ones(len(pts))
    for th in seqlen._grid_starts(fit.layout, g, lN, lD, lL, w, keep=5):
        assert seqlen._objective(th, fit.layout, g, lN, lD, lL, w)[0] >= fit.objective - 1e-12


def test_recommendation_is_the_brute_force_optimum_at_equal_compute():
    laws = {l: {"E": E_TRUE[l], **TRUTH} for l in LENGTHS}
    # a longer encoder costs more per token: at a small budget the shortest length can win despite its higher E
    for flops in (1e12, 1e16, 1e21):
        rec = seqlen.recommend(laws, flops, DEC)
        brute = {}
        for row, l in zip(rec["by_length"], LENGTHS):
            fam = ladder_family("non_embedding", l, DEC)
            ln = np.linspace(np.log(1e3), np.log(flops) - 1.0, 200001)
            d = flops / np.exp(log_flops_per_token(ln, fam))
            loss = _law(l, np.exp(ln), d)
            k = int(np.argmin(loss))
            brute[l] = loss[k]
            assert row["loss"]["value"] == pytest.approx(loss[k], rel=1e-6)
            assert row["n_opt"]["value"] == pytest.approx(np.exp(ln[k]), rel=2e-3)
        assert rec["enc_len_opt"] == min(brute, key=brute.get)


def test_study_intervals_file_and_budget_cli(tmp_path):
    res = seqlen.study(_runs(), 1e20, bootstrap_draws=12, seed=0, source="synthetic")
    rec = res["recommendation"]
    assert rec["enc_len_opt"] in LENGTHS and res["bootstrap"]["draws"] >= 10
    assert abs(sum(rec["p_best"].values()) - 1.0) < 1e-9
    for row in rec["by_length"]:
        lo, hi = row["loss"]["ci"]
        assert lo <= row["loss"]["value"] * 1.05 and hi >= row["loss"]["value"] * 0.95
    md = "\n".join(seqlen.markdown(res))
    assert "## Sequence length" in md and "(recommended)" in md and "held-out" in md
    path = tmp_path / "seqlen_law.json"
    path.write_text(json.dumps(seqlen.law_file(res)))
    env = {**os.environ, "PYTHONPATH": REPO}
    out = subprocess.run([sys.executable, "-m", "medscale", "budget", "--flops", "1e20", "--law", str(path),
                          "--json"], capture_output=True, text=True, env=env, check=True)
    got = json.loads(out.stdout)
    assert got["enc_len_opt"] == rec["enc_len_opt"]
    for a, b in zip(got["seqlen"]["by_length"], rec["by_length"]):
        assert a["loss"]["value"] == pytest.approx(b["loss"]["value"], rel=1e-9)
        assert a["loss"]["ci"] == pytest.approx(b["loss"]["ci"], rel=1e-9)
    table = subprocess.run([sys.executable, "-m", "medscale", "budget", "--flops", "1e20", "--law", str(path)],
                           capture_output=True, text=True, env=env, check=True).stdout
    assert "encoder length" in table and "<- recommended" in table
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"law": seqlen.law_file(res)["law"], "seqlen": {"laws": {"32": {"E": 1}}}}))
    err = subprocess.run([sys.executable, "-m", "medscale", "budget", "--flops", "1e20", "--law", str(bad)],
                         check=False, capture_output=True, text=True, env=env)
    assert err.returncode == 2 and err.stderr.strip().startswith("error:") and len(err.stderr.strip().splitlines()) == 1


def test_report_section_on_a_registry_folder(tmp_path):
    root = tmp_path / "seqlen-law"
    for _, r in _runs().iterrows():
        d = root / r["run_id"]
        d.mkdir(parents=True)
        summary = {"run_id": r["run_id"], "status": "done", "enc_len": int(r["enc_len"]), "dec_len": DEC,
                   "params": {"non_embedding": r["params"], "total": r["params"] * 1.2, "embedding": 0, "heads": 0},
                   "tokens": r["tokens"], "model_flops": r["flops"], "final_eval_loss": r["fixed_loss"] * 1.1,
                   "final_fixed_eval_loss": r["fixed_loss"], "fixed_eval": {"ref_enc_len": 128}, "config": {}}
        (d / "summary.json").write_text(json.dumps(summary))
        (d / "config.json").write_text("{}")
    out = tmp_path / "report"
    sec = seqlen.report_section(str(root), 1e20, str(out), bootstrap_draws=6)
    assert os.path.exists(out / "seqlen_law.json") and os.path.exists(out / "figures" / "seqlen_law.png")
    assert sec["n_runs"] == 45 and sec["loss_column"] == "fixed_loss"
    assert seqlen.load_law_file(str(out / "seqlen_law.json"))["dec_len"] == DEC


@pytest.mark.slow
def test_a_run_records_the_length_independent_eval(tmp_path):
    from medscale.sweep.registry import load_sweep  # the registry row of the run this test trains

    work = tmp_path / "sweep" / "run"
    sets = ["train.steps=4", "train.eval_every=2", "train.fixed_eval_enc_len=128", "data.enc_len=32",
            "train.task_eval_examples=0", "data.num_train=64", "data.num_eval=16", "train.eval_batches=1",
            "train.eval_batch_size=16"]
    args = [sys.executable, "-m", "medscale", "train", "--config", "tiny", "--workdir", str(work), "--quiet"]
    for s in sets:
        args += ["--set", s]
    env = {**os.environ, "PYTHONPATH": REPO, "JAX_PLATFORMS": "cpu", "MEDSCALE_TENSORBOARD": "0"}
    subprocess.run(args, check=True, capture_output=True, text=True, env=env, cwd=str(tmp_path), timeout=600)
    summary = json.loads((work / "summary.json").read_text())
    assert summary["fixed_eval"] == {"ref_enc_len": 128, "enc_len": 32, "dec_len": DEC, "examples": 16,
                                     "split": "validation"}
    assert np.isfinite(summary["final_fixed_eval_loss"]) and summary["final_fixed_eval_loss"] != \
        summary["final_eval_loss"]
    assert set(summary["final_fixed_eval_loss_by_modality"]) == set(summary["final_eval_loss_by_modality"])
    evals = [json.loads(x) for x in (work / "metrics.jsonl").read_text().splitlines() if '"eval"' in x]
    assert all("fixed_loss" in r for r in evals) and len(evals) == 2
    row = load_sweep(str(tmp_path / "sweep")).iloc[0]
    assert row["fixed_loss"] == summary["final_fixed_eval_loss"] and row["fixed_ref_enc_len"] == 128


def test_the_reference_report_recommends_an_encoder_length():
    ref = os.path.join(REPO, "results", "reference")
    if not os.path.exists(os.path.join(ref, "seqlen_law.json")):
        pytest.skip("no committed reference report with a length study in this checkout")
    with open(os.path.join(ref, "report.json")) as fh:
        rep = json.load(fh)
    sl = rep["seqlen"]
    rec = sl["recommendation"]
    assert sl["loss_column"] == "fixed_loss" and len(sl["lengths"]) >= 2 and sl["form"] in seqlen.FORMS
    assert rec["enc_len_opt"] in sl["lengths"] and rec["flops"] == rep["budget"]["flops"]
    for row in rec["by_length"]:  # the equal-compute comparison, every quantity with its interval
        for key in ("n_opt", "d_opt", "loss", "delta_loss_vs_best"):
            assert len(row[key]["ci"]) == 2
        assert 0.0 <= row["p_best"] <= 1.0
    assert all(os.path.exists(os.path.join(ref, p)) for p in sl["figures"])
    with open(os.path.join(ref, "report.md")) as fh:
        md = fh.read()
    assert "## Sequence length" in md and f"Recommended encoder length: **{rec['enc_len_opt']}**" in md
    # the law file gives the same answer through medscale budget at the report's budget
    env = {**os.environ, "PYTHONPATH": REPO}
    out = subprocess.run([sys.executable, "-m", "medscale", "budget", "--flops", repr(rec["flops"]), "--law",
                          os.path.join(ref, "seqlen_law.json"), "--json"], capture_output=True, text=True, env=env,
                         check=True)
    got = json.loads(out.stdout)
    assert got["enc_len_opt"] == rec["enc_len_opt"]
    for a, b in zip(got["seqlen"]["by_length"], rec["by_length"]):
        assert a["loss"]["value"] == pytest.approx(b["loss"]["value"], rel=1e-9)
        assert a["loss"]["ci"] == pytest.approx(b["loss"]["ci"], rel=1e-9)
