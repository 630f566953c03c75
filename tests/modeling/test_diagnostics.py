"""Imbalance diagnostics: anchor counts and the easy-negative share of the objectness loss, sampled and focal."""

import math

import pytest
import torch
import torch.nn.functional as F
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.rpn import RegionProposalNetwork, RPNHead

from fl_rpn import FocalLossRPN, TwoLogitRPNHead
from fl_rpn.events import EventStorage
from fl_rpn.modeling.diagnostics import EASY_LOGIT, attach_anchor_diagnostics

THRESHOLDS = dict(fg_iou_thresh=0.7, bg_iou_thresh=0.3, pre_nms_top_n={"training": 10}, post_nms_top_n={"training": 10},
                  nms_thresh=0.7)  # fmt: skip


def loss_inputs(form, n=1000, seed=0):
    """Two images of ``n`` anchors: 5 and 3 positives, 100 ignored each, logits spread over easy and hard."""
    g = torch.Generator().manual_seed(seed)
    labels = []
    for num_pos in (5, 3):
        image = torch.zeros(n)
        image[:num_pos] = 1.0
        image[-100:] = -1.0
        labels.append(image)
    objectness = torch.randn(2 * n, 2 if form == "softmax" else 1, generator=g, dtype=torch.float64) * 3
    return objectness, torch.randn(2 * n, 4, generator=g), labels, [torch.randn(n, 4, generator=g) for _ in labels]


def reference_focal(d, positive, alpha=0.25, gamma=2.0):
    p = torch.sigmoid(d)
    p_t = torch.where(positive, p, 1 - p)
    return -torch.where(positive, alpha, 1 - alpha) * (1 - p_t) ** gamma * torch.log(p_t)


@pytest.mark.parametrize("form", ["sigmoid", "softmax"])
def test_focal_rpn_counts_every_labelled_anchor_and_the_easy_negative_share(form):
    head = (TwoLogitRPNHead if form == "softmax" else RPNHead)(4, 3)
    rpn = FocalLossRPN(AnchorGenerator(((16,),), ((0.5, 1.0, 2.0),)), head, form=form, **THRESHOLDS)
    objectness, deltas, labels, targets = loss_inputs(form)
    with EventStorage() as events:
        rpn.compute_loss(objectness, deltas, labels, targets)
    stats = {k.removeprefix("rpn/"): v.item() for k, v in events.drain().items()}
    assert stats["positive_anchors_per_image"] == 4.0  # (5 + 3) / 2
    assert stats["negative_anchors_per_image"] == 1000 - 100 - 4
    assert stats["trained_anchors_per_image"] == 1000 - 100  # every anchor but the ignored ones
    assert stats["focal_normalizer"] == 8.0

    flat = torch.cat(labels)
    d = objectness[:, 0] if form == "sigmoid" else objectness[:, 1] - objectness[:, 0]
    per_anchor = torch.where(flat >= 0, reference_focal(d, flat == 1), 0.0)
    easy = (flat == 0) & (torch.sigmoid(d) < 0.1)  # p_t > 0.9 for a background anchor
    assert 0 < easy.sum() < (flat == 0).sum()
    assert stats["easy_negative_loss_share"] == pytest.approx((per_anchor[easy].sum() / per_anchor.sum()).item())


class FixedMaps(torch.nn.Module):
    """A head whose objectness maps hold ``[R, 1]`` logits, in compute_loss's order: ``[N, A = 1, R / N, 1]``."""

    def __init__(self, logits, num_images):
        super().__init__()
        self.logits, self.num_images = logits, num_images

    def forward(self, features):
        return [self.logits.view(self.num_images, 1, -1, 1)], []


def test_sampled_rpn_diagnostics_cover_the_sampled_anchors_only():
    rpn = RegionProposalNetwork(AnchorGenerator(((16,),), ((0.5, 1.0, 2.0),)), RPNHead(4, 3),
                                batch_size_per_image=256, positive_fraction=0.5, score_thresh=0.0,
                                **THRESHOLDS)  # fmt: skip
    objectness, deltas, labels, targets = loss_inputs("sigmoid")
    rpn.head = FixedMaps(objectness, num_images=2)  # the head hook sees these logits, as a forward pass would
    attach_anchor_diagnostics(rpn)
    torch.manual_seed(0)
    with EventStorage() as events:
        rpn.head(None)  # a forward pass runs the head, then compute_loss
        rpn.compute_loss(objectness, deltas, labels, targets)
    stats = {k.removeprefix("rpn/"): v.item() for k, v in events.drain().items()}
    assert stats["positive_anchors_per_image"] == 4.0 and stats["negative_anchors_per_image"] == 896.0
    assert stats["trained_anchors_per_image"] == 256.0  # all 8 positives and 504 negatives over 2 images

    pos, neg = rpn.fg_bg_sampler.last  # the anchors the sampler really picked
    trained = torch.cat(pos).bool() | torch.cat(neg).bool()
    flat, logit = torch.cat(labels), objectness[:, 0]
    bce = F.binary_cross_entropy_with_logits(logit, flat.clamp(min=0), reduction="none")
    easy = trained & (flat == 0) & (logit < EASY_LOGIT)
    assert easy.any()
    assert stats["easy_negative_loss_share"] == pytest.approx((bce[easy].sum() / bce[trained].sum()).item())
    assert EASY_LOGIT == pytest.approx(math.log(0.1 / 0.9))
