"""FL-RPN: a torchvision Region Proposal Network that trains every anchor with a focal loss.

Chen, Song, Jiang, "Focal Loss for Region Proposal Network", PRCV 2018::

    L = loss_weight / N_pos * sum_{label >= 0} FL(p_t) + 1 / (2 N_pos) * sum_{label == 1} smooth_l1(t, t*)

The box term's normaliser is ``box_normalizer`` (config ``rpn.box_normalizer``), for every RPN form:
``positives`` = 1 / (2 N_pos) (the paper's term, the focal default) or ``sampled`` = 1 / (batch_size_per_image * N),
the number of anchors torchvision's sampled RPN draws (its default). ``BoxPositivesRPN`` is torchvision's sampled
RPN with the ``positives`` box normaliser, so that either loss can be paired with either box weight.

The paper's settings are the keyword defaults of ``FocalLossRPN`` (``FOCAL_DEFAULTS``, read from its signature);
``conf/_base/focal.yaml`` gives the config the same values (tests/test_rpn_registry.py holds the two together).

Shapes: ``N`` images, ``A`` anchors per location, ``Hi x Wi`` the feature map of level ``i``,
``R`` = sum over images and levels of ``A * Hi * Wi`` (all anchors of the batch), ``C`` objectness
logits per anchor (1 for the sigmoid form, 2 for the softmax form: background, object).

``FocalLossRPN`` differs from its parent in three steps only: ``compute_loss`` (no sampler, focal loss
over every anchor with label >= 0), ``forward`` (counts anchors from the box-regression maps and scores
proposals with the object probability when C = 2) and the objectness-bias initialisation.
"""

import inspect
import logging

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.detection.generalized_rcnn import GeneralizedRCNN
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.rpn import RegionProposalNetwork, RPNHead, concat_box_prediction_layers

from ..events import current_storage
from .diagnostics import anchor_statistics
from .losses import sigmoid_focal_loss
from .rpn_heads import FORMS, TwoLogitRPNHead, init_objectness_prior, replace_rpn_head

__all__ = [
    "FocalLossRPN", "BoxPositivesRPN", "TwoLogitRPNHead", "use_focal_rpn", "init_objectness_prior", "rpn_settings",
    "FORMS", "BOX_NORMALIZERS", "FOCAL_DEFAULTS",
]  # fmt: skip

log = logging.getLogger(__name__)

BOX_NORMALIZERS = ("positives", "sampled")  # 1 / (2 N_pos) | 1 / (batch_size_per_image * N)
TORCHVISION_SAMPLE_SIZE = 256  # torchvision's rpn_batch_size_per_image: the focal "sampled" box normaliser's default


def global_count_normalizer(count: Tensor) -> tuple[Tensor, Tensor]:
    """``(max(1, count), divisor)``: the clamped count of the global batch (all ranks), and what this rank divides
    its loss sums by, that count over the number of ranks ``W``.

    DDP averages gradients over ranks, so dividing each rank's sum by ``max(1, count) / W`` makes that average
    the single-process gradient over the global batch (as in DETR). The global count is clamped before the
    division, so a global batch with fewer positives than ranks (or none) matches one process too.
    """
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        count = count.clone()
        dist.all_reduce(count)
        count = count.clamp(min=1.0)
        return count, count / dist.get_world_size()
    count = count.clamp(min=1.0)
    return count, count


