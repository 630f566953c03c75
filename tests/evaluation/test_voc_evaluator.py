"""VOC07Evaluator: precision-recall curves worked out by hand."""

import math

import numpy as np
import pytest
import torch

from fl_rpn.evaluation import VOC07Evaluator
from fl_rpn.evaluation.voc import voc_ap

NAMES = ["cat", "dog"]
G1, G2, G3, G4 = [0, 0, 10, 10], [20, 0, 30, 10], [40, 0, 50, 10], [60, 0, 70, 10]
EMPTY = [100, 100, 110, 110]  # overlaps no ground truth


def target(boxes, labels, ignore=None, image_id=0):
    boxes = torch.as_tensor(boxes, dtype=torch.float32).reshape(-1, 4)
    ignore = torch.zeros(len(boxes), dtype=torch.bool) if ignore is None else torch.as_tensor(ignore)
    return {"boxes": boxes, "labels": torch.as_tensor(labels, dtype=torch.int64).reshape(-1), "ignore": ignore,
            "image_id": image_id}  # fmt: skip


def output(boxes, scores, labels):
    return {"boxes": torch.as_tensor(boxes, dtype=torch.float32).reshape(-1, 4),
            "scores": torch.as_tensor(scores, dtype=torch.float32),
            "labels": torch.as_tensor(labels, dtype=torch.int64).reshape(-1)}  # fmt: skip


def evaluate(targets, outputs, **kwargs):
    ev = VOC07Evaluator(NAMES, **kwargs)
    ev.update(targets, outputs)
    return ev.compute()


# 4 cats in one image (and a dog, found, so that dog AP = 1). Cat detections by score:
#   G1 (TP), nothing (FP), G2 (TP), G3 (TP), G1 again (duplicate → FP); G4 is never found.
#   rank:       1     2     3     4     5
#   precision:  1    1/2   2/3   3/4   3/5
#   recall:    1/4   1/4   1/2   3/4   3/4
# 11-point: the best precision at recall >= t is 1 for t = 0, .1, .2; 3/4 for t = .3 ... .7 (five
# points); 0 for t = .8, .9, 1 (recall never gets there) → AP = (3 * 1 + 5 * 3/4) / 11 = 6.75 / 11.
# Area under the envelope: recall steps of 1/4 at precision 1, 3/4, 3/4, then 0 → AP = 0.625.
CASE_T = [target([G1, G2, G3, G4, EMPTY], [1, 1, 1, 1, 2])]
CASE_O = [output([G1, EMPTY, G2, G3, G1, EMPTY], [0.9, 0.8, 0.7, 0.6, 0.5, 0.99], [1, 1, 1, 1, 1, 2])]


def test_eleven_point_ap_by_hand():
    m = evaluate(CASE_T, CASE_O)
    assert m["voc07/AP/cat"] == pytest.approx(6.75 / 11, abs=1e-12)
    assert m["voc07/AP/dog"] == pytest.approx(1.0, abs=1e-12)
    assert m["voc07/mAP"] == pytest.approx((6.75 / 11 + 1.0) / 2, abs=1e-12)
    assert list(m) == ["voc07/mAP", "voc07/AP/cat", "voc07/AP/dog"]


def test_area_ap_by_hand():
    m = evaluate(CASE_T, CASE_O, use_07_metric=False)
    assert m["voc07/AP/cat"] == pytest.approx(0.625, abs=1e-12)


def test_voc_ap_on_the_curve_directly():
    precision = np.array([1, 1 / 2, 2 / 3, 3 / 4, 3 / 5])
    recall = np.array([1 / 4, 1 / 4, 1 / 2, 3 / 4, 3 / 4])
    assert voc_ap(recall, precision, True) == pytest.approx(6.75 / 11, abs=1e-12)
    assert voc_ap(recall, precision, False) == pytest.approx(0.625, abs=1e-12)


def test_perfect_detections():
    t = [target([G1, G2], [1, 2], image_id=1), target([G3], [1], image_id=2)]
    o = [output([G1, G2], [0.9, 0.8], [1, 2]), output([G3], [0.7], [1])]
    for use_07 in (True, False):
        m = evaluate(t, o, use_07_metric=use_07)
        assert m["voc07/mAP"] == pytest.approx(1.0, abs=1e-12)


def test_difficult_box_is_neither_hit_nor_miss():
    # A detection on the difficult box, ranked first, is skipped (not an FP); the difficult box is
    # not in the recall denominator. Counting it either way would give AP < 1.
    t = [target([G1, G2], [1, 1], ignore=[False, True])]
    assert evaluate(t, [output([G2, G1], [0.9, 0.8], [1, 1])])["voc07/AP/cat"] == pytest.approx(1.0, abs=1e-12)
    assert evaluate(t, [output([G1], [0.8], [1])])["voc07/AP/cat"] == pytest.approx(1.0, abs=1e-12)


def test_duplicate_detection_is_a_false_positive():
    # TP then duplicate FP: precision [1, 1/2], recall [1, 1] → 11-point AP 1; add a second box found
    # after the duplicate: precision [1, 1/2, 2/3], recall [1/2, 1/2, 1] → 11-point:
    # t = 0 .. .5 (6 points): max precision = 1; t = .6 .. 1 (5 points): 2/3 → (6 + 10/3) / 11.
    t = [target([G1, G2], [1, 1])]
    m = evaluate(t, [output([G1, G1, G2], [0.9, 0.8, 0.7], [1, 1, 1])])
    assert m["voc07/AP/cat"] == pytest.approx((6 + 10 / 3) / 11, abs=1e-12)


