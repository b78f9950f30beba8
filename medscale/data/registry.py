"""A run's modalities: the model's :class:`ModalitySpec` bound to its registry entry and trained tokenizer.

The modalities themselves are defined in one place, the registry ``medscale.modalities``; adding a modality is
one entry there plus its tokenizer class, not an edit of this module or of the model.
"""

from __future__ import annotations

import dataclasses
import hashlib

from medscale import modalities
from medscale.errors import UserError
from medscale.spec import ModalitySpec


@dataclasses.dataclass(frozen=True)
class Modality:
    index: int  # position in ModelSpec.modalities (the id in enc_modality / dec_modality)
    spec: ModalitySpec
    entry: modalities.Modality
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

    @property
    def pos(self) -> str:  # "2d" (row * grid_w + col) | "1d"
        return self.entry.pos

    @property
    def field(self) -> str:
        return self.entry.field


class Tokenizers:
    """The trained tokenizers by tokenizer name (``text``, ``image``, ``segmentation``, ...; ``None`` where the
    data has nothing to train one on): ``tokenizers["text"]``, ``tokenizers.text``, ``tokenizers.hash``."""

    def __init__(self, by_name: dict | None = None, **kw):
        self._by_name = dict(by_name or {}, **kw)

    def __getitem__(self, name: str):
        return self._by_name[name]

    def __getattr__(self, name: str):
        if name.startswith("_"):
            raise AttributeError(name)
        return self.__dict__.get("_by_name", {}).get(name)

    def get(self, name: str, default=None):
        return self._by_name.get(name, default)

    def __contains__(self, name) -> bool:
        return name in self._by_name

    def items(self):
        return self._by_name.items()

    def names(self) -> tuple[str, ...]:
        return tuple(self._by_name)

    @property
    def hash(self) -> str:
        """Content hash of the set: the tokenizers' hashes joined in their order (``none`` for an absent one)."""
        parts = [getattr(t, "hash", "none") for t in self._by_name.values()]
        return hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]


def tokenizer_order() -> tuple[str, ...]:
    """Tokenizer names in the order of :attr:`Tokenizers.hash`: the sequence modalities' tokenizers, then the
    image-like ones, each in registry order (for the built-ins: text, image, segmentation, the order token
    caches and data-iterator states of existing runs are keyed by)."""
    out: list[str] = []
    for kind in ("sequence", "image"):
        for m in modalities.registered():
            if m.kind == kind and m.tokenizer_name not in out:
                out.append(m.tokenizer_name)
    return tuple(out)


def build_registry(spec, tokenizers: Tokenizers) -> tuple[Modality, ...]:
    """Registry entries for the modalities of a :class:`medscale.spec.ModelSpec`, in its order."""
    out = []
    for i, m in enumerate(spec.modalities):
        if m.name not in modalities.names():
            raise UserError(f"unknown modality {m.name!r}; the data registry knows: {', '.join(modalities.names())}")
        entry = modalities.get(m.name)
        if m.kind != entry.kind:
            raise UserError(f"modality {m.name!r} is {entry.kind}, the spec says {m.kind}")
        tok = tokenizers.get(entry.tokenizer_name)
        tv = getattr(tok, "vocab_size", None)
        if tv is not None and tv > m.vocab_size:
            raise UserError(f"modality {m.name!r}: tokenizer vocabulary {tv} > model vocabulary {m.vocab_size}")
        out.append(Modality(i, m, entry, tok))
    return tuple(out)
