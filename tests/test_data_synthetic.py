"""Synthetic scenes: determinism, content/caption agreement, boxes and masks."""

import numpy as np
import pytest

from medscale.data.synthetic import MASK_CLASSES, STYLES, finding_scores, parse_caption, render_scene


def test_same_seed_same_bytes_different_seed_differs():
    a, b, c = render_scene(3, 17), render_scene(3, 17), render_scene(4, 17)
    assert a["image"].tobytes() == b["image"].tobytes() and a["caption"] == b["caption"]
    assert a["mask"].tobytes() == b["mask"].tobytes() and a["boxes"] == b["boxes"]
    assert a["image"].tobytes() != c["image"].tobytes()
    assert render_scene(3, 18)["image"].tobytes() != a["image"].tobytes()


def test_caption_parses_back_to_the_true_findings():
    seen_styles, seen_counts = set(), set()
    for i in range(150):
        s = render_scene(0, i)
        facts = s["facts"]
        seen_styles.add(facts["style"])
        seen_counts.add(facts["n_lesions"])
        parsed = parse_caption(s["caption"])
        scores = finding_scores(parsed, facts)
        assert all(v == 1.0 for v in scores.values()), (s["caption"], scores)
        assert len(s["boxes"]) == facts["n_lesions"]
    assert seen_styles == set(STYLES)
    assert seen_counts == {0, 1, 2, 3, 4}


def test_wrong_caption_scores_lower():
    s = next(render_scene(0, i) for i in range(50) if render_scene(0, i)["facts"]["n_lesions"] >= 2)
    bad = s["caption"].replace("small", "large").replace("left", "right")
    bad = bad.replace("two lesions", "three lesions").replace("three lesions", "four lesions")
    scores = finding_scores(parse_caption(bad), s["facts"])
    assert scores["n_lesions"] == 0.0
    assert parse_caption("nothing to read here") == {"style": None, "region": None, "n_lesions": None,
                                                    "lesions": []}


@pytest.mark.parametrize("size", [64, 128])
def test_boxes_enclose_lesion_pixels_and_mask_classes(size):
    for i in range(30):
        s = render_scene(1, i, size)
        img, mask = s["image"], s["mask"]
        assert img.shape == mask.shape == (size, size) and img.dtype == np.uint8
        assert mask.max() < len(MASK_CLASSES)
        lesion = mask == 3
        covered = np.zeros_like(lesion)
        for cls, x0, y0, x1, y1 in s["boxes"]:
            assert cls == "lesion" and 0 <= x0 < x1 <= size and 0 <= y0 < y1 <= size
            covered[y0:y1, x0:x1] = True
            assert lesion[y0:y1, x0:x1].any()
        assert not (lesion & ~covered).any()  # every lesion pixel is inside some box
        assert (lesion.any()) == bool(s["boxes"])
        assert (mask == 1).any() and (mask == 0).any()  # body and background


def test_images_carry_the_lesions():
    # a lesion is visible: mean intensity inside differs from its surrounding organ/body ring
    diffs = []
    for i in range(40):
        s = render_scene(2, i)
        if s["boxes"]:
            lesion = s["mask"] == 3
            diffs.append(abs(float(s["image"][lesion].mean()) - float(s["image"][s["mask"] == 2].mean())))
    assert np.median(diffs) > 10
