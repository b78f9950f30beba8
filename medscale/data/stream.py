"""The synthetic training stream: scene ``i`` of the stream is ``render_scene(data_seed, i)``, for ``i = 0, 1, 2,
...`` without end, tokenised into chunk files that grow on demand.

Chunk ``c`` holds the tokens of scenes ``[c * C, (c + 1) * C)`` (``C = data.stream_chunk``) in one ``.npy`` file:
int32 rows, per registered modality its tokens, its length and its flags (absent; truncated for sequences). A
chunk is built by the first process that needs it, under a file lock, written to a temporary name then renamed;
every process reads the same file. Its bytes are a function of ``(data_seed, chunk, tokenizers)``, so two
processes building the same chunk write identical files (across machines, up to the BLAS rounding of the
codebook searches). A fixed-size training set (``data.num_train = n``) is
the stream's first ``n`` scenes: its last chunk may be built only as far as ``n`` (``chunk-c-kK.npy``, ``K <
C`` rows); a full chunk serves any prefix of itself.

Orders: :func:`stream_order` maps a run's example positions ``0, 1, 2, ...`` to scene indices: chunk by chunk,
shuffled inside each chunk with the run's seed, so positions ``0 .. M-1`` visit ``M`` distinct scenes, all from
the first ``ceil(M / C)`` chunks.
"""

from __future__ import annotations

import collections
import io
import os
import threading

import numpy as np

from medscale import modalities, rundir
from medscale.data.synthetic import HELDOUT_BASE, render_scene

BUILD_BATCH = 512  # scenes rendered and tokenised at a time when a chunk is built


def stream_order(positions, seed: int, chunk: int) -> np.ndarray:
    """Scene indices of stream positions (int array): position ``p`` is scene ``c * chunk + perm_c[p % chunk]``
    with ``c = p // chunk`` and ``perm_c`` a permutation of ``range(chunk)`` seeded by ``(seed, c)``."""
    p = np.asarray(positions, np.int64)
    out = np.empty_like(p)
    c = p // chunk
    for k in np.unique(c):
        perm = np.random.default_rng([int(seed), int(k), 0x5EED]).permutation(chunk)
        sel = c == k
        out[sel] = k * chunk + perm[p[sel] - k * chunk]
    return out


class SceneExamples:
    """Raw training scenes ``[0, count)`` rendered on access, in the layout of ``pipeline.Examples`` (boxes as
    floats like the held-out splits')."""

    def __init__(self, seed: int, image_size: int, count: int = HELDOUT_BASE):
        self.seed, self.image_size, self.count = int(seed), int(image_size), int(count)

    def __len__(self):
        return self.count

    def __getitem__(self, i):
        if not -self.count <= i < self.count:
            raise IndexError(i)
        index = int(i) % self.count
        s = render_scene(self.seed, index, self.image_size)
        return scene_record(s, index)

    def __iter__(self):
        for i in range(self.count):
            yield self[i]


def scene_record(s, index: int) -> dict:
    """A rendered scene as a raw example (``pipeline.Examples`` layout; the facts hold only JSON types, so they
    equal the held-out splits' decoded ones)."""
    return {"image": s["image"], "mask": s["mask"], "caption": s["caption"],
            "boxes": [(b[0], *map(float, b[1:])) for b in s["boxes"]],
            "facts": s["facts"], "id": f"synthetic-{index}", "index": int(index), "meta": {},
            "question": s["question"], "answer": s["answer"], "answer_type": s["answer_type"]}


class Layout:
    """Columns of a chunk row: per registered modality ``name`` its tokens, ``name_len`` and flags."""

    def __init__(self, sizes: dict):
        self.sizes = dict(sizes)
        self.cols, c = {}, 0
        for m in modalities.registered():
            n = self.sizes[m.name]
            self.cols[m.name] = slice(c, c + n)
            c += n
            for key in (m.name + "_len", m.name + "_absent") + ((m.name + "_truncated",) if m.kind == "sequence"
                                                                  else ()):
                self.cols[key] = c
                c += 1
        self.width = c


def tokenize_records(recs: list[dict], tokenizers, sizes: dict, image_size: int):
    """Token arrays and statistics of raw examples (every registered modality): ``name`` [N, size] int32,
    ``name_len`` [N], and per example the flags ``name_absent`` (value missing) and ``name_truncated``
    (sequence cut to ``size - 1`` tokens, room for ``</s>``)."""
    n = len(recs)
    out = {}
    for m in modalities.registered():
        out[m.name] = np.zeros((n, sizes[m.name]), np.int32)
        out[m.name + "_len"] = np.zeros(n, np.int32)
        out[m.name + "_absent"] = np.zeros(n, np.int32)
        if m.kind == "sequence":
            out[m.name + "_truncated"] = np.zeros(n, np.int32)
        values = [m.value(r) for r in recs]
        has = [j for j, v in enumerate(values) if v is not None]
        out[m.name + "_absent"][[j for j, v in enumerate(values) if v is None]] = 1
        tok = tokenizers.get(m.tokenizer_name)
        if not has or tok is None:
            continue
        ids = m.encode_values(tok, [values[j] for j in has], image_size)
        if m.kind == "image":
            out[m.name][has] = ids
            out[m.name + "_len"][has] = sizes[m.name]
            continue
        room = sizes[m.name] - 1  # room for </s> within max_tokens
        for i, t in zip(has, ids):
            if len(t) > room:
                out[m.name + "_truncated"][i] = 1
            t = t[:room]
            out[m.name][i, :len(t)] = t
            out[m.name + "_len"][i] = len(t)
    return out


