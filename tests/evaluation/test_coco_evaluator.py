"""CocoEvaluator against answers worked out from COCO's definition of AP.

COCOeval averages precision over 101 recall thresholds r = 0, 0.01, ..., 1, taking at each r the
best precision reached at recall >= r (0 where recall never reaches r).
"""

import math

import numpy as np
import pytest
import torch

from fl_rpn.evaluation import CocoEvaluator

CATS, NAMES = [1, 2], ["cat", "dog"]
RECALL_THRESHOLDS = np.linspace(0.0, 1.0, 101)  # exactly as pycocotools builds them


def target(boxes, labels, image_id, ignore=None, area=None, orig_size=(200, 300)):
    t = {
        "boxes": torch.as_tensor(boxes, dtype=torch.float32).reshape(-1, 4),
        "labels": torch.as_tensor(labels, dtype=torch.int64),
        "ignore": torch.tensor(ignore if ignore is not None else [False] * len(labels)),
        "image_id": image_id,
        "orig_size": orig_size,
    }
    if area is not None:
        t["area"] = torch.tensor(area, dtype=torch.float32)
    return t


def output(boxes, scores, labels):
    return {
        "boxes": torch.as_tensor(boxes, dtype=torch.float32).reshape(-1, 4),
        "scores": torch.as_tensor(scores, dtype=torch.float32),
        "labels": torch.as_tensor(labels, dtype=torch.int64),
    }


def evaluate(targets, outputs, category_ids=CATS, class_names=NAMES, backend="pycocotools"):
    ev = CocoEvaluator(category_ids, class_names, backend=backend)
    ev.update(targets, outputs)
    return ev.compute()


# Two images, three objects, all medium-sized (40x40 = 1600 px, between 32^2 and 96^2).
GT = [
    target([[10, 10, 50, 50], [100, 100, 140, 140]], [1, 2], image_id=7),
    target([[20, 30, 60, 70]], [1], image_id=9),
]


def perfect(targets):
    return [output(t["boxes"], [1.0] * len(t["labels"]), t["labels"]) for t in targets]


def test_perfect_detections_give_ap_one():
    m = evaluate(GT, perfect(GT))
    assert set(m) == {"bbox/AP", "bbox/AP50", "bbox/AP75", "bbox/APs", "bbox/APm", "bbox/APl"}
    for key in ("bbox/AP", "bbox/AP50", "bbox/AP75", "bbox/APm"):
        assert m[key] == pytest.approx(1.0, abs=1e-6)
    # No small or large objects: pycocotools' -1 comes back as nan.
    assert math.isnan(m["bbox/APs"]) and math.isnan(m["bbox/APl"])


def test_one_of_two_objects_found():
    # One image, two cats, one exact detection: precision 1 up to recall 0.5, nothing beyond.
    # AP = #{r <= 0.5} / 101 = 51 / 101 at every IoU threshold.
    expected = float((RECALL_THRESHOLDS <= 0.5).sum()) / 101
    assert expected == pytest.approx(51 / 101)
    gt = [target([[10, 10, 50, 50], [100, 100, 140, 140]], [1, 1], image_id=1)]
    m = evaluate(gt, [output([[10, 10, 50, 50]], [0.9], [1])])
    for key in ("bbox/AP", "bbox/AP50", "bbox/AP75"):
        assert m[key] == pytest.approx(expected, abs=1e-12)


def test_one_class_missed_halves_the_mean():
    # cat: both found (AP 1); dog: missed (AP 0) → mean over the two categories 0.5.
    dets = [output([[10, 10, 50, 50]], [1.0], [1]), output([[20, 30, 60, 70]], [1.0], [1])]
    m = evaluate(GT, dets)
    assert m["bbox/AP"] == pytest.approx(0.5, abs=1e-12)
    assert m["bbox/AP50"] == pytest.approx(0.5, abs=1e-12)


def test_shifted_detection_counts_at_ap50_not_ap75():
    # GT 40x40; detection shifted by 8 px: IoU = 32*40 / (2*1600 - 32*40) = 1280/1920 = 2/3.
    # Hit for IoU thresholds 0.50..0.65 (4 of 10), miss above → AP = 0.4, AP50 = 1, AP75 = 0.
    gt = [target([[10, 10, 50, 50]], [1], image_id=1)]
    m = evaluate(gt, [output([[18, 10, 58, 50]], [0.9], [1])], [1], ["cat"])
    assert m["bbox/AP"] == pytest.approx(0.4, abs=1e-12)
    assert m["bbox/AP50"] == pytest.approx(1.0, abs=1e-12) and m["bbox/AP75"] == 0.0


def test_crowd_is_neither_a_miss_nor_a_false_positive():
    # A crowd box, undetected in one image and detected (with the top score) in another: if it
    # counted as a miss, recall would stop at 1/2; if its detection were a false positive it would
    # rank first and cap precision at 1/2. Ignored, AP is 1.
    gt = [
        target([[10, 10, 50, 50], [100, 100, 160, 160]], [1, 1], image_id=1, ignore=[False, True]),
        target([[10, 10, 50, 50], [100, 100, 160, 160]], [1, 1], image_id=2, ignore=[False, True]),
    ]
    dets = [
        output([[10, 10, 50, 50]], [0.5], [1]),
        output([[100, 100, 160, 160], [10, 10, 50, 50]], [0.99, 0.5], [1, 1]),
    ]
    assert evaluate(gt, dets, [1], ["cat"])["bbox/AP"] == pytest.approx(1.0, abs=1e-12)


