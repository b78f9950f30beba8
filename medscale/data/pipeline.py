"""The input pipeline: TFDS dataset (ArrayRecord, ``tfds.data_source``) -> tokens (cached) -> grain -> 4M batches.

    data = build_data(cfg, spec)
    it = data.iterator("train", batch_size, seed)        # endless, deterministic, sharded by process
    batch = next(it)                                     # numpy dict per medscale/data/batch.py
    state = it.get_state(); it.set_state(state)          # JSON-serialisable
    data.eval_batches("validation", batch_size, n)       # fixed masking seed
    data.examples("validation")[i]                       # raw: image, caption, boxes, mask, facts

Everything built is cached under ``cfg.data.data_dir`` (default ``~/.cache/medscale``): ``tfds/`` (the dataset),
``tokenizers/<dataset>/`` (artifacts named by their settings, holding their content hash) and
``tokens/<dataset>/<split>-<tokenizers hash>.npz``. Each is built under a file lock and written to a temporary
name then renamed, so concurrent processes build it once and never read half a file.

Synthetic data (``synthetic_med``) trains on a stream of scenes ``0, 1, 2, ...`` tokenised in chunks that grow on
demand (``medscale.data.stream``; ``tokens/synthetic_med_s<S>_seed<seed>/train-<hash>-...-x<chunk>/``):
``data.num_train = 0`` (the default) reads it without end, never repeating a scene; ``data.num_train = n`` cycles
over its first ``n`` scenes. Its held-out splits are TFDS splits of scenes from index ``HELDOUT_BASE`` on.
"""

from __future__ import annotations

import contextlib
import fcntl
import io
import json
import logging
import os
import sys

import numpy as np

from medscale import modalities, rundir
from medscale.configs import spec_from_config
from medscale.data import entropy, real
from medscale.data import stream as scene_stream
from medscale.data.builders import VERSION as SYNTHETIC_VERSION
from medscale.data.builders import SyntheticMed, SyntheticMedConfig
from medscale.data.masking import Masker, refit_inputs
from medscale.data.registry import Tokenizers, build_registry, tokenizer_order
from medscale.data.synthetic import HELDOUT_BASE
from medscale.errors import UserError

log = logging.getLogger(__name__)

DATASETS = ("synthetic_med", "roco", "rocov2", "medmnist", "vqa_rad", "slake")
SPLITS = ("train", "validation", "test")
EVAL_MASK_SEED = 20240611


def cache_root(dcfg) -> str:
    root = dcfg.get("data_dir", "") or os.path.join(os.path.expanduser("~"), ".cache", "medscale")
    return os.path.abspath(root)


@contextlib.contextmanager
def file_lock(path: str):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "a+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


@contextlib.contextmanager
def _quiet_absl():
    """TFDS warns through absl about every config not listed in BUILDER_CONFIGS; ours are made on the fly."""
    lg = logging.getLogger("absl")
    old = lg.level
    lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        lg.setLevel(old)


def make_builder(dcfg, root: str):
    """The TFDS builder a data config names (not yet prepared)."""
    with _quiet_absl():
        return _make_builder(dcfg, root)


def _make_builder(dcfg, root: str):
    name = dcfg.dataset
    tfds_dir = os.path.join(root, "tfds")
    if name == "synthetic_med":
        cfg = SyntheticMedConfig(image_size=int(dcfg.image_size), num_eval=int(dcfg.num_eval),
                                 seed=int(dcfg.get("data_seed", 0)))
        return SyntheticMed(config=cfg, data_dir=tfds_dir, file_format="array_record")
    if name in ("roco", "rocov2", "medmnist", "vqa_rad", "slake"):
        return real.make_real_builder(name, dcfg, tfds_dir)
    raise UserError(f"unknown data.dataset {name!r}; choose one of {', '.join(DATASETS)}")