class FocalLossRPN(RegionProposalNetwork):
    """``RegionProposalNetwork`` trained with a focal loss over all anchors instead of 256 sampled ones.

    Args (besides torchvision's own; ``batch_size_per_image`` and ``positive_fraction`` are accepted
    and ignored, since no anchor is sampled):
        form: ``"sigmoid"`` (head with A objectness channels) or ``"softmax"`` (``TwoLogitRPNHead``, 2A).
        loss_weight: lambda, the weight of the objectness term.
        alpha: focal weight of object anchors (background anchors get ``1 - alpha``).
        gamma: focal exponent; 0 gives alpha-weighted cross-entropy.
        prior_prob: initial object probability of every anchor; ``None`` keeps the head's bias.
        box_normalizer: ``"positives"``: the box loss sum over positives / (2 max(1, N_pos)), N_pos of the global
            batch (the paper); ``"sampled"``: / (``batch_size_per_image`` x N images), what torchvision's sampled
            RPN divides by when every image has enough anchors to fill its sample (``batch_size_per_image``
            default 256).
        npos_ema: ``None`` (the paper: divide by this batch's N_pos) or a momentum in [0, 1): the objectness loss
            and the ``positives`` box loss are divided by an exponential moving average of max(1, N_pos) instead
            (``focal_normalizer``); the average is in the state dict (``npos_ema_sum``, ``npos_ema_steps``).

    The keyword defaults are the paper's (lambda 0.1, alpha 0.25, gamma 2, pi 0.01, the softmax form, 1 / (2 N_pos));
    ``FOCAL_DEFAULTS`` holds them by name.
    """

    def __init__(
        self,
        anchor_generator: nn.Module,
        head: nn.Module,
        fg_iou_thresh: float,
        bg_iou_thresh: float,
        pre_nms_top_n: dict[str, int],
        post_nms_top_n: dict[str, int],
        nms_thresh: float,
        score_thresh: float = 0.0,
        batch_size_per_image: int | None = None,
        positive_fraction: float | None = None,
        *,
        form: str = "softmax",
        loss_weight: float = 0.1,
        alpha: float = 0.25,
        gamma: float = 2.0,
        prior_prob: float | None = 0.01,
        box_normalizer: str = "positives",
        npos_ema: float | None = None,
    ) -> None:
        super().__init__(
            anchor_generator, head, fg_iou_thresh, bg_iou_thresh, 256, 0.5,
            pre_nms_top_n, post_nms_top_n, nms_thresh, score_thresh,
        )  # fmt: skip
        self.fg_bg_sampler = None  # every anchor with label >= 0 is trained
        if form not in FORMS:
            raise ValueError(f"rpn form must be one of {sorted(FORMS)}, got {form!r}")
        if not loss_weight > 0:
            raise ValueError(f"rpn loss_weight (lambda) must be > 0, got {loss_weight}")
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"rpn alpha must be in [0, 1], got {alpha}")
        if not gamma >= 0:
            raise ValueError(f"rpn gamma must be >= 0, got {gamma}")
        if box_normalizer not in BOX_NORMALIZERS:
            raise ValueError(f"rpn box_normalizer must be one of {BOX_NORMALIZERS}, got {box_normalizer!r}")
        if npos_ema is not None and not 0.0 <= npos_ema < 1.0:
            raise ValueError(f"rpn npos_ema must be in [0, 1) or None, got {npos_ema}")
        num_anchors = head.bbox_pred.out_channels // 4
        if head.cls_logits.out_channels != FORMS[form] * num_anchors:
            raise ValueError(
                f"the {form} form needs {FORMS[form]} objectness channels per anchor "
                f"({FORMS[form] * num_anchors}), but the head has {head.cls_logits.out_channels}; "
                "use TwoLogitRPNHead for the softmax form"
            )
        self.form = form
        self.loss_weight = loss_weight
        self.alpha = alpha
        self.gamma = gamma
        self.box_normalizer = box_normalizer
        self.box_sample_size = TORCHVISION_SAMPLE_SIZE if batch_size_per_image is None else int(batch_size_per_image)
        self.npos_ema = npos_ema
        if npos_ema is not None:  # in the state dict: checkpointed and restored with the weights
            self.register_buffer("npos_ema_sum", torch.zeros(()))  # the zero-started average, before its correction
            self.register_buffer("npos_ema_steps", torch.zeros(()))
        if prior_prob is not None:
            init_objectness_prior(head.cls_logits, form, prior_prob)

    def focal_normalizer(self, num_pos: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``(max(1, N_pos) of the global batch, the count the loss is normalised by, what this rank divides its
        sums by)``, 0-d tensors.

        Without ``npos_ema`` the loss is normalised by the batch's count (each rank divides by it over the number of
        ranks, ``global_count_normalizer``). With it, by the exponential moving average of the counts of every
        training step so far, this one included (detectron2's RetinaNet ``loss_normalizer``), started at zero and
        bias-corrected as Adam's moments are: after the counts ``c_1 .. c_t``,
        ``sum_k (1 - m) m^(t-k) c_k / (1 - m^t)``. So the first step divides by its own count, as the paper does,
        and no starting guess (detectron2's 100, for COCO at 16 images per batch) scales the first steps' loss by
        the ratio of that guess to this dataset's count (BCCD at 4 images per batch has about 64).
        """
        count, divisor = global_count_normalizer(num_pos)
        if self.npos_ema is None:
            return count, count, divisor
        m = self.npos_ema
        with torch.no_grad():
            self.npos_ema_steps += 1
            self.npos_ema_sum.mul_(m).add_((1.0 - m) * count)
            average = self.npos_ema_sum / (1.0 - torch.pow(m, self.npos_ema_steps))
        return count, average, average * (divisor / count)  # each rank's share, as in global_count_normalizer

    def compute_loss(
        self, objectness: Tensor, pred_bbox_deltas: Tensor, labels: list[Tensor], regression_targets: list[Tensor]
    ) -> tuple[Tensor, Tensor]:
        """
        Args:
            objectness: ``[R, C]`` logits (C = 1 sigmoid, C = 2 softmax with column 0 background).
            pred_bbox_deltas: ``[R, 4]``.
            labels: per image ``[R_n]`` floats, 1 object, 0 background, -1 ignored (between thresholds).
            regression_targets: per image ``[R_n, 4]``, or one ``[R, 4]`` for the batch (``forward`` passes that).

        Returns:
            ``(loss_objectness, loss_rpn_box_reg)``, scalars. Inside an open ``EventStorage`` it also puts the
            step's ``anchor_statistics`` and ``focal_normalizer`` there, as ``rpn/<name>``.
        """
        num_images = len(labels)
        flat_labels = torch.cat(labels)
        positive, negative = flat_labels == 1, flat_labels == 0
        expected = (positive.shape[0], FORMS[self.form])
        if tuple(objectness.shape) != expected:
            raise ValueError(f"{self.form} FocalLossRPN expects objectness {expected}, got {tuple(objectness.shape)}")

        # at least float32 under autocast: sums over ~1e5 anchors and counts lose digits in bf16 / fp16
        dtype = torch.promote_types(objectness.dtype, torch.float32)
        # One logit per anchor in both forms: the softmax focal loss is exactly the sigmoid focal loss of
        # z_obj - z_bg (losses.softmax_focal_loss), so the difference is taken once, for the loss and the stats.
        logit = object_logit(objectness.to(dtype))
        valid = positive | negative  # label -1 (between the IoU thresholds): no loss, no gradient
        per_anchor = sigmoid_focal_loss(logit, positive, self.alpha, self.gamma, valid=valid)

        num_pos = positive.count_nonzero()
        global_num_pos, average_num_pos, normalizer = self.focal_normalizer(num_pos.to(torch.float32))
        loss_sum = per_anchor.sum()
        loss_objectness = self.loss_weight * loss_sum / normalizer

        # Only the few positives (~0.1 % of R) have a box loss: index them (the one host sync of this method, as
        # torchvision's compute_loss has) rather than run smooth L1 and its backward over all R x 4 deltas.
        pos_idx = torch.where(positive)[0]
        targets = regression_targets[0] if len(regression_targets) == 1 else torch.cat(regression_targets)
        box_loss = F.smooth_l1_loss(
            pred_bbox_deltas[pos_idx].to(dtype), targets[pos_idx].to(dtype), beta=1 / 9, reduction="sum"
        )
        if self.box_normalizer == "positives":
            loss_rpn_box_reg = box_loss / (2 * normalizer)
        else:  # torchvision's: / sampled_inds.numel(), batch_size_per_image per image
            loss_rpn_box_reg = box_loss / (self.box_sample_size * num_images)

        storage = current_storage()
        if storage is not None:  # the trainer's step: the statistics are logged
            stats = anchor_statistics(
                logit.detach(), negative, per_anchor.detach(), num_positive=num_pos,
                num_negative=negative.count_nonzero(), num_trained=valid.count_nonzero(), num_images=num_images,
                loss_sum=loss_sum.detach(),
            )  # fmt: skip
            stats["focal_normalizer"] = global_num_pos  # max(1, N_pos) of the global batch, whatever W is
            if self.npos_ema is not None:  # next to the batch's own count: the average the sums were divided by
                stats["npos_ema"] = average_num_pos
            storage.put_scalars(stats, prefix="rpn/")
        return loss_objectness, loss_rpn_box_reg

    def forward(
        self, images: ImageList, features: dict[str, Tensor], targets: list[dict[str, Tensor]] | None = None
    ) -> tuple[list[Tensor], dict[str, Tensor]]:
        """Torchvision's ``forward`` with anchors counted from the ``[N, 4A, Hi, Wi]`` regression maps and
        proposals scored with one logit per anchor (``z_object - z_background`` in the softmax form).

        Returns:
            per image ``[P_n, 4]`` proposals sorted by score, and the loss dict in training.
        """
        features = list(features.values())
        objectness, pred_bbox_deltas = self.head(features)
        anchors = self.anchor_generator(images, features)

        num_images = len(anchors)
        num_anchors_per_level = [d.shape[1] // 4 * d.shape[2] * d.shape[3] for d in pred_bbox_deltas]
        objectness, pred_bbox_deltas = concat_box_prediction_layers(objectness, pred_bbox_deltas)
        # torchvision does not backprop through the proposals
        proposals = self.box_coder.decode(pred_bbox_deltas.detach(), anchors)
        proposals = proposals.view(num_images, -1, 4)
        boxes, _scores = self.filter_proposals(
            proposals, object_logit(objectness.detach()), images.image_sizes, num_anchors_per_level
        )

        losses = {}
        if self.training:
            if targets is None:
                raise ValueError("targets should not be None")
            labels, matched_gt_boxes = self.assign_targets_to_anchors(anchors, targets)
            # one [R, 4] tensor for the batch: box_coder.encode would split it per image for compute_loss to copy
            # it back together
            regression_targets = [self.box_coder.encode_single(torch.cat(matched_gt_boxes), torch.cat(anchors))]
            loss_objectness, loss_rpn_box_reg = self.compute_loss(
                objectness, pred_bbox_deltas, labels, regression_targets
            )
            losses = {"loss_objectness": loss_objectness, "loss_rpn_box_reg": loss_rpn_box_reg}
        return boxes, losses


class BoxPositivesRPN(RegionProposalNetwork):
    """torchvision's sampled ``RegionProposalNetwork`` with the paper's box normaliser, 1 / (2 N_pos).

    Everything is the parent's (sampler, binary cross-entropy over the sampled anchors, smooth L1 with beta 1/9
    over the sampled positives) except the divisor of the box-loss sum: ``2 max(1, N_pos)``, N_pos the sampled
    positives of the global batch (all ranks, as ``FocalLossRPN``), instead of ``sampled_inds.numel()``. It is
    used only for ``rpn.loss=sampled`` with ``rpn.box_normalizer=positives``; ``rpn=sampled`` keeps the parent.
    """

    def compute_loss(
        self, objectness: Tensor, pred_bbox_deltas: Tensor, labels: list[Tensor], regression_targets: list[Tensor]
    ) -> tuple[Tensor, Tensor]:
        """
        Args:
            objectness: ``[R, 1]`` logits; pred_bbox_deltas: ``[R, 4]``.
            labels: per image ``[R_n]`` floats, 1 object, 0 background, -1 ignored.
            regression_targets: per image ``[R_n, 4]``.

        Returns:
            ``(loss_objectness, loss_rpn_box_reg)``, scalars.
        """
        sampled_pos_inds, sampled_neg_inds = self.fg_bg_sampler(labels)
        sampled_pos_inds = torch.where(torch.cat(sampled_pos_inds, dim=0))[0]
        sampled_neg_inds = torch.where(torch.cat(sampled_neg_inds, dim=0))[0]
        sampled_inds = torch.cat([sampled_pos_inds, sampled_neg_inds], dim=0)
        objectness = objectness.flatten()
        labels = torch.cat(labels, dim=0)
        regression_targets = torch.cat(regression_targets, dim=0)
        box_sum = F.smooth_l1_loss(
            pred_bbox_deltas[sampled_pos_inds], regression_targets[sampled_pos_inds], beta=1 / 9, reduction="sum"
        )
        num_pos = torch.tensor(float(sampled_pos_inds.numel()), device=box_sum.device)
        _, normalizer = global_count_normalizer(num_pos)
        box_loss = box_sum / (2 * normalizer)
        objectness_loss = F.binary_cross_entropy_with_logits(objectness[sampled_inds], labels[sampled_inds])
        return objectness_loss, box_loss


def object_logit(objectness: Tensor) -> Tensor:
    """``[R]`` logit whose sigmoid is the object probability, from ``[R, 1]`` or ``[R, 2]`` objectness."""
    if objectness.shape[-1] == 2:
        return objectness[:, 1] - objectness[:, 0]
    return objectness.reshape(-1)


FOCAL_DEFAULTS = {
    name: p.default for name, p in inspect.signature(FocalLossRPN).parameters.items() if p.kind is p.KEYWORD_ONLY
}  # form, loss_weight, alpha, gamma, prior_prob, box_normalizer, npos_ema: the paper's, as FocalLossRPN has them


def rpn_settings(rpn: RegionProposalNetwork) -> dict:
    """The keyword arguments that make another RPN over the same anchors as ``rpn`` (any torchvision
    ``RegionProposalNetwork``): anchor generator, IoU thresholds, top-n per mode, NMS and score thresholds, read
    through their public accessors (the top-n of each mode from ``pre_nms_top_n()`` / ``post_nms_top_n()``)."""
    top_n = {"pre_nms_top_n": {}, "post_nms_top_n": {}}
    training = rpn.training
    try:
        for mode in ("training", "testing"):
            rpn.train(mode == "training")
            for name, values in top_n.items():
                values[mode] = getattr(rpn, name)()
    finally:
        rpn.train(training)
    return {
        "anchor_generator": rpn.anchor_generator, "fg_iou_thresh": rpn.proposal_matcher.high_threshold,
        "bg_iou_thresh": rpn.proposal_matcher.low_threshold, **top_n, "nms_thresh": rpn.nms_thresh,
        "score_thresh": rpn.score_thresh,
    }  # fmt: skip


def use_focal_rpn(
    model: GeneralizedRCNN,
    *,
    score_thresh: float = 0.0,
    batch_size_per_image: int | None = None,
    head: str = "shared",
    head_options: dict | None = None,
    **focal,
) -> GeneralizedRCNN:
    """Replace ``model.rpn`` of any torchvision ``GeneralizedRCNN`` (Faster / Mask / Keypoint R-CNN) in place.

    Keeps the anchor generator, IoU thresholds, top-n and NMS settings (``rpn_settings``), and the head's shared conv
    and box-regression weights. The objectness layer is always re-initialised: a trained A-channel layer does not fit
    a 2A-channel head, and both forms should start from the same prior. ``focal``: ``FocalLossRPN``'s keywords
    (``form``, ``loss_weight``, ``alpha``, ``gamma``, ``prior_prob``, ``box_normalizer``, ``npos_ema``), the paper's
    values (``FOCAL_DEFAULTS``) where left out; ``batch_size_per_image``: see ``FocalLossRPN``.

    ``score_thresh`` (the minimum object probability of a proposal) is not taken from the replaced RPN: its
    threshold was chosen for the scores of a BCE-trained, sampled RPN (torchvision's MobileNet detectors use
    0.05), while a focal-loss RPN starts with every anchor at ``prior_prob`` (0.01): kept, 0.05 would leave no
    proposal at all, in eval and in training, until the objectness had been trained past it. The new RPN uses
    ``score_thresh`` (default 0, no threshold, as torchvision's ResNet detectors); a different replaced value
    is logged. ``head`` (``shared``, ``decoupled``, ``shared_matched``) with ``head_options``:
    ``fl_rpn.modeling.rpn_heads.replace_rpn_head``; the default ``shared`` without options keeps the head as
    described above.
    """
    focal = {**FOCAL_DEFAULTS, **focal}
    old = model.rpn
    settings = rpn_settings(old)
    if old.score_thresh != score_thresh:
        log.info(
            "use_focal_rpn: rpn score_thresh %g of the replaced RPN is not kept (it was set for BCE-trained scores; "
            "the focal RPN starts every anchor at probability %s): now %g; pass score_thresh= to choose",
            old.score_thresh, focal["prior_prob"], score_thresh,
        )  # fmt: skip
    in_channels, num_anchors = old.head.cls_logits.in_channels, old.head.bbox_pred.out_channels // 4
    head_class = TwoLogitRPNHead if focal["form"] == "softmax" else RPNHead
    new_head = head_class(in_channels, num_anchors, conv_depth=len(old.head.conv))  # torchvision's v2 head has 2
    new_head.conv.load_state_dict(old.head.conv.state_dict())
    new_head.bbox_pred.load_state_dict(old.head.bbox_pred.state_dict())
    new_head.to(old.head.bbox_pred.weight.device)
    settings.update(head=new_head, score_thresh=score_thresh, batch_size_per_image=batch_size_per_image)
    model.rpn = FocalLossRPN(**settings, **focal)
    if head != "shared" or head_options:
        replace_rpn_head(model, head, focal["form"], focal["prior_prob"], **(head_options or {}))
    model.rpn.train(old.training)
    return model
