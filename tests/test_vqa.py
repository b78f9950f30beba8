"""Visual question answering: the question/answer modalities, synthetic questions from the scenes' facts, the
VQA-RAD and SLAKE builders on fixtures in their published layouts, the benchmarks' metrics (closed / open
accuracy, ROUGE-L) and the comparison table on shared tasks."""

import json
import os

import numpy as np
import pytest

from medscale import modalities
from medscale.analysis import comparison
from medscale.data.masking import Masker
from medscale.data.synthetic import ORGANS, render_scene, scene_qa
from medscale.errors import UserError
from medscale.generate import metrics as M


# ----------------------------------------------------------------------------------------------- registry
def test_question_is_input_only_and_answer_target_only():
    q, a = modalities.get("question"), modalities.get("answer")
    assert (q.kind, q.role, a.kind, a.role, a.given) == ("sequence", "input", "sequence", "target", "question")
    assert q.tokenizer_name == a.tokenizer_name == "qa" and a.task_inputs == ("image", "question")
    assert q.value({"question": "  is there  a lesion? "}) == "is there a lesion?"
    assert q.value({"caption": "x"}) is None and a.value({"answer": ""}) is None
    with pytest.raises(UserError, match="only a target-only modality"):
        modalities.Modality("x", "sequence", ("x_vocab", 8), "t:T", max_tokens=("x_tokens", 4), given="question")


# ----------------------------------------------------------------------------------------------- synthetic
def _truth(question: str, facts: dict) -> str | None:
    """The answer a reader of the facts gives (independently of scene_qa's code paths)."""
    les = facts["lesions"]
    organs = sorted({le["organ"] for le in les})
    if question == "is this study normal?":
        return "yes" if not les else "no"
    if question == "is there more than one lesion?":
        return "yes" if len(les) > 1 else "no"
    if question == "how many lesions are there?":
        return ("zero", "one", "two", "three", "four")[len(les)]
    if question == "which organ has a lesion?":
        return organs[0] if len(organs) == 1 else None
    if question == "which body region is shown?":
        return facts["region"]
    if question.startswith("is there a lesion in the "):
        rest = question[len("is there a lesion in the "):-1]
        part = rest.split()[0] if rest.split()[0] in ("upper", "lower") else None
        organ = rest[len(part) + 1:] if part else rest
        found = any(le["organ"] == organ and (part is None or le["location"].endswith(part)) for le in les)
        return "yes" if found else "no"
    return None


def test_synthetic_answers_follow_the_facts():
    kinds, answers = {"closed": 0, "open": 0}, {"yes": 0, "no": 0}
    checked = 0
    for i in range(300):
        s = render_scene(3, i, 32)
        assert (s["question"], s["answer"], s["answer_type"]) == scene_qa(s["facts"], 3, i)  # deterministic
        kinds[s["answer_type"]] += 1
        answers[s["answer"]] = answers.get(s["answer"], 0) + 1
        want = _truth(s["question"], s["facts"])
        if want is not None:
            assert s["answer"] == want, (s["question"], s["facts"])
            checked += 1
        organs = {o[0] for o in ORGANS[s["facts"]["region"]]}
        for o in organs:  # a question naming an organ names one of the scene's region
            if o in s["question"]:
                break
    assert checked > 150
    assert 0.35 < kinds["closed"] / 300 < 0.65
    assert abs(answers["yes"] - answers["no"]) < 0.3 * (answers["yes"] + answers["no"])


def test_question_leaves_the_scene_unchanged():
    s = render_scene(0, 7, 32)
    facts = json.loads(json.dumps(s["facts"]))
    assert scene_qa(facts, 0, 7) == (s["question"], s["answer"], s["answer_type"])
    # the question has its own random stream: another index asks something of the same facts independently
    assert len({scene_qa(facts, 0, i) for i in range(40)}) > 5


