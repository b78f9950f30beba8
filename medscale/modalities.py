"""The modality registry: one entry per modality, the one place where a modality is defined.

An entry (:class:`Modality`) says everything the rest of medscale reads about a modality:

- ``name`` and ``kind``: ``"image"`` (image-like: a grid of ``data.image_size / data.patch_size`` squared patch
  tokens, 2D positions, predicted in parallel) or ``"sequence"`` (1D positions, generated left to right);
- ``vocab``: the ``cfg.data`` key of its vocabulary size and its default; ``max_tokens`` (sequences): the key of the
  tokens one example holds and its default (image-like modalities hold the whole grid). The base config gets
  every registered key with its default, so ``--set data.KEY=...`` works for any modality;
- ``read``: the key of the raw example (``medscale.data.pipeline.Examples``) it is read from, or a function of
  the raw example returning the value, ``None`` where the example lacks the modality;
- ``tokenizer``: its tokenizer class (the interface below); modalities with the same ``tokenizer_name`` share
  one trained tokenizer (captions and boxes share the text tokenizer). ``encode`` / ``decode`` turn raw values
  into token ids and back with that tokenizer when the tokenizer's own ``encode`` / ``decode`` do not fit;
- ``decoding``, ``renderer``, ``metrics``: how ``medscale generate`` / ``medscale evaluate`` constrain its
  generated tokens, show it, and score it (``medscale.generate``; optional); ``task_inputs``: the modalities it
  is decoded from when it is scored (default: the image alone);
- ``role``: ``"both"`` (the default: input and target, as 4M draws them), ``"input"`` (never a target) or
  ``"target"`` (never an input); ``given``: for a target-only modality, the input-only modality that goes into
  the encoder whole whenever this one is a target (the answer's question), so that a target is always
  conditioned on what it answers.

References to code in other layers (tokenizers in ``medscale.data``, renderers and metrics in
``medscale.generate``) are ``"module:attribute"`` strings, resolved by :func:`resolve` where they are used, so
this module imports nothing of medscale but its errors; an entry defined outside medscale may give the objects.

Tokenizer interface (``TextTokenizer``, ``VQTokenizer`` and ``SegTokenizer`` of ``medscale.data.tokenizers``):

- ``cls.artifact(dcfg, vocab_size) -> str``: the file name of the trained tokenizer, from its settings;
- ``cls.train(values, dcfg, vocab_size) -> tokenizer | None``: ``values`` maps each modality sharing the
  tokenizer to its raw values in the training examples (absent ones left out); ``None``: nothing to learn from;
- ``cls.load(path)``, ``tokenizer.save(path)``, ``tokenizer.hash`` (content hash; caches are keyed by it),
  ``tokenizer.vocab_size``;
- image-like: ``tokenizer.encode(values) -> int [N, G]`` (``values``: N uint8 ``[H, W]`` arrays) and ``tokenizer.decode(ids [G], image_size)``;
  sequences: ``tokenizer.encode(value) -> list[int]`` and ``tokenizer.decode(ids) -> value``, with the special
  ids of ``medscale.data.tokenizers`` (0 pad, 1 unknown, 2 start, 3 end, then ``data.num_sentinels`` sentinels).

The built-in modalities are :data:`BUILTIN`; :func:`extended` adds entries for the duration of a ``with`` block.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
from collections.abc import Callable
from typing import Any, Literal

from medscale.errors import UserError

KINDS = ("image", "sequence")
ROLES = ("both", "input", "target")


@dataclasses.dataclass(frozen=True)
class ModalitySpec:
    """What the model needs to know of one modality (the registry entry holds the rest)."""

    name: str
    kind: Literal["image", "sequence"]  # image-like: predicted in parallel, 2D positions
    vocab_size: int
    max_tokens: int  # tokens one example can hold of this modality (grid h*w for image-like)
    grid: tuple[int, int] | None = None  # (h, w) for image-like modalities
    encodes: bool = True  # False for a target-only modality: never an input, no encoder places

    def __post_init__(self):
        if self.kind not in KINDS:
            raise UserError(f"modality {self.name!r}: kind must be 'image' or 'sequence', not {self.kind!r}")
        if self.vocab_size <= 0 or self.max_tokens <= 0:
            raise UserError(f"modality {self.name!r}: vocab_size and max_tokens must be positive")
        if self.kind == "image" and (self.grid is None or self.grid[0] * self.grid[1] != self.max_tokens):
            raise UserError(f"modality {self.name!r}: an image-like modality needs grid h*w == max_tokens")


Ref = str | Callable | type | None  # "module:attribute", or the object itself


def resolve(ref: Ref) -> Any:
    """The object a reference names (``"package.module:attr.attr"``); objects are returned as they are."""
    if not isinstance(ref, str):
        return ref
    module, _, attr = ref.partition(":")
    obj = importlib.import_module(module)
    for part in attr.split(".") if attr else ():
        obj = getattr(obj, part)
    return obj


@dataclasses.dataclass(frozen=True)
class Modality:
    """One modality (module docstring)."""

    name: str
    kind: Literal["image", "sequence"]
    vocab: tuple[str, int]  # (cfg.data key of the vocabulary size, default)
    tokenizer: Ref  # the tokenizer class
    tokenizer_name: str = ""  # default: name; modalities naming the same tokenizer share it
    max_tokens: tuple[str, int] | None = None  # sequences: (cfg.data key of tokens per example, default)
    read: str | Callable[[dict], Any] = ""  # raw example key (default: name), or example -> value | None
    encode: Ref = None  # (tokenizer, values, image_size) -> ids per value; default: the tokenizer's encode
    decode: Ref = None  # (tokenizer, ids, image_size) -> value; default: the tokenizer's decode
    absent_stat: str | None = None  # token statistic counting the examples without this modality
    decoding: Ref = None  # sequences: generation constraints and outputs (medscale.generate.predict)
    renderer: Ref = None  # medscale generate's output (medscale.generate.render)
    metrics: Ref = None  # (predictions, examples) -> {"<name>/<metric>": value} (medscale.generate.evaluate)
    task_inputs: tuple[str, ...] = ("image",)  # what it is decoded from when it is scored
    role: Literal["both", "input", "target"] = "both"
    given: str | None = None  # target-only: the input-only modality given whole whenever this one is a target

    def __post_init__(self):
        if self.kind not in KINDS:
            raise UserError(f"modality {self.name!r}: kind must be 'image' or 'sequence', not {self.kind!r}")
        if (self.kind == "sequence") != (self.max_tokens is not None):
            raise UserError(f"modality {self.name!r}: a sequence needs max_tokens (config key, default); an "
                            "image-like modality holds the whole grid and has none")
        if self.role not in ROLES:
            raise UserError(f"modality {self.name!r}: role must be one of {', '.join(ROLES)}, not {self.role!r}")
        if self.given is not None and self.role != "target":
            raise UserError(f"modality {self.name!r}: only a target-only modality (role 'target') names a given "
                            "input")
        if not self.tokenizer_name:
            object.__setattr__(self, "tokenizer_name", self.name)
        if not self.read:
            object.__setattr__(self, "read", self.name)

    @property
    def pos(self) -> str:
        """Position kind: ``"2d"`` (row * grid_w + col) for image-like modalities, ``"1d"`` for sequences."""
        return "2d" if self.kind == "image" else "1d"

    @property
    def field(self) -> str:
        """The raw example key it is read from (its name when read through a function)."""
        return self.read if isinstance(self.read, str) else self.name

    def config_keys(self) -> dict[str, int]:
        """``{cfg.data key: default}`` of its sizes."""
        return dict([self.vocab, *([self.max_tokens] if self.max_tokens else [])])

    def value(self, example: dict):
        """Its raw value in ``example``, ``None`` when the example lacks it."""
        return example.get(self.read) if isinstance(self.read, str) else self.read(example)

    def encode_values(self, tokenizer, values: list, image_size: int):
        """Token ids of raw ``values``: int [N, G] (image-like), or one id list per value (sequences)."""
        if self.encode is not None:
            return resolve(self.encode)(tokenizer, values, image_size)
        if self.kind == "image":
            return tokenizer.encode(values)
        return [tokenizer.encode(v) for v in values]

    def decode_ids(self, tokenizer, ids, image_size: int):
        """The raw value of one example's ids (image-like: the whole grid in position order)."""
        if self.decode is not None:
            return resolve(self.decode)(tokenizer, ids, image_size)
        if self.kind == "image":
            return tokenizer.decode(ids, image_size)
        return tokenizer.decode(ids)


