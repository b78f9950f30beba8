"""Task metrics against hand-worked examples (values derived in the comments)."""

import math

import numpy as np
import pytest

from medscale.generate import metrics as M


# ------------------------------------------------------------------------------------------------ BLEU
def test_bleu_perfect_is_one():
    refs = ["the liver shows two small lesions .", "axial ct scan of the abdomen"]
    out = M.corpus_bleu(refs, refs)
    assert out["bleu"] == pytest.approx(1.0)
    assert out["brevity_penalty"] == 1.0 and out["precisions"] == [1.0] * 4


def test_bleu_brevity_penalty_hand_worked():
    # every n-gram of the hypothesis matches; c = 5, r = 7 -> BP = exp(1 - 7/5)
    out = M.corpus_bleu(["a b c d e"], ["a b c d e f g"])
    assert out["precisions"] == [1.0] * 4
    assert out["bleu"] == pytest.approx(math.exp(-0.4))
    # a longer hypothesis is not penalised: BP = 1, precisions drop instead.
    out = M.corpus_bleu(["a b c d e f g x"], ["a b c d e f g"])
    # unigrams 7/8, bigrams 6/7, trigrams 5/6, 4-grams 4/5
    want = (7 / 8 * 6 / 7 * 5 / 6 * 4 / 5) ** 0.25
    assert out["brevity_penalty"] == 1.0 and out["bleu"] == pytest.approx(want)


def test_bleu_counts_are_pooled_over_the_corpus_and_clipped():
    # sentence 1: "the the the" vs "the cat": unigram clipped 1/3, no higher-order matches;
    # sentence 2: perfect 4 tokens.  Corpus: p1 = (1+4)/(3+4), p2 = 3/(2+3), p3 = 2/(1+2), p4 = 1/(0+1).
    hyps = ["the the the", "w x y z"]
    refs = ["the cat", "w x y z"]
    out = M.corpus_bleu(hyps, refs)
    assert out["precisions"] == pytest.approx([5 / 7, 3 / 5, 2 / 3, 1.0])
    # c = 7, r = 2 + 4 = 6 -> BP = 1
    assert out["bleu"] == pytest.approx((5 / 7 * 3 / 5 * 2 / 3) ** 0.25)


def test_bleu_zero_4gram_and_add1_smoothing():
    # hyp "the cat sat on the mat" vs ref "the cat is on the mat":
    # p1 = 5/6, p2 = 3/5 (the cat, on the, the mat), p3 = 1/4 (on the mat), p4 = 0/3.
    h, r = ["the cat sat on the mat"], ["the cat is on the mat"]
    out = M.corpus_bleu(h, r)
    assert out["precisions"] == pytest.approx([5 / 6, 3 / 5, 1 / 4, 0.0])
    assert out["bleu"] == 0.0
    sm = M.corpus_bleu(h, r, smooth="add1")  # (5/6 * 4/6 * 2/5 * 1/4) ** 0.25 = (1/18) ** 0.25
    assert sm["bleu"] == pytest.approx((1 / 18) ** 0.25)


def test_bleu_empty_and_short_hypotheses():
    assert M.corpus_bleu([], [])["bleu"] == 0.0
    out = M.corpus_bleu(["", ""], ["a b", "c d"])
    assert out["bleu"] == 0.0 and out["brevity_penalty"] == 0.0
    # a 2-token hypothesis has no 3- or 4-grams: unsmoothed BLEU 0, and no crash
    assert M.corpus_bleu(["a b"], ["a b c"])["bleu"] == 0.0
    # multiple references: closest length wins (r = 4 for a 4-token hypothesis)
    out = M.corpus_bleu(["a b c d"], [["a b c d e f", "a b c d"]])
    assert out["ref_len"] == 4 and out["bleu"] == pytest.approx(1.0)
    # punctuation is its own token, case is ignored
    assert M.tokenize("Two Lesions, left.") == ["two", "lesions", ",", "left", "."]


# ------------------------------------------------------------------------------------------------ findings
def _f(style, *lesions, region="chest"):
    return {"style": style, "region": region, "n_lesions": len(lesions),
            "lesions": [{"location": loc, "organ": "liver", "size": s} for loc, s in lesions]}


