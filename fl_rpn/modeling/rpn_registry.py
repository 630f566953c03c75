"""RPN variants by name: ``rpn.loss`` selects a builder, whose signature declares the ``rpn.<key>`` it reads.

The RPN is built in one direction: its head first (``build_rpn_head`` from ``rpn.head``, in the variant's
objectness form), then the RPN around that head and the model's anchor generator (``build_rpn``). A builder
``builder(parts, *, key: Annotated[type, check], ...) -> RegionProposalNetwork`` gets ``parts``, the keyword arguments
every torchvision ``RegionProposalNetwork`` takes (anchor generator, head, IoU thresholds, top-n, NMS and score
thresholds, from the keys every rpn option shares: ``conf/_base/rpn.yaml``, ``SHARED_KEYS``), and its own keys. Each
of its keyword-only parameters is a config key, annotated with the check of its value; one with a default may be
left out of an option. The values themselves are written in the yaml files (``conf/rpn/``, ``conf/_base/``).
``check_rpn_config`` checks a config's ``rpn`` node, shared keys, variant keys and head, each key once.

A new RPN loss variant is a module that defines its RPN and registers a builder, ``@register_rpn("<loss>")``, imported
by ``fl_rpn/modeling/__init__.py`` (so that it registers before a config is checked), and an option
``conf/rpn/<name>.yaml`` with ``loss: <loss>`` and its values.
"""

import inspect
import typing
from collections.abc import Callable
from typing import Annotated, Any

from omegaconf import DictConfig
from torch import nn
from torchvision.models.detection.rpn import RegionProposalNetwork

from ..checks import Check, check, check_choice, check_int, check_number, integer, number, one_of, optional
from .rpn import BOX_NORMALIZERS, FORMS, BoxPositivesRPN, FocalLossRPN
from .rpn_heads import GROUPS, HEAD_OPTIONS, HEADS, NORMS, build_rpn_head

__all__ = [
    "RPN_BUILDERS", "SHARED_KEYS", "register_rpn", "check_rpn_config", "check_head_config", "build_rpn",
    "config_keys", "head_form",
]  # fmt: skip

# read outside the builders: the option's name, the variant, the parts of every RPN, the optimizer's objectness lr,
# the head
PART_KEYS = (
    "fg_iou_thresh", "bg_iou_thresh", "pre_nms_top_n_train", "pre_nms_top_n_test", "post_nms_top_n_train",
    "post_nms_top_n_test", "nms_thresh", "score_thresh",
)  # fmt: skip
SHARED_KEYS = ("name", "loss", *PART_KEYS, "cls_lr_mult", "head")

RPN_BUILDERS: dict[str, Callable[..., RegionProposalNetwork]] = {}
_CROSS_CHECKS: dict[str, Callable[[DictConfig], None]] = {}


def register_rpn(name: str, *, check: Callable[[DictConfig], None] | None = None):
    """Decorator: ``rpn.loss=<name>`` builds with the decorated function. ``check(rpn)``, if given, checks what one
    key's annotation cannot: values that depend on each other (it runs after every key's own check)."""

    def register(builder: Callable[..., RegionProposalNetwork]) -> Callable[..., RegionProposalNetwork]:
        if name in RPN_BUILDERS:
            raise ValueError(f"rpn.loss={name!r} is registered twice")
        RPN_BUILDERS[name] = builder
        if check is not None:
            _CROSS_CHECKS[name] = check
        return builder

    return register


def config_keys(builder: Callable[..., Any]) -> dict[str, tuple[Check, bool]]:
    """``{key: (check, required)}`` from the builder's keyword-only parameters."""
    hints = typing.get_type_hints(builder, include_extras=True)
    keys = {}
    for p in inspect.signature(builder).parameters.values():
        if p.kind is inspect.Parameter.KEYWORD_ONLY:
            keys[p.name] = (hints[p.name].__metadata__[0], p.default is inspect.Parameter.empty)
    return keys


