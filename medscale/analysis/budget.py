"""Budget planning (``medscale budget``): a compute budget (hardware x days, FLOPs or PF-days) or a model size
mapped through a scaling law (``medscale.laws``) onto a compute-optimal size and token count, and onto the
nearest size of the project's ladder with its encoder-decoder FLOPs (``medscale.accounting``).

numpy, no JAX: ``medscale budget`` stays fast.
"""

from __future__ import annotations

import math

from medscale import hardware as hw
from medscale.accounting import flops_per_token, ladder_specs, nearest_ladder, param_counts
from medscale.analysis import repetition
from medscale.errors import UserError
from medscale.laws import load_law_with_convention

DEFAULT_MFU = 0.35  # model FLOPs utilisation assumed when none is given or measured (always stated)


def compute_optimal(law, flops: float) -> tuple[float, float]:
    """``(N_opt, D_opt)`` for ``flops`` under the law's own convention C = 6 N D."""
    return float(law.n_opt(flops)), float(law.d_opt(flops))


def compute_for_params(law, n_params: float) -> float:
    """The compute C whose optimal size is ``n_params`` (inverts N_opt(C), a power law C^a in every form)."""
    c0 = 1e21
    n0 = float(law.n_opt(c0))
    return c0 * (float(n_params) / n0) ** (1.0 / law.a)


def compute_optimal_tokens(law, n_params: float) -> float:
    """Tokens to train a model of ``n_params`` (the law's N) compute-optimally: D_opt(C(N)) = C / (6 N)."""
    return compute_for_params(law, n_params) / (6.0 * float(n_params))


def _positive(name: str, value) -> float:
    if value is None:
        return None
    value = float(value)
    if not math.isfinite(value) or value <= 0:
        raise UserError(f"{name} must be a positive number, got {value:g}")
    return value


def budget_plan(law: str = "chinchilla", *, flops=None, pf_days=None, hardware=None, gpus=None, days=None,
                mfu: float = DEFAULT_MFU, precision: str | None = None, params=None, batch_tokens: int = 2**19) -> dict:
    """The compute-budget calculator (``medscale budget``). Give exactly one budget: ``hardware`` with
    ``days`` (and ``gpus``, ``mfu``, ``precision``), or ``flops``, or ``pf_days``; or reverse mode ``params``.
    Hardware with ``flops``/``pf_days``/``params`` adds GPU-hours and wall-clock days.

    Returns the JSON keys of ``medscale budget --json`` and more (``details``) for the table."""
    flops, pf_days, params = _positive("--flops", flops), _positive("--pf-days", pf_days), \
        _positive("--params", params)
    days = _positive("--days", days)
    batch_tokens = _positive("--batch-tokens", batch_tokens)
    given = [name for name, v in (("--flops", flops), ("--pf-days", pf_days), ("--params", params),
                                  ("--days", days)) if v is not None]
    if len(given) != 1:
        raise UserError("give exactly one budget: --hardware NAME --days D, or --flops X, or --pf-days X, "
                        f"or --params N (got {', '.join(given) or 'none'})")
    if days is not None and hardware is None:
        raise UserError("--days needs --hardware (and --gpus, --mfu) to turn time into FLOPs")
    mfu = float(mfu)
    if not (0.0 < mfu <= 1.0) or not math.isfinite(mfu):
        raise UserError(f"--mfu must be in (0, 1], got {mfu:g}")

    peak = None
    device = dtype = dtype_note = None
    if hardware is not None:
        device, default_gpus, precision, peak = hw.system_peak(hardware, precision)
        dtype, dtype_note = hw.dtype_for_precision(device, precision)
        gpus = default_gpus if gpus is None else gpus
        if int(gpus) != gpus or gpus <= 0:
            raise UserError(f"--gpus must be a positive whole number, got {gpus}")
        gpus = int(gpus)
    elif gpus is not None or precision is not None:
        raise UserError("--gpus and --precision need --hardware NAME")

    law_obj, conv = load_law_with_convention(law)
    if days is not None:
        flops = gpus * peak * mfu * days * 86_400
    elif pf_days is not None:
        flops = pf_days * hw.PF_DAY
    if params is not None:
        n_opt = params
        flops = compute_for_params(law_obj, n_opt)
        d_opt = flops / (6.0 * n_opt)
    else:
        n_opt, d_opt = compute_optimal(law_obj, flops)

    def wall(c):
        return None if peak is None else c / (gpus * peak * mfu)  # seconds

    specs = ladder_specs()
    near = nearest_ladder(n_opt, conv, specs)
    counts = param_counts(near)
    n_ladder = counts[conv]
    tokens_ladder = compute_optimal_tokens(law_obj, n_ladder)
    flops_ladder_6nd = 6.0 * n_ladder * tokens_ladder
    flops_ladder_model = flops_per_token(near) * tokens_ladder  # the project's encoder-decoder accounting
    secs = wall(flops)
    secs_ladder = wall(flops_ladder_model)
    return {
        "flops": flops,
        "pf_days": flops / hw.PF_DAY,
        "gpu_hours": None if secs is None else secs * gpus / 3600.0,
        "n_params_opt": n_opt,
        "tokens_opt": d_opt,
        "tokens_per_param": d_opt / n_opt,
        "predicted_loss": float(law_obj.loss(n_opt, d_opt)),
        "law": law,
        "ladder": {"name": near.name, "params": n_ladder, "tokens": tokens_ladder},
        "days": None if secs is None else secs / 86_400.0,
        "dtype": dtype,
        "dtype_note": dtype_note,
        "details": {
            "mode": "params" if params is not None else "budget",
            "law_citation": law_obj.citation,
            "n_convention": conv,
            "hardware": device, "gpus": gpus if hardware is not None else None, "precision": precision,
            "peak_flops_per_gpu": peak, "mfu": mfu, "batch_tokens": batch_tokens,
            "steps_opt": math.ceil(d_opt / batch_tokens),
            "ladder_counts": counts,
            "ladder_shape": {k: getattr(near, k) for k in ("d_model", "enc_layers", "dec_layers",
                                                             "num_heads", "d_ff", "mlp", "enc_len", "dec_len")},
            "ladder_steps": math.ceil(tokens_ladder / batch_tokens),
            "ladder_flops_6nd": flops_ladder_6nd,
            "ladder_model_flops": flops_ladder_model,
            "ladder_predicted_loss": float(law_obj.loss(n_ladder, tokens_ladder)),
            "ladder_days": None if secs_ladder is None else secs_ladder / 86_400.0,
        },
    }


