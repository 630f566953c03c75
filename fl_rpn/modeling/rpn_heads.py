"""RPN heads: torchvision's shared head, a decoupled head and a parameter-matched shared control.

Shapes: ``N`` images, ``C`` channels of every feature map (the FPN's ``out_channels``), ``A`` anchors per
location, ``Hi x Wi`` the feature map of level ``i``, ``K`` objectness logits per anchor (1 for the sigmoid
form, 2 for the softmax form, in ``TwoLogitRPNHead``'s anchor-major layout a0:bg, a0:obj, a1:bg, ...).

Every head has torchvision ``RPNHead``'s forward contract (a list of ``[N, C, Hi, Wi]`` maps in, a list of
``[N, K A, Hi, Wi]`` objectness maps and a list of ``[N, 4 A, Hi, Wi]`` box-delta maps out) and its 1x1 output
layers ``cls_logits`` and ``bbox_pred``, which ``FocalLossRPN``, the optimizer's objectness group and gradient
clipping look up.

``SharedRPNHead``: one tower of ``num_convs`` 3x3 convolutions of ``width`` channels feeds both output layers
(``num_convs=1``, ``width=C``, no norm is torchvision's ``RPNHead``, the same parameters under the same names).
``DecoupledRPNHead``: one such tower for the objectness and another for the box deltas (RetinaNet's separate
subnetworks), so that neither loss reaches the other's tower. ``match_parameters`` picks the shared head of about
the decoupled head's parameter count, the control that tells "decoupled is better" from "bigger is better".
"""

import logging
import math

import torch
from torch import Tensor, nn
from torchvision.models.detection.generalized_rcnn import GeneralizedRCNN
from torchvision.models.detection.rpn import RPNHead
from torchvision.ops.misc import Conv2dNormActivation

__all__ = [
    "SharedRPNHead", "DecoupledRPNHead", "TwoLogitRPNHead", "FORMS", "HEADS", "NORMS", "GROUPS", "HEAD_OPTIONS",
    "head_parameters", "match_parameters", "build_rpn_head", "replace_rpn_head", "count_parameters",
    "init_objectness_prior",
]  # fmt: skip

log = logging.getLogger(__name__)

FORMS = {"sigmoid": 1, "softmax": 2}  # form -> objectness logits per anchor
HEADS = ("shared", "decoupled", "shared_matched")  # rpn head kinds; shared_matched: the decoupled head's control
NORMS = (None, "group")
GROUPS = 32  # GroupNorm groups, RetinaNet's; the tower width must be a multiple of it
# the options of ``build_rpn_head`` besides its kind (config node ``rpn.head``), with torchvision RPNHead's values
HEAD_OPTIONS = {"num_convs": 1, "width": None, "norm": None, "vary": "width"}


class TwoLogitRPNHead(RPNHead):
    """torchvision's ``RPNHead`` with two objectness logits per anchor.

    ``cls_logits`` outputs ``[N, 2A, Hi, Wi]`` in anchor-major order (a0:bg, a0:obj, a1:bg, ...), the
    layout ``permute_and_flatten`` expects with ``C = 2``; ``bbox_pred`` outputs ``[N, 4A, Hi, Wi]``.
    """

    def __init__(self, in_channels: int, num_anchors: int, conv_depth: int = 1) -> None:
        super().__init__(in_channels, num_anchors, conv_depth)
        self.cls_logits = nn.Conv2d(in_channels, 2 * num_anchors, kernel_size=1, stride=1)
        nn.init.normal_(self.cls_logits.weight, std=0.01)
        nn.init.zeros_(self.cls_logits.bias)


def init_objectness_prior(cls_logits: nn.Conv2d, form: str, prior_prob: float) -> None:
    """RetinaNet's prior init: every anchor starts with object probability ``prior_prob``.

    Sigmoid: bias ``-log((1 - pi) / pi)``. Softmax: background bias 0, object bias ``log(pi / (1 - pi))``,
    so the softmax object probability ``sigmoid(b_obj - b_bg)`` is ``pi``.
    """
    if not 0.0 < prior_prob < 1.0:
        raise ValueError(f"prior_prob must be in (0, 1), got {prior_prob}")
    object_bias = math.log(prior_prob / (1.0 - prior_prob))
    with torch.no_grad():
        if form == "sigmoid":
            cls_logits.bias.fill_(object_bias)
        else:
            cls_logits.bias.zero_()
            cls_logits.bias[1::2] = object_bias