def test_findings_perfect_and_partial():
    truth = [_f("ct", ("left", "small"), ("right", "large")), _f("mri"), _f("xray", ("upper", "small"))]
    perfect = M.finding_scores(truth, truth)
    assert all(perfect[k] == 1.0 for k in ("style_acc", "region_acc", "count_acc", "location_f1",
                                            "location_size_f1", "all_correct"))
    pred = [
        _f("ct", ("left", "small"), ("right", "small")),  # style ok, count ok, locs F1 1, loc+size F1 1/2
        _f("ct"),                                          # style wrong, count ok (0), F1 of empties = 1
        None,                                              # unparsable caption: all zero
    ]
    out = M.finding_scores(pred, truth)
    assert out["style_acc"] == pytest.approx(1 / 3)
    assert out["count_acc"] == pytest.approx(2 / 3)
    assert out["location_f1"] == pytest.approx(2 / 3)
    assert out["location_size_f1"] == pytest.approx((0.5 + 1.0 + 0.0) / 3)
    assert out["all_correct"] == 0.0
    # one extra lesion: locations F1 = 2*1/(2+1) = 2/3, count wrong
    out = M.finding_scores([_f("ct", ("left", "small"), ("left", "small"))], [_f("ct", ("left", "small"))])
    assert out["location_f1"] == pytest.approx(2 / 3) and out["count_acc"] == 0.0
    # order does not matter; the organ is part of the place; a stated count overrides the phrases found
    a = _f("ct", ("left", "small"), ("right", "large"))
    b = _f("ct", ("right", "large"), ("left", "small"))
    assert M.finding_scores([b], [a])["all_correct"] == 1.0
    b["lesions"][0]["organ"] = "spleen"
    assert M.finding_scores([b], [a])["location_f1"] == pytest.approx(0.5)
    b = dict(a, n_lesions=3, region="head")
    out = M.finding_scores([b], [a])
    assert out["count_acc"] == 0.0 and out["region_acc"] == 0.0 and out["location_size_f1"] == 1.0


# ------------------------------------------------------------------------------------------------ boxes
def test_box_iou_values():
    iou = M.box_iou([[0, 0, 10, 10]], [[0, 0, 10, 5], [5, 0, 15, 10], [20, 20, 30, 30]])
    # half inside: 50/100; shifted by half: 50/150; disjoint: 0
    assert iou[0] == pytest.approx([0.5, 1 / 3, 0.0])


def test_matched_iou_perfect_and_hungarian_beats_greedy():
    gt = [[("lesion", (0, 0, 10, 10)), ("lesion", (20, 20, 30, 30))]]
    assert M.box_matched_iou(gt, gt)["mean_iou"] == pytest.approx(1.0)
    # 1-D layout (height 1): GT1 = [0, 10], GT2 = [10, 20]; A = [2, 12], B = [0, 6].
    # IoU(A,GT1) = 8/12, IoU(A,GT2) = 2/18, IoU(B,GT1) = 6/10, IoU(B,GT2) = 0.
    # Greedy (best pair first) would give A->GT1, B->GT2: (2/3 + 0)/2 = 1/3.
    # Hungarian maximises the sum: A->GT2, B->GT1: (1/9 + 3/5)/2.
    gt = [[("lesion", (0, 0, 10, 1)), ("lesion", (10, 0, 20, 1))]]
    pred = [[("lesion", (2, 0, 12, 1)), ("lesion", (0, 0, 6, 1))]]
    out = M.box_matched_iou(pred, gt)
    assert out["mean_iou"] == pytest.approx((1 / 9 + 3 / 5) / 2) and out["num_gt"] == 2


def test_box_forms_are_interchangeable():
    # the data package writes boxes as (class, x0, y0, x1, y1)
    flat = [[("lesion", 0, 0, 10, 5)]]
    nested = [[("lesion", (0, 0, 10, 5))]]
    gt = [[("lesion", 0, 0, 10, 10)]]
    assert M.box_matched_iou(flat, gt)["mean_iou"] == M.box_matched_iou(nested, gt)["mean_iou"] == 0.5
    assert M.average_precision(flat, gt)["map"] == 1.0
    with pytest.raises(ValueError):
        M.average_precision(flat, gt, scores=[[0.1, 0.2]])


def test_matched_iou_classes_missing_and_empty():
    gt = [[("lesion", (0, 0, 10, 10))], [("organ", (0, 0, 10, 10))], []]
    pred = [[("organ", (0, 0, 10, 10))],       # right place, wrong class -> 0
            [("organ", (0, 0, 10, 5))],        # IoU 1/2
            [("lesion", (0, 0, 4, 4))]]        # no ground truth: contributes nothing
    out = M.box_matched_iou(pred, gt)
    assert out["mean_iou"] == pytest.approx(0.25) and out["num_gt"] == 2
    assert M.box_matched_iou([[]], [[]])["mean_iou"] is None
    assert M.box_matched_iou([[]], [[("lesion", (0, 0, 1, 1))]])["mean_iou"] == 0.0


