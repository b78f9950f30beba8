"""The modality registry is the one place a modality is added: one entry plus its tokenizer class (both in this
file) give a config key, a model modality, tokens in the data pipeline, 4M batches and a real training step."""

import hashlib
import io
import json
import math
import os

import numpy as np
import PIL.Image
import pytest

from medscale import modalities
from medscale.configs import load_config, spec_from_config
from medscale.data.pipeline import build_data
from medscale.errors import UserError
from medscale.generate.cli_impl import generate
from medscale.spec import ModalitySpec
from medscale.train.loop import train


class DepthTokenizer:
    """A coarse "depth" map of a synthetic scene (mask class 0..3 as 0, 85, 170, 255: background far, lesion
    near): one id per ``patch x patch`` patch, the patch's mean depth quantised to ``vocab_size`` levels."""

    def __init__(self, vocab_size: int, patch: int):
        self.vocab_size, self.patch = int(vocab_size), int(patch)
        self.hash = hashlib.sha256(f"depth {self.vocab_size} {self.patch}".encode()).hexdigest()[:16]

    @classmethod
    def artifact(cls, dcfg, vocab_size):
        return f"depth_v{vocab_size}_p{int(dcfg.patch_size)}.npz"

    @classmethod
    def train(cls, values, dcfg, vocab_size):
        return cls(vocab_size, int(dcfg.patch_size)) if any(values.values()) else None

    def save(self, path):
        with open(path, "wb") as f:
            f.write(json.dumps({"vocab_size": self.vocab_size, "patch": self.patch}).encode())

    @classmethod
    def load(cls, path):
        with open(path, "rb") as f:
            return cls(**json.load(io.BytesIO(f.read())))

    def encode(self, maps):
        x = np.asarray(maps, np.float64)
        n, s, p = x.shape[0], x.shape[1], self.patch
        means = x.reshape(n, s // p, p, s // p, p).mean((2, 4)).reshape(n, -1)
        return np.minimum(means * self.vocab_size / 256.0, self.vocab_size - 1).astype(np.int32)

    def decode(self, ids, image_size):
        g = image_size // self.patch
        levels = (np.asarray(ids, np.float64).reshape(g, g) + 0.5) * 256.0 / self.vocab_size
        return np.kron(levels, np.ones((self.patch, self.patch))).astype(np.uint8)


def _depth(example):
    mask = example.get("mask")
    return None if mask is None else (np.asarray(mask, np.int64) * 85).astype(np.uint8)


# the one place: a registry entry (config key data.depth_vocab, default 16; read from the scene's mask)
DEPTH = modalities.Modality("depth", "image", vocab=("depth_vocab", 16), tokenizer=DepthTokenizer, read=_depth)


def _cfg(root, *extra):
    return load_config("tiny", [f"data.data_dir={root}", "data.num_train=48", "data.num_eval=8",
                                "data.tokenizer_examples=48", "data.vq_iters=2", "train.batch_size=8",
                                "train.steps=1", "train.task_eval_examples=0", "train.eval_batches=1", *extra])


@pytest.fixture(scope="module")
def depth_run(tmp_path_factory):
    """(config, run directory) of one training step with the depth modality registered for that time only."""
    root = tmp_path_factory.mktemp("depth")
    with modalities.extended(DEPTH):
        cfg = _cfg(root / "cache", "data.modalities=('image', 'caption', 'depth')", "data.depth_vocab=12",
                   "data.mixture='image2all:1'")
        summary = train(cfg, str(root / "run"), progress=False)
    return cfg, str(root / "run"), summary


def test_a_modality_added_in_one_place_trains_a_step(depth_run):
    cfg, run, summary = depth_run
    assert "depth" not in modalities.names() and "depth_vocab" not in load_config("tiny").data
    with modalities.extended(DEPTH):
        spec = spec_from_config(cfg)
        assert spec.modalities[-1] == ModalitySpec("depth", "image", 12, 64, (8, 8))
        assert [m.name for m in spec.modalities] == ["image", "caption", "depth"]
        data = build_data(cfg, spec)  # the run's, from its cache
        assert isinstance(data.tokenizers["depth"], DepthTokenizer)
        # the cached tokens are the entry's tokenizer applied to what the entry reads
        ex = data.examples("train")
        toks = data.tokens("train")
        want = DepthTokenizer(12, 8).encode([_depth(ex[i]) for i in range(4)])
        np.testing.assert_array_equal(toks["depth"][:4], want)
        assert (toks["depth_len"] == 64).all() and len(set(toks["depth"][:4].ravel().tolist())) > 1
        np.testing.assert_array_equal(data.tokenizers["depth"].encode([data.detokenize("depth", want[0])]),
                                      want[:1])
        # 4M batches hold depth targets (the seed is the training loop's: its first batch)
        batch = next(data.iterator("train", 8, int(cfg.seed), 0, 1))
        d = spec.modality_index("depth")
        assert (batch["dec_valid"] & (batch["dec_modality"] == d)).sum() > 0
        assert batch["dec_target"][batch["dec_modality"] == d].max() < 12
    assert summary["status"] == "done" and summary["steps"] == 1
    assert math.isfinite(summary["final_train_loss"])
    by_mod = summary["final_train_loss_by_modality"]
    assert set(by_mod) == {"image", "caption", "depth"}
    # a uniform guess over 12 levels has loss log 12; one step from a random start is near it, never zero
    assert 0.1 * math.log(12) < by_mod["depth"] < 3 * math.log(12)
    with open(os.path.join(run, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    assert any(math.isfinite(r.get("loss/depth") or math.nan) for r in rows if r["kind"] == "train")


def test_generate_decodes_and_writes_the_new_modality(depth_run, tmp_path):
    _, run, _ = depth_run
    with modalities.extended(DEPTH):
        out = generate(run, example=("validation", 1), inputs=("image",), targets=("depth",),
                       out_dir=str(tmp_path))
    # no renderer in the entry: the default writes the decoded map as STEM_depth.png
    assert out["targets"] == ["depth"] and out["depth"]["path"] == str(tmp_path / "validation-1_depth.png")
    with PIL.Image.open(out["depth"]["path"]) as im:
        depth = np.asarray(im)
    assert depth.shape == (64, 64)
    levels = {int((i + 0.5) * 256 / 12) for i in range(12)}
    assert set(np.unique(depth).tolist()) <= levels
    assert os.path.getsize(out["picture"]) > 0


def test_registry_changes_are_checked_and_reversible():
    before = modalities.registered()
    with pytest.raises(UserError, match="unique"), modalities.extended(modalities.get("image")):
        pass
    clash = modalities.Modality("depth", "image", vocab=("text_vocab", 99), tokenizer=DepthTokenizer)
    with pytest.raises(UserError, match="text_vocab"), modalities.extended(clash):
        pass
    with pytest.raises(UserError, match="sequence needs max_tokens"):
        modalities.Modality("ecg", "sequence", vocab=("ecg_vocab", 64), tokenizer=DepthTokenizer)
    with modalities.extended(DEPTH):
        assert modalities.names()[-1] == "depth"
        # --vocab: one integer per registered modality, in registry order; a wrong count names them
        assert [m.vocab_size for m in modalities.from_vocab_flag("1,2,3,4,5,6,7")] == [1, 2, 3, 4, 5, 6, 7]
        with pytest.raises(UserError, match=r"seven \(image,caption,boxes,segmentation,question,answer,depth\)"):
            modalities.from_vocab_flag("1,2,3,4")
        with pytest.raises(UserError, match="unknown modality 'ecg' in data.modalities; known: .*depth"):
            spec_from_config(load_config("tiny", ["data.modalities=('image', 'ecg')"]))
    assert modalities.registered() == before
    with pytest.raises(UserError, match=r"six \(image,caption,boxes,segmentation,question,answer\)"):
        modalities.from_vocab_flag("1,2")


def test_raw_examples_carry_a_datasets_further_features():
    from medscale.data.pipeline import _decode_example

    depth = np.arange(16, dtype=np.uint8).reshape(4, 4, 1)
    rec = {"image": np.zeros((4, 4, 1), np.uint8), "mask": np.zeros((4, 4, 1), np.uint8), "has_mask": False,
           "caption": b"a scan", "boxes": np.zeros((0, 4), np.float32), "box_labels": b"", "facts": b"{}",
           "meta": b"{}", "id": b"x-3", "index": 3, "depth": depth, "note": b"left"}
    ex = _decode_example(rec)
    assert set(ex) == {"image", "mask", "caption", "boxes", "facts", "meta", "id", "index", "depth", "note"}
    np.testing.assert_array_equal(ex["depth"], depth[..., 0])
    assert ex["note"] == "left" and ex["mask"] is None and ex["caption"] == "a scan"