def _check(num_convs: int, width: int, norm: str | None, form: str) -> None:
    if form not in FORMS:
        raise ValueError(f"rpn form must be one of {sorted(FORMS)}, got {form!r}")
    if num_convs < 1:
        raise ValueError(f"rpn head num_convs must be >= 1, got {num_convs}")
    if norm not in NORMS:
        raise ValueError(f"rpn head norm must be one of {NORMS}, got {norm!r}")
    if norm == "group" and width % GROUPS:
        raise ValueError(f"rpn head norm=group needs a width divisible by {GROUPS}, got {width}")


def conv_tower(in_channels: int, width: int, num_convs: int, norm: str | None) -> nn.Sequential:
    """``num_convs`` 3x3 convolutions (+ GroupNorm) + ReLU: ``[N, in_channels, H, W]`` -> ``[N, width, H, W]``."""
    norm_layer = (lambda c: nn.GroupNorm(GROUPS, c)) if norm == "group" else None
    return nn.Sequential(
        *(Conv2dNormActivation(in_channels if i == 0 else width, width, kernel_size=3, norm_layer=norm_layer)
          for i in range(num_convs))
    )  # fmt: skip


def _init_convs(module: nn.Module) -> None:
    """torchvision's RPNHead (and RetinaNet head) init: conv weights normal(std 0.01), biases 0; norms keep 1, 0."""
    for layer in module.modules():
        if isinstance(layer, nn.Conv2d):
            nn.init.normal_(layer.weight, std=0.01)
            if layer.bias is not None:
                nn.init.zeros_(layer.bias)


def _checked_width(in_channels: int, num_convs: int, width: int | None, norm: str | None, form: str) -> int:
    """The tower width (``None``: ``C``), after checking the options."""
    width = in_channels if width is None else width
    _check(num_convs, width, norm, form)
    return width


def _output_layers(width: int, num_anchors: int, form: str) -> tuple[nn.Conv2d, nn.Conv2d]:
    """``cls_logits`` (``K A`` channels) and ``bbox_pred`` (``4 A``): 1x1 convolutions over a tower's output."""
    return nn.Conv2d(width, FORMS[form] * num_anchors, kernel_size=1), nn.Conv2d(width, 4 * num_anchors, kernel_size=1)


class SharedRPNHead(nn.Module):
    """``conv`` (a tower shared by both outputs), then ``cls_logits`` ``[N, K A]`` and ``bbox_pred`` ``[N, 4 A]``.

    Args:
        in_channels: ``C``; num_anchors: ``A``; form: ``"sigmoid"`` (K = 1) or ``"softmax"`` (K = 2).
        num_convs: 3x3 convolutions in the tower; width: their output channels (``None``: ``C``).
        norm: ``None`` (conv with bias) or ``"group"`` (GroupNorm with ``GROUPS`` groups, conv without bias).
    """

    def __init__(
        self, in_channels: int, num_anchors: int, *, form: str = "sigmoid", num_convs: int = 1,
        width: int | None = None, norm: str | None = None,
    ) -> None:  # fmt: skip
        super().__init__()
        width = _checked_width(in_channels, num_convs, width, norm, form)
        self.form = form
        self.conv = conv_tower(in_channels, width, num_convs, norm)
        self.cls_logits, self.bbox_pred = _output_layers(width, num_anchors, form)
        _init_convs(self)

    def forward(self, x: list[Tensor]) -> tuple[list[Tensor], list[Tensor]]:
        """``[N, C, Hi, Wi]`` per level -> (``[N, K A, Hi, Wi]`` per level, ``[N, 4 A, Hi, Wi]`` per level)."""
        logits, bbox_reg = [], []
        for feature in x:
            t = self.conv(feature)
            logits.append(self.cls_logits(t))
            bbox_reg.append(self.bbox_pred(t))
        return logits, bbox_reg


