"""The model specification: the one form the model is built from and the accounting counts from.

`ModelSpec` is pure Python (no JAX) so that ``medscale.accounting`` and ``medscale budget`` stay light.
The Flax model (``medscale.model``) is built from a `ModelSpec` and nothing else; a test requires the
analytic parameter count (``medscale.accounting.param_counts``) to equal the instantiated model's exactly.

Architecture the spec describes (every weight is listed; nothing else has parameters):
- token table: one ``[V_total, d_model]`` table, the per-modality tables concatenated (modality m's local id
  ``t`` is row ``offset[m] + t``), shared by encoder inputs and decoder (sequence-target) inputs;
- modality embeddings: ``[M, d_model]`` for the encoder and another ``[M, d_model]`` for the decoder;
- a learned mask vector ``[d_model]``: the decoder input at image-like target positions;
- positions: fixed sin-cos (2D over the modality's grid for image-like modalities, 1D for sequences), no params;
- encoder layer: LayerNorm (scale+bias) -> self-attention (q, k, v, o: d_model x d_model, no bias) ->
  LayerNorm -> MLP (GELU: d_model->d_ff->d_model; SwiGLU: gate and up d_model->d_ff, down d_ff->d_model; no bias);
  a final LayerNorm after the stack;
- decoder layer: LayerNorm -> self-attention -> LayerNorm -> cross-attention (q from decoder, k, v from encoder
  output; 4 x d_model^2) -> LayerNorm -> MLP; a final LayerNorm;
- output heads: one ``[d_model, V_total]`` projection (no bias), i.e. the per-modality heads side by side; each
  decoder position's softmax is taken over its own modality's slice only.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

from medscale.errors import UserError

MLP_KINDS = ("gelu", "swiglu")


@dataclasses.dataclass(frozen=True)
class ModalitySpec:
    """What the model needs to know of one modality (the data registry holds the rest)."""

    name: str
    kind: Literal["image", "sequence"]  # image-like: predicted in parallel, 2D positions
    vocab_size: int
    max_tokens: int  # tokens one example can hold of this modality (grid h*w for image-like)
    grid: tuple[int, int] | None = None  # (h, w) for image-like modalities

    def __post_init__(self):
        if self.kind not in ("image", "sequence"):
            raise UserError(f"modality {self.name!r}: kind must be 'image' or 'sequence', not {self.kind!r}")
        if self.vocab_size <= 0 or self.max_tokens <= 0:
            raise UserError(f"modality {self.name!r}: vocab_size and max_tokens must be positive")
        if self.kind == "image" and (self.grid is None or self.grid[0] * self.grid[1] != self.max_tokens):
            raise UserError(f"modality {self.name!r}: an image-like modality needs grid h*w == max_tokens")


def default_modalities(text_vocab: int = 2048, image_vocab: int = 512, seg_vocab: int = 256,
                       grid: tuple[int, int] = (8, 8), caption_tokens: int = 64,
                       box_tokens: int = 32) -> tuple[ModalitySpec, ...]:
    """The four modalities of the design with default sizes (64x64 images in 8x8 patches)."""
    n = grid[0] * grid[1]
    return (
        ModalitySpec("image", "image", image_vocab, n, grid),
        ModalitySpec("caption", "sequence", text_vocab, caption_tokens),
        ModalitySpec("boxes", "sequence", text_vocab, box_tokens),
        ModalitySpec("segmentation", "image", seg_vocab, n, grid),
    )


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
    def num_modalities(self) -> int:
        return len(self.modalities)

    def modality_index(self, name: str) -> int:
        for i, m in enumerate(self.modalities):
            if m.name == name:
                return i
        raise UserError(f"unknown modality {name!r}; known: {', '.join(m.name for m in self.modalities)}")

    def replace(self, **kw) -> ModelSpec:
        return dataclasses.replace(self, **kw)


def modalities_for_vocab(vocab: str | None) -> tuple:
    """The default modalities with the vocabulary sizes of a ``--vocab`` flag (``medscale flops``, ``bench``):
    one integer (the text vocabulary, caption and boxes) or four comma-separated ones (image, caption, boxes,
    segmentation); None: the defaults."""
    if vocab is None:
        return default_modalities()
    try:
        values = [int(v) for v in str(vocab).split(",")]
    except ValueError:
        raise UserError(f"--vocab {vocab!r}: give an integer or four comma-separated integers") from None
    if any(v <= 0 for v in values):
        raise UserError(f"--vocab {vocab!r}: vocabulary sizes must be positive")
    if len(values) == 1:
        return default_modalities(text_vocab=values[0])
    if len(values) == 4:
        return tuple(dataclasses.replace(m, vocab_size=v) for m, v in zip(default_modalities(), values))
    raise UserError(f"--vocab {vocab!r}: give one size (text) or four (image,caption,boxes,segmentation)")