def test_image_without_ground_truth_contributes_false_positives():
    # Ranked: FP (image 2, no GT) then TP → precision [0, 1/2], recall [0, 1]; the envelope is 1/2
    # at every recall threshold → AP = 0.5.
    gt = [target([[10, 10, 50, 50]], [1], image_id=1), target([], [], image_id=2)]
    dets = [output([[10, 10, 50, 50]], [0.5], [1]), output([[10, 10, 50, 50]], [0.9], [1])]
    assert evaluate(gt, dets, [1], ["cat"])["bbox/AP"] == pytest.approx(0.5, abs=1e-12)


def test_area_decides_the_size_bucket():
    # A 40x40 box whose COCO area (its segment) is 500 < 32^2 counts as small.
    gt = [target([[10, 10, 50, 50]], [1], image_id=1, area=[500.0])]
    m = evaluate(gt, perfect(gt), [1], ["cat"])
    assert m["bbox/APs"] == pytest.approx(1.0) and math.isnan(m["bbox/APm"])


def test_gapped_category_ids_round_trip():
    ids, names = [1, 5, 90], ["person", "airplane", "toothbrush"]
    gt = [target([[0, 0, 40, 40], [50, 50, 90, 90], [100, 0, 140, 40]], [1, 2, 3], image_id=3)]
    dets = [output([[0, 0, 40, 40], [50, 50, 90, 90], [100, 0, 140, 40]], [0.9, 0.8, 0.7], [1, 2, 3])]
    ev = CocoEvaluator(ids, names)
    ev.update(gt, dets)
    coco_gt, results = ev.coco_dicts()
    assert coco_gt["categories"] == [{"id": 1, "name": "person"}, {"id": 5, "name": "airplane"},
                                     {"id": 90, "name": "toothbrush"}]  # fmt: skip
    assert [a["category_id"] for a in coco_gt["annotations"]] == [1, 5, 90]
    assert [d["category_id"] for d in results] == [1, 5, 90]
    assert coco_gt["annotations"][1]["bbox"] == [50, 50, 40, 40]
    assert coco_gt["images"] == [{"id": 3, "height": 200, "width": 300}]
    assert ev.compute()["bbox/AP"] == pytest.approx(1.0, abs=1e-12)
    # Swapping the labels of two detections makes both wrong: 1 of 3 categories right.
    ev.reset()
    ev.update(gt, [output(dets[0]["boxes"], [0.9, 0.8, 0.7], [1, 3, 2])])
    assert ev.compute()["bbox/AP"] == pytest.approx(1 / 3, abs=1e-12)


@pytest.mark.parametrize("backend", ["pycocotools", "faster_coco_eval"])
def test_zero_detections_give_zero(backend):
    m = evaluate(GT, [output([], [], []), output([], [], [])], backend=backend)
    assert m["bbox/AP"] == 0.0 and m["bbox/AP50"] == 0.0 and m["bbox/APm"] == 0.0
    assert math.isnan(m["bbox/APl"])


def test_nothing_accumulated_gives_nan():
    ev = CocoEvaluator(CATS, NAMES)
    assert all(math.isnan(v) for v in ev.compute().values())


def test_repeated_image_counts_once():
    # A DistributedSampler pads with repeats; a repeated image must not double its detections.
    ev = CocoEvaluator(CATS, NAMES)
    ev.update(GT, perfect(GT))
    other = CocoEvaluator(CATS, NAMES)
    other.update(GT[:1], [output([], [], [])])  # same image id 7, evaluated again elsewhere
    ev.merge([other.state()])
    assert len(ev.records) == 3
    assert ev.compute()["bbox/AP"] == pytest.approx(1.0, abs=1e-12)


def test_labels_out_of_range_are_an_error():
    ev = CocoEvaluator(CATS, NAMES)
    with pytest.raises(ValueError, match="1..2"):
        ev.update([target([[0, 0, 10, 10]], [3], image_id=1)], [output([], [], [])])


def random_case(seed, num_images=12, num_classes=3):
    g = torch.Generator().manual_seed(seed)
    targets, outputs = [], []
    for image_id in range(num_images):
        m = int(torch.randint(0, 6, (1,), generator=g))
        xy = torch.rand(m, 2, generator=g) * 400
        wh = 4 + torch.rand(m, 2, generator=g) * 150  # small, medium and large objects
        boxes = torch.cat([xy, xy + wh], dim=1)
        labels = torch.randint(1, num_classes + 1, (m,), generator=g)
        ignore = torch.rand(m, generator=g) < 0.1
        targets.append({"boxes": boxes, "labels": labels, "ignore": ignore, "image_id": 100 + image_id})
        jitter = boxes + torch.randn(m, 4, generator=g) * 6  # near misses and hits
        noise_xy = torch.rand(4, 2, generator=g) * 400
        noise = torch.cat([noise_xy, noise_xy + 10 + torch.rand(4, 2, generator=g) * 100], dim=1)
        det_boxes = torch.cat([jitter, noise])
        det_labels = torch.cat([labels, torch.randint(1, num_classes + 1, (4,), generator=g)])
        outputs.append({"boxes": det_boxes, "scores": torch.rand(len(det_boxes), generator=g), "labels": det_labels})
    return targets, outputs


def test_backends_agree():
    targets, outputs = random_case(seed=0)
    ids, names = [1, 5, 90], ["a", "b", "c"]
    ref = evaluate(targets, outputs, ids, names, backend="pycocotools")
    fast = evaluate(targets, outputs, ids, names, backend="faster_coco_eval")
    assert 0.0 < ref["bbox/AP"] < 1.0
    assert ref.keys() == fast.keys()
    for key in ref:
        assert ref[key] == pytest.approx(fast[key], abs=1e-12, nan_ok=True), key


def test_unknown_backend_is_an_error():
    with pytest.raises(ValueError, match="backend"):
        CocoEvaluator(CATS, NAMES, backend="nope")
