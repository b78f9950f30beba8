"""Tokenizers: text round trip and special ids, box text, VQ and segmentation reconstruction bounds."""

import numpy as np
import pytest

from medscale.data import tokenizers as T
from medscale.data.synthetic import render_scene
from medscale.errors import UserError

VQ_RMSE_BOUND = 0.10  # grey levels in [0, 1]; the scenes' own noise has sd 0.04-0.06


@pytest.fixture(scope="module")
def scenes():
    return [render_scene(0, i) for i in range(260)]


@pytest.fixture(scope="module")
def text_tok(scenes):
    return T.train_text_tokenizer([s["caption"] for s in scenes[:200]] + ["lesion none"], 512, 8, 16)


def test_text_round_trip_is_the_normalised_text(text_tok, scenes):
    for s in scenes[200:]:
        x = "  " + s["caption"].replace(" ", "   ", 2) + " "
        ids = text_tok.encode(x)
        assert all(0 <= i < text_tok.trained_size <= 512 for i in ids)
        assert text_tok.decode(ids) == text_tok.normalize(x) == " ".join(x.split())
    mixed = "<S3> small v0=5 round v2=15 lesion <S0>"
    ids = text_tok.encode(mixed)
    assert text_tok.decode(ids) == mixed
    assert ids[0] == text_tok.sentinel(3) and ids[-1] == text_tok.sentinel(0)
    assert text_tok.coord_id(0, 5) in ids and text_tok.coord_id(2, 15) in ids


def test_special_ids_layout(text_tok):
    sp = text_tok.sp
    assert [sp.id_to_piece(i) for i in range(4)] == ["<pad>", "<unk>", "<s>", "</s>"]
    assert sp.id_to_piece(4) == "<S0>" and sp.id_to_piece(4 + 7) == "<S7>"
    assert sp.id_to_piece(text_tok.coord_id(0, 0)) == "v0=0"
    assert sp.id_to_piece(text_tok.coord_id(3, 15)) == "v3=15"
    assert text_tok.decode([T.START, *text_tok.encode("small round"), T.EOS, 99]) == "small round"


def test_boxes_text_round_trip_contains_original(text_tok):
    boxes = [("lesion", 3, 10, 20, 31), ("lesion", 40, 0, 64, 64)]
    txt = text_tok.boxes_to_text(boxes, 64)
    assert txt.startswith("v0=0 v1=2 v2=4 v3=7 lesion")
    assert len(text_tok.encode(txt)) == 10  # 4 coordinates + 1 class word per box
    back = text_tok.text_to_boxes(text_tok.decode(text_tok.encode(txt)), 64)
    assert len(back) == 2
    for (c, *b), (c2, *b2) in zip(boxes, back):
        assert c == c2
        assert b2[0] <= b[0] and b2[1] <= b[1] and b2[2] >= b[2] and b2[3] >= b[3]
        assert all(abs(u - v) < 64 / 16 for u, v in zip(b, b2))
    assert text_tok.boxes_to_text([], 64) == "none" and text_tok.text_to_boxes("none", 64) == []


def test_text_vocab_too_small_is_a_user_error():
    with pytest.raises(UserError, match="text_vocab"):
        T.train_text_tokenizer(["a b c"], 100, 16, 32)
    with pytest.raises(UserError, match="empty"):
        T.train_text_tokenizer(["   ", ""], 512, 8, 16)


def test_vq_reconstruction_under_bound(scenes, tmp_path):
    imgs = np.stack([s["image"] for s in scenes])
    vq = T.train_vq(imgs[:200], 64, 8, iters=8)
    held = vq.reconstruction(imgs[200:])
    assert held["rmse"] < VQ_RMSE_BOUND, held
    # the codebook is much better than the best single grey level per patch position
    trivial = float(np.sqrt(np.mean((imgs[200:] / 255.0 - imgs[:200].mean() / 255.0) ** 2)))
    assert held["rmse"] < 0.5 * trivial
    ids = vq.encode(imgs[200:])
    assert ids.shape == (60, 64) and ids.min() >= 0 and ids.max() < 64
    vq.save(str(tmp_path / "vq.npz"))
    back = T.VQTokenizer.load(str(tmp_path / "vq.npz"))
    assert back.hash == vq.hash and np.array_equal(back.encode(imgs[:5]), vq.encode(imgs[:5]))


def test_seg_reconstruction(scenes):
    masks = np.stack([s["mask"] for s in scenes])
    seg = T.train_seg(masks[:200], 64, 8, 4, iters=8)
    rec = seg.reconstruction(masks[200:])
    assert rec["pixel_accuracy"] > 0.93 and rec["miou"] > 0.75, rec
    ids = seg.encode(masks[200:])
    assert ids.max() < 64
    # a pure-background patch decodes to background exactly
    assert (seg.decode(seg.encode(np.zeros((64, 64), np.uint8)), 64) == 0).all()


def test_corrupt_artifact_is_a_user_error(text_tok, tmp_path):
    p = tmp_path / "text.npz"
    text_tok.save(str(p))
    assert T.TextTokenizer.load(str(p)).hash == text_tok.hash
    z = dict(np.load(p))
    z["meta"] = str(z["meta"]).replace('"box_bins": 16', '"box_bins": 17')
    np.savez(p, **z)
    with pytest.raises((UserError, ValueError)):
        T.TextTokenizer.load(str(p))
