"""ProposalRecall: known answers for detectron2-style greedy one-to-one proposal recall."""

import math

import pytest
import torch

from fl_rpn.evaluation import ProposalRecall
from fl_rpn.evaluation.recall import IOU_THRESHOLDS, matched_overlaps

FAR = [[900.0, 900.0, 910.0, 910.0]]  # a proposal that overlaps no ground truth


def target(boxes, ignore=None, image_id=0):
    boxes = torch.as_tensor(boxes, dtype=torch.float32).reshape(-1, 4)
    ignore = torch.zeros(len(boxes), dtype=torch.bool) if ignore is None else torch.as_tensor(ignore)
    return {"boxes": boxes, "labels": torch.ones(len(boxes), dtype=torch.int64), "ignore": ignore,
            "image_id": image_id}  # fmt: skip


def output(proposals):
    return {"proposals": torch.as_tensor(proposals, dtype=torch.float32).reshape(-1, 4)}


def recall(targets, outputs, max_proposals=(100, 300, 1000)):
    ev = ProposalRecall(max_proposals=max_proposals)
    ev.update(targets, outputs)
    return ev.compute()


def test_thresholds_are_the_decimal_values():
    assert IOU_THRESHOLDS.tolist() == [0.5, 0.55, 0.6, 0.65, 0.7, 0.75, 0.8, 0.85, 0.9, 0.95]


def test_exact_proposals_for_k_of_n_boxes():
    # 5 boxes over two images, 3 of them proposed exactly: recall 3/5 at every IoU threshold.
    a = [[0, 0, 10, 10], [20, 20, 40, 40], [50, 0, 90, 30]]
    b = [[0, 0, 30, 30], [40, 40, 60, 80]]
    m = recall([target(a, image_id=1), target(b, image_id=2)], [output([a[0], a[2]] + FAR), output(FAR + [b[1]])])
    assert m == {f"proposal/{kind}@{k}": pytest.approx(3 / 5, abs=1e-12)
                 for kind in ("AR", "R50") for k in (100, 300, 1000)}  # fmt: skip


def test_iou_of_exactly_0_6():
    # 10x10 box, 10x6 proposal inside it: IoU = 60/100 = 0.6 (exact in float64, >= 0.6 holds).
    # Recall 1 at t = 0.50, 0.55, 0.60 and 0 above → AR = 3/10.
    overlaps = matched_overlaps(torch.tensor([[0.0, 0.0, 10.0, 6.0]]), torch.tensor([[0.0, 0.0, 10.0, 10.0]]))
    assert overlaps.tolist() == [0.6]
    m = recall([target([[0, 0, 10, 10]])], [output([[0, 0, 10, 6]])])
    assert m["proposal/AR@100"] == pytest.approx(3 / 10, abs=1e-12)
    assert m["proposal/R50@100"] == 1.0


def test_top_k_truncation():
    # The only good proposal is at rank 150: it counts for @300 and @1000, not for @100.
    proposals = FAR * 149 + [[0, 0, 10, 10]] + FAR * 500
    m = recall([target([[0, 0, 10, 10]])], [output(proposals)])
    assert m["proposal/AR@100"] == 0.0 and m["proposal/R50@100"] == 0.0
    assert m["proposal/AR@300"] == pytest.approx(1.0, abs=1e-12) and m["proposal/AR@1000"] == pytest.approx(1.0)


def test_ignored_boxes_are_left_out():
    m = recall([target([[0, 0, 10, 10], [50, 50, 90, 90]], ignore=[False, True])], [output([[0, 0, 10, 10]])], [10])
    assert m == {"proposal/AR@10": pytest.approx(1.0, abs=1e-12), "proposal/R50@10": 1.0}


def test_matching_is_one_to_one():
    # Two identical boxes and a single proposal on them: only one box is recalled.
    m = recall([target([[0, 0, 10, 10], [0, 0, 10, 10]])], [output([[0, 0, 10, 10]])], [10])
    assert m["proposal/R50@10"] == 0.5


def test_greedy_takes_the_best_covered_box_first():
    # p0 covers A exactly and B with IoU 0.8; p1 covers B with IoU 0.6. Greedy gives A ← p0 (IoU 1, the
    # best-covered box), then B ← p1 (0.6), not B ← p0 (0.8).
    a, b = [0, 0, 10, 10], [0, 0, 10, 8]  # IoU(a, b) = 0.8
    p0, p1 = a, [0, 0, 10, 4.8]  # IoU(b, p1) = 48/80 = 0.6, IoU(a, p1) = 0.48
    overlaps = matched_overlaps(torch.tensor([p0, p1]), torch.tensor([a, b], dtype=torch.float32))
    assert overlaps.tolist() == pytest.approx([1.0, 0.6], abs=1e-6)


def test_images_without_ground_truth_contribute_nothing():
    m = recall([target([[0, 0, 10, 10]], image_id=1), target([], image_id=2)], [output([[0, 0, 10, 10]]), output(FAR)])
    assert m["proposal/AR@100"] == pytest.approx(1.0, abs=1e-12)


def test_an_image_without_proposals_counts_its_boxes_as_misses():
    m = recall([target([[0, 0, 10, 10]], image_id=1), target([[0, 0, 10, 10]], image_id=2)],
               [output([[0, 0, 10, 10]]), output([])])  # fmt: skip
    assert m["proposal/R50@100"] == 0.5


def test_no_ground_truth_at_all_gives_nan():
    m = recall([target([])], [output(FAR)])
    assert all(math.isnan(v) for v in m.values())


def test_missing_proposals_is_an_error():
    ev = ProposalRecall()
    with pytest.raises(ValueError, match="must return its proposals"):
        ev.update([target([[0, 0, 10, 10]])], [{"boxes": torch.zeros(0, 4)}])


def test_state_and_merge_equal_one_pass():
    targets = [target([[0, 0, 10, 10]], image_id=1), target([[0, 0, 10, 10], [20, 20, 30, 30]], image_id=2)]
    outputs = [output([[0, 0, 10, 10]]), output([[0, 0, 10, 6]])]
    whole = recall(targets, outputs)
    first, second = ProposalRecall(), ProposalRecall()
    first.update(targets[:1], outputs[:1])
    second.update(targets[1:], outputs[1:])
    first.merge([second.state()])
    assert first.compute() == whole
    first.gather()  # not distributed: a no-op
    assert first.compute() == whole
