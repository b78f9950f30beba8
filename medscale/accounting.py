"""Parameter counts and analytic FLOPs of a :class:`medscale.spec.ModelSpec`, by component.

Pure Python: ``medscale budget`` imports this without JAX. Budget planning (the laws' compute-optimal allocation
mapped onto these counts) is ``medscale.analysis.budget``.
All formulas are written out in ``docs/foundation.md``; in short, with d = d_model, f = d_ff, V = total
vocabulary (all modalities' tables side by side), M = modalities, B = batch, Le/Ld = encoder/decoder length,
Lenc/Ldec = encoder/decoder layers, m = 2 (GELU) or 3 (SwiGLU) weight matrices in the MLP:

Parameters (``ModelSpec``'s docstring lists every weight):
- embedding = V d (token table) + 2 M d (encoder and decoder modality tables) + d (mask vector);
- heads = d V (one combined output projection, no bias);
- encoder layer = 4 d^2 (q, k, v, o) + m d f (MLP) + 2 x 2d (two LayerNorms, scale and bias);
- decoder layer = 8 d^2 (self and cross attention) + m d f + 3 x 2d;
- final LayerNorms: 2d after each stack;
- a per-modality encoder (``spec.encoder == "per_modality"``) has one encoder stack (layers and final LayerNorm)
  per modality with a positive share of ``spec.encoder_split``;
- non_embedding = total - embedding - heads.

FLOPs: a matmul of an ``[n, k]`` by a ``[k, m]`` operand costs 2 n k m. Per forward pass and layer:
- enc_attn_proj 8 B Le d^2; enc_attn_scores 4 B Le Se d (QK^T and PV; Se = Le, or min(window, Le) for local);
- dec_self_proj 8 B Ld d^2; dec_self_scores 4 B Ld^2 d (hardware) or 2 B Ld^2 d (model: masked at half);
- cross_proj 4 B Ld d^2 (q, o on decoder tokens) + 4 B Le d^2 (k, v on encoder tokens); cross_scores 4 B Ld Le d;
- enc_mlp 2 m B Le d f; dec_mlp 2 m B Ld d f;
- per-modality encoder: stack m runs on its own Le_m = ``encoder_split[m]`` tokens (sum_m Le_m = Le), so the
  projections, MLPs and the cross-attention's k, v are as above with Le = sum_m Le_m, and the encoder scores are
  4 B d sum_m Le_m Se_m (Se_m = Le_m, or min(window, Le_m)) instead of 4 B Le Se d;
- heads 2 B Ld d V (once, after the decoder).
A training step is forward x 3 (backward = 2 x forward). ``model_flops`` counts useful work (decoder
self-attention scores at half, no recomputation); ``hardware_flops`` what the kernels execute (dense scores in
full; ``remat="full"`` adds one more forward of the layer stacks, not of the heads; ``save_dots`` saves every
matmul output, so it recomputes no matmul FLOPs). Embedding lookups, softmax, norms and other elementwise work
are not counted (XLA's cost analysis does count them, hence ``xla_ratio`` slightly above 1).
Encoder weights see encoder tokens only, decoder weights decoder tokens only.
"""

from __future__ import annotations

import math

from medscale.configs.ladder import ladder_names, ladder_shape
from medscale.errors import UserError
from medscale.options import ATTENTION_IMPLEMENTATIONS, REMAT_POLICIES
from medscale.spec import ModelSpec, default_modalities

REMAT = REMAT_POLICIES
ATTENTION = ATTENTION_IMPLEMENTATIONS
COMPONENTS = ("enc_attn_proj", "enc_attn_scores", "enc_mlp", "dec_self_proj", "dec_self_scores",
              "cross_proj", "cross_scores", "dec_mlp", "heads")
LAYER_COMPONENTS = COMPONENTS[:-1]
TRAIN_MULT = 3  # forward + backward (2 x forward)


def _mlp_mats(spec) -> int:
    return 3 if spec.mlp == "swiglu" else 2


def param_breakdown(spec) -> dict:
    """Parameter count of every group of weights (the exact architecture of ``medscale.spec``)."""
    d, f, V, M = spec.d_model, spec.d_ff, spec.vocab_total, spec.num_modalities
    mlp = _mlp_mats(spec) * d * f
    enc_layer = 4 * d * d + mlp + 2 * (2 * d)
    dec_layer = 8 * d * d + mlp + 3 * (2 * d)
    stacks = len(encoder_stack_lengths(spec))
    return {
        "token_table": V * d,
        "modality_tables": 2 * M * d,
        "mask_vector": d,
        "encoder_layers": stacks * spec.enc_layers * enc_layer,
        "encoder_final_norm": stacks * 2 * d,
        "decoder_layers": spec.dec_layers * dec_layer,
        "decoder_final_norm": 2 * d,
        "heads": d * V,
    }


def encoder_stack_lengths(spec) -> list[int]:
    """Encoder tokens each encoder stack runs on: ``[Le]`` for a unified encoder, the positive shares of
    ``spec.encoder_split`` for a per-modality one."""
    if getattr(spec, "encoder", "unified") == "unified":
        return [spec.enc_len]
    return [s for s in spec.encoder_split if s > 0]


