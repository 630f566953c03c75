"""Imbalance diagnostics of an RPN step, the same for the sampled baseline and FL-RPN.

Per step (device tensors; read them only when logging): positive and negative anchors per image
(labels 1 / 0, before any sampling), anchors that received a loss per image, the focal normaliser
(FL-RPN only) and the share of the objectness loss carried by easy negatives (``p_t > 0.9``, i.e.
object probability < 0.1).

Under DDP every rank logs the same global values: the easy-negative share is the ratio of the loss sums over
all ranks (one small all_reduce), not a mean of per-rank ratios, and the focal normaliser is the global count.
The per-image counts are per rank; every rank has the same number of images, so their mean over ranks (the
logged value) is the global per-image mean.
"""

import math

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor
from torchvision.models.detection.rpn import RegionProposalNetwork

EASY_LOGIT = -math.log(9.0)  # sigmoid(EASY_LOGIT) = 0.1: a negative below it has p_t > 0.9


@torch.no_grad()
def anchor_statistics(
    object_logit: Tensor,
    negative: Tensor,
    per_anchor_loss: Tensor,
    *,
    num_positive: Tensor,
    num_negative: Tensor,
    num_trained: Tensor,
    num_images: int,
    loss_sum: Tensor | None = None,
) -> dict[str, Tensor]:
    """
    Args:
        object_logit: ``[T]`` logit whose sigmoid is the object probability, of T anchors that include every
            trained one (all R anchors for FL-RPN, the 256 sampled per image for the sampled RPN).
        negative: ``[T]`` bool, those labelled 0 (background).
        per_anchor_loss: ``[T]`` their objectness loss, zero for any that was not trained.
        num_positive, num_negative, num_trained: anchors labelled 1, labelled 0 (before any sampling) and
            trained, in the whole batch.
        loss_sum: ``per_anchor_loss.sum()`` when the caller has it already.
    """
    if loss_sum is None:
        loss_sum = per_anchor_loss.sum()
    easy_loss = (per_anchor_loss * (negative & (object_logit < EASY_LOGIT))).sum()
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:  # the global ratio
        sums = torch.stack([easy_loss, loss_sum]).float()
        dist.all_reduce(sums)
        easy_loss, loss_sum = sums.unbind()
    return {
        "positive_anchors_per_image": num_positive / num_images,
        "negative_anchors_per_image": num_negative / num_images,
        "trained_anchors_per_image": num_trained / num_images,
        "easy_negative_loss_share": easy_loss / loss_sum.clamp(min=1e-12),
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
        sampled = torch.cat(pos).bool() | torch.cat(neg).bool()  # at most batch_size_per_image per image
        # Their indices without a host sync (torch.where would wait for the count): a fixed-size index list,
        # padded with index 0 past the real ones, which ``real`` masks out.
        size = min(recorder.batch_size_per_image * len(labels), sampled.numel())
        trained = torch.nonzero_static(sampled, size=size, fill_value=0).squeeze(1)
        num_trained = sampled.count_nonzero()
        real = torch.arange(size, device=sampled.device) < num_trained
        flat_labels = torch.cat(labels)
        logit, label = objectness.detach().flatten()[trained], flat_labels[trained]
        bce = F.binary_cross_entropy_with_logits(logit, label.clamp(min=0), reduction="none") * real
        rpn.stats = anchor_statistics(
            logit, (label == 0) & real, bce, num_positive=(flat_labels == 1).count_nonzero(),
            num_negative=(flat_labels == 0).count_nonzero(), num_images=len(labels), num_trained=num_trained,
        )  # fmt: skip
        return losses

    rpn.compute_loss = observed_compute_loss
