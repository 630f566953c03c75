"""Imbalance diagnostics of an RPN step, the same for the sampled baseline and FL-RPN.

Per step, put into the current ``EventStorage`` (``fl_rpn.events``) as ``rpn/<name>``, device tensors (read them
only when logging): positive and negative anchors per image (labels 1 / 0, before any sampling), anchors that
received a loss per image, the focal normaliser (FL-RPN only) and the share of the objectness loss carried by easy
negatives (``p_t > 0.9``, i.e. object probability < 0.1). ``FocalLossRPN`` puts its own; a sampled RPN is observed
from outside (``attach_anchor_diagnostics``, which the trainer calls). Without an open storage nothing is computed.

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

from ..events import current_storage

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


class _SampledAnchorStatistics:
    """Stands in for a sampled RPN's ``fg_bg_sampler``: calls the RPN's own sampler (no extra random draws) and
    puts ``anchor_statistics`` of the anchors it picked into the current ``EventStorage``.

    The objectness of those anchors comes from a forward hook on ``rpn.head``, which keeps its ``[N, A, Hi, Wi]``
    maps (per level) when a storage is open; torchvision's ``forward`` calls the head before ``compute_loss`` calls
    the sampler, which flattens them in ``concat_box_prediction_layers``'s anchor order. Any other attribute
    (``batch_size_per_image``, ``positive_fraction``) is the sampler's.
    """

    def __init__(self, rpn: RegionProposalNetwork) -> None:
        self.sampler = rpn.fg_bg_sampler
        self.objectness: list[Tensor] | None = None
        self.last: tuple[list[Tensor], list[Tensor]] | None = None  # the latest pick (per image [R_n] masks)
        self.hook = rpn.head.register_forward_hook(self._keep_objectness)

    def __getattr__(self, name):
        if name == "sampler":  # not set yet (copy / unpickle): no recursion
            raise AttributeError(name)
        return getattr(self.sampler, name)

    def _keep_objectness(self, head, args, output) -> None:
        keep = head.training and current_storage() is not None
        self.objectness = [o.detach() for o in output[0]] if keep else None

    def __call__(self, labels: list[Tensor]) -> tuple[list[Tensor], list[Tensor]]:
        self.last = self.sampler(labels)
        storage, objectness = current_storage(), self.objectness
        self.objectness = None
        if storage is not None and objectness is not None:
            storage.put_scalars(self._statistics(objectness, labels, *self.last), prefix="rpn/")
        return self.last

    def _statistics(
        self, objectness: list[Tensor], labels: list[Tensor], pos: list[Tensor], neg: list[Tensor]
    ) -> dict[str, Tensor]:
        # [R]: image-major, then level, location and anchor, the order of compute_loss's objectness
        flat = torch.cat([o.permute(0, 2, 3, 1).reshape(o.shape[0], -1) for o in objectness], dim=1).reshape(-1)
        sampled = torch.cat(pos).bool() | torch.cat(neg).bool()  # at most batch_size_per_image per image
        # Their indices without a host sync (torch.where would wait for the count): a fixed-size index list,
        # padded with index 0 past the real ones, which ``real`` masks out.
        size = min(self.sampler.batch_size_per_image * len(labels), sampled.numel())
        trained = torch.nonzero_static(sampled, size=size, fill_value=0).squeeze(1)
        num_trained = sampled.count_nonzero()
        real = torch.arange(size, device=sampled.device) < num_trained
        flat_labels = torch.cat(labels)
        logit, label = flat[trained], flat_labels[trained]
        bce = F.binary_cross_entropy_with_logits(logit, label.clamp(min=0), reduction="none") * real
        return anchor_statistics(
            logit, (label == 0) & real, bce, num_positive=(flat_labels == 1).count_nonzero(),
            num_negative=(flat_labels == 0).count_nonzero(), num_images=len(labels), num_trained=num_trained,
        )  # fmt: skip


def attach_anchor_diagnostics(rpn: RegionProposalNetwork) -> None:
    """Have a sampled RPN (torchvision's, or a subclass with its ``forward`` whose loss calls ``fg_bg_sampler``)
    put the statistics that ``FocalLossRPN`` puts itself, inside an open ``EventStorage``.

    Its class and ``compute_loss`` stay as they are: the sampler is wrapped and the head observed by a forward hook
    (``_SampledAnchorStatistics``). An RPN without a sampler (``FocalLossRPN``) is left alone, as is one already
    observed.
    """
    if rpn.fg_bg_sampler is None or isinstance(rpn.fg_bg_sampler, _SampledAnchorStatistics):
        return
    rpn.fg_bg_sampler = _SampledAnchorStatistics(rpn)


def detach_anchor_diagnostics(rpn: RegionProposalNetwork) -> None:
    """Undo ``attach_anchor_diagnostics``: the RPN's own sampler back, the head's hook removed (no-op otherwise)."""
    observer = rpn.fg_bg_sampler
    if isinstance(observer, _SampledAnchorStatistics):
        observer.hook.remove()
        rpn.fg_bg_sampler = observer.sampler