class DecoupledRPNHead(nn.Module):
    """``cls_tower`` -> ``cls_logits`` ``[N, K A]`` and, apart, ``box_tower`` -> ``bbox_pred`` ``[N, 4 A]``.

    The objectness loss reaches only ``cls_tower`` / ``cls_logits`` and the box loss only ``box_tower`` /
    ``bbox_pred``; the layers both reach are the backbone and FPN below. Args as ``SharedRPNHead``'s, per tower.
    """

    def __init__(
        self, in_channels: int, num_anchors: int, *, form: str = "sigmoid", num_convs: int = 1,
        width: int | None = None, norm: str | None = None,
    ) -> None:  # fmt: skip
        super().__init__()
        width = _checked_width(in_channels, num_convs, width, norm, form)
        self.form = form
        self.cls_tower = conv_tower(in_channels, width, num_convs, norm)
        self.box_tower = conv_tower(in_channels, width, num_convs, norm)
        self.cls_logits, self.bbox_pred = _output_layers(width, num_anchors, form)
        _init_convs(self)

    def forward(self, x: list[Tensor]) -> tuple[list[Tensor], list[Tensor]]:
        """``[N, C, Hi, Wi]`` per level -> (``[N, K A, Hi, Wi]`` per level, ``[N, 4 A, Hi, Wi]`` per level)."""
        logits = [self.cls_logits(self.cls_tower(feature)) for feature in x]
        bbox_reg = [self.bbox_pred(self.box_tower(feature)) for feature in x]
        return logits, bbox_reg


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def head_parameters(
    kind: str, in_channels: int, num_anchors: int, form: str, *, num_convs: int = 1, width: int | None = None,
    norm: str | None = None,
) -> int:  # fmt: skip
    """The parameter count of ``SharedRPNHead`` (``kind="shared"``) or ``DecoupledRPNHead`` (``"decoupled"``),
    without building it: per 3x3 conv ``9 c_in w`` weights + ``w`` bias (no norm) or ``2 w`` GroupNorm affine."""
    width = in_channels if width is None else width
    per_conv_extra = 2 * width if norm == "group" else width
    tower = 9 * in_channels * width + 9 * width * width * (num_convs - 1) + per_conv_extra * num_convs
    outputs = (width + 1) * (FORMS[form] + 4) * num_anchors
    return (2 if kind == "decoupled" else 1) * tower + outputs


def match_parameters(
    in_channels: int, num_anchors: int, form: str, *, num_convs: int = 1, width: int | None = None,
    norm: str | None = None, vary: str = "width", max_width: int | None = None, max_convs: int = 16,
) -> dict:  # fmt: skip
    """The ``SharedRPNHead`` options (``num_convs``, ``width``, ``norm``) whose parameter count is closest to that of
    the ``DecoupledRPNHead`` with the given options.

    ``vary="width"``: the same ``num_convs``, the width searched up to ``max_width`` (default ``4 C``; multiples of
    ``GROUPS`` with ``norm="group"``); ``vary="depth"``: the same width, ``num_convs`` searched up to ``max_convs``.
    Ties go to the smaller head. For the ResNet-50 FPN head (C = 256, A = 3, 1 to 4 convs per tower) the widened
    head is within 0.5 % of the count (7 % with GroupNorm, whose width moves in steps of 32) and the deepened one
    (``2 num_convs`` convs) exact.
    """
    width = in_channels if width is None else width
    target = head_parameters("decoupled", in_channels, num_anchors, form, num_convs=num_convs, width=width, norm=norm)
    if vary == "width":
        step = GROUPS if norm == "group" else 1
        top = 4 * in_channels if max_width is None else max_width
        candidates = [(num_convs, w) for w in range(step, top + 1, step)]
    elif vary == "depth":
        candidates = [(n, width) for n in range(1, max_convs + 1)]
    else:
        raise ValueError(f"rpn head match vary must be 'width' or 'depth', got {vary!r}")

    def distance(option: tuple[int, int]) -> tuple[int, int]:
        n, w = option
        count = head_parameters("shared", in_channels, num_anchors, form, num_convs=n, width=w, norm=norm)
        return abs(count - target), count

    best_convs, best_width = min(candidates, key=distance)
    return {"num_convs": best_convs, "width": best_width, "norm": norm}


