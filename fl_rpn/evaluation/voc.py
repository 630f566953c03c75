"""PASCAL VOC mAP, as the VOC2007 devkit and detectron2's ``pascal_voc_evaluation.py`` compute it.

Per class, detections of all images are ranked by score (ties keep their input order). Each is
compared with the ground-truth box of its class in its image that it overlaps most: IoU
``> iou_thresh`` with a box not yet taken → true positive (the box is taken); with a ``difficult``
box (``ignore``) → skipped, neither true nor false positive; with a taken box, or no overlap above the
threshold → false positive. Recall divides by the number of non-difficult boxes. AP is the 11-point
interpolated precision (VOC2007: the mean over t in ``np.arange(0, 1.1, 0.1)`` of the best precision
at recall >= t, the thresholds exactly as detectron2 and mmdetection compute them) or, with
``use_07_metric=False``, the area under the monotone precision envelope (VOC2010 and later).

Pixel convention. The devkit measures boxes in 1-based inclusive pixels and adds 1 to every width
and height. Our VOC reader, like detectron2's, subtracts 1 from ``xmin`` and ``ymin`` at load time,
giving continuous 0-based ``xyxy`` boxes. For such boxes the devkit's "+1" IoU equals the plain
continuous IoU (``torchvision.ops.box_iou``) exactly, which is what we compute: numbers match the
devkit and detectron2 as long as boxes come from such a reader (and detections are in the same
coordinates). For evaluation the readers keep every box as annotated (neither clipped to the image
nor dropped when <= 1 px, which is training-only), so the ground truth is the devkit's own
(``tests/evaluation/test_reader_vs_official.py`` scores the same XML files both ways).

Values are fractions in [0, 1]. A class without non-difficult ground truth has AP ``nan`` and is
left out of the mean (``nan`` if no class has ground truth).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from torchvision.ops import box_iou

from fl_rpn.evaluation.base import Evaluator, MetricSpec, OptionError, detections, ground_truth, image_id_of


def voc_ap(recall: np.ndarray, precision: np.ndarray, use_07_metric: bool = True) -> float:
    """AP from the cumulative ``recall`` [D] and ``precision`` [D] of the ranked detections."""
    if use_07_metric:
        ap = 0.0
        for t in np.arange(0.0, 1.1, 0.1):
            ap += (precision[recall >= t].max() if (recall >= t).any() else 0.0) / 11.0
        return float(ap)
    mrec = np.concatenate(([0.0], recall, [1.0]))
    mpre = np.concatenate(([0.0], precision, [0.0]))
    mpre = np.maximum.accumulate(mpre[::-1])[::-1]  # precision envelope
    i = np.flatnonzero(mrec[1:] != mrec[:-1])  # points where recall changes
    return float(np.sum((mrec[i + 1] - mrec[i]) * mpre[i + 1]))


class VOC07Evaluator(Evaluator):
    """``voc07/mAP`` and ``voc07/AP/<class_name>`` for each class.

    Args:
        class_names: the name of each label ``1..K``.
        use_07_metric: 11-point AP (VOC2007) if True, area under the envelope if False; ``eval.voc07.use_07_metric``.
        iou_thresh: a detection is a hit if its IoU is strictly greater than this; ``eval.voc07.iou_thresh``.

    ``update`` reads from each target ``boxes`` [M, 4], ``labels`` [M] and optionally ``ignore`` [M]
    (VOC ``difficult``), from each output ``boxes`` [D, 4], ``scores`` [D], ``labels`` [D]. The keys
    keep the ``voc07/`` prefix whichever AP rule is chosen.
    """

    metric_specs = (MetricSpec("voc07/mAP"), MetricSpec("voc07/AP/{class_name}", per_class=True))
    headline = ("voc07/mAP",)

    def __init__(self, class_names: list[str], *, use_07_metric: bool = True, iou_thresh: float = 0.5) -> None:
        if not isinstance(use_07_metric, bool):
            raise OptionError("use_07_metric", use_07_metric, "must be true or false")
        if isinstance(iou_thresh, bool) or not isinstance(iou_thresh, int | float) or not 0 <= iou_thresh < 1:
            raise OptionError("iou_thresh", iou_thresh, "must be a number in [0, 1)")
        self.class_names = list(class_names)
        self.use_07_metric = use_07_metric
        self.iou_thresh = float(iou_thresh)
        super().__init__()

    @classmethod
    def from_meta(cls, meta: Any, **options: Any) -> VOC07Evaluator:
        return cls(list(meta.class_names), **options)

    def _record(self, target: dict, output: dict) -> dict[str, Any]:
        boxes, labels, ignore = ground_truth(target)
        dt_boxes, dt_scores, dt_labels = detections(output)
        # The box each detection overlaps most among the boxes of its class (the devkit's jmax).
        ious = box_iou(dt_boxes, boxes)  # [D, M]
        ious[dt_labels[:, None] != labels[None, :]] = -1.0
        if len(boxes):
            best_iou, best_box = ious.max(dim=1)
        else:
            best_iou = torch.full((len(dt_boxes),), -1.0, dtype=torch.float64)
            best_box = torch.zeros(len(dt_boxes), dtype=torch.int64)
        return {
            "image_id": image_id_of(target),
            "labels": labels, "ignore": ignore,
            "dt_scores": dt_scores, "dt_labels": dt_labels,
            "dt_best_iou": best_iou, "dt_best_box": best_box,
        }  # fmt: skip

    def compute(self) -> dict[str, float]:
        records = self.unique_records()
        # All images concatenated; dt_box indexes the concatenated ground truth.
        offsets = np.cumsum([0] + [len(r["labels"]) for r in records])

        def cat(key: str, shift: bool = False) -> np.ndarray:
            parts = [r[key].numpy() + (o if shift else 0) for r, o in zip(records, offsets)]
            return np.concatenate(parts) if parts else np.zeros(0)

        gt_labels, gt_ignore = cat("labels"), cat("ignore").astype(bool)
        dt_scores, dt_labels = cat("dt_scores"), cat("dt_labels")
        dt_iou, dt_box = cat("dt_best_iou"), cat("dt_best_box", shift=True)

        aps = {}
        for label, name in enumerate(self.class_names, start=1):
            num_pos = int(((gt_labels == label) & ~gt_ignore).sum())
            if num_pos == 0:
                aps[name] = math.nan
                continue
            (dets,) = np.nonzero(dt_labels == label)
            dets = dets[np.argsort(-dt_scores[dets], kind="stable")]
            taken = np.zeros(len(gt_labels), dtype=bool)
            tp, fp = np.zeros(len(dets)), np.zeros(len(dets))
            for rank, d in enumerate(dets):
                if dt_iou[d] > self.iou_thresh:
                    g = dt_box[d]
                    if gt_ignore[g]:
                        continue
                    if taken[g]:
                        fp[rank] = 1
                    else:
                        tp[rank], taken[g] = 1, True
                else:
                    fp[rank] = 1
            tp, fp = np.cumsum(tp), np.cumsum(fp)
            recall = tp / num_pos
            precision = tp / np.maximum(tp + fp, np.finfo(np.float64).eps)
            aps[name] = voc_ap(recall, precision, self.use_07_metric)

        valid = [ap for ap in aps.values() if not math.isnan(ap)]
        metrics = {"voc07/mAP": float(np.mean(valid)) if valid else math.nan}
        metrics.update({f"voc07/AP/{name}": ap for name, ap in aps.items()})
        return metrics
