"""The modality registry: one entry per modality (model spec + position kind + tokenizer + example field).

Adding a modality means adding one row to :data:`KNOWN` (and a tokenizer), not editing the model.
"""

from __future__ import annotations

import dataclasses

from medscale.errors import UserError
from medscale.spec import ModalitySpec

# name -> (kind, position kind, example field it is read from, tokenizer attribute of Tokenizers)
KNOWN = {
    "image": ("image", "2d", "image", "image"),
    "caption": ("sequence", "1d", "caption", "text"),
    "boxes": ("sequence", "1d", "boxes", "text"),
    "segmentation": ("image", "2d", "mask", "segmentation"),
}


@dataclasses.dataclass(frozen=True)
class Modality:
    index: int  # position in ModelSpec.modalities (the id in enc_modality / dec_modality)
    spec: ModalitySpec
    pos: str  # "2d" (row * grid_w + col) | "1d"
    field: str
    tokenizer: object

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def kind(self) -> str:
        return self.spec.kind

    @property
    def vocab_size(self) -> int:
        return self.spec.vocab_size

    @property
    def max_tokens(self) -> int:
        return self.spec.max_tokens


@dataclasses.dataclass
class Tokenizers:
    text: object = None  # TextTokenizer (captions and boxes)
    image: object = None  # VQTokenizer
    segmentation: object = None  # SegTokenizer

    @property
    def hash(self) -> str:
        import hashlib

        parts = [getattr(t, "hash", "none") for t in (self.text, self.image, self.segmentation)]
        return hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]


def build_registry(spec, tokenizers: Tokenizers) -> tuple[Modality, ...]:
    """Registry entries for the modalities of a :class:`medscale.spec.ModelSpec`, in its order."""
    out = []
    for i, m in enumerate(spec.modalities):
        if m.name not in KNOWN:
            raise UserError(f"unknown modality {m.name!r}; the data registry knows: {', '.join(KNOWN)}")
        kind, pos, field, tok_attr = KNOWN[m.name]
        if m.kind != kind:
            raise UserError(f"modality {m.name!r} is {kind}, the spec says {m.kind}")
        tok = getattr(tokenizers, tok_attr)
        tv = getattr(tok, "vocab_size", None)
        if tv is not None and tv > m.vocab_size:
            raise UserError(f"modality {m.name!r}: tokenizer vocabulary {tv} > model vocabulary {m.vocab_size}")
        out.append(Modality(i, m, pos, field, tok))
    return tuple(out)