def test_ap_perfect_and_hand_worked():
    gt = [[("lesion", (0, 0, 10, 10)), ("lesion", (20, 20, 30, 30))], [("lesion", (5, 5, 15, 15))]]
    assert M.average_precision(gt, gt)["map"] == pytest.approx(1.0)
    # ranked: TP (0.9), FP (0.8, nowhere), TP (0.7, IoU 0.5 exactly) ; 3 ground truths, one missed.
    # recall 1/3, 1/3, 2/3; precision 1, 1/2, 2/3; envelope 1, 2/3, 2/3
    # AP = 1/3 * 1 + 0 * 2/3 + 1/3 * 2/3 = 5/9
    pred = [[("lesion", (0, 0, 10, 10)), ("lesion", (50, 50, 60, 60))], [("lesion", (5, 5, 15, 10))]]
    scores = [[0.9, 0.8], [0.7]]
    out = M.average_precision(pred, gt, scores)
    assert out["per_class"]["lesion"] == pytest.approx(5 / 9)
    # without scores, generation order: score -j within each image, so both first boxes (score 0) rank
    # before image 0's second box (-1): TP, TP, FP -> precision 1, 1, 2/3 at recall 1/3, 2/3, 2/3 -> AP 2/3
    assert M.average_precision(pred, gt)["map"] == pytest.approx(2 / 3)
    # reversed confidences: FP first (0.9), then TP, TP: precision 0, 1/2, 2/3 at recall 0, 1/3, 2/3
    # AP = 1/3 * 2/3 + 1/3 * 2/3 = 4/9
    out = M.average_precision(pred, gt, [[0.5, 0.9], [0.4]])
    assert out["map"] == pytest.approx(4 / 9)


def test_ap_duplicates_and_classes():
    gt = [[("lesion", (0, 0, 10, 10)), ("organ", (20, 20, 40, 40))]]
    # a duplicate on the same lesion is a false positive: TP, FP -> AP(lesion) = 1 (recall reached at p=1)
    # organ predicted as lesion elsewhere -> organ AP = 0; "cyst" has no ground truth -> left out.
    pred = [[("lesion", (0, 0, 10, 10)), ("lesion", (0, 0, 10, 10)), ("cyst", (1, 1, 2, 2))]]
    out = M.average_precision(pred, gt)
    assert out["per_class"] == {"lesion": pytest.approx(1.0), "organ": 0.0}
    assert out["map"] == pytest.approx(0.5)
    # IoU just below 0.5 is a miss
    below = M.average_precision([[("lesion", (0, 0, 10, 4.9))]], [[("lesion", (0, 0, 10, 10))]])
    assert below["map"] == 0.0
    assert M.average_precision([[]], [[]])["map"] is None


# ------------------------------------------------------------------------------------------------ masks
def test_segmentation_iou_perfect_and_hand_worked():
    t = np.array([[0, 1], [1, 3]])
    perfect = M.segmentation_iou([t], [t])
    assert perfect["miou"] == 1.0 and perfect["per_class"]["organ"] is None  # absent in both: excluded
    p = np.array([[0, 1], [3, 3]])
    out = M.segmentation_iou([p], [t])
    # background 1/1; body tp 1, union 2; organ absent; lesion tp 1, union 2 -> mIoU = (1 + .5 + .5) / 3
    assert out["per_class"] == {"background": 1.0, "body": 0.5, "organ": None, "lesion": 0.5}
    assert out["miou"] == pytest.approx(2 / 3) and out["pixel_acc"] == 0.75


def test_segmentation_iou_is_pooled_over_the_corpus():
    # image 1: lesion 1 px predicted right; image 2: lesion 3 px, predicted 1 px of them.
    # pooled: tp 2, union 4 -> 0.5 (the mean of per-image IoUs would be (1 + 1/3)/2)
    t1, p1 = np.array([[3, 0]]), np.array([[3, 0]])
    t2, p2 = np.array([[3, 3, 3, 0]]), np.array([[3, 0, 0, 0]])
    out = M.segmentation_iou([p1, p2], [t1, t2])
    assert out["per_class"]["lesion"] == pytest.approx(0.5)
    with pytest.raises(ValueError):
        M.segmentation_iou([np.zeros((2, 2))], [np.zeros((3, 3))])