# ----------------------------------------------------------------------------------------------- masking
def test_masker_gives_the_question_whole_with_its_answer():
    mods = [("image", "image", 16), ("caption", "sequence", 12), ("question", "sequence", 8),
            ("answer", "sequence", 4)]
    masker = Masker(mods, enc_len=20, dec_len=14, roles={"question": "input", "answer": "target"},
                    given={"answer": "question"}, mixture="all2all:0.5,image2all:0.5")
    rng = np.random.default_rng(0)
    B = 64
    ex = {"image": rng.integers(0, 50, (B, 16)), "image_len": np.full(B, 16),
          "caption": rng.integers(20, 90, (B, 12)), "caption_len": np.full(B, 11),
          "question": rng.integers(20, 90, (B, 8)), "question_len": rng.integers(3, 8, B),
          "answer": rng.integers(20, 90, (B, 4)), "answer_len": np.full(B, 1)}
    with_answer = 0
    for seed in range(5):
        out = masker(ex, np.random.default_rng(seed))
        for i in range(B):
            enc_mod = out["enc_modality"][i][out["enc_valid"][i]]
            dec_mod = out["dec_modality"][i][out["dec_valid"][i]]
            assert 3 not in enc_mod and 2 not in dec_mod  # answer never an input, question never a target
            n_q = int((enc_mod == 2).sum())
            if 3 in dec_mod:
                with_answer += 1
                assert n_q == ex["question_len"][i]
                q = out["enc_tokens"][i][out["enc_valid"][i]][enc_mod == 2]
                assert q.tolist() == ex["question"][i][:n_q].tolist()
            else:
                assert n_q == 0
            assert out["enc_valid"][i].sum() <= 20
    assert with_answer > 100
    with pytest.raises(UserError, match="answer is never an input"):
        Masker(mods, 20, 14, roles={"answer": "target"}, mixture="answer2all:1")


# ----------------------------------------------------------------------------------------------- metrics
def test_answer_normalisation_and_accuracy_hand_worked():
    assert M.normalize_answer(" The Left  Lung. ") == "left lung"
    assert M.normalize_answer("Two") == M.normalize_answer("2") == "2"
    assert M.normalize_answer("3.5 cm") == "3.5 cm" and M.normalize_answer("x-ray") == "x ray"
    acc = M.vqa_accuracy(["Yes", "no", "the liver", "brain", "2"],
                         ["yes", "yes", "Liver", "left kidney", "two"],
                         ["CLOSED", "closed", "open", "open", "open"])
    assert acc["closed"] == 0.5 and acc["open"] == pytest.approx(2 / 3) and acc["overall"] == pytest.approx(3 / 5)
    assert (acc["n_closed"], acc["n_open"]) == (2, 3)
    assert M.vqa_accuracy(["a"], ["a"], ["open"])["closed"] is None


def test_rouge_l_hand_worked():
    # LCS("the cat sat on the mat", "the cat is on the mat") = "the cat on the mat" = 5 of 6 and 6: F = 5/6
    assert M.rouge_l("the cat sat on the mat", "the cat is on the mat") == pytest.approx(5 / 6)
    # hyp 4 tokens, ref 8, LCS 3 ("a", "b", "d"): P = 3/4, R = 3/8, F = (1 + 1.44) P R / (R + 1.44 P)
    p, r = 3 / 4, 3 / 8
    assert M.rouge_l("a b c d", "a x b y z d w v") == pytest.approx(2.44 * p * r / (r + 1.44 * p))
    assert M.rouge_l("", "a b") == 0.0 and M.rouge_l("a b", "a b") == pytest.approx(1.0)
    # several references: the best precision and the best recall
    assert M.rouge_l("a b", ["a b c d", "a"]) == pytest.approx(2.44 * 1.0 * 1.0 / (1.0 + 1.44 * 1.0))
    assert M.corpus_rouge_l(["a b", "x"], ["a b", "y"]) == pytest.approx(0.5)


# ----------------------------------------------------------------------------------------------- builders
def _png(path, value):
    import PIL.Image

    os.makedirs(os.path.dirname(path), exist_ok=True)
    PIL.Image.fromarray(np.full((20, 24), value, np.uint8)).save(path)


def _dcfg(dataset, manual_dir, data_dir, subset=""):
    import ml_collections

    return ml_collections.ConfigDict({"dataset": dataset, "manual_dir": str(manual_dir), "image_size": 16,
                                      "subset": subset, "data_dir": str(data_dir)})


def _prepared(dcfg):
    from medscale.data.pipeline import Examples, cache_root, make_builder, prepare_builder

    root = cache_root(dcfg)
    b = prepare_builder(make_builder(dcfg, root), root)
    return {s: list(Examples(b.as_data_source(split=s))) for s in b.info.splits}


