"""RPN variants by name: ``rpn.loss`` selects a builder, whose signature declares the ``rpn.<key>`` it reads.

A builder ``builder(model, *, key: Annotated[type, check], ...)`` replaces ``model.rpn`` in place; ``model.rpn`` is
then the ``RegionProposalNetwork`` that ``FasterRCNN`` built from the keys every rpn option shares
(``conf/_base/rpn.yaml``: ``SHARED_KEYS``). Each keyword-only parameter is a config key, annotated with the check of
its value; one with a default (``None``) may be left out of an option. The values themselves, defaults included,
are written in the yaml files only (``conf/rpn/``, ``conf/_base/``). ``check_rpn_config`` checks a config's ``rpn``
node against its builder's signature (unknown, missing and bad keys, each named); ``build_rpn`` builds.

A new RPN loss variant is a module that defines its RPN and registers a builder, ``@register_rpn("<loss>")``,
imported at the end of this one, and an option ``conf/rpn/<name>.yaml`` with ``loss: <loss>`` and its values.
"""

import inspect
import typing
from collections.abc import Callable
from typing import Annotated, Any

from omegaconf import DictConfig
from torchvision.models.detection.generalized_rcnn import GeneralizedRCNN

from ..config_check import _check, _check_int, _check_number
from .rpn import BOX_NORMALIZERS, FORMS, use_focal_rpn, use_sampled_rpn
from .rpn_heads import GROUPS, HEADS, NORMS, replace_rpn_head

__all__ = ["RPN_BUILDERS", "SHARED_KEYS", "RPN_DETECTOR_KEYS", "register_rpn", "check_rpn_config", "build_rpn"]

# rpn.<key> -> FasterRCNN(rpn_<key>=...), for every variant
RPN_DETECTOR_KEYS = (
    "pre_nms_top_n_train", "pre_nms_top_n_test", "post_nms_top_n_train", "post_nms_top_n_test",
    "nms_thresh", "fg_iou_thresh", "bg_iou_thresh", "score_thresh",
)  # fmt: skip
# read outside the builders: the option's name, the variant, FasterRCNN's keys, the optimizer's objectness lr
SHARED_KEYS = ("name", "loss", *RPN_DETECTOR_KEYS, "cls_lr_mult", "head")
HEAD_DEFAULTS = {"kind": "shared", "num_convs": 1, "width": None, "norm": None}  # torchvision's RPNHead

Check = Callable[[str, Any], None]  # (rpn.<key>, value) -> None, or ValueError("config key rpn.<key>=...: ...")
RPN_BUILDERS: dict[str, Callable[..., None]] = {}
_CROSS_CHECKS: dict[str, Callable[[DictConfig], None]] = {}


def register_rpn(name: str, *, check: Callable[[DictConfig], None] | None = None):
    """Decorator: ``rpn.loss=<name>`` builds with the decorated function. ``check(rpn)``, if given, checks what one
    key's annotation cannot: values that depend on each other (it runs after every key's own check)."""

    def register(builder: Callable[..., None]) -> Callable[..., None]:
        if name in RPN_BUILDERS:
            raise ValueError(f"rpn.loss={name!r} is registered twice")
        RPN_BUILDERS[name] = builder
        if check is not None:
            _CROSS_CHECKS[name] = check
        return builder

    return register


# -- the checks a parameter's annotation carries ------------------------------------------------------------------
def number(ok: Callable[[float], bool], requirement: str) -> Check:
    """A finite int or float (not a bool, string, NaN or inf) with ``ok(value)``; ``requirement`` says which."""
    return lambda key, value: _check_number(key, value, ok, requirement)


def integer(minimum: int) -> Check:
    return lambda key, value: _check_int(key, value, minimum)


def one_of(*choices: str) -> Check:
    return lambda key, value: _check(value in choices, key, value, "must be " + " or ".join(map(repr, choices)))


def optional(check: Check) -> Check:
    """``null`` or what ``check`` accepts."""
    return lambda key, value: None if value is None else check(key, value)


def config_keys(builder: Callable[..., None]) -> dict[str, tuple[Check, bool]]:
    """``{key: (check, required)}`` from the builder's keyword-only parameters."""
    hints = typing.get_type_hints(builder, include_extras=True)
    keys = {}
    for p in inspect.signature(builder).parameters.values():
        if p.kind is inspect.Parameter.KEYWORD_ONLY:
            keys[p.name] = (hints[p.name].__metadata__[0], p.default is inspect.Parameter.empty)
    return keys


def check_rpn_config(rpn: DictConfig) -> None:
    """``rpn.loss`` is registered, and the node has every key its builder requires, with valid values, and no key
    that neither the builder nor the shared ones read. Raises ``ValueError`` naming the key."""
    _check(rpn.loss in RPN_BUILDERS, "rpn.loss", rpn.loss, "must be " + " or ".join(map(repr, sorted(RPN_BUILDERS))))
    keys = config_keys(RPN_BUILDERS[rpn.loss])
    for key in rpn:
        _check(key in SHARED_KEYS or key in keys, f"rpn.{key}", rpn[key],
               f"not a key of rpn.loss={rpn.loss}, which reads {sorted(keys)} besides the shared ones")  # fmt: skip
    for key, (check, required) in keys.items():
        if key in rpn:
            check(f"rpn.{key}", rpn[key])
        elif required:
            raise ValueError(f"config key rpn.{key} is missing: rpn.loss={rpn.loss} reads it")
    if rpn.loss in _CROSS_CHECKS:
        _CROSS_CHECKS[rpn.loss](rpn)
    if "head" in rpn:
        check_head_config(rpn.head)