# ----------------------------------------------------------------------------------------------- built-ins
def _caption(example: dict):
    text = " ".join(str(example.get("caption") or "").split())
    return text or None


def _boxes(example: dict):
    # boxes are known (possibly none) where a mask is, or where the example lists some
    if example.get("mask") is not None or example.get("boxes"):
        return list(example.get("boxes") or ())
    return None


def _text_field(key: str):
    def read(example: dict):
        text = " ".join(str(example.get(key) or "").split())
        return text or None

    read.__name__ = f"_{key}"
    return read


def _boxes_encode(text, values, image_size):
    return [text.encode(text.boxes_to_text(v, image_size)) for v in values]


def _boxes_decode(text, ids, image_size):
    return text.text_to_boxes(text.decode(ids), image_size)


_T = "medscale.data.tokenizers:"
_P = "medscale.generate.predict:"
_R = "medscale.generate.render:"
_E = "medscale.generate.evaluate:"

BUILTIN = (
    Modality("image", "image", ("image_vocab", 512), _T + "VQTokenizer", renderer=_R + "ImageRenderer"),
    Modality("caption", "sequence", ("text_vocab", 2048), _T + "TextTokenizer", tokenizer_name="text",
             max_tokens=("caption_tokens", 64), read=_caption, absent_stat="empty_caption",
             decoding=_P + "CaptionDecoding", renderer=_R + "CaptionRenderer", metrics=_E + "caption_metrics"),
    Modality("boxes", "sequence", ("text_vocab", 2048), _T + "TextTokenizer", tokenizer_name="text",
             max_tokens=("box_tokens", 32), read=_boxes, encode=_boxes_encode, decode=_boxes_decode,
             decoding=_P + "BoxesDecoding", renderer=_R + "BoxesRenderer", metrics=_E + "boxes_metrics"),
    Modality("segmentation", "image", ("seg_vocab", 256), _T + "SegTokenizer", read="mask",
             absent_stat="no_mask", renderer=_R + "MaskRenderer", metrics=_E + "segmentation_metrics"),
    # visual question answering: the question is only ever an input, given whole whenever its answer is a target;
    # both share one small text tokenizer of their own (the answer's output head is qa_vocab wide, not text_vocab)
    Modality("question", "sequence", ("qa_vocab", 256), _T + "QATokenizer", tokenizer_name="qa",
             max_tokens=("question_tokens", 32), read=_text_field("question"), absent_stat="no_question",
             role="input", renderer=_R + "TextRenderer"),
    Modality("answer", "sequence", ("qa_vocab", 256), _T + "QATokenizer", tokenizer_name="qa",
             max_tokens=("answer_tokens", 12), read=_text_field("answer"), role="target", given="question",
             renderer=_R + "TextRenderer", metrics=_E + "answer_metrics", task_inputs=("image", "question")),
)

