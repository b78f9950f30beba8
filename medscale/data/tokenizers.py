"""Tokenizers: text (sentencepiece + box-coordinate + sentinel tokens), image VQ and segmentation codebooks.

Every tokenizer is an artifact on disk with a content hash (``.hash``): caches of tokens are keyed by it.

Text vocabulary (size ``text_vocab``, shared by captions and boxes); ids:

=======================  ===========================================================
0                        ``<pad>`` (never a target)
1                        ``<unk>``
2                        ``<s>``: the start id, ``dec_input`` at a sequence target's first position
3                        ``</s>``: end of sequence (last target of a complete sequence)
4 .. 4+S-1               sentinels ``<S0>`` .. ``<S{S-1}>`` (span masking)
4+S .. 4+S+4B-1          box coordinates ``v0=0 .. v0={B-1}``, ``v1=..``, ``v2=..``, ``v3=..``
                         (x0, y0, x1, y1 quantised to B bins; x1/y1 exclusive)
then                     byte pieces (only when ``text_vocab >= 1024``), then learned pieces
up to ``text_vocab``     unused (the trained model may be smaller; its size is ``.trained_size``)
=======================  ===========================================================

Special tokens (sentinels, coordinates) are split off the text before sentencepiece sees it, so each is exactly
one id whatever the surrounding spaces; ``decode`` joins them with single spaces. ``decode(encode(x)) ==
normalize(x)`` (sentencepiece's NFKC normalisation and whitespace collapsing).
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import re

import numpy as np

from medscale import rundir
from medscale.data.synthetic import MASK_CLASSES
from medscale.errors import UserError

log = logging.getLogger(__name__)

PAD, UNK, START, EOS = 0, 1, 2, 3


def _sha(*parts: bytes) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(p)
    return h.hexdigest()[:16]


def _limit(dcfg) -> int:
    """Training examples the tokenizers learn from (``data.tokenizer_examples``; synthetic data: the stream's
    first ones, no more than a fixed-size set's ``data.num_train``); part of artifact names."""
    limit = int(dcfg.get("tokenizer_examples", 2000))
    n = int(dcfg.get("num_train") or 0)
    return min(limit, n) if dcfg.get("dataset", "synthetic_med") == "synthetic_med" and n > 0 else limit


# ----------------------------------------------------------------------------------------------- text
class TextTokenizer:
    """Sentencepiece over words plus fixed special ids for sentinels and box coordinates."""

    def __init__(self, model_bytes: bytes, vocab_size: int, num_sentinels: int, box_bins: int):
        import sentencepiece as spm

        self.model_bytes = model_bytes
        self.vocab_size = int(vocab_size)
        self.num_sentinels = int(num_sentinels)
        self.box_bins = int(box_bins)
        self.sp = spm.SentencePieceProcessor(model_proto=model_bytes)
        self.trained_size = self.sp.get_piece_size()
        if self.trained_size > self.vocab_size:
            raise UserError(f"text tokenizer has {self.trained_size} pieces > data.text_vocab {self.vocab_size}")
        self.sentinel_ids = np.arange(4, 4 + self.num_sentinels, dtype=np.int32)
        self.coord_base = 4 + self.num_sentinels
        checks = [("<pad>", PAD), ("<unk>", UNK), ("<s>", START), ("</s>", EOS)]
        checks += [("<S0>", 4)] if self.num_sentinels else []
        checks += [("v0=0", self.coord_base)] if self.box_bins else []
        for name, want in checks:
            got = self.sp.piece_to_id(name)
            if got != want:
                raise ValueError(f"text tokenizer: piece {name!r} has id {got}, expected {want}")
        self._special = re.compile(r"(<S\d+>|v[0-3]=\d+)")
        self.hash = _sha(model_bytes, json.dumps([vocab_size, num_sentinels, box_bins]).encode())

    # special ids
    pad_id, unk_id, start_id, eos_id = PAD, UNK, START, EOS

    def sentinel(self, i: int) -> int:
        return 4 + i

    def coord_id(self, slot: int, b: int) -> int:
        return self.coord_base + slot * self.box_bins + b

    def is_special(self, ids) -> np.ndarray:
        ids = np.asarray(ids)
        return (ids >= 4) & (ids < self.coord_base + 4 * self.box_bins)

    def _piece(self, i: int) -> str:
        return self.sp.id_to_piece(int(i))

    def encode(self, text: str) -> list[int]:
        out: list[int] = []
        for chunk in self._special.split(text):
            if not chunk or chunk.isspace():
                continue
            if self._special.fullmatch(chunk):
                i = self.sp.piece_to_id(chunk)
                if i == UNK:
                    raise UserError(f"text {chunk!r} is outside the tokenizer's special range")
                out.append(i)
            else:
                out.extend(self.sp.encode(chunk))
        return out

    def decode(self, ids) -> str:
        parts, run = [], []
        for i in (int(x) for x in ids):
            if i in (PAD, START):
                continue
            if i == EOS:
                break
            if 4 <= i < self.coord_base + 4 * self.box_bins:
                if run:
                    parts.append(self.sp.decode(run))
                    run = []
                parts.append(self._piece(i))
            elif i < self.trained_size:
                run.append(i)
            else:
                run.append(UNK)
        if run:
            parts.append(self.sp.decode(run))
        return " ".join(p for p in parts if p)

    def normalize(self, text: str) -> str:
        parts = []
        for chunk in self._special.split(text):
            if self._special.fullmatch(chunk or ""):
                parts.append(chunk)
            elif chunk and not chunk.isspace():
                n = self.sp.normalize(chunk).replace("\u2581", " ").strip()
                if n:
                    parts.append(n)
        return " ".join(parts)

    # boxes <-> text
    def boxes_to_text(self, boxes, image_size: int) -> str:
        """``[(cls, x0, y0, x1, y1)]`` pixels (x1, y1 exclusive) -> ``v0=.. v1=.. v2=.. v3=.. cls ...``;
        no box -> ``none``."""
        if not boxes:
            return "none"
        B, S = self.box_bins, float(image_size)
        out = []
        for cls, x0, y0, x1, y1 in boxes:
            q = [int(np.clip(np.floor(c * B / S), 0, B - 1)) for c in (x0, y0)]
            q += [int(np.clip(np.floor((c - 1) * B / S), 0, B - 1)) for c in (x1, y1)]
            out.append(f"v0={q[0]} v1={q[1]} v2={q[2]} v3={q[3]} {cls}")
        return " ".join(out)

    def text_to_boxes(self, text: str, image_size: int) -> list[tuple]:
        """Inverse of :meth:`boxes_to_text` (pixel edges of the bins; a box always contains the original)."""
        B, S = self.box_bins, float(image_size)
        boxes = []
        pat = re.compile(r"v0=(\d+)\s+v1=(\d+)\s+v2=(\d+)\s+v3=(\d+)\s+([^<]+?)(?=\s+v0=|\s*$)")
        for m in pat.finditer(text):
            b = [min(int(m.group(k)), B - 1) for k in range(1, 5)]
            boxes.append((m.group(5).strip(), b[0] * S / B, b[1] * S / B, (b[2] + 1) * S / B,
                          (b[3] + 1) * S / B))
        return boxes

    def save(self, path: str) -> None:
        meta = {"vocab_size": self.vocab_size, "num_sentinels": self.num_sentinels, "box_bins": self.box_bins,
                    "hash": self.hash}
        buf = io.BytesIO()
        np.savez(buf, model=np.frombuffer(self.model_bytes, np.uint8), meta=json.dumps(meta))
        rundir.write_bytes(path, buf.getvalue())

    # the registry's tokenizer interface (medscale.modalities)
    @classmethod
    def artifact(cls, dcfg, vocab_size: int) -> str:
        ns, bins = int(dcfg.get("num_sentinels", 16)), int(dcfg.get("box_bins", 32))
        return f"text_v{vocab_size}_s{ns}_b{bins}_n{_limit(dcfg)}.npz"

    @classmethod
    def train(cls, values: dict, dcfg, vocab_size: int) -> TextTokenizer:
        """Sentencepiece on the texts of every modality sharing the tokenizer (a list of boxes contributes its
        class names; coordinates have fixed ids), plus the word ``none`` (the text of no box)."""
        texts = [v if isinstance(v, str) else " ".join(str(b[0]) for b in v)
                 for vals in values.values() for v in vals]
        texts.append("none")
        return train_text_tokenizer(texts, vocab_size, int(dcfg.get("num_sentinels", 16)),
                                    int(dcfg.get("box_bins", 32)), seed=0)

    @classmethod
    def load(cls, path: str) -> TextTokenizer:
        with np.load(path) as z:
            meta = json.loads(str(z["meta"]))
            tok = cls(z["model"].tobytes(), meta["vocab_size"], meta["num_sentinels"], meta["box_bins"])
        if tok.hash != meta["hash"]:
            raise UserError(f"tokenizer file {path} is corrupt (hash mismatch); delete it to rebuild")
        return tok


def train_text_tokenizer(texts, vocab_size: int, num_sentinels: int = 16, box_bins: int = 32,
                         seed: int = 0) -> TextTokenizer:
    """Train sentencepiece (BPE, word-internal pieces) on ``texts`` (strings; special tokens removed first)."""
    import sentencepiece as spm

    specials = [f"<S{i}>" for i in range(num_sentinels)]
    specials += [f"v{s}={b}" for s in range(4) for b in range(box_bins)]
    n_fixed = 4 + len(specials)
    byte_fallback = vocab_size >= 1024
    min_size = n_fixed + (256 if byte_fallback else 0) + 32
    if vocab_size < min_size:
        raise UserError(f"data.text_vocab {vocab_size} is too small: sentinels and {box_bins} box bins alone "
                        f"take {n_fixed} ids; use at least {min_size}")
    strip = re.compile(r"<S\d+>|v[0-3]=\d+")
    corpus = [" ".join(strip.sub(" ", t).split()) for t in texts]
    corpus = [t for t in corpus if t]
    if not corpus:
        raise UserError("no caption text to train the text tokenizer on: every caption is empty")
    model = io.BytesIO()
    spm.set_random_generator_seed(int(seed) + 1)
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus), model_writer=model, vocab_size=vocab_size, model_type="bpe",
        pad_id=PAD, unk_id=UNK, bos_id=START, eos_id=EOS, user_defined_symbols=specials,
        hard_vocab_limit=False, byte_fallback=byte_fallback, character_coverage=1.0,
        split_by_whitespace=True, max_sentencepiece_length=16, input_sentence_size=200_000,
        shuffle_input_sentence=True, seed_sentencepiece_size=200_000, num_threads=1, minloglevel=2)
    return TextTokenizer(model.getvalue(), vocab_size, num_sentinels, box_bins)