def check_head_config(head: DictConfig) -> None:
    """The ``rpn.head`` node (``conf/_base/rpn.yaml``): its kind, tower depth (1-4), width, norm and ``vary``."""
    if not isinstance(head, DictConfig):  # rpn.head=decoupled, meant as rpn.head.kind=decoupled
        raise ValueError(
            f"config key rpn.head={head!r}: rpn.head is a group of keys ({', '.join([*HEAD_DEFAULTS, 'vary'])}), "
            f"not a value; to choose the head write rpn.head.kind={head}"
        )
    expected = {*HEAD_DEFAULTS, "vary"}
    for key in head:
        _check(key in expected, f"rpn.head.{key}", head[key], f"unknown; rpn.head takes {sorted(expected)}")
    for key in expected:
        if key not in head:
            raise ValueError(f"config key rpn.head.{key} is missing")
    _check(head.kind in HEADS, "rpn.head.kind", head.kind, "must be " + " or ".join(map(repr, HEADS)))
    _check_int("rpn.head.num_convs", head.num_convs, 1)
    _check(head.num_convs <= 4, "rpn.head.num_convs", head.num_convs, "must be 1 to 4")
    if head.width is not None:
        _check_int("rpn.head.width", head.width, 1)
    _check(head.norm in NORMS, "rpn.head.norm", head.norm, "must be null or 'group'")
    _check(head.norm != "group" or head.width is None or head.width % GROUPS == 0, "rpn.head.width", head.width,
           f"must be a multiple of {GROUPS} with rpn.head.norm=group (GroupNorm's groups)")  # fmt: skip
    _check(head.vary in ("width", "depth"), "rpn.head.vary", head.vary, "must be 'width' or 'depth'")


def build_rpn(model: GeneralizedRCNN, rpn: DictConfig) -> None:
    """Replace ``model.rpn`` in place with the variant of the ``rpn`` node, which ``check_rpn_config`` accepted."""
    builder = RPN_BUILDERS[rpn.loss]
    builder(model, **{key: rpn[key] for key in config_keys(builder) if key in rpn})
    head = dict(rpn.get("head") or HEAD_DEFAULTS)
    vary = head.pop("vary", "width")
    if head != HEAD_DEFAULTS:  # the default is the head the builder kept: torchvision's (or its two-logit form)
        kind = head.pop("kind")
        options = {k: v for k, v in head.items() if v != HEAD_DEFAULTS[k]}
        if kind == "shared_matched":
            options["vary"] = vary
        focal = rpn.loss == "focal"
        form, prior_prob = (rpn.form, rpn.prior_prob) if focal else ("sigmoid", None)
        replace_rpn_head(model, kind, form, prior_prob, **options)


# -- the built-in variants ----------------------------------------------------------------------------------------
BoxNormalizer = Annotated[str, one_of(*BOX_NORMALIZERS)]  # positives: 1 / (2 N_pos); sampled: 1 / (sample size N)


@register_rpn("sampled")
def sampled_rpn(
    model: GeneralizedRCNN,
    *,
    batch_size_per_image: Annotated[int, integer(1)],
    positive_fraction: Annotated[float, number(lambda v: 0 < v <= 1, "in (0, 1]")],
    box_normalizer: BoxNormalizer,
) -> None:
    """torchvision's sampled RPN (binary cross-entropy over ``batch_size_per_image`` anchors per image), its own
    class for ``box_normalizer=sampled``, ``BoxPositivesRPN`` for ``positives``."""
    use_sampled_rpn(
        model, batch_size_per_image=batch_size_per_image, positive_fraction=positive_fraction,
        box_normalizer=box_normalizer,
    )  # fmt: skip


def _score_below_prior(rpn: DictConfig) -> None:
    # every anchor starts at probability prior_prob: a threshold above it lets no proposal through until the
    # objectness has been trained, and the box head sees only the ground-truth boxes
    if rpn.prior_prob is not None:
        _check(rpn.score_thresh < rpn.prior_prob, "rpn.score_thresh", rpn.score_thresh,
               f"must be below rpn.prior_prob ({rpn.prior_prob}), the initial object probability of every anchor; "
               "otherwise no anchor is proposed at the start of training")  # fmt: skip


@register_rpn("focal", check=_score_below_prior)
def focal_rpn(
    model: GeneralizedRCNN,
    *,
    form: Annotated[str, one_of(*FORMS)],
    loss_weight: Annotated[float, number(lambda v: v > 0, "> 0")],
    alpha: Annotated[float, number(lambda v: 0 <= v <= 1, "in [0, 1]")],
    gamma: Annotated[float, number(lambda v: v >= 0, ">= 0")],
    prior_prob: Annotated[float | None, optional(number(lambda v: 0 < v < 1, "in (0, 1), or null"))],
    box_normalizer: BoxNormalizer,
    batch_size_per_image: Annotated[int | None, optional(integer(1))] = None,
    npos_ema: Annotated[float | None, optional(number(lambda v: 0 <= v < 1, "in [0, 1), or null"))] = None,
) -> None:
    """``FocalLossRPN`` (``use_focal_rpn``), with the shared keys' ``score_thresh``. ``batch_size_per_image``: the
    sample size of the ``sampled`` box normaliser (no anchor is sampled); left out, torchvision's 256. ``npos_ema``:
    the momentum of the N_pos average the losses are divided by; null, this batch's N_pos."""
    use_focal_rpn(
        model, form=form, loss_weight=loss_weight, alpha=alpha, gamma=gamma, prior_prob=prior_prob,
        score_thresh=model.rpn.score_thresh, box_normalizer=box_normalizer, batch_size_per_image=batch_size_per_image,
        npos_ema=npos_ema,
    )  # fmt: skip


# Variants defined in modules of their own register themselves when imported here, e.g.
# from . import rpn_hinge  # noqa: E402, F401
