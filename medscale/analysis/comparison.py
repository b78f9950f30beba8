"""Earlier models: on shared tasks (the headline table) and by size and data (the secondary table).

Shared tasks (:data:`BENCHMARK_RESULTS`, :func:`shared_task_table`): published accuracies of earlier models on
the medical VQA benchmarks medscale can prepare (VQA-RAD, SLAKE), each number with the paper and the table it
comes from, beside medscale's own result on the same split and metric when a run trained on that benchmark has
been scored on its test split (``medscale evaluate --split test``), and "not run (data not present)" otherwise.
A number we could not check against its source is left out rather than quoted. The metrics are the
benchmarks' own: accuracy on closed questions (yes/no and choice), on open questions, and overall, exact match
(the published models classify over the training answers; medscale generates the answer and is scored by
exact match after normalisation, ``medscale.generate.metrics.vqa_accuracy``).

Secondary table (:data:`MODELS`): earlier, similarly sized models by size and data, published facts only, each
with its source; where a fact is not published (or we could not verify it) the field is None and the text says
so.

``place_models(law, k)`` adds where the fitted law puts a model of that size and data: the predicted loss
L(N, D) and the compute-optimal tokens for that N. Those numbers are an **extrapolation across domains,
tokenizers, objectives and architectures** (published N counts all parameters; our N is non-embedding; their
tokens are not our tokens) and are labelled so wherever they are shown.

Token conventions of the sources:
- 4M: ``total_tokens`` in the released configs counts input + target tokens (the training script divides it by
  ``num_input_tokens + num_target_tokens`` per sample), which is our D convention (encoder + decoder tokens).
- T5: tokens of the 512-token packed input sequences (Raffel et al. 2020, Sec. 3.7 and 3.1.3).
"""

from __future__ import annotations

import math

from medscale.analysis import plots