class QATokenizer(TextTokenizer):
    """Question and answer text (the ``qa`` tokenizer, size ``data.qa_vocab``): sentencepiece like the text
    tokenizer but without sentinels or box coordinates (a question is only an input and an answer only a
    target, so neither is ever span-masked): ids 0-3 special, then pieces."""

    @classmethod
    def artifact(cls, dcfg, vocab_size: int) -> str:
        return f"qa_v{vocab_size}_n{_limit(dcfg)}.npz"

    @classmethod
    def train(cls, values: dict, dcfg, vocab_size: int) -> QATokenizer | None:
        """Sentencepiece on every question and answer; ``None`` when the data has none (no VQA in it)."""
        texts = [v for vals in values.values() for v in vals if isinstance(v, str) and v.strip()]
        if not texts:
            return None
        if vocab_size < 36:
            raise UserError(f"data.qa_vocab {vocab_size} is too small; use at least 36")
        tok = train_text_tokenizer(texts, vocab_size, 0, 0, seed=0)
        return cls(tok.model_bytes, vocab_size, 0, 0)


# ----------------------------------------------------------------------------------------------- k-means
def kmeans(x: np.ndarray, k: int, iters: int = 20, seed: int = 0, init: np.ndarray | None = None) -> np.ndarray:
    """Lloyd's k-means in JAX on ``x`` [N, D] (float32); ``init`` fixes the first rows of the codebook's
    initial value. Empty clusters are re-seeded with the points worst served. Returns [k, D] float32."""
    import jax
    import jax.numpy as jnp

    x = np.asarray(x, np.float32)
    n = x.shape[0]
    rng = np.random.default_rng(seed)
    c0 = x[rng.choice(n, size=k, replace=n < k)].copy()
    if init is not None:
        c0[: len(init)] = init
    c0 += rng.normal(0, 1e-4, c0.shape).astype(np.float32)

    @jax.jit
    def step(c, x):
        d = (x * x).sum(1, keepdims=True) - 2 * x @ c.T + (c * c).sum(1)[None]
        a = jnp.argmin(d, 1)
        best = jnp.take_along_axis(d, a[:, None], 1)[:, 0]
        sums = jax.ops.segment_sum(x, a, num_segments=k)
        cnt = jax.ops.segment_sum(jnp.ones((x.shape[0],), jnp.float32), a, num_segments=k)
        newc = jnp.where(cnt[:, None] > 0, sums / jnp.maximum(cnt, 1)[:, None], c)
        # re-seed empty clusters with the worst-served points
        worst = jnp.argsort(-best)[:k]
        empty_rank = jnp.cumsum(cnt == 0) - 1
        newc = jnp.where((cnt == 0)[:, None], x[worst[jnp.clip(empty_rank, 0, k - 1)]], newc)
        return newc, best.mean()

    c = jnp.asarray(c0)
    xj = jnp.asarray(x)
    for _ in range(iters):
        c, _ = step(c, xj)
    return np.asarray(c)