def _check_shared_keys(rpn: DictConfig) -> None:
    check_number("rpn.fg_iou_thresh", rpn.fg_iou_thresh, lambda v: 0 <= v <= 1, "in [0, 1]")
    check_number("rpn.bg_iou_thresh", rpn.bg_iou_thresh, lambda v: 0 <= v <= rpn.fg_iou_thresh,
                 f"with 0 <= rpn.bg_iou_thresh <= rpn.fg_iou_thresh ({rpn.fg_iou_thresh})")  # fmt: skip
    check_number("rpn.nms_thresh", rpn.nms_thresh, lambda v: 0 < v <= 1, "in (0, 1]")
    check_number("rpn.score_thresh", rpn.score_thresh, lambda v: 0 <= v < 1, "in [0, 1)")
    for key in PART_KEYS:
        if "top_n" in key:
            check_int(f"rpn.{key}", rpn[key], 1)
    check_number("rpn.cls_lr_mult", rpn.cls_lr_mult, lambda v: v > 0, "> 0")


def check_rpn_config(rpn: DictConfig) -> None:
    """The ``rpn`` node: the shared keys, ``rpn.loss`` registered, every key its builder requires with a valid value
    and no key that neither the builder nor the shared ones read, and the head. Raises ``ValueError`` naming the
    key."""
    _check_shared_keys(rpn)
    check_choice("rpn.loss", rpn.loss, sorted(RPN_BUILDERS))
    keys = config_keys(RPN_BUILDERS[rpn.loss])
    for key in rpn:
        check(key in SHARED_KEYS or key in keys, f"rpn.{key}", rpn[key],
              f"not a key of rpn.loss={rpn.loss}, which reads {sorted(keys)} besides the shared ones")  # fmt: skip
    for key, (key_check, required) in keys.items():
        if key in rpn:
            key_check(f"rpn.{key}", rpn[key])
        elif required:
            raise ValueError(f"config key rpn.{key} is missing: rpn.loss={rpn.loss} reads it")
    if rpn.loss in _CROSS_CHECKS:
        _CROSS_CHECKS[rpn.loss](rpn)
    if "head" in rpn:
        check_head_config(rpn.head)


def check_head_config(head: Any) -> None:
    """The ``rpn.head`` node (``conf/_base/rpn.yaml``): its kind, tower depth (1-4), width, norm and ``vary``."""
    expected = ("kind", *HEAD_OPTIONS)
    if not isinstance(head, DictConfig):  # rpn.head=decoupled, meant as rpn.head.kind=decoupled
        raise ValueError(
            f"config key rpn.head={head!r}: rpn.head is a group of keys ({', '.join(expected)}), not a value; to "
            f"choose the head write rpn.head.kind={head}"
        )
    for key in head:
        check(key in expected, f"rpn.head.{key}", head[key], f"unknown; rpn.head takes {sorted(expected)}")
    for key in expected:
        if key not in head:
            raise ValueError(f"config key rpn.head.{key} is missing")
    check_choice("rpn.head.kind", head.kind, HEADS)
    check_int("rpn.head.num_convs", head.num_convs, 1)
    check(head.num_convs <= 4, "rpn.head.num_convs", head.num_convs, "must be 1 to 4")
    if head.width is not None:
        check_int("rpn.head.width", head.width, 1)
    check(head.norm in NORMS, "rpn.head.norm", head.norm, "must be null or 'group'")
    check(head.norm != "group" or head.width is None or head.width % GROUPS == 0, "rpn.head.width", head.width,
          f"must be a multiple of {GROUPS} with rpn.head.norm=group (GroupNorm's groups)")  # fmt: skip
    check_choice("rpn.head.vary", head.vary, ("width", "depth"))


def head_form(rpn: DictConfig) -> str:
    """The objectness form the variant's head needs: the focal RPN's ``rpn.form``, else one logit (``sigmoid``)."""
    return rpn.get("form", "sigmoid")