MODELS = [
    {
        "model": "PubMedCLIP (ViT-B/32)",
        "params": None,
        "params_text": "CLIP ViT-B/32 image + text encoders (count not given in the paper)",
        "data": "ROCO: ~80k radiology image–caption pairs from PubMed Central (fine-tuning of OpenAI CLIP)",
        "tokens": None,
        "seen_text": "not published as tokens (fine-tuning epochs over ROCO)",
        "compute_flops": None,
        "compute_text": "not published",
        "source": "Eslami, Meinel, de Melo, Findings of EACL 2023 (arXiv:2112.13906)",
    },
    {
        "model": "4M-B (4M-7)",
        "params": 198e6,
        "params_text": "198M",
        "data": "CC12M with pseudo-labelled modalities (7 modalities)",
        "tokens": 500e9,
        "seen_text": "500B tokens (input + target; 128 + 128 per sample ≈ 2.0B samples)",
        "compute_flops": None,
        "compute_text": "not published",
        "source": "Mizrahi et al., NeurIPS 2023 (arXiv:2312.06647); apple/ml-4m model zoo, 4m-b_mod7_500b.yaml",
    },
    {
        "model": "4M-L (4M-7)",
        "params": 705e6,
        "params_text": "705M",
        "data": "CC12M with pseudo-labelled modalities (7 modalities)",
        "tokens": 500e9,
        "seen_text": "500B tokens (input + target; 128 + 128 per sample)",
        "compute_flops": None,
        "compute_text": "not published",
        "source": "Mizrahi et al., NeurIPS 2023 (arXiv:2312.06647); apple/ml-4m model zoo, 4m-l_mod7_500b.yaml",
    },
    {
        "model": "4M-XL (4M-7)",
        "params": 2.8e9,
        "params_text": "2.8B",
        "data": "CC12M with pseudo-labelled modalities (7 modalities)",
        "tokens": 500e9,
        "seen_text": "500B tokens (input + target; 128 + 128 per sample)",
        "compute_flops": None,
        "compute_text": "not published",
        "source": "Mizrahi et al., NeurIPS 2023 (arXiv:2312.06647); apple/ml-4m model zoo, 4m-xl_mod7_500b.yaml",
    },
    {
        "model": "4M-21 B",
        "params": 198e6,
        "params_text": "198M",
        "data": "CC12M + COYO700M + C4 (21 modalities)",
        "tokens": 1000e9,
        "seen_text": "500B tokens (256 + 256 per sample) after initialisation from 4M-7 (500B): 1T in all",
        "compute_flops": None,
        "compute_text": "not published",
        "source": "Bachmann et al., NeurIPS 2024 (arXiv:2406.09406); apple/ml-4m, 4m-b_mod21_500b.yaml",
    },
    {
        "model": "4M-21 XL",
        "params": 2.8e9,
        "params_text": "2.8B (\"three billion\" in the paper)",
        "data": "CC12M + COYO700M + C4 (21 modalities)",
        "tokens": 1000e9,
        "seen_text": "500B tokens (256 + 256 per sample) after initialisation from 4M-7 (500B): 1T in all",
        "compute_flops": None,
        "compute_text": "not published",
        "source": "Bachmann et al., NeurIPS 2024 (arXiv:2406.09406); apple/ml-4m, 4m-xl_mod21_500b.yaml",
    },
    {
        "model": "T5-small",
        "params": 60e6,
        "params_text": "60M",
        "data": "C4 (span corruption), then multi-task mixture",
        "tokens": 1_000_000 * 2**11 * 512,  # 1M steps x 2^11 sequences x 512 tokens ≈ 1.05e12
        "seen_text": "≈1T tokens (1M steps x 2^11 x 512) for the released models; 2^35 ≈ 34B in the baseline "
                     "experiments",
        "compute_flops": None,
        "compute_text": "not published",
        "source": "Raffel et al., JMLR 2020 (arXiv:1910.10683), Sec. 3.7 and 3.1",
    },
    {
        "model": "T5-base",
        "params": 220e6,
        "params_text": "220M",
        "data": "C4 (span corruption), then multi-task mixture",
        "tokens": 1_000_000 * 2**11 * 512,
        "seen_text": "≈1T tokens (1M steps x 2^11 x 512) for the released models; 2^35 ≈ 34B in the baseline "
                     "experiments",
        "compute_flops": None,
        "compute_text": "not published",
        "source": "Raffel et al., JMLR 2020 (arXiv:1910.10683), Sec. 3.7 and 3.1",
    },
    {
        "model": "BiomedCLIP",
        "params": None,
        "params_text": "ViT-B/16 image encoder + PubMedBERT text encoder (total not verified)",
        "data": "PMC-15M: 15M figure–caption pairs from 4.4M PubMed Central articles",
        "tokens": None,
        "seen_text": "not verified",
        "compute_flops": None,
        "compute_text": "not published",
        "source": "Zhang et al. 2023 (arXiv:2303.00915), NEJM AI 2024",
    },
    {
        "model": "LLaVA-Med",
        "params": 7e9,
        "params_text": "7B (initialised from LLaVA)",
        "data": "PMC-15M figure–caption pairs (concept alignment) + GPT-4-generated instruction data",
        "tokens": None,
        "seen_text": "not published as tokens",
        "compute_flops": None,
        "compute_text": "< 15 hours on 8 x A100 (published wall-clock; FLOPs not published)",
        "source": "Li et al., NeurIPS 2023 Datasets and Benchmarks (arXiv:2306.00890)",
    },
]


BENCHMARKS = {"vqa_rad": "VQA-RAD", "slake": "SLAKE"}  # data.dataset -> the benchmark's name
METRICS = ("open", "closed", "overall")  # accuracy in percent on the test split

_PUBMEDCLIP = ("Eslami, Meinel, de Melo, PubMedCLIP: How Much Does CLIP Benefit Visual Question Answering in the "
               "Medical Domain?, Findings of EACL 2023, pp. 1151-1163 (arXiv:2112.13906)")
_PUBMEDCLIP_TABLE = ("the results table of MEVF and QCR with each visual encoder (the best, QCR + PubMedCLIP); "
                     "checked against the same figures quoted in the results tables of LaPA (Gu et al., CVPR "
                     "Workshops 2024, its repository's README) and CIMB-MVQA (Liu et al., "
                     "Medical Image Analysis 107, 2026, github.com/cloneiq/CIMB-MVQA README)")
_LAPA = ("Gu, Yang, Liu, Cai, LaPA: Latent Prompt Assist Model For Medical Visual Question Answering, CVPR "
         "Workshops 2024 (arXiv:2404.13039)")
_LAPA_TABLE = "its results table (Open / Closed / Overall on VQA-RAD, SLAKE), as its official repository's README gives it"