BUDGET_JSON_KEYS = ("flops", "pf_days", "gpu_hours", "n_params_opt", "tokens_opt", "tokens_per_param",
                    "predicted_loss", "law", "ladder", "days", "dtype", "dtype_note")


def constrained_plan(plan: dict, unique_tokens: float, constants=None, dataset: dict | None = None) -> dict:
    """A budget plan (``budget_plan``'s dict) bounded by ``unique_tokens`` unique tokens (in the law's D units):
    Muennighoff et al. 2023's effective data and parameters (``medscale.analysis.repetition``), minimised at the
    plan's compute. ``n_params_opt``, ``tokens_opt``, ``tokens_per_param``, ``predicted_loss`` become the
    data-constrained optimum's, with ``epochs``, ``unique_tokens`` and ``repetition`` (the unconstrained answer,
    loss lost to repetition, the compute beyond which more stops helping, warnings, constants) added; the ladder
    and day counts keep describing the unconstrained optimum. ``dataset``: where ``unique_tokens`` came from."""
    if plan["details"]["mode"] == "params":
        raise UserError("--unique-tokens/--dataset plan a compute budget; give --flops, --pf-days or --hardware "
                        "with --days instead of --params")
    law_obj, conv = load_law_with_convention(plan["law"])
    res = repetition.plan(law_obj, plan["flops"], unique_tokens, constants or repetition.Constants())
    out = dict(plan)
    out.update(n_params_opt=res["n_params_opt"], tokens_opt=res["tokens_opt"],
               tokens_per_param=res["tokens_opt"] / res["n_params_opt"], predicted_loss=res["predicted_loss"],
               epochs=res["epochs"], unique_tokens=float(unique_tokens))
    specs = ladder_specs()
    near = nearest_ladder(res["n_params_opt"], conv, specs)
    res["ladder"] = {"name": near.name, "params": param_counts(near)[conv]}
    res["dataset"] = dataset
    out["repetition"] = res
    return out


CONSTRAINED_JSON_KEYS = ("epochs", "unique_tokens", "repetition")
