"""Detokenisation of generated box text and the constrained-decoding id sets, with a real text tokenizer."""

import numpy as np
import pytest

from medscale.generate.predict import banned_text_ids, box_start_ids, boxes_from_ids


@pytest.fixture(scope="module")
def text():
    from medscale.data.tokenizers import train_text_tokenizer

    caps = ["ct scan of the chest. one lesion: small round hyperdense 20mm, left upper left lung.",
            "radiograph of the head. no focal lesion.", "mri scan of the abdomen. normal study.", "lesion", "none"]
    return train_text_tokenizer(caps * 4, 200, num_sentinels=4, box_bins=16)


def test_boxes_from_ids_parses_scores_and_drops_bad_spans(text):
    s = "v0=2 v1=3 v2=5 v3=6 lesion v0=9 v1=9 v2=4 v3=12 lesion v0=1 v1=1"
    ids = text.encode(s)
    logp = -np.arange(1, len(ids) + 1, dtype=np.float64) / 10
    boxes, scores = boxes_from_ids(text, ids, logp, 64)
    # bins of 64/16 = 4 px: (2, 3)-(5, 6) -> x0 8, y0 12, x1 (5+1)*4 = 24, y1 28; the second box has x1 < x0 and
    # the third has no far corner: both dropped
    assert boxes == [("lesion", 8.0, 12.0, 24.0, 28.0)]
    n_first = len(text.encode("v0=2 v1=3 v2=5 v3=6 lesion"))
    assert scores == [pytest.approx(float(np.mean(logp[:n_first])))]
    assert boxes_from_ids(text, text.encode("none"), np.zeros(1), 64) == ([], [])


def test_banned_ids(text):
    cap = set(banned_text_ids(text, "caption", given={"image"}))
    box = set(banned_text_ids(text, "boxes", given={"image", "boxes"}))
    for i in (text.pad_id, text.unk_id, text.start_id):
        assert i in cap and i in box
    assert text.eos_id not in cap | box
    assert set(text.sentinel_ids.tolist()) <= cap and not set(text.sentinel_ids.tolist()) & box
    starts = set(box_start_ids(text))
    assert len(starts) == 16 and starts <= cap and not starts & box
    word = text.encode("lesion")[0]
    assert word not in cap and word not in box
