"""Imbalance diagnostics of an RPN step, the same for the sampled baseline and FL-RPN.

Per step (device tensors; read them only when logging): positive and negative anchors per image
(labels 1 / 0, before any sampling), anchors that received a loss per image, the focal normaliser
(FL-RPN only) and the share of the objectness loss carried by easy negatives (``p_t > 0.9``, i.e.
object probability < 0.1).
"""

import math

import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.models.detection.rpn import RegionProposalNetwork

EASY_LOGIT = -math.log(9.0)  # sigmoid(EASY_LOGIT) = 0.1: a negative below it has p_t > 0.9


@torch.no_grad()
def anchor_statistics(
    object_logit: Tensor, labels: Tensor, per_anchor_loss: Tensor, trained: Tensor, num_images: int
) -> dict[str, Tensor]:
    """
    Args:
        object_logit: ``[R]`` logit whose sigmoid is the object probability.
        labels: ``[R]`` 1 / 0 / -1.
        per_anchor_loss: ``[R]`` objectness loss per anchor (zero where not trained).
        trained: ``[R]`` bool, anchors that received a loss.
    """
    negative = labels == 0
    easy = negative & trained & (object_logit < EASY_LOGIT)
    total = torch.where(trained, per_anchor_loss, 0.0).sum()
    return {
        "positive_anchors_per_image": (labels == 1).count_nonzero() / num_images,
        "negative_anchors_per_image": negative.count_nonzero() / num_images,
        "trained_anchors_per_image": trained.count_nonzero() / num_images,
        "easy_negative_loss_share": torch.where(easy, per_anchor_loss, 0.0).sum() / total.clamp(min=1e-12),
    }


class _RecordingSampler:
    """Calls the RPN's own sampler and remembers which anchors it picked (no extra random draws)."""

    def __init__(self, sampler) -> None:
        self.sampler = sampler
        self.last: tuple[list[Tensor], list[Tensor]] | None = None

    def __getattr__(self, name):
        return getattr(self.sampler, name)

    def __call__(self, labels: list[Tensor]):
        self.last = self.sampler(labels)
        return self.last


def attach_anchor_diagnostics(rpn: RegionProposalNetwork) -> None:
    """Give a torchvision ``RegionProposalNetwork`` the ``stats`` that ``FocalLossRPN`` records itself.

    The class is left untouched: the instance's sampler is observed and its ``compute_loss`` wrapped.
    """
    if hasattr(rpn, "stats"):
        return
    recorder = _RecordingSampler(rpn.fg_bg_sampler)
    rpn.fg_bg_sampler = recorder
    compute_loss = rpn.compute_loss
    rpn.stats = {}

    def observed_compute_loss(objectness, pred_bbox_deltas, labels, regression_targets):
        losses = compute_loss(objectness, pred_bbox_deltas, labels, regression_targets)
        pos, neg = recorder.last
        trained = torch.cat(pos).bool() | torch.cat(neg).bool()
        flat_labels = torch.cat(labels)
        logit = objectness.detach().flatten()
        bce = F.binary_cross_entropy_with_logits(logit, flat_labels.clamp(min=0), reduction="none")
        rpn.stats = anchor_statistics(logit, flat_labels, bce, trained, len(labels))
        return losses

    rpn.compute_loss = observed_compute_loss