BENCHMARK_RESULTS = [
    {"benchmark": "VQA-RAD", "model": "PubMedCLIP (QCR + PubMedCLIP)", "open": 60.1, "closed": 80.0,
     "overall": 72.1, "paper": _PUBMEDCLIP, "table": _PUBMEDCLIP_TABLE},
    {"benchmark": "SLAKE", "model": "PubMedCLIP (QCR + PubMedCLIP)", "open": 78.4, "closed": 82.5,
     "overall": 80.1, "paper": _PUBMEDCLIP, "table": _PUBMEDCLIP_TABLE},
    {"benchmark": "VQA-RAD", "model": "LaPA", "open": 68.72, "closed": 86.40, "overall": 79.38,
     "paper": _LAPA, "table": _LAPA_TABLE},
    {"benchmark": "SLAKE", "model": "LaPA", "open": 82.17, "closed": 88.70, "overall": 84.73,
     "paper": _LAPA, "table": _LAPA_TABLE},
]
# left out (not verified against their papers here): MEVF (Nguyen et al., MICCAI 2019) and M3AE (Chen et al.,
# MICCAI 2022), whose figures differ between the tables that quote them

NOT_RUN = "not run (data not present)"
NOT_SCORED = "not run (data prepared, no run scored on its test split in this results folder)"
NOT_RUN_STATES = (NOT_RUN, NOT_SCORED)


def shared_task_table(local: list[dict] | None = None, prepared=()) -> list[dict]:
    """The headline comparison: one row per cited published result (:data:`BENCHMARK_RESULTS`, copies) and per
    benchmark one medscale row. ``local``: medscale's own results, dicts ``{"benchmark": "vqa_rad" | "slake",
    "run_id", "flops", "params", "open", "closed", "overall"}`` (fractions; shown in percent) of runs trained on
    the benchmark and scored on its test split; the one with the most compute is shown. ``prepared``: the
    benchmarks (``data.dataset`` names) whose data is prepared locally. A medscale row without a result says
    why (:data:`NOT_RUN`, :data:`NOT_SCORED`). Rows carry ``source`` ("paper; table") or ``local`` (the run)."""
    rows = []
    for key, name in BENCHMARKS.items():
        for r in BENCHMARK_RESULTS:
            if r["benchmark"] == name:
                rows.append({**r, "source": f"{r['paper']}; {r['table']}", "local": None, "status": "published"})
        mine = [x for x in (local or []) if x.get("benchmark") == key]
        if mine:
            best = max(mine, key=lambda x: float(x.get("flops") or 0.0))
            rows.append({"benchmark": name, "model": f"medscale ({best.get('run_id')})", "source": None,
                         "local": dict(best), "status": "local",
                         **{m: (None if best.get(m) is None else round(100.0 * float(best[m]), 2)) for m in METRICS}})
        else:
            rows.append({"benchmark": name, "model": "medscale", "source": None, "local": None,
                         "status": NOT_SCORED if key in set(prepared) else NOT_RUN, **dict.fromkeys(METRICS)})
    return rows


def table() -> list[dict]:
    """The rows as published (copies), each with ``predicted_loss`` None."""
    return [{**m, "predicted_loss": None, "d_opt_for_n": None, "compute_6nd": None} for m in MODELS]


def d_opt_for_n(law, n: float, model) -> float | None:
    """The tokens the law's compute-optimal frontier gives a model of ``n`` parameters under the compute model:
    the D of the budget C whose N_opt(C) is n (bisection in log C; closed form for C = k N D)."""
    if isinstance(model, plots.KND):
        c = model.k * (n / law.G) ** (1.0 / law.a) if law.a > 0 else float("nan")
        return float(plots.law_d_opt(law, c, model.k)) if math.isfinite(c) else None
    lo, hi = math.log(1e6), math.log(1e32)
    if not (model.optimum(law, math.exp(lo))[0] < n < model.optimum(law, math.exp(hi))[0]):
        return None
    for _ in range(60):
        mid = 0.5 * (lo + hi)
        if model.optimum(law, math.exp(mid))[0] < n:
            lo = mid
        else:
            hi = mid
    return float(model.optimum(law, math.exp(0.5 * (lo + hi)))[1])


def place_models(law, k) -> list[dict]:
    """Rows plus where ``law`` (our fit, on the compute model ``k``: a factor for C = k N D or a
    ``plots.LadderAccounting``) places each model: ``predicted_loss`` = L(N, D) when N and D are published,
    ``d_opt_for_n`` = the tokens our law gives that N compute-optimally, ``compute_6nd`` = 6 N D (our estimate,
    labelled; not the published compute)."""
    model = plots.as_model(k)
    rows = table()
    for r in rows:
        n, d = r["params"], r["tokens"]
        if n:
            r["d_opt_for_n"] = d_opt_for_n(law, n, model)
        if n and d:
            r["predicted_loss"] = float(law.loss(n, d))
            r["compute_6nd"] = 6.0 * n * d
    return rows