def param_counts(spec) -> dict:
    """``{"total", "embedding", "non_embedding", "heads"}``; non_embedding excludes embeddings and heads."""
    b = param_breakdown(spec)
    total = sum(b.values())
    embedding = b["token_table"] + b["modality_tables"] + b["mask_vector"]
    heads = b["heads"]
    return {"total": total, "embedding": embedding, "non_embedding": total - embedding - heads, "heads": heads}


def _check_opts(remat: str, attention: str, window) -> tuple[str, str, int | None]:
    remat = str(remat).replace("-", "_").lower()
    attention = str(attention).lower()
    if remat not in REMAT:
        raise UserError(f"remat must be one of {', '.join(REMAT)}, not {remat!r}")
    if attention not in ATTENTION:
        raise UserError(f"attention must be one of {', '.join(ATTENTION)}, not {attention!r}")
    if attention == "local":
        if window is None or int(window) <= 0:
            raise UserError("local attention needs a positive window (keys per encoder query)")
        window = int(window)
    else:
        window = None  # a window means nothing to the dense implementations
    return remat, attention, window


def forward_flops(spec, batch_size: int, attention: str = "dense", window=None) -> tuple[dict, dict]:
    """FLOPs of one forward pass by component: ``(model, hardware)`` dicts."""
    _, attention, window = _check_opts("none", attention, window)
    if int(batch_size) <= 0:
        raise UserError(f"batch size must be positive, got {batch_size}")
    B, d, f, V = int(batch_size), spec.d_model, spec.d_ff, spec.vocab_total
    Ld, ne, nd = spec.dec_len, spec.enc_layers, spec.dec_layers
    stacks = encoder_stack_lengths(spec)
    Le = sum(stacks)  # encoder tokens (what the decoder cross-attends to)
    m = _mlp_mats(spec)
    # query x key pairs of the encoder's self-attention: each stack's queries see its own tokens (or a window)
    pairs = sum(le * (min(window, le) if attention == "local" else le) for le in stacks)
    hw = {
        "enc_attn_proj": ne * 8 * B * Le * d * d,
        "enc_attn_scores": ne * 4 * B * pairs * d,
        "enc_mlp": ne * 2 * m * B * Le * d * f,
        "dec_self_proj": nd * 8 * B * Ld * d * d,
        "dec_self_scores": nd * 4 * B * Ld * Ld * d,
        "cross_proj": nd * (4 * B * Ld * d * d + 4 * B * Le * d * d),
        "cross_scores": nd * 4 * B * Ld * Le * d,
        "dec_mlp": nd * 2 * m * B * Ld * d * f,
        "heads": 2 * B * Ld * d * V,
    }
    model = dict(hw)
    model["dec_self_scores"] = nd * 2 * B * Ld * Ld * d  # causal/segment-masked: counted at half
    return model, hw


def step_flops(spec, batch_size: int, remat: str = "none", attention: str = "dense", window=None) -> dict:
    """FLOPs of one training step (forward x 3): ``{"model_flops", "hardware_flops", "components",
    "hardware_components"}``; the component dicts hold per-step FLOPs by name (``COMPONENTS``)."""
    remat, attention, window = _check_opts(remat, attention, window)
    fwd_model, fwd_hw = forward_flops(spec, batch_size, attention, window)
    components = {k: TRAIN_MULT * fwd_model[k] for k in COMPONENTS}
    hw_mult = {k: TRAIN_MULT + (1 if remat == "full" and k in LAYER_COMPONENTS else 0) for k in COMPONENTS}
    hardware_components = {k: hw_mult[k] * fwd_hw[k] for k in COMPONENTS}
    return {
        "model_flops": sum(components.values()),
        "hardware_flops": sum(hardware_components.values()),
        "components": components,
        "hardware_components": hardware_components,
    }


def tokens_per_step(spec, batch_size: int) -> int:
    """Encoder + decoder token positions one step processes: B (Le + Ld)."""
    return int(batch_size) * (spec.enc_len + spec.dec_len)


def flops_per_token(spec, batch_size: int = 1, **opts) -> float:
    """model_flops per (encoder + decoder) token of a training step; independent of the batch size."""
    return step_flops(spec, batch_size, **opts)["model_flops"] / tokens_per_step(spec, batch_size)


def ratio_to_6nd(spec, batch_size: int = 1, **opts) -> float:
    """model_flops / (6 N D) with N = non-embedding parameters and D = B (Le + Ld) encoder + decoder tokens:
    how far the encoder-decoder's real cost is from the decoder-only rule of thumb C = 6 N D."""
    n = param_counts(spec)["non_embedding"]
    return step_flops(spec, batch_size, **opts)["model_flops"] / (6.0 * n * tokens_per_step(spec, batch_size))


def ladder_specs(enc_len: int | None = None, dec_len: int | None = None) -> list:
    """The ladder sizes as ModelSpecs with the base config's modalities and lengths (no ml_collections)."""
    kw = {}
    if enc_len is not None:
        kw["enc_len"] = enc_len
    if dec_len is not None:
        kw["dec_len"] = dec_len
    return [ModelSpec(modalities=default_modalities(), name=n, **kw, **ladder_shape(n)) for n in ladder_names()]


def nearest_ladder(n_params: float, convention: str = "total", specs=None):
    """The ladder spec whose parameter count (under ``convention``) is nearest to ``n_params`` in log."""
    specs = specs if specs is not None else ladder_specs()
    return min(specs, key=lambda s: abs(math.log(param_counts(s)[convention] / float(n_params))))
