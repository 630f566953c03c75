"""Class-agnostic recall of the RPN's proposals, as detectron2 and mmdetection report it.

For each image the top-k proposals are matched one-to-one to the non-ignored ground-truth boxes by
detectron2's greedy rule (``_evaluate_box_proposals``; mmdetection's ``eval_recalls`` does the
same): repeatedly take the ground-truth box whose best IoU with a remaining proposal is highest,
record that IoU as its overlap, and remove both. Boxes left over (more boxes than proposals) get
overlap 0. Recall at IoU t is the fraction of all ground-truth boxes, over all images, with overlap
``>= t``; AR is the mean recall over t = 0.50, 0.55, ..., 0.95.

IoUs and thresholds are float64 and the thresholds are the decimal values (0.6 is ``0.6``, not
``0.5 + 2 * 0.05``), so an IoU of exactly 0.6 counts at t = 0.6.

One deliberate difference from detectron2: an image that has ground truth but no proposals counts
its boxes as misses (detectron2 skips such an image, which would raise recall).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torchvision.ops import box_iou

from fl_rpn.evaluation.base import Evaluator, MetricSpec, OptionError, as_boxes, ground_truth, image_id_of

IOU_THRESHOLDS = torch.tensor([round(0.5 + 0.05 * i, 2) for i in range(10)], dtype=torch.float64)
MAX_PROPOSALS = (100, 300, 1000)
AR = MetricSpec("proposal/AR@{k}")  # recall averaged over IoU 0.5:0.95, top-k proposals per image
R50 = MetricSpec("proposal/R50@{k}")  # recall at IoU 0.5


def matched_overlaps(proposals: torch.Tensor, gt_boxes: torch.Tensor) -> torch.Tensor:
    """Greedy one-to-one matching of ``proposals`` [P, 4] to ``gt_boxes`` [M, 4].

    Returns the IoU of each ground-truth box with the proposal it was given, float64 [M]
    (0 for boxes left without a proposal).
    """
    overlaps = box_iou(proposals.double(), gt_boxes.double())  # [P, M]
    out = torch.zeros(len(gt_boxes), dtype=torch.float64)
    for _ in range(min(len(proposals), len(gt_boxes))):
        best_iou, best_proposal = overlaps.max(dim=0)  # per box: its best remaining proposal
        iou, gt_index = best_iou.max(dim=0)  # the box that is covered best
        out[gt_index] = iou
        overlaps[best_proposal[gt_index], :] = -1
        overlaps[:, gt_index] = -1
    return out


class ProposalRecall(Evaluator):
    """``proposal/AR@k`` (AR over IoU 0.5:0.95) and ``proposal/R50@k`` (recall at IoU 0.5).

    Args:
        max_proposals: the k values; the top-k proposals of each image are scored
            (``eval.proposal_recall.max_proposals``).

    ``update`` reads from each target ``boxes`` [M, 4] and optionally ``ignore`` [M] (ignored boxes
    are left out), from each output ``proposals`` [P, 4], sorted by objectness, best first.
    Images without (non-ignored) ground truth contribute nothing; with no ground truth at all the
    values are ``nan``. Values are fractions in [0, 1].
    """

    metric_specs = (AR, R50)
    headline = tuple(AR.key(k=k) for k in MAX_PROPOSALS)

    def __init__(self, *, max_proposals: Sequence[int] = MAX_PROPOSALS) -> None:
        ok = isinstance(max_proposals, Sequence) and not isinstance(max_proposals, str) and len(max_proposals) > 0
        if not (ok and all(isinstance(k, int) and not isinstance(k, bool) and k >= 1 for k in max_proposals)):
            raise OptionError("max_proposals", max_proposals, "must be a non-empty list of integers >= 1")
        self.max_proposals = tuple(max_proposals)
        super().__init__()

    def _record(self, target: dict, output: dict) -> dict[str, Any]:
        if "proposals" not in output:
            raise ValueError(
                "ProposalRecall needs output['proposals'] ([P, 4] RPN proposals, best first) for every image; "
                "the model must return its proposals in eval mode."
            )
        boxes, _, ignore = ground_truth(target)
        gt_boxes = boxes[~ignore]
        proposals = as_boxes(output["proposals"])
        # Only the per-box overlaps are kept, so the records stay small whatever P is.
        overlaps = {k: matched_overlaps(proposals[:k], gt_boxes) for k in self.max_proposals}
        return {"image_id": image_id_of(target), "overlaps": overlaps}

    def compute(self) -> dict[str, float]:
        records = self.unique_records()
        recalls = {}  # k -> recall at each IoU threshold [10]
        for k in self.max_proposals:
            overlaps = torch.cat([torch.zeros(0, dtype=torch.float64)] + [r["overlaps"][k] for r in records])
            if len(overlaps) == 0:
                recalls[k] = torch.full_like(IOU_THRESHOLDS, math.nan)
            else:
                recalls[k] = (overlaps[:, None] >= IOU_THRESHOLDS[None, :]).double().mean(dim=0)
        metrics = {AR.key(k=k): float(r.mean()) for k, r in recalls.items()}
        metrics.update({R50.key(k=k): float(r[0]) for k, r in recalls.items()})
        return metrics