def test_vqarad_round_trip(tmp_path):
    man = tmp_path / "vqarad"
    rows = []
    for k in range(12):
        img = f"synpic{100 + k % 4}.jpg"
        rows.append({"qid": k, "image_name": img, "question": f"is there  fluid {k}?", "answer": "Yes" if k % 2
                     else "left lung", "answer_type": "CLOSED" if k % 2 else "OPEN ",
                     "phrase_type": "test_freeform" if k < 3 else "freeform", "question_type": "PRES",
                     "image_organ": "CHEST"})
    rows.append({"qid": 99, "image_name": "missing.jpg", "question": "q?", "answer": "no",
                 "answer_type": "CLOSED", "phrase_type": "para"})
    man.mkdir()
    (man / "VQA_RAD Dataset Public.json").write_text(json.dumps(rows))
    for k in range(4):
        _png(str(man / "VQA_RAD Image Folder" / f"synpic{100 + k}.jpg"), 40 * k)
    splits = _prepared(_dcfg("vqa_rad", man, tmp_path / "data"))
    got = {e["meta"]["qid"]: (s, e) for s, exs in splits.items() for e in exs}
    assert set(got) == set(range(12))  # the record without an image skipped
    for k, (split, e) in got.items():
        r = rows[k]
        assert split == ("test" if k < 3 else ("validation" if split == "validation" else "train"))
        assert e["question"] == f"is there fluid {k}?" and e["answer"] == r["answer"]
        assert e["answer_type"] == ("closed" if k % 2 else "open") and e["caption"] == ""
        assert e["image"].shape == (16, 16) and abs(int(e["image"].mean()) - 40 * (k % 4)) <= 1
    # validation holds whole images: no image has questions in both train and validation
    imgs = {s: {rows[e["meta"]["qid"]]["image_name"] for e in exs} for s, exs in splits.items()}
    assert not (imgs.get("validation", set()) & imgs.get("train", set()))


def test_slake_round_trip_english_by_default(tmp_path):
    man = tmp_path / "slake"
    for split, n in (("train", 6), ("validate", 2), ("test", 3)):
        rows = [{"img_id": k, "img_name": f"xmlab{k % 2}/source.jpg", "question": f"{split} q{k}?",
                 "answer": "MRI" if k % 2 else "Yes", "answer_type": "OPEN" if k % 2 else "CLOSED",
                 "q_lang": "en" if k < n - 1 else "zh", "qid": 1000 * len(split) + k, "location": "Abdomen"}
                for k in range(n)]
        os.makedirs(man, exist_ok=True)
        (man / f"{split}.json").write_text(json.dumps(rows, ensure_ascii=False))
    for k in range(2):
        _png(str(man / "imgs" / f"xmlab{k}" / "source.jpg"), 100 + 50 * k)
    splits = _prepared(_dcfg("slake", man, tmp_path / "data"))
    assert {s: len(v) for s, v in splits.items()} == {"train": 5, "validation": 1, "test": 2}
    e = next(x for x in splits["test"] if x["question"] == "test q1?")  # TFDS orders examples by key
    assert (e["question"], e["answer"], e["answer_type"]) == ("test q1?", "MRI", "open")
    assert abs(int(e["image"].mean()) - 150) <= 1 and e["meta"]["q_lang"] == "en"
    everything = _prepared(_dcfg("slake", man, tmp_path / "data2", subset="all"))
    assert len(everything["train"]) == 6


@pytest.mark.parametrize("dataset,needs", [("vqa_rad", "VQA_RAD Dataset Public.json"), ("slake", "train.json")])
def test_missing_benchmark_files_name_what_is_expected(tmp_path, dataset, needs):
    from medscale.data.pipeline import make_builder

    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError) as err:
        make_builder(_dcfg(dataset, tmp_path / "empty", tmp_path / "data"), str(tmp_path / "data"))
    assert needs in str(err.value) and "expected MANUAL_DIR" in str(err.value)
    assert not os.path.exists(tmp_path / "data" / "tfds" / dataset)  # nothing half-written