def prepare_builder(builder, root: str, progress: bool = False):
    import tensorflow_datasets as tfds

    key = f"{builder.name}-{builder.builder_config.name}".replace("/", "_")
    with file_lock(os.path.join(root, "locks", key + ".lock")):
        if not os.path.exists(os.path.join(str(builder.data_path), "dataset_info.json")):
            log.info("preparing %s/%s in %s", builder.name, builder.builder_config.name, builder.data_dir)
            tfds.display_progress_bar(bool(progress))
            # TFDS prints its banners on stdout; stdout belongs to the CLI's results (--json), so send them to
            # stderr with the progress bars, or nowhere when quiet
            sink = sys.stderr if progress else open(os.devnull, "w")  # noqa: SIM115
            try:
                with contextlib.redirect_stdout(sink):
                    builder.download_and_prepare(file_format="array_record")
            finally:
                tfds.display_progress_bar(True)
                if sink is not sys.stderr:
                    sink.close()
    # a fresh builder reads the finished dataset's info (this one may predate another process's build)
    with _quiet_absl():
        return type(builder)(config=builder.builder_config, data_dir=os.path.dirname(os.path.dirname(
            os.path.dirname(str(builder.data_path)))), file_format="array_record")


def _decode_example(rec: dict) -> dict:
    def s(x):
        return x.decode("utf-8", errors="replace") if isinstance(x, bytes) else str(x)

    labels = s(rec["box_labels"]).split("|") if s(rec["box_labels"]) else []
    boxes = [(lab, *map(float, b)) for lab, b in zip(labels, np.asarray(rec["boxes"]).reshape(-1, 4))]
    out = {"image": np.asarray(rec["image"])[..., 0], "mask": np.asarray(rec["mask"])[..., 0]
           if bool(rec["has_mask"]) else None, "caption": s(rec["caption"]), "boxes": boxes,
           "facts": json.loads(s(rec["facts"]) or "{}"), "id": s(rec["id"]), "index": int(rec["index"]),
           "meta": json.loads(s(rec["meta"]) or "{}") if "meta" in rec else {}}
    for key in rec.keys() - out.keys() - {"has_mask", "box_labels"}:  # a builder's further features, as they are
        v = rec[key]  # (text as str; a one-channel image as [H, W]), for the modalities that read them
        a = np.asarray(v)
        out[key] = s(v) if isinstance(v, (bytes, str)) else a[..., 0] if a.ndim == 3 and a.shape[-1] == 1 else a
    return out


class Examples:
    """Raw random access to a split: ``examples[i]`` -> dict(image uint8 HxW, mask uint8 HxW | None, caption,
    boxes [(cls, x0, y0, x1, y1)] pixels, facts (synthetic findings, else {}), meta (source info), id, index)."""

    def __init__(self, source):
        self.source = source

    def __len__(self):
        return len(self.source)

    def __getitem__(self, i):
        if not -len(self) <= i < len(self):
            raise IndexError(i)
        return _decode_example(self.source[int(i) % len(self)])

    def __iter__(self):
        for i in range(len(self)):
            yield self[i]


def _holds(path: str, sizes: dict) -> bool:
    """Whether the token cache ``path`` holds an array of every modality in ``sizes``."""
    with np.load(path) as z:
        return all(name in z.files and name + "_len" in z.files for name in sizes)


def _count(arrays: dict) -> int:
    return len(next(iter(arrays.values())))


def index_dataset(n: int, batch_size: int, seed: int, shard_index: int, shard_count: int):
    """grain: this shard's example indices (``shard_index::shard_count``), shuffled per epoch with ``seed``,
    endless, in batches of ``batch_size`` index arrays (the token arrays are gathered per batch, vectorised)."""
    import grain

    ds = grain.MapDataset.range(n)[shard_index::shard_count]
    return ds.shuffle(seed=int(seed)).repeat(None).batch(batch_size, drop_remainder=True)


def stream_dataset(batch_size: int, shard_index: int, shard_count: int):
    """grain: this shard's positions in the unbounded stream (``shard_index::shard_count`` of ``0, 1, 2, ...``),
    in batches of ``batch_size``; ``stream.stream_order`` turns positions into scene indices."""
    import grain

    ds = grain.MapDataset.range(HELDOUT_BASE)[shard_index::shard_count]
    return ds.batch(batch_size, drop_remainder=True)