_REGISTRY: dict[str, Modality] = {}


def _check(entries) -> None:
    keys: dict[str, tuple[str, int]] = {}
    tokenizers: dict[str, tuple[str, Ref]] = {}
    names = [m.name for m in entries]
    if len(set(names)) != len(names):
        raise UserError(f"modality names must be unique: {names}")
    for m in entries:
        for key, default in m.config_keys().items():
            if key in keys and keys[key][1] != default:
                raise UserError(f"modality {m.name!r}: config key data.{key} has default {default}, modality "
                                f"{keys[key][0]!r} gives it {keys[key][1]}")
            keys.setdefault(key, (m.name, default))
        if m.given is not None and m.given in names and entries[names.index(m.given)].role != "input":
            raise UserError(f"modality {m.name!r} is given {m.given!r}, which must be input-only (role 'input')")
        t = tokenizers.setdefault(m.tokenizer_name, (m.name, m.tokenizer))
        if t[1] != m.tokenizer:
            raise UserError(f"modality {m.name!r} shares tokenizer {m.tokenizer_name!r} with {t[0]!r} but names "
                            "another tokenizer class")


def _set(entries) -> None:
    entries = tuple(entries)
    _check(entries)
    _REGISTRY.clear()
    _REGISTRY.update((m.name, m) for m in entries)


_set(BUILTIN)


