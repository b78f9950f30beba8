"""The synthetic training stream: unbounded by default, chunked token caches built on demand, a fixed-size set as
its prefix, the iterator's state restoring bit-exactly, and the run record's unique examples and epochs."""

import glob
import json
import os
import pathlib

import numpy as np
import pytest

from medscale.configs import load_config, spec_from_config
from medscale.data import stream as scene_stream
from medscale.data.pipeline import build_data, index_dataset, stream_dataset, unique_examples
from medscale.data.synthetic import HELDOUT_BASE, render_scene
from medscale.errors import UserError

CHUNK = 32
SMALL = ["data.num_eval=16", "data.tokenizer_examples=64", "data.vq_iters=2", "data.image_vocab=16",
         "data.seg_vocab=16", f"data.stream_chunk={CHUNK}"]


def make(root, *extra):
    cfg = load_config("tiny", [f"data.data_dir={root}", *SMALL, *extra])
    return build_data(cfg, spec_from_config(cfg))


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make(tmp_path_factory.mktemp("s"))


def same(a, b):
    return set(a) == set(b) and all(np.array_equal(a[k], b[k]) for k in a)


def test_unbounded_by_default_and_held_out_beyond_the_stream(data):
    assert data.num_train is None and data.stream.limit is None
    assert len(data.examples("train")) == HELDOUT_BASE
    val = data.examples("validation")
    assert sorted(val[i]["index"] for i in range(len(val))) == list(range(HELDOUT_BASE, HELDOUT_BASE + 16))
    e = data.examples("train")[5]
    s = render_scene(0, 5, 64)
    assert e["caption"] == s["caption"] and np.array_equal(e["image"], s["image"]) and e["index"] == 5


def test_positions_visit_distinct_scenes_chunk_by_chunk():
    m = 5 * CHUNK + 7
    idx = scene_stream.stream_order(np.arange(m), seed=3, chunk=CHUNK)
    assert len(set(idx.tolist())) == m  # no repetition
    assert idx.max() < 6 * CHUNK and set(idx[: 5 * CHUNK].tolist()) == set(range(5 * CHUNK))
    assert not np.array_equal(idx, scene_stream.stream_order(np.arange(m), seed=4, chunk=CHUNK))  # seeded order
    # shards read disjoint positions of one stream
    pos = [np.concatenate([stream_dataset(4, s, 2)[i] for i in range(20)]) for s in range(2)]
    assert not set(pos[0].tolist()) & set(pos[1].tolist())
    assert set(pos[0].tolist()) | set(pos[1].tolist()) == set(range(160))


def test_stream_tokens_are_the_scenes_tokens(data):
    idx = np.array([0, 31, 32, 70, 5, 100])  # across four chunks, out of order
    got = data.stream.gather(idx)
    recs = [scene_stream.scene_record(render_scene(0, int(i), 64), int(i)) for i in idx]
    want = scene_stream.tokenize_records(recs, data.tokenizers, data.stream.layout.sizes, 64)
    for m in data.registry:
        assert np.array_equal(got[m.name], want[m.name]) and np.array_equal(got[m.name + "_len"],
                                                                            want[m.name + "_len"])
    assert got["caption_len"].min() > 0


def test_iterator_reads_each_scene_once_and_restores_bit_exactly(data):
    it = data.iterator("train", 8, seed=1, shard_index=0, shard_count=1)
    for _ in range(6):  # past the first chunk boundary (4 batches of 8 per chunk)
        next(it)
    state = json.loads(json.dumps(it.get_state()))
    assert state["examples"] == 0 and state["chunk"] == CHUNK
    want = [next(it) for _ in range(3)]
    fresh = data.iterator("train", 8, seed=1, shard_index=0, shard_count=1)
    fresh.set_state(state)
    assert all(same(w, next(fresh)) for w in want)
    # a fresh process's view: another Data over the same cache gives the same batches
    again = make(data.root)
    assert again.tokenizers.hash == data.tokenizers.hash
    other = again.iterator("train", 8, seed=1, shard_index=0, shard_count=1)
    other.set_state(state)
    assert all(same(w, next(other)) for w in want)
    fixed = make(data.root, "data.num_train=64").iterator("train", 8, seed=1, shard_index=0, shard_count=1)
    with pytest.raises(UserError):
        fixed.set_state(state)