def stats_of(arrays: dict) -> dict:
    """The token statistics of ``Data.stats`` from the flags of :func:`tokenize_records`."""
    stats = {"examples": len(next(iter(arrays.values())))}
    for m in modalities.registered():
        if m.absent_stat:
            stats[m.absent_stat] = int(arrays[m.name + "_absent"].sum())
        if m.kind == "sequence":
            stats[f"truncated_{m.name}"] = int(arrays[m.name + "_truncated"].sum())
    return stats


class TokenStream:
    """Token chunks of the synthetic stream under ``directory`` (see the module docstring); thread-safe.
    ``limit``: the number of scenes the data holds (``data.num_train``), ``None`` for the unbounded stream."""

    def __init__(self, directory: str, seed: int, image_size: int, chunk: int, tokenizers, sizes: dict,
                 lock, limit: int | None = None, keep: int = 8):
        if chunk <= 0:
            raise ValueError(f"chunk size must be positive, got {chunk}")
        self.dir, self.seed, self.image_size, self.chunk = directory, int(seed), int(image_size), int(chunk)
        self.tokenizers, self.layout, self.file_lock = tokenizers, Layout(sizes), lock
        self.limit = None if limit is None else int(limit)
        self.keep = int(keep)
        self._cache: collections.OrderedDict = collections.OrderedDict()
        self._mutex = threading.Lock()

    def extent(self, c: int) -> int:
        """Rows of chunk ``c`` this data reads (fewer than the chunk size only in the last chunk of ``limit``)."""
        return self.chunk if self.limit is None else max(0, min(self.chunk, self.limit - c * self.chunk))

    def path(self, c: int, rows: int | None = None) -> str:
        part = "" if rows is None or rows == self.chunk else f"-k{rows}"
        return os.path.join(self.dir, f"chunk-{int(c):07d}{part}.npy")

    def rows(self, c: int) -> np.ndarray:
        """int32 [extent(c), width]: the rows of chunk ``c`` (loaded, or built under the lock)."""
        with self._mutex:
            got = self._cache.get(c)
            if got is not None:
                self._cache.move_to_end(c)
                return got
        need = self.extent(c)
        if need <= 0:
            raise IndexError(f"chunk {c} is beyond the {self.limit} scenes of this data")
        arr = self._load_or_build(c, need)[:need]
        with self._mutex:
            self._cache[c] = arr
            while len(self._cache) > self.keep:
                self._cache.popitem(last=False)
        return arr

    def _existing(self, c: int, need: int) -> str | None:
        """A file holding at least the first ``need`` rows of chunk ``c``: the full chunk or a longer part."""
        if os.path.exists(self.path(c)):
            return self.path(c)
        best = None
        prefix = f"chunk-{int(c):07d}-k"
        for name in os.listdir(self.dir) if os.path.isdir(self.dir) else ():
            if name.startswith(prefix) and name.endswith(".npy"):
                k = int(name[len(prefix):-4])
                if k >= need and (best is None or k < best):
                    best = k
        return None if best is None else self.path(c, best)

    def _load_or_build(self, c: int, need: int) -> np.ndarray:
        path = self._existing(c, need)
        if path is None:
            with self.file_lock(os.path.join(self.dir, f"chunk-{int(c):07d}.lock")):
                path = self._existing(c, need)
                if path is None:
                    arr = self.build(c, need)
                    buf = io.BytesIO()
                    np.save(buf, arr, allow_pickle=False)
                    rundir.write_bytes(self.path(c, need), buf.getvalue())
                    return arr
        return np.load(path, allow_pickle=False)

    def build(self, c: int, rows: int) -> np.ndarray:
        """The rows of chunk ``c`` for scenes ``[c * C, c * C + rows)``: render, tokenise, pack."""
        start = c * self.chunk
        out = np.zeros((rows, self.layout.width), np.int32)
        for s in range(0, rows, BUILD_BATCH):  # bounded memory (the codebook searches hold a batch's patches)
            n = min(BUILD_BATCH, rows - s)
            recs = [scene_record(render_scene(self.seed, i, self.image_size), i)
                    for i in range(start + s, start + s + n)]
            arrays = tokenize_records(recs, self.tokenizers, self.layout.sizes, self.image_size)
            for key, col in self.layout.cols.items():
                out[s:s + n, col] = arrays[key]
        return out

    def gather(self, indices, names=None) -> dict:
        """Token arrays (``name`` [N, size], ``name_len`` [N]) of the scenes ``indices``, in their order;
        ``names``: the modalities to return (default: every registered one)."""
        idx = np.asarray(indices, np.int64).reshape(-1)
        names = [m.name for m in modalities.registered()] if names is None else list(names)
        lay = self.layout
        out = {}
        for n in names:
            out[n] = np.zeros((len(idx), lay.sizes[n]), np.int32)
            out[n + "_len"] = np.zeros(len(idx), np.int32)
        c = idx // self.chunk
        for k in np.unique(c):
            sel = np.nonzero(c == k)[0]
            rows = self.rows(int(k))[idx[sel] - k * self.chunk]
            for n in names:
                out[n][sel] = rows[:, lay.cols[n]]
                out[n + "_len"][sel] = rows[:, lay.cols[n + "_len"]]
        return out

    def prefix(self, n: int) -> tuple[dict, dict]:
        """(token arrays of every registered modality with their flags, statistics) of scenes ``[0, n)``."""
        parts = []
        for c in range(-(-int(n) // self.chunk)):
            parts.append(self.rows(c)[: int(n) - c * self.chunk])
        rows = np.concatenate(parts) if parts else np.zeros((0, self.layout.width), np.int32)
        arrays = {key: rows[:, col] for key, col in self.layout.cols.items()}
        return arrays, stats_of(arrays)