def test_missing_benchmark_is_one_error_line_from_the_cli(tmp_path, capsys):
    from medscale.cli import main

    (tmp_path / "empty").mkdir()
    code = main(["data", "prepare", "--config", "tiny", "--set", "data.dataset=vqa_rad",
                 "--set", f"data.manual_dir={tmp_path / 'empty'}", "--set", f"data.data_dir={tmp_path / 'd'}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("error: ") and "VQA_RAD Dataset Public.json" in err[0]


# ----------------------------------------------------------------------------------------------- comparison
def test_shared_task_table_holds_only_cited_rows_and_local_results():
    local = [{"benchmark": "vqa_rad", "run_id": "small", "flops": 1e12, "params": 1e5, "open": 0.1,
              "closed": 0.6, "overall": 0.4},
             {"benchmark": "vqa_rad", "run_id": "big", "flops": 1e13, "params": 1e6, "open": 0.2,
              "closed": 0.7, "overall": 0.5}]
    rows = comparison.shared_task_table(local, prepared=["vqa_rad"])
    cited = {(r["benchmark"], r["model"]): r for r in comparison.BENCHMARK_RESULTS}
    assert cited and all(r["paper"] and r["table"] for r in comparison.BENCHMARK_RESULTS)
    for row in rows:
        if row["status"] == "published":  # exactly a cited row, with its paper and table
            ref = cited[(row["benchmark"], row["model"])]
            assert all(row[m] == ref[m] for m in comparison.METRICS)
            assert row["source"] == f"{ref['paper']}; {ref['table']}" and row["local"] is None
        elif row["status"] == "local":  # exactly a local result (the one with the most compute), in percent
            assert row["benchmark"] == "VQA-RAD" and row["local"]["run_id"] == "big" and row["source"] is None
            assert (row["closed"], row["open"], row["overall"]) == (70.0, 20.0, 50.0)
        else:  # no number at all
            assert row["status"] == comparison.NOT_RUN and row["benchmark"] == "SLAKE"
            assert all(row[m] is None for m in comparison.METRICS)
    assert sum(r["status"] == "published" for r in rows) == len(comparison.BENCHMARK_RESULTS)
    assert len(rows) == len(comparison.BENCHMARK_RESULTS) + len(comparison.BENCHMARKS)
    none = comparison.shared_task_table([], prepared=["slake"])
    status = {r["benchmark"]: r["status"] for r in none if r["model"] == "medscale"}
    assert status == {"VQA-RAD": comparison.NOT_RUN, "SLAKE": comparison.NOT_SCORED}


# ----------------------------------------------------------------------------------------------- report
def test_report_vqa_section_from_run_task_metrics(tmp_path):
    import pandas as pd

    from medscale.analysis import report

    rows = []
    for k, (budget, n, acc) in enumerate([(1e10, 1e5, 0.50), (1e10, 2e5, 0.55), (1e11, 1e5, 0.62),
                                         (1e11, 2e5, 0.70), (1e12, 2e5, 0.80)]):
        rows.append({"run_id": f"r{k}", "status": "done", "params": n, "tokens": budget / (6 * n), "flops": budget,
                     "loss": 3.0 - k * 0.1, "budget": budget,
                     "task_metrics": {"answer/closed_acc": acc + 0.1, "answer/open_acc": acc - 0.1,
                                      "answer/overall_acc": acc, "caption/bleu4": 0.1}})
    rows.append({"run_id": "nq", "status": "done", "params": 1e5, "tokens": 1e5, "flops": 1e10, "loss": 3.0,
                 "budget": 1e10, "task_metrics": {"caption/bleu4": 0.2}})  # no answers: not a VQA point
    v = report.vqa_vs_compute(pd.DataFrame(rows))
    assert v["n_runs"] == 5 and [b["run_id"] for b in v["best_per_budget"]] == ["r1", "r3", "r4"]
    assert v["best_per_budget"][1]["closed_acc"] == pytest.approx(0.8)
    x, y = np.log10([1e10, 1e10, 1e11, 1e11, 1e12]), [0.5, 0.55, 0.62, 0.7, 0.8]
    assert v["overall_per_decade"] == pytest.approx(np.polyfit(x, y, 1)[0])
    assert report.vqa_vs_compute(pd.DataFrame(rows[-1:])) is None
    v["figure"] = [os.path.relpath(p, tmp_path) for p in report.vqa_figure(v, str(tmp_path / "figures"))]
    md = "\n".join(report._vqa_md({"vqa": v}))
    assert "| 1e11 | r3 |" in md and "figures/vqa_accuracy.png" in md
    shared = "\n".join(report._shared_tasks_md({"shared_tasks": comparison.shared_task_table([], [])}))
    assert shared.count(comparison.NOT_RUN) == 2 and "Findings of EACL 2023" in shared


@pytest.mark.slow
def test_a_run_trained_on_a_benchmark_is_scored_on_its_test_split_and_compared(tmp_path, capsys):
    """End to end on a SLAKE fixture: train a tiny run, `medscale evaluate --split test`, and the report's
    shared-task table shows the run beside the cited rows."""
    from medscale.analysis import report
    from medscale.cli import main
    from medscale.configs import load_config
    from medscale.train.loop import train

    man = tmp_path / "slake"
    man.mkdir()
    for split, n in (("train", 24), ("validate", 6), ("test", 8)):
        rows = [{"img_name": f"xmlab{k % 4}/source.jpg", "question": f"is organ {k % 3} visible?",
                 "answer": "yes" if k % 2 else "no", "answer_type": "CLOSED" if k % 3 else "OPEN",
                 "q_lang": "en", "qid": k} for k in range(n)]
        (man / f"{split}.json").write_text(json.dumps(rows))
    for k in range(4):
        _png(str(man / "imgs" / f"xmlab{k}" / "source.jpg"), 30 + 50 * k)
    cfg = load_config("tiny", [f"data.data_dir={tmp_path / 'data'}", "data.dataset=slake",
                               f"data.manual_dir={man}", "train.steps=2", "train.batch_size=4",
                               "train.eval_every=2", "train.ckpt_every=2", "train.eval_batches=1",
                               "train.warmup_steps=1", "train.task_eval_examples=0"])
    workdir = str(tmp_path / "results" / "slake-run")
    assert train(cfg, workdir, progress=False)["status"] == "done"
    assert main(["evaluate", "--workdir", workdir, "--split", "test", "--num", "8", "--json"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["task_eval"]["split"] == "test" and out["task_eval"]["questions"] == {"closed": 5, "open": 3}
    assert {"answer/closed_acc", "answer/open_acc", "answer/overall_acc"} <= set(out["task_metrics"])
    assert all(0.0 <= out["task_metrics"][k] <= 1.0 for k in ("answer/closed_acc", "answer/open_acc"))
    runs, _ = report.load_runs(str(tmp_path / "results"))
    local = report.local_benchmark_results(str(tmp_path / "results"), runs)
    assert [x["run_id"] for x in local] == [os.path.basename(workdir)]
    rows = report.shared_tasks(str(tmp_path / "results"), runs, data_root=str(tmp_path / "data"))
    mine = [r for r in rows if r["status"] == "local"]
    assert len(mine) == 1 and mine[0]["benchmark"] == "SLAKE"
    assert mine[0]["overall"] == pytest.approx(100 * out["task_metrics"]["answer/overall_acc"], abs=0.01)
    assert next(r for r in rows if r["model"] == "medscale")["status"] == comparison.NOT_RUN  # VQA-RAD


def test_refitted_inputs_keep_a_given_question_whole():
    from medscale.data.masking import refit_inputs

    mods = [("image", "image", 16), ("question", "sequence", 8), ("answer", "sequence", 4)]
    masker = Masker(mods, enc_len=24, dec_len=8, roles={"question": "input", "answer": "target"},
                    given={"answer": "question"})
    rng = np.random.default_rng(1)
    B = 32
    ex = {"image": rng.integers(0, 50, (B, 16)), "image_len": np.full(B, 16),
          "question": rng.integers(20, 90, (B, 8)), "question_len": np.full(B, 7),
          "answer": rng.integers(20, 90, (B, 4)), "answer_len": np.full(B, 1)}
    full = masker(ex, np.random.default_rng(0))
    small = refit_inputs(full, 10, ["image", "sequence", "sequence"], np.random.default_rng(2), whole=[1])
    assert (small["dec_target"] == full["dec_target"]).all()  # targets kept exactly
    assert sum(int((full["enc_modality"][i][full["enc_valid"][i]] == 1).sum()) == 7 for i in range(B)) > 10
    for i in range(B):
        q_full = full["enc_tokens"][i][full["enc_valid"][i] & (full["enc_modality"][i] == 1)]
        q_small = small["enc_tokens"][i][small["enc_valid"][i] & (small["enc_modality"][i] == 1)]
        assert q_small.tolist() == q_full.tolist()
        assert small["enc_valid"][i].sum() == min(10, full["enc_valid"][i].sum())