def build_rpn_head(kind: str, in_channels: int, num_anchors: int, form: str, **opts) -> nn.Module:
    """A new head of ``kind`` (``HEADS``) for ``C = in_channels`` features, with torchvision's init (no prior).

    ``opts``: ``num_convs``, ``width``, ``norm`` of the head; for ``shared_matched`` those of the decoupled head to
    match, and ``vary`` (see ``match_parameters``); ``vary`` is ignored by the other kinds. The shared head with
    torchvision's options is torchvision's own class: ``RPNHead`` for the sigmoid form, ``TwoLogitRPNHead`` for the
    softmax form.
    """
    vary = opts.pop("vary", HEAD_OPTIONS["vary"])
    torchvisions = all(opts.get(k, HEAD_OPTIONS[k]) == HEAD_OPTIONS[k] for k in ("num_convs", "width", "norm"))
    if kind == "shared" and torchvisions:
        _check(1, in_channels, None, form)
        return TwoLogitRPNHead(in_channels, num_anchors) if form == "softmax" else RPNHead(in_channels, num_anchors)
    if kind == "shared":
        return SharedRPNHead(in_channels, num_anchors, form=form, **opts)
    if kind == "decoupled":
        return DecoupledRPNHead(in_channels, num_anchors, form=form, **opts)
    if kind == "shared_matched":
        matched = match_parameters(in_channels, num_anchors, form, vary=vary, **opts)
        decoupled = {k: opts[k] for k in ("num_convs", "width", "norm") if k in opts}
        log.info(
            "rpn head shared_matched: %s, %d parameters, for a decoupled head (%s) of %d", matched,
            head_parameters("shared", in_channels, num_anchors, form, **matched), decoupled or "defaults",
            head_parameters("decoupled", in_channels, num_anchors, form, **decoupled),
        )  # fmt: skip
        return SharedRPNHead(in_channels, num_anchors, form=form, **matched)
    raise ValueError(f"rpn head must be one of {HEADS}, got {kind!r}")


def replace_rpn_head(
    model: GeneralizedRCNN, kind: str, form: str, prior_prob: float | None = None, **opts
) -> nn.Module:
    """Replace ``model.rpn.head`` in place by a new ``build_rpn_head(kind, ...)`` and return it.

    The new head is freshly initialised (conv weights normal(std 0.01), biases 0, as torchvision's), on the old
    head's device and in its mode; with ``prior_prob`` its objectness bias gets RetinaNet's prior init
    (``init_objectness_prior``). ``form`` must be the RPN's: a ``FocalLossRPN``'s own, ``"sigmoid"`` for
    torchvision's sampled RPN (binary cross-entropy on one logit per anchor), which is usually given
    ``prior_prob=None`` to keep torchvision's init.
    """
    rpn, old = model.rpn, model.rpn.head
    expected = getattr(rpn, "form", "sigmoid")  # a FocalLossRPN's form; torchvision's sampled RPN has one logit
    if form != expected:
        raise ValueError(f"rpn head form {form!r} does not fit this {type(rpn).__name__}, which needs {expected!r}")
    num_anchors = old.bbox_pred.out_channels // 4
    head = build_rpn_head(kind, model.backbone.out_channels, num_anchors, form, **opts)
    if prior_prob is not None:
        init_objectness_prior(head.cls_logits, form, prior_prob)
    head.to(old.bbox_pred.weight.device).train(old.training)
    rpn.head = head
    log.info(
        "rpn head: %s (%s), %d parameters (the replaced head had %d)", kind,
        ", ".join(f"{k}={v}" for k, v in opts.items()) or "defaults", count_parameters(head), count_parameters(old),
    )  # fmt: skip
    return head