def unique_examples(n: int | None, seen: int, shard_count: int = 1) -> int:
    """Distinct examples among the first ``seen`` (all shards together, ``seen / shard_count`` each) that the
    iterators of ``shard_count`` shards give: all of them on the unbounded stream (``n`` None), else per shard
    the smaller of its share of the ``n`` examples and what it read (an epoch visits each example once)."""
    if n is None:
        return int(seen)
    per = int(seen) // int(shard_count)
    return sum(min(len(range(s, int(n), int(shard_count))), per) for s in range(int(shard_count)))


class DataIterator:
    """Endless deterministic batches; ``get_state()`` / ``set_state()`` (JSON-serialisable)."""

    def __init__(self, data: Data, split: str, batch_size: int, seed: int, shard_index: int,
                 shard_count: int, num_threads: int = 1, prefetch: int = 4):
        import grain

        stream = data.stream if data._split(split) == "train" else None
        if stream is None:
            tokens = data.tokens(split)
            n = _count(tokens)

            def gather(idx):
                return {k: v[idx] for k, v in tokens.items()}
        else:
            n = stream.limit  # None: the unbounded stream
            names = [m.name for m in data.registry]

            def gather(idx):
                return stream.gather(idx, names)
        if not 0 <= shard_index < shard_count:
            raise UserError(f"shard_index {shard_index} must be in [0, shard_count={shard_count})")
        if n is not None and n // shard_count == 0:
            raise UserError(f"split {split!r} has {n} examples: too few for {shard_count} shards")
        if batch_size <= 0:
            raise UserError(f"batch_size must be positive, got {batch_size}")
        self.ident = {"split": split, "batch_size": int(batch_size), "seed": int(seed),
                      "shard_index": int(shard_index), "shard_count": int(shard_count),
                      "tokens": data.tokenizers.hash}
        if stream is not None:
            self.ident.update(examples=n or 0, chunk=stream.chunk)
        masker = data.masker
        order = (lambda pos: scene_stream.stream_order(pos, seed, stream.chunk)) if n is None else (lambda i: i)

        def gather_and_mask(i, idx):
            return masker(gather(order(idx)), np.random.default_rng([int(seed), int(shard_index), int(i), 0x3D]))

        if n is None:
            ds = stream_dataset(batch_size, shard_index, shard_count)
        else:
            ds = index_dataset(n, batch_size, seed, shard_index, shard_count)
        ds = ds.map_with_index(gather_and_mask)
        # one background thread keeps a few batches ready (masking is Python; the trainer's device work
        # releases the GIL); grain's default (16 threads, 500 elements ahead) would mask hundreds of batches
        # up front and compete with the trainer for the CPU
        opts = grain.ReadOptions(num_threads=int(num_threads), prefetch_buffer_size=int(prefetch))
        self._it = iter(ds.to_iter_dataset(opts))

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        return next(self._it)

    def get_state(self) -> dict:
        return dict(self.ident, grain=self._it.get_state())

    def set_state(self, state: dict) -> None:
        state = json.loads(json.dumps(state))
        mine = {k: state.get(k) for k in self.ident}
        if mine != self.ident:
            raise UserError(f"data iterator state is for {mine}, this iterator is {self.ident}")
        self._it.set_state(state["grain"])