def nearest(x: np.ndarray, codebook: np.ndarray, chunk: int = 65536) -> np.ndarray:
    """Index of the nearest codebook row for each row of ``x`` (numpy, chunked)."""
    x = np.asarray(x, np.float32)
    cc = (codebook * codebook).sum(1)
    out = np.empty(x.shape[0], np.int32)
    for s in range(0, x.shape[0], chunk):
        xs = x[s:s + chunk]
        out[s:s + chunk] = np.argmin(cc[None] - 2 * xs @ codebook.T, 1)
    return out


def _patches(images: np.ndarray, p: int) -> np.ndarray:
    """[N, H, W] -> [N, (H/p)*(W/p), p*p] in row-major patch order."""
    n, h, w = images.shape
    return images.reshape(n, h // p, p, w // p, p).transpose(0, 1, 3, 2, 4).reshape(n, (h // p) * (w // p), p * p)


def _unpatch(patches: np.ndarray, h: int, w: int, p: int) -> np.ndarray:
    n = patches.shape[0]
    return patches.reshape(n, h // p, w // p, p, p).transpose(0, 1, 3, 2, 4).reshape(n, h, w)


class VQTokenizer:
    """Image -> one code per ``patch x patch`` patch (nearest codebook entry over grey values in [0, 1])."""

    kind = "image"

    def __init__(self, codebook: np.ndarray, patch: int):
        self.codebook = np.asarray(codebook, np.float32)
        self.patch = int(patch)
        self.vocab_size = self.codebook.shape[0]
        self.hash = _sha(self.codebook.tobytes(), str(self.patch).encode(), b"vq")

    def encode(self, images: np.ndarray) -> np.ndarray:
        """uint8 [N, H, W] (or [H, W]) -> int32 [N, (H/p)*(W/p)]."""
        images = np.asarray(images)
        single = images.ndim == 2
        x = _patches(images[None] if single else images, self.patch).astype(np.float32) / 255.0
        ids = nearest(x.reshape(-1, x.shape[-1]), self.codebook).reshape(x.shape[:2])
        return ids[0] if single else ids

    def decode(self, ids: np.ndarray, image_size: int) -> np.ndarray:
        ids = np.asarray(ids)
        single = ids.ndim == 1
        rec = self.codebook[np.clip(ids, 0, self.vocab_size - 1)]
        img = _unpatch(rec if not single else rec[None], image_size, image_size, self.patch)
        img = np.clip(img * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return img[0] if single else img

    def reconstruction(self, images: np.ndarray) -> dict:
        """Mean squared error (grey values in [0, 1]) and PSNR (dB) of decode(encode(images))."""
        rec = self.decode(self.encode(images), images.shape[-1]).astype(np.float32) / 255.0
        mse = float(np.mean((rec - images.astype(np.float32) / 255.0) ** 2))
        return {"mse": mse, "rmse": mse ** 0.5, "psnr": float(10 * np.log10(1.0 / max(mse, 1e-12)))}

    def save(self, path: str) -> None:
        buf = io.BytesIO()
        np.savez(buf, codebook=self.codebook, patch=self.patch, hash=self.hash)
        rundir.write_bytes(path, buf.getvalue())

    @classmethod
    def artifact(cls, dcfg, vocab_size: int) -> str:
        return f"vq_v{vocab_size}_p{int(dcfg.patch_size)}_n{_limit(dcfg)}.npz"

    @classmethod
    def train(cls, values: dict, dcfg, vocab_size: int) -> VQTokenizer | None:
        images = [v for vals in values.values() for v in vals]
        if not images:
            return None
        return train_vq(np.stack(images), vocab_size, int(dcfg.patch_size), iters=int(dcfg.get("vq_iters", 15)))

    @classmethod
    def load(cls, path: str):
        with np.load(path) as z:
            tok = cls(z["codebook"], int(z["patch"]))
            if tok.hash != str(z["hash"]):
                raise UserError(f"tokenizer file {path} is corrupt (hash mismatch); delete it to rebuild")
        return tok


def train_vq(images: np.ndarray, vocab_size: int, patch: int, iters: int = 20, seed: int = 0,
             max_patches: int = 131072) -> VQTokenizer:
    """k-means codebook (in JAX) over the patches of uint8 ``images`` [N, H, W]."""
    x = _patches(np.asarray(images), patch).reshape(-1, patch * patch).astype(np.float32) / 255.0
    rng = np.random.default_rng(seed)
    if x.shape[0] > max_patches:
        x = x[rng.choice(x.shape[0], max_patches, replace=False)]
    return VQTokenizer(kmeans(x, vocab_size, iters, seed), patch)


class SegTokenizer:
    """Segmentation mask -> one code per patch: nearest entry of a codebook over one-hot class layouts
    (k-means; the first ``num_classes`` entries start as the pure-class patches). Decoding takes each pixel's
    most likely class under the code's mean layout."""

    kind = "segmentation"

    def __init__(self, codebook: np.ndarray, patch: int, num_classes: int):
        self.codebook = np.asarray(codebook, np.float32)  # [K, p*p*C]
        self.patch = int(patch)
        self.num_classes = int(num_classes)
        self.vocab_size = self.codebook.shape[0]
        self.hash = _sha(self.codebook.tobytes(), f"{patch},{num_classes}".encode(), b"seg")

    def _onehot(self, masks: np.ndarray) -> np.ndarray:
        p = _patches(masks, self.patch)  # [N, P, p*p]
        return np.eye(self.num_classes, dtype=np.float32)[np.minimum(p, self.num_classes - 1)].reshape(
            p.shape[0], p.shape[1], -1)

    def encode(self, masks: np.ndarray) -> np.ndarray:
        masks = np.asarray(masks)
        single = masks.ndim == 2
        x = self._onehot(masks[None] if single else masks)
        ids = nearest(x.reshape(-1, x.shape[-1]), self.codebook).reshape(x.shape[:2])
        return ids[0] if single else ids

    def decode(self, ids: np.ndarray, image_size: int) -> np.ndarray:
        ids = np.asarray(ids)
        single = ids.ndim == 1
        ids = ids[None] if single else ids
        probs = self.codebook[np.clip(ids, 0, self.vocab_size - 1)].reshape(
            ids.shape[0], ids.shape[1], self.patch * self.patch, self.num_classes)
        cls = probs.argmax(-1).astype(np.uint8)
        m = _unpatch(cls, image_size, image_size, self.patch)
        return m[0] if single else m

    def reconstruction(self, masks: np.ndarray) -> dict:
        """Pixel accuracy and mean IoU over classes of decode(encode(masks))."""
        rec = self.decode(self.encode(masks), masks.shape[-1])
        acc = float((rec == masks).mean())
        ious = []
        for c in range(self.num_classes):
            inter = np.logical_and(rec == c, masks == c).sum()
            union = np.logical_or(rec == c, masks == c).sum()
            if union:
                ious.append(inter / union)
        return {"pixel_accuracy": acc, "miou": float(np.mean(ious))}

    def save(self, path: str) -> None:
        buf = io.BytesIO()
        np.savez(buf, codebook=self.codebook, patch=self.patch, num_classes=self.num_classes, hash=self.hash)
        rundir.write_bytes(path, buf.getvalue())

    @classmethod
    def artifact(cls, dcfg, vocab_size: int) -> str:
        return f"seg_v{vocab_size}_p{int(dcfg.patch_size)}_n{_limit(dcfg)}.npz"

    @classmethod
    def train(cls, values: dict, dcfg, vocab_size: int) -> SegTokenizer | None:
        """Codebook over the masks of the training examples; None when no example has a mask (real data)."""
        masks = [v for vals in values.values() for v in vals]
        if not masks:
            return None
        return train_seg(np.stack(masks), vocab_size, int(dcfg.patch_size), len(MASK_CLASSES),
                         iters=int(dcfg.get("vq_iters", 15)))

    @classmethod
    def load(cls, path: str):
        with np.load(path) as z:
            tok = cls(z["codebook"], int(z["patch"]), int(z["num_classes"]))
            if tok.hash != str(z["hash"]):
                raise UserError(f"tokenizer file {path} is corrupt (hash mismatch); delete it to rebuild")
        return tok


def train_seg(masks: np.ndarray, vocab_size: int, patch: int, num_classes: int, iters: int = 20, seed: int = 0,
              max_patches: int = 131072) -> SegTokenizer:
    tmp = SegTokenizer(np.zeros((1, patch * patch * num_classes), np.float32), patch, num_classes)
    x = tmp._onehot(np.asarray(masks)).reshape(-1, patch * patch * num_classes)
    rng = np.random.default_rng(seed)
    if x.shape[0] > max_patches:
        x = x[rng.choice(x.shape[0], max_patches, replace=False)]
    pure = np.stack([np.tile(np.eye(num_classes, dtype=np.float32)[c], (patch * patch,)) for c in
                     range(num_classes)])
    del tmp
    return SegTokenizer(kmeans(x, vocab_size, iters, seed, init=pure[:vocab_size]), patch, num_classes)