def test_chunks_grow_on_demand_and_are_deterministic_bytes(data, tmp_path):
    data.stream.gather([3 * CHUNK + 1])
    files = sorted(os.path.basename(f) for f in glob.glob(os.path.join(data.stream.dir, "chunk-*.npy")))
    assert "chunk-0000003.npy" in files
    other = make(tmp_path)  # built from scratch elsewhere: same tokenizers, same chunk bytes
    assert other.tokenizers.hash == data.tokenizers.hash
    other.stream.gather([3 * CHUNK])
    a, b = (pathlib.Path(d, "chunk-0000003.npy").read_bytes() for d in (data.stream.dir, other.stream.dir))
    assert a == b


def test_fixed_size_set_is_the_streams_prefix_and_cycles(data):
    n = 48  # a chunk and a half: the second chunk is built only as far as n
    fixed = make(data.root, f"data.num_train={n}", "data.tokenizer_examples=32")
    toks = fixed.tokens("train")
    assert len(toks["caption"]) == n and fixed.stats["train"]["examples"] == n
    assert os.path.exists(fixed.stream.path(1, n - CHUNK)) and not os.path.exists(fixed.stream.path(1))
    # the unbounded stream with the same tokenizers builds its full second chunk; the first n rows agree
    unbounded = make(data.root, "data.tokenizer_examples=32")
    assert unbounded.tokenizers.hash == fixed.tokenizers.hash and unbounded.stream.dir == fixed.stream.dir
    assert same(toks, unbounded.stream.gather(np.arange(n), [m.name for m in fixed.registry]))
    assert os.path.exists(fixed.stream.path(1))
    # tokenizers learn from the first min(tokenizer_examples, num_train) scenes: a set at least that large
    # shares the unbounded stream's tokenizers and token cache
    assert make(data.root, "data.num_train=96").tokenizers.hash == data.tokenizers.hash
    assert make(data.root, "data.num_train=40").tokenizers.hash != data.tokenizers.hash
    it = fixed.iterator("train", 8, seed=2, shard_index=0, shard_count=1)
    got = [next(it) for _ in range(8)]  # 64 examples: one epoch of 48 and a third
    ds = index_dataset(n, 8, 2, 0, 1)
    seen = np.concatenate([ds[i] for i in range(8)])
    assert len(set(seen[:n].tolist())) == n and seen.max() < n
    assert unique_examples(n, 64) == n == len(set(seen.tolist()))
    masked = fixed.masker(fixed.stream.gather(seen[:8], [m.name for m in fixed.registry]),
                          np.random.default_rng([2, 0, 0, 0x3D]))
    assert same(masked, got[0])


def test_unique_examples_and_epochs_in_the_record(data):
    rec = data.record(16 * 300)
    assert rec == {"source": "synthetic", "unique_examples": 4800, "epochs": 1.0,
                   "caption_entropy_floor": None}
    fixed = make(data.root, "data.num_train=64")
    rec = fixed.record(16 * 30, caption_floor=0.03)
    assert rec["unique_examples"] == 64 and rec["epochs"] == pytest.approx(480 / 64)
    assert rec["caption_entropy_floor"] == 0.03
    # sharded: each shard's own share; 3 shards of 64 examples hold 22, 21, 21
    assert unique_examples(64, 3 * 10, 3) == 30 and unique_examples(64, 3 * 25, 3) == 22 + 21 + 21
    assert unique_examples(None, 10**9, 8) == 10**9
    for s in range(3):
        ds = index_dataset(64, 5, 0, s, 3)
        assert len(set(np.concatenate([ds[i] for i in range(5)]).tolist())) == min(len(range(s, 64, 3)), 25)


def test_bad_stream_settings_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="num_train"):
        make(tmp_path, "data.num_train=-1")
    with pytest.raises(UserError, match="stream_chunk"):
        make(tmp_path, "data.stream_chunk=0")


def test_a_chunk_built_in_batches_is_the_same(data, monkeypatch):
    whole = data.stream.build(5, CHUNK)
    monkeypatch.setattr(scene_stream, "BUILD_BATCH", 7)  # 32 rows in batches of 7: the last one short
    assert np.array_equal(data.stream.build(5, CHUNK), whole)
    assert np.array_equal(data.stream.build(5, 10), whole[:10])


@pytest.mark.parametrize("size", [64, 128, 224])
def test_base_configs_make_their_builder(tmp_path, size):
    from medscale.data.pipeline import make_builder

    cfg = load_config("base", [f"data.image_size={size}"])
    b = make_builder(cfg.data, str(tmp_path))  # no clash with a listed config of the same name
    assert b.builder_config.name == f"s{size}_e512_seed0"
