"""The model specification: the one form the model is built from and the accounting counts from.

`ModelSpec` is pure Python (no JAX) so that ``medscale.accounting`` and ``medscale budget`` stay light. Its
modalities are :class:`ModalitySpec` of the modality registry (``medscale.modalities``, which also gives
``default_modalities``: every registered modality with its default sizes).
The Flax model (``medscale.model``) is built from a `ModelSpec` and nothing else; a test requires the
analytic parameter count (``medscale.accounting.param_counts``) to equal the instantiated model's exactly.

Architecture the spec describes (every weight is listed; nothing else has parameters):
- token table: one ``[V_total, d_model]`` table, the per-modality tables concatenated (modality m's local id
  ``t`` is row ``offset[m] + t``), shared by encoder inputs and decoder (sequence-target) inputs;
- modality embeddings: ``[M, d_model]`` for the encoder and another ``[M, d_model]`` for the decoder;
- a learned mask vector ``[d_model]``: the decoder input at image-like target positions;
- positions: fixed sin-cos (2D over the modality's grid for image-like modalities, 1D for sequences), no params;
- encoder (``encoder="unified"``): one stack of encoder layers over every input token;
  ``encoder="per_modality"``: one stack per input modality (same depth and width), each over its own modality's
  tokens only, at most ``encoder_split[m]`` of them (fixed, so shapes stay static; a modality whose share is 0
  has no stack); the stacks' outputs are concatenated (modality order) for the decoder's cross-attention;
- encoder layer: LayerNorm (scale+bias) -> self-attention (q, k, v, o: d_model x d_model, no bias) ->
  LayerNorm -> MLP (GELU: d_model->d_ff->d_model; SwiGLU: gate and up d_model->d_ff, down d_ff->d_model; no bias);
  a final LayerNorm after the stack (after each stack, per modality);
- decoder layer: LayerNorm -> self-attention -> LayerNorm -> cross-attention (q from decoder, k, v from encoder
  output; 4 x d_model^2) -> LayerNorm -> MLP; a final LayerNorm;
- output heads: one ``[d_model, V_total]`` projection (no bias), i.e. the per-modality heads side by side; each
  decoder position's softmax is taken over its own modality's slice only.
"""

from __future__ import annotations

import dataclasses

from medscale.errors import UserError
from medscale.modalities import ModalitySpec, default_modalities
from medscale.options import ENCODER_KINDS

__all__ = ["MLP_KINDS", "ModalitySpec", "ModelSpec", "default_modalities"]

MLP_KINDS = ("gelu", "swiglu")


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    d_model: int
    enc_layers: int
    dec_layers: int
    num_heads: int
    d_ff: int
    mlp: str = "gelu"
    modalities: tuple[ModalitySpec, ...] = dataclasses.field(default_factory=default_modalities)
    enc_len: int = 128
    dec_len: int = 64
    name: str = "custom"
    encoder: str = "unified"  # one of ENCODER_KINDS
    enc_split: tuple[int, ...] = ()  # per-modality encoder token budgets (sum enc_len); () = default_split

    def __post_init__(self):
        for field in ("d_model", "num_heads", "d_ff", "enc_len", "dec_len"):
            if getattr(self, field) <= 0:
                raise UserError(f"{field} must be positive, got {getattr(self, field)}")
        for field in ("enc_layers", "dec_layers"):
            if getattr(self, field) <= 0:
                raise UserError(f"{field} must be a positive number of layers, got {getattr(self, field)}")
        if self.d_model % self.num_heads:
            raise UserError(f"d_model {self.d_model} is not divisible by heads {self.num_heads}; "
                            "choose heads that divide d_model")
        if self.mlp not in MLP_KINDS:
            raise UserError(f"mlp must be one of {', '.join(MLP_KINDS)}, not {self.mlp!r}")
        if not self.modalities:
            raise UserError("a model needs at least one modality")
        names = [m.name for m in self.modalities]
        if len(set(names)) != len(names):
            raise UserError(f"modality names must be unique: {names}")
        if self.encoder not in ENCODER_KINDS:
            raise UserError(f"model.encoder must be one of {', '.join(ENCODER_KINDS)}, not {self.encoder!r}")
        object.__setattr__(self, "enc_split", tuple(int(x) for x in self.enc_split))
        if self.enc_split:
            split = self.enc_split
            if len(split) != len(self.modalities):
                raise UserError(f"data.enc_split {split} needs one encoder token budget per modality "
                                f"({', '.join(names)})")
            if min(split) < 0 or sum(split) != self.enc_len:
                raise UserError(f"data.enc_split {split} must be >= 0 and sum to data.enc_len {self.enc_len} "
                                f"(it sums to {sum(split)})")
            over = [(m.name, s) for m, s in zip(self.modalities, split) if s > m.max_tokens]
            if over:
                raise UserError(f"data.enc_split gives {over[0][0]!r} {over[0][1]} encoder tokens, more than the "
                                f"{self.modalities[names.index(over[0][0])].max_tokens} it holds; lower it")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.num_heads

    @property
    def vocab_sizes(self) -> tuple[int, ...]:
        return tuple(m.vocab_size for m in self.modalities)

    @property
    def vocab_total(self) -> int:
        return sum(self.vocab_sizes)

    @property
    def vocab_offsets(self) -> tuple[int, ...]:
        out, acc = [], 0
        for v in self.vocab_sizes:
            out.append(acc)
            acc += v
        return tuple(out)

    @property
    def encoder_split(self) -> tuple[int, ...]:
        """Encoder tokens per modality: ``enc_split`` when given, else :func:`default_split`."""
        return self.enc_split or default_split(self.enc_len,
                                               [m.max_tokens if m.encodes else 0 for m in self.modalities])

    @property
    def encoder_stacks(self) -> tuple[int, ...]:
        """Indices of the modalities with an encoder stack: ``(0,)`` standing for all of them when unified, every
        modality with a positive share of ``encoder_split`` when per-modality."""
        if self.encoder == "unified":
            return (0,)
        return tuple(i for i, s in enumerate(self.encoder_split) if s > 0)

    @property
    def num_modalities(self) -> int:
        return len(self.modalities)

    def modality_index(self, name: str) -> int:
        for i, m in enumerate(self.modalities):
            if m.name == name:
                return i
        raise UserError(f"unknown modality {name!r}; known: {', '.join(m.name for m in self.modalities)}")

    def replace(self, **kw) -> ModelSpec:
        return dataclasses.replace(self, **kw)


def default_split(enc_len: int, max_tokens) -> tuple[int, ...]:
    """``enc_len`` encoder tokens shared among modalities in proportion to the tokens each can hold (largest
    remainders get the leftover tokens; no share above its modality's ``max_tokens``; a modality that holds 0
    tokens, such as a target-only one, gets none)."""
    caps = [int(t) for t in max_tokens]
    total = sum(caps)
    if enc_len >= total:
        return tuple(caps)
    raw = [enc_len * c / total for c in caps]
    out = [int(r) for r in raw]
    for i in sorted(range(len(caps)), key=lambda i: (out[i] - raw[i], i))[: enc_len - sum(out)]:
        out[i] += 1
    return tuple(out)