def build_rpn(rpn: DictConfig, anchor_generator: nn.Module, in_channels: int) -> RegionProposalNetwork:
    """The RPN of the ``rpn`` node (which ``check_rpn_config`` accepted) over ``in_channels``-channel features: its
    head first (``rpn.head``, in the variant's form), then the variant's builder around it."""
    head_cfg = dict(rpn.get("head") or {"kind": "shared", **HEAD_OPTIONS})
    num_anchors = anchor_generator.num_anchors_per_location()[0]
    head = build_rpn_head(head_cfg.pop("kind"), in_channels, num_anchors, head_form(rpn), **head_cfg)
    parts = {
        "anchor_generator": anchor_generator, "head": head, "fg_iou_thresh": rpn.fg_iou_thresh,
        "bg_iou_thresh": rpn.bg_iou_thresh, "nms_thresh": rpn.nms_thresh, "score_thresh": rpn.score_thresh,
        "pre_nms_top_n": {"training": rpn.pre_nms_top_n_train, "testing": rpn.pre_nms_top_n_test},
        "post_nms_top_n": {"training": rpn.post_nms_top_n_train, "testing": rpn.post_nms_top_n_test},
    }  # fmt: skip
    builder = RPN_BUILDERS[rpn.loss]
    return builder(parts, **{key: rpn[key] for key in config_keys(builder) if key in rpn})


# -- the built-in variants ----------------------------------------------------------------------------------------
BoxNormalizer = Annotated[str, one_of(*BOX_NORMALIZERS)]  # positives: 1 / (2 N_pos); sampled: 1 / (sample size N)


@register_rpn("sampled")
def sampled_rpn(
    parts: dict,
    *,
    batch_size_per_image: Annotated[int, integer(1)],
    positive_fraction: Annotated[float, number(lambda v: 0 < v <= 1, "in (0, 1]")],
    box_normalizer: BoxNormalizer,
) -> RegionProposalNetwork:
    """torchvision's sampled RPN (binary cross-entropy over ``batch_size_per_image`` anchors per image), its own
    class for ``box_normalizer=sampled``, ``BoxPositivesRPN`` for ``positives``."""
    rpn_class = BoxPositivesRPN if box_normalizer == "positives" else RegionProposalNetwork
    return rpn_class(**parts, batch_size_per_image=batch_size_per_image, positive_fraction=positive_fraction)


def _score_below_prior(rpn: DictConfig) -> None:
    # every anchor starts at probability prior_prob: a threshold above it lets no proposal through until the
    # objectness has been trained, and the box head sees only the ground-truth boxes
    if rpn.prior_prob is not None:
        check(rpn.score_thresh < rpn.prior_prob, "rpn.score_thresh", rpn.score_thresh,
              f"must be below rpn.prior_prob ({rpn.prior_prob}), the initial object probability of every anchor; "
              "otherwise no anchor is proposed at the start of training")  # fmt: skip


@register_rpn("focal", check=_score_below_prior)
def focal_rpn(
    parts: dict,
    *,
    form: Annotated[str, one_of(*FORMS)],
    loss_weight: Annotated[float, number(lambda v: v > 0, "> 0")],
    alpha: Annotated[float, number(lambda v: 0 <= v <= 1, "in [0, 1]")],
    gamma: Annotated[float, number(lambda v: v >= 0, ">= 0")],
    prior_prob: Annotated[float | None, optional(number(lambda v: 0 < v < 1, "in (0, 1), or null"))],
    box_normalizer: BoxNormalizer,
    box_sample_size: Annotated[int | None, optional(integer(1))] = None,
    npos_ema: Annotated[float | None, optional(number(lambda v: 0 <= v < 1, "in [0, 1), or null"))] = None,
) -> RegionProposalNetwork:
    """``FocalLossRPN`` (its prior init applied to the head). ``box_sample_size``: the anchors per image the
    ``sampled`` box normaliser divides by (no anchor is sampled); left out, torchvision's 256. ``npos_ema``: the
    momentum of the N_pos average the losses are divided by; null, this batch's N_pos."""
    return FocalLossRPN(
        **parts, form=form, loss_weight=loss_weight, alpha=alpha, gamma=gamma, prior_prob=prior_prob,
        box_normalizer=box_normalizer, batch_size_per_image=box_sample_size, npos_ema=npos_ema,
    )  # fmt: skip