def registered() -> tuple[Modality, ...]:
    """Every registered modality, in registry order (the model's modality order)."""
    return tuple(_REGISTRY.values())


def names() -> tuple[str, ...]:
    return tuple(_REGISTRY)


def get(name: str) -> Modality:
    if name not in _REGISTRY:
        raise UserError(f"unknown modality {name!r}; the registry knows: {', '.join(_REGISTRY)}")
    return _REGISTRY[name]


@contextlib.contextmanager
def extended(*entries: Modality):
    """Register ``entries`` (after the registered ones) inside the ``with`` block; the registry is restored after."""
    old = registered()
    _set(old + tuple(entries))
    try:
        yield registered()
    finally:
        _set(old)


def config_defaults() -> dict[str, int]:
    """``{cfg.data key: default}`` of every registered modality's sizes, in registry order."""
    out: dict[str, int] = {}
    for m in registered():
        for key, default in m.config_keys().items():
            out.setdefault(key, default)
    return out


def default_modalities(grid: tuple[int, int] = (8, 8), **sizes: int) -> tuple[ModalitySpec, ...]:
    """Model specs of every registered modality, sizes from the registry's defaults overridden by ``sizes``
    (``cfg.data`` keys: ``text_vocab``, ``image_vocab``, ``seg_vocab``, ``caption_tokens``, ``box_tokens``, ...);
    image-like modalities take ``grid`` (default 64x64 images in 8x8 patches)."""
    known = config_defaults()
    unknown = sorted(set(sizes) - set(known))
    if unknown:
        raise TypeError(f"default_modalities(): unknown size {unknown[0]!r}; the registry's: {', '.join(known)}")
    return specs(dict(known, **sizes), grid)


def specs(values, grid: tuple[int, int], wanted=None) -> tuple[ModalitySpec, ...]:
    """Model specs of the registered modalities named in ``wanted`` (default: all), in registry order; sizes
    read from ``values`` (a mapping of ``cfg.data`` keys, e.g. ``cfg.data``; a key it lacks takes the default)."""
    def size(key, default):
        v = values.get(key, default)
        return int(default if v is None else v)

    out = []
    for m in registered():
        if wanted is not None and m.name not in wanted:
            continue
        vocab = size(*m.vocab)
        if m.kind == "image":
            out.append(ModalitySpec(m.name, m.kind, vocab, int(grid[0]) * int(grid[1]), tuple(grid)))
        else:
            out.append(ModalitySpec(m.name, m.kind, vocab, size(*m.max_tokens), encodes=m.role != "target"))
    return tuple(out)


_COUNT = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")


def count_word(n: int) -> str:
    return _COUNT[n] if 0 <= n < len(_COUNT) else str(n)


def vocab_flag_help() -> str:
    """The ``--vocab`` help text: ``text vocabulary N, or I,C,B,S,Q,A: image, caption, boxes, ...``."""
    letters = ",".join(m.name[0].upper() for m in registered())
    return f"text vocabulary N, or {letters}: {', '.join(names())}"


def from_vocab_flag(vocab: str | None) -> tuple[ModalitySpec, ...]:
    """The registered modalities with vocabularies from a ``--vocab`` flag: ``None`` keeps the defaults; one
    integer sets the text vocabulary (the modalities sized by ``data.text_vocab``: caption and boxes); one
    integer per registered modality sets each, in registry order."""
    if vocab is None:
        return default_modalities()
    n = len(_REGISTRY)
    try:
        values = [int(v) for v in str(vocab).split(",")]
    except ValueError:
        raise UserError(f"--vocab {vocab!r}: give an integer or {count_word(n)} comma-separated integers") from None
    if any(v <= 0 for v in values):
        raise UserError(f"--vocab {vocab!r}: vocabulary sizes must be positive")
    mods = default_modalities()
    if len(values) == 1:
        text = {e.name for e in registered() if e.vocab[0] == "text_vocab"}
        return tuple(dataclasses.replace(m, vocab_size=values[0]) if m.name in text else m for m in mods)
    if len(values) == n:
        return tuple(dataclasses.replace(m, vocab_size=v) for m, v in zip(mods, values))
    raise UserError(f"--vocab {vocab!r}: give one size (text) or {count_word(n)} ({','.join(names())})")