class Data:
    """A prepared dataset with its tokenizers, registry, token caches and masker (see the module docstring)."""

    def __init__(self, cfg, spec, progress: bool = False):
        self.cfg, self.spec, self.dcfg = cfg, spec, cfg.data
        self.progress = bool(progress)
        self.root = cache_root(self.dcfg)
        self.builder = prepare_builder(make_builder(self.dcfg, self.root), self.root, progress)
        self.key = f"{self.builder.name}/{self.builder.builder_config.name}/{self.builder.version}"
        self.image_size = int(self.dcfg.image_size)
        self.synthetic = self.dcfg.dataset == "synthetic_med"
        num_train = self.dcfg.get("num_train") or 0
        if int(num_train) < 0:
            raise UserError(f"data.num_train must be >= 0 (0: the unbounded synthetic stream), not {num_train}")
        self.num_train = int(num_train) or None  # synthetic: None = the unbounded stream
        self.stream_chunk = int(self.dcfg.get("stream_chunk", 4096))
        if self.stream_chunk <= 0:
            raise UserError(f"data.stream_chunk must be positive, not {self.stream_chunk}")
        # tokenizers and the training stream depend on the scenes, not on the held-out splits' size
        self.stream_key = (f"synthetic_med/s{self.image_size}_seed{int(self.dcfg.get('data_seed', 0))}/"
                           f"{SYNTHETIC_VERSION}") if self.synthetic else self.key
        self._sources, self._tokens = {}, {}
        self.stats: dict = {}
        skipped = self.builder.info.metadata.get("skipped") if self.builder.info.metadata else None
        if skipped:
            self.stats["skipped"] = dict(skipped)
            log.warning("dataset %s skipped examples when it was built: %s", self.key, skipped)
        self.tokenizers = self._tokenizers()
        self.registry = build_registry(spec, self.tokenizers)
        self.stream = None
        if self.synthetic:
            directory = os.path.join(self.root, "tokens", self.stream_key.replace("/", "_"),
                                     f"train-{self._tokens_key()}-x{self.stream_chunk}")
            self.stream = scene_stream.TokenStream(directory, int(self.dcfg.get("data_seed", 0)), self.image_size,
                                                   self.stream_chunk, self.tokenizers, self._sizes(), file_lock,
                                                   limit=self.num_train)
        self._floors: dict = {}
        self.masker = Masker([(m.name, m.kind, m.max_tokens) for m in self.registry], spec.enc_len, spec.dec_len,
                             roles={m.name: m.entry.role for m in self.registry},
                             given={m.name: m.entry.given for m in self.registry if m.entry.given},
                             alpha=float(self.dcfg.dirichlet_alpha), mixture=self.dcfg.mixture,
                             num_sentinels=int(self.dcfg.get("num_sentinels", 16)), sentinel_base=4,
                             enc_caps=spec.encoder_split if (spec.enc_split or spec.encoder != "unified") else None)
        grid = (self.image_size // int(self.dcfg.patch_size)) ** 2
        for m in self.registry:
            if m.kind == "image" and m.max_tokens != grid:
                raise UserError(f"modality {m.name!r} has {m.max_tokens} tokens but data.image_size "
                                f"{self.image_size} / data.patch_size {self.dcfg.patch_size} gives {grid} patches")
        capacity = sum(m.max_tokens for m in self.registry)  # positions stay below max_tokens
        for side, L in (("enc_len", spec.enc_len), ("dec_len", spec.dec_len)):
            if L > capacity:
                raise UserError(f"data.{side} {L} exceeds the {capacity} tokens an example of modalities "
                                f"{', '.join(m.name for m in self.registry)} can hold; lower data.{side}")

    # ------------------------------------------------------------------ raw access
    def source(self, split: str):
        split = self._split(split)
        if split not in self._sources:
            if self.synthetic and split == "train":  # rendered on access
                self._sources[split] = scene_stream.SceneExamples(int(self.dcfg.get("data_seed", 0)),
                                                                  self.image_size, self.num_train or HELDOUT_BASE)
            else:
                self._sources[split] = self.builder.as_data_source(split=split)
        return self._sources[split]

    @property
    def splits(self) -> list[str]:
        """The dataset's splits (synthetic: the training stream ``train`` and the held-out TFDS splits)."""
        names = list(self.builder.info.splits.keys())
        return ["train", *names] if self.synthetic and "train" not in names else names

    def _split(self, split: str) -> str:
        names = self.splits
        if split not in names:
            raise UserError(f"split {split!r} not in dataset {self.key}; splits: {', '.join(names)}")
        return split

    def examples(self, split: str) -> Examples:
        src = self.source(split)
        return src if isinstance(src, scene_stream.SceneExamples) else Examples(src)

    # ------------------------------------------------------------------ tokenizers
    def _artifact(self, name: str) -> str:
        return os.path.join(self.root, "tokenizers", self.stream_key.replace("/", "_"), name)

    def _train_examples(self, limit: int):
        if self.synthetic:  # the stream's first scenes (a fixed-size set's own when it is smaller)
            ex = self.examples("train")
            return [ex[i] for i in range(min(limit, len(ex)))]
        ex = self.examples("train")
        idx = np.linspace(0, len(ex) - 1, num=min(limit, len(ex))).astype(int)
        return [ex[i] for i in np.unique(idx)]

    def _tokenizers(self):
        """Every registered modality's tokenizer (one per tokenizer name), trained on first use."""
        d = self.dcfg
        groups: dict = {}  # tokenizer name -> (class, vocabulary, artifact path, modalities sharing it)
        for m in modalities.registered():
            if m.tokenizer_name not in groups:
                cls = modalities.resolve(m.tokenizer)
                vocab = int(d.get(m.vocab[0], m.vocab[1]))
                groups[m.tokenizer_name] = (cls, vocab, self._artifact(cls.artifact(d, vocab)), [])
            groups[m.tokenizer_name][3].append(m)
        limit = int(d.get("tokenizer_examples", 2000))
        with file_lock(self._artifact("build.lock")):
            missing = [g for g in groups.values() if not os.path.exists(g[2])]
            if missing:
                train = self._train_examples(limit)
            for cls, vocab, path, mods in missing:
                values = {m.name: [v for v in map(m.value, train) if v is not None] for m in mods}
                tok = cls.train(values, d, vocab)
                if tok is not None:  # None: the data holds nothing to learn it from (no masks in real data)
                    tok.save(path)
        return Tokenizers({name: groups[name][0].load(groups[name][2]) if os.path.exists(groups[name][2])
                           else None for name in tokenizer_order()})

    # ------------------------------------------------------------------ token cache
    def tokens(self, split: str) -> dict:
        """Token arrays of a split (cached on disk, keyed by the tokenizers' hash and the sequences' lengths):
        per modality ``name`` [N, max_tokens] int32 and ``name_len`` [N]. Every registered modality is
        tokenised once; a run reads those of its spec."""
        split = self._split(split)
        if split in self._tokens:
            return self._tokens[split]
        sizes = self._sizes()
        wanted = {m.name for m in self.registry}
        if split == "train" and self.stream is not None:
            arrays, self.stats[split] = self.stream.prefix(self.num_train or self.stream_chunk)
            self._tokens[split] = {k: v for k, v in arrays.items() if k.removesuffix("_len") in wanted}
            return self._tokens[split]
        key = self._tokens_key()
        path = os.path.join(self.root, "tokens", self.key.replace("/", "_"), f"{split}-{key}.npz")
        with file_lock(path + ".lock"):
            if not os.path.exists(path) or not _holds(path, sizes):  # the key names sequences by first letter
                arrays, stats = self._tokenize(split, sizes)
                buf = io.BytesIO()
                np.savez(buf, stats=json.dumps(stats), **arrays)
                rundir.write_bytes(path, buf.getvalue())
        with np.load(path) as z:
            arrays = {k: z[k] for k in z.files if k != "stats"}
            self.stats[split] = json.loads(str(z["stats"]))
        if self.stats[split].get("truncated_caption") or self.stats[split].get("empty_caption"):
            log.info("tokens %s: %s", split, self.stats[split])
        arrays = {k: v for k, v in arrays.items() if k.removesuffix("_len") in wanted}
        self._tokens[split] = arrays
        return arrays

    def tokens_of(self, split: str, indices) -> dict:
        """Token arrays (``name``, ``name_len``) of the examples ``indices`` of ``split`` (on the synthetic
        stream: any scene, its chunk built if need be)."""
        idx = np.asarray(indices, np.int64)
        if self._split(split) == "train" and self.stream is not None:
            return self.stream.gather(idx, [m.name for m in self.registry])
        return {k: v[idx] for k, v in self.tokens(split).items()}

    def _tokens_key(self) -> str:
        """The token caches' key: the tokenizers' hash and the sequences' lengths (``HASH-c64-b32-v2``)."""
        sizes = self._sizes()
        lengths = "-".join(f"{m.name[0]}{sizes[m.name]}" for m in modalities.registered() if m.kind == "sequence")
        return f"{self.tokenizers.hash}-{lengths}-v2"

    def _sizes(self) -> dict:
        """Tokens per example of every registered modality (image-like: the patch grid)."""
        G = (self.image_size // int(self.dcfg.patch_size)) ** 2
        return {m.name: G if m.kind == "image" else int(self.dcfg.get(*m.max_tokens))
                for m in modalities.registered()}

    def _tokenize(self, split: str, sizes: dict):
        ex = self.examples(split)
        n = len(ex)
        chunk = 1024
        from tqdm import tqdm

        parts = []
        bar = tqdm(total=n, desc=f"tokenizing {split}", unit="ex", disable=not self.progress, file=sys.stderr)
        for s in range(0, n, chunk):
            bar.update(min(chunk, n - s))
            parts.append(scene_stream.tokenize_records([ex[i] for i in range(s, min(n, s + chunk))],
                                                       self.tokenizers, sizes, self.image_size))
        bar.close()
        if not parts:
            parts.append(scene_stream.tokenize_records([], self.tokenizers, sizes, self.image_size))
        flags = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
        stats = scene_stream.stats_of(flags)
        out = {k: v for k, v in flags.items() if not k.endswith(("_absent", "_truncated"))}
        return out, stats

    # ------------------------------------------------------------------ batches
    def iterator(self, split: str = "train", batch_size: int = 16, seed: int = 0, shard_index: int | None = None,
                 shard_count: int | None = None, num_threads: int = 1, prefetch: int = 4) -> DataIterator:
        """Endless batches of ``split`` in a seeded order, masked per batch with a seeded generator.
        ``shard_index``/``shard_count`` default to ``jax.process_index()``/``jax.process_count()``;
        ``num_threads``/``prefetch``: grain's background reading (0 threads: synchronous)."""
        if shard_index is None or shard_count is None:
            import jax

            shard_index, shard_count = jax.process_index(), jax.process_count()
        return DataIterator(self, split, batch_size, seed, shard_index, shard_count, num_threads, prefetch)

    def eval_batches(self, split: str = "validation", batch_size: int = 16, num_batches: int = 4,
                     seed: int = EVAL_MASK_SEED) -> list[dict]:
        """The first ``num_batches * batch_size`` examples (wrapping around), masked with a fixed seed."""
        arrays = self.tokens(split)
        n = _count(arrays)
        out = []
        for b in range(num_batches):
            idx = np.arange(b * batch_size, (b + 1) * batch_size) % n
            out.append(self.masker({k: v[idx] for k, v in arrays.items()}, np.random.default_rng([seed, b])))
        return out

    def fixed_eval_batches(self, ref_enc_len: int, split: str = "validation", batch_size: int = 16,
                           num_batches: int = 4, seed: int = EVAL_MASK_SEED) -> list[dict]:
        """The length-independent evaluation set: the batches :meth:`eval_batches` would give with encoder
        length ``ref_enc_len`` (same examples, same seeded masking, so the same decoder targets at any encoder
        length of the run), their inputs refitted to this run's encoder length
        (``medscale.data.masking.refit_inputs``). Runs that share the data config, ``dec_len``, the reference
        length and these arguments are scored on exactly the same targets."""
        capacity = sum(m.max_tokens for m in self.registry)
        if not 0 < int(ref_enc_len) <= capacity:
            raise UserError(f"train.fixed_eval_enc_len {ref_enc_len} must be in 1..{capacity} (the tokens an "
                            "example can hold); set it to the largest encoder length of the study")
        given = {m.name: m.entry.given for m in self.registry if m.entry.given}
        ref = Masker([(m.name, m.kind, m.max_tokens) for m in self.registry], int(ref_enc_len), self.spec.dec_len,
                     roles={m.name: m.entry.role for m in self.registry}, given=given,
                     alpha=float(self.dcfg.dirichlet_alpha), mixture=self.dcfg.mixture,
                     num_sentinels=int(self.dcfg.get("num_sentinels", 16)), sentinel_base=4)
        kinds = [m.kind for m in self.registry]
        arrays = self.tokens(split)
        n = _count(arrays)
        out = []
        for b in range(num_batches):
            idx = np.arange(b * batch_size, (b + 1) * batch_size) % n
            full = ref({k: v[idx] for k, v in arrays.items()}, np.random.default_rng([seed, b]))
            whole = [m.index for m in self.registry if m.name in given.values()]
            out.append(refit_inputs(full, self.spec.enc_len, kinds, np.random.default_rng([seed, b, 1]), whole))
        return out

    def caption_entropy_floor(self, split: str = "validation", batch_size: int = 16, num_batches: int = 4,
                              seed: int = EVAL_MASK_SEED) -> float | None:
        """The caption loss's floor in nats per caption token on the batches :meth:`eval_batches` gives for
        the same arguments (``medscale.data.entropy.masked_floor``; docs/data.md): the grammar's irreducible
        entropy of the targets over their expected tokens. None without synthetic facts or a caption modality."""
        key = (split, int(batch_size), int(num_batches), int(seed))
        if key in self._floors:
            return self._floors[key]
        floor = None
        names = [m.name for m in self.registry]
        if self.synthetic and "caption" in names and self.tokenizers.text is not None:

            arrays, ex = self.tokens(split), self.examples(split)
            n = _count(arrays)
            facts, budgets = [], []
            for b in range(num_batches):
                idx = np.arange(b * batch_size, (b + 1) * batch_size) % n
                self.masker({k: v[idx] for k, v in arrays.items()}, np.random.default_rng([seed, b]), budgets)
                facts.extend(ex[int(i)]["facts"] for i in idx)
            floor = entropy.masked_floor(facts, budgets, self.tokenizers.text, self.modality("caption").max_tokens,
                                         self.masker)
        self._floors[key] = floor
        return floor

    def caption_target_floor(self, split: str = "validation") -> dict | None:
        """The floor of whole captions as targets on ``split`` (``medscale.data.entropy.target_floor``): nats
        per caption, tokens per caption (``</s>`` included) and nats per token. None without synthetic facts."""
        names = [m.name for m in self.registry]
        if not (self.synthetic and "caption" in names and self.tokenizers.text is not None):
            return None

        return entropy.target_floor([e["facts"] for e in self.examples(split)], self.tokenizers.text,
                                    self.modality("caption").max_tokens)

    def record(self, examples_seen: int, shard_count: int = 1, caption_floor: float | None = None) -> dict:
        """A run's data record (its summary's ``data``): the source (``synthetic`` or the dataset's name), the
        distinct training examples among the ``examples_seen`` it read, the epochs (seen / distinct) and the
        caption entropy floor (:meth:`caption_entropy_floor`)."""
        n = self.num_train if self.synthetic else len(self.source("train"))
        unique = unique_examples(n, int(examples_seen), int(shard_count))
        return {"source": "synthetic" if self.synthetic else str(self.dcfg.dataset), "unique_examples": unique,
                "epochs": float(examples_seen) / unique if unique else 0.0, "caption_entropy_floor": caption_floor}

    def task_batch(self, split: str, indices, inputs=("image",), targets=("caption",)) -> dict:
        """A deterministic batch for generation/evaluation: all tokens of ``inputs`` in the encoder, every
        token of ``targets`` in the decoder, for the examples ``indices`` of ``split``."""
        arrays = self.tokens(split)
        idx = np.asarray(indices, int)
        return self.masker.task({k: v[idx] for k, v in arrays.items()}, inputs, targets)

    def modality(self, name: str):
        for m in self.registry:
            if m.name == name:
                return m
        raise UserError(f"unknown modality {name!r}; known: {', '.join(m.name for m in self.registry)}")

    def detokenize(self, name: str, ids) -> object:
        """Local ids of one modality -> a caption (str), boxes ([(cls, x0, y0, x1, y1)] pixels), an image or a
        mask (uint8 HxW; image-like ids must cover the whole grid in position order)."""
        m = self.modality(name)
        if m.tokenizer is None:
            raise UserError(f"dataset {self.key} has no {name} tokenizer (its examples carry no {m.field})")
        return m.entry.decode_ids(m.tokenizer, np.asarray(ids), self.image_size)


def build_data(cfg, spec=None, progress: bool = False) -> Data:
    """Build (or load from cache) the dataset, tokenizers and token caches a config names."""
    if spec is None:
        spec = spec_from_config(cfg)
    return Data(cfg, spec, progress=progress)


def prepare_report(cfg, spec=None, progress: bool = False, held_out: int = 256) -> dict:
    """Build everything a config reads and report it: examples per split, tokenizer hashes and sizes, VQ and
    segmentation reconstruction on held-out examples, token statistics and skipped examples."""
    data = build_data(cfg, spec, progress=progress)
    out = {"dataset": data.key, "cache": data.root, "tokenizers_hash": data.tokenizers.hash}
    splits = data.splits
    out["examples"] = {s: len(data.source(s)) for s in splits}
    if data.stream is not None:  # the synthetic training stream: unbounded, or its first num_train scenes
        out["examples"]["train"] = data.num_train or "unbounded"
        out["stream_chunk"] = data.stream_chunk
    for s in splits:
        data.tokens(s)
    out["token_stats"] = {s: data.stats[s] for s in splits}
    if data.stats.get("skipped"):
        out["skipped"] = data.stats["skipped"]
    tok = data.tokenizers
    out["text_vocab"] = {"configured": tok.text.vocab_size, "trained": tok.text.trained_size,
                         "hash": tok.text.hash}
    if tok.qa is not None:
        out["qa_vocab"] = {"configured": tok.qa.vocab_size, "trained": tok.qa.trained_size, "hash": tok.qa.hash}
    held = "validation" if "validation" in splits else splits[-1]
    ex = data.examples(held)
    sel = [ex[i] for i in range(min(held_out, len(ex)))]
    imgs = np.stack([e["image"] for e in sel])
    out["image_vq"] = {"codes": tok.image.vocab_size, "hash": tok.image.hash,
                       **{k: round(v, 5) for k, v in tok.image.reconstruction(imgs).items()}}
    masks = [e["mask"] for e in sel if e["mask"] is not None]
    if tok.segmentation is not None and masks:
        out["segmentation"] = {"codes": tok.segmentation.vocab_size, "hash": tok.segmentation.hash,
                               **{k: round(v, 5) for k, v in tok.segmentation.reconstruction(
                                   np.stack(masks)).items()}}
    if any(e["facts"].get("lesions") for e in sel):
        out["image_vq"]["lesion_contrast_kept"] = lesion_contrast_kept(tok.image, sel, data.image_size)
    toks = data.tokens("train")
    out["mean_tokens_per_example"] = {m.name: float(np.mean(toks[m.name + "_len"])) for m in data.registry}
    floor = data.caption_target_floor(held)
    if floor is not None:
        out["caption_entropy"] = {k: round(v, 5) for k, v in floor.items()}
    return out


def lesion_contrast_kept(vq, examples, image_size: int) -> dict:
    """Median, per lesion size, of (lesion minus surrounding-ring mean grey level) after VQ round trip divided by
    the same contrast in the original image: how much of a lesion the image tokens still show (synthetic)."""
    ratios: dict = {}
    for e in examples:
        lesions = e["facts"].get("lesions") or []
        if not lesions or e["mask"] is None:
            continue
        img = e["image"].astype(np.float64)
        rec = vq.decode(vq.encode(e["image"]), image_size).astype(np.float64)
        for (_, x0, y0, x1, y1), f in zip(e["boxes"], lesions):
            x0, y0, x1, y1 = int(x0), int(y0), int(x1), int(y1)
            box = np.zeros(img.shape, bool)
            box[y0:y1, x0:x1] = True
            inner = box & (e["mask"] == 3)
            ring = np.zeros(img.shape, bool)
            ring[max(0, y0 - 3):y1 + 3, max(0, x0 - 3):x1 + 3] = True
            ring &= ~box & (e["mask"] >= 1)
            if not inner.any() or not ring.any():
                continue
            c0 = img[inner].mean() - img[ring].mean()
            if abs(c0) > 10:
                ratios.setdefault(f["size"], []).append((rec[inner].mean() - rec[ring].mean()) / c0)
    return {k: round(float(np.median(v)), 3) for k, v in sorted(ratios.items())}