def test_iou_must_exceed_the_threshold():
    # IoU exactly 0.5 (half of a 10x10 box) is not a hit: the devkit requires IoU > 0.5.
    t = [target([G1], [1])]
    assert evaluate(t, [output([[0, 0, 10, 5]], [0.9], [1])])["voc07/AP/cat"] == 0.0
    assert evaluate(t, [output([[0, 0, 10, 5.5]], [0.9], [1])])["voc07/AP/cat"] == pytest.approx(1.0)
    assert evaluate(t, [output([[0, 0, 10, 5.5]], [0.9], [1])], iou_thresh=0.6)["voc07/AP/cat"] == 0.0


def test_a_detection_of_the_wrong_class_does_not_hit():
    m = evaluate([target([G1, G2], [1, 2])], [output([G1, G2], [0.9, 0.9], [2, 1])])
    assert m["voc07/AP/cat"] == 0.0 and m["voc07/AP/dog"] == 0.0


def test_class_without_ground_truth_is_nan_and_left_out_of_the_mean():
    m = evaluate([target([G1], [1])], [output([G1, G2], [0.9, 0.8], [1, 2])])
    assert math.isnan(m["voc07/AP/dog"])
    assert m["voc07/mAP"] == pytest.approx(1.0, abs=1e-12)
    assert math.isnan(evaluate([target([], [])], [output([G1], [0.9], [1])])["voc07/mAP"])


def test_detections_in_an_image_without_ground_truth_are_false_positives():
    # FP (image 2) ranked above the TP: precision [0, 1/2], recall [0, 1] → 11-point AP 1/2.
    t = [target([G1], [1], image_id=1), target([], [], image_id=2)]
    o = [output([G1], [0.5], [1]), output([G1], [0.9], [1])]
    assert evaluate(t, o)["voc07/AP/cat"] == pytest.approx(0.5, abs=1e-12)


def devkit_ap(gts, dets, label, use_07_metric):
    """detectron2's ``voc_eval`` (VOC devkit rules, "+1" IoU) on 1-based inclusive boxes."""
    recs = {i: (b[lab == label], dif[lab == label], np.zeros(int((lab == label).sum()), bool))
            for i, (b, lab, dif) in enumerate(gts)}  # fmt: skip
    npos = sum(int((~dif).sum()) for _, dif, _ in recs.values())
    mine = sorted((d for d in dets if d[3] == label), key=lambda d: -d[1])
    tp, fp = np.zeros(len(mine)), np.zeros(len(mine))
    for k, (i, _, bb, _) in enumerate(mine):
        gt, dif, det = recs[i]
        ovmax, jmax = -np.inf, -1
        if len(gt):
            iw = np.maximum(np.minimum(gt[:, 2], bb[2]) - np.maximum(gt[:, 0], bb[0]) + 1.0, 0.0)
            ih = np.maximum(np.minimum(gt[:, 3], bb[3]) - np.maximum(gt[:, 1], bb[1]) + 1.0, 0.0)
            inter = iw * ih
            union = (bb[2] - bb[0] + 1) * (bb[3] - bb[1] + 1) + (gt[:, 2] - gt[:, 0] + 1) * (gt[:, 3] - gt[:, 1] + 1)
            overlaps = inter / (union - inter)
            ovmax, jmax = overlaps.max(), overlaps.argmax()
        if ovmax > 0.5:
            if not dif[jmax]:
                tp[k], fp[k] = (0, 1) if det[jmax] else (1, 0)
                det[jmax] = True
        else:
            fp[k] = 1
    tp, fp = np.cumsum(tp), np.cumsum(fp)
    return voc_ap(tp / npos, tp / np.maximum(tp + fp, np.finfo(np.float64).eps), use_07_metric)


@pytest.mark.parametrize("use_07_metric", [True, False])
def test_matches_the_devkit_on_boxes_shifted_at_load_time(use_07_metric):
    # The devkit's "+1" IoU on 1-based boxes equals the plain IoU once xmin, ymin are shifted by -1,
    # as our VOC reader (like detectron2's) does. Random integer boxes, difficult flags and duplicates.
    rng = np.random.default_rng(0)
    names = ["a", "b", "c"]
    gts, dets, targets, outputs = [], [], [], []
    shift = np.array([1.0, 1.0, 0.0, 0.0])
    for i in range(15):
        m = int(rng.integers(0, 6))
        xy = rng.integers(1, 300, (m, 2)).astype(float)
        boxes = np.concatenate([xy, xy + rng.integers(5, 120, (m, 2))], 1)
        labels, difficult = rng.integers(1, 4, m), rng.random(m) < 0.15
        det_boxes = np.concatenate([boxes + rng.integers(-8, 9, boxes.shape), boxes[:1]])  # one duplicate
        det_labels, scores = np.concatenate([labels, labels[:1]]), rng.random(m + min(m, 1))
        gts.append((boxes, labels, difficult))
        dets += [(i, s, b, lab) for s, b, lab in zip(scores, det_boxes, det_labels)]
        targets.append(target(torch.tensor(boxes - shift), labels, ignore=difficult, image_id=i))
        outputs.append(output(torch.tensor(det_boxes - shift), scores, det_labels))
    ev = VOC07Evaluator(names, use_07_metric=use_07_metric)
    ev.update(targets, outputs)
    m = ev.compute()
    for label, name in enumerate(names, start=1):
        assert m[f"voc07/AP/{name}"] == pytest.approx(devkit_ap(gts, dets, label, use_07_metric), abs=1e-12)
    assert 0.0 < m["voc07/mAP"] < 1.0
