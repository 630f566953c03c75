"""SGD with the linear lr-scaling rule, an iteration-based warm-up + step schedule, and gradient clipping; the
checks of their config nodes, ``optim`` and ``schedule``."""

import logging

import torch
from omegaconf import DictConfig, ListConfig
from torch import Tensor, nn
from torch.nn.utils import clip_grads_with_norm_, get_total_norm
from torch.optim import SGD, Optimizer
from torch.optim.lr_scheduler import LambdaLR

from ..checks import check, check_int, check_number

log = logging.getLogger(__name__)


def check_optim_config(optim: DictConfig) -> None:
    """The ``optim`` node: SGD's lr, momentum, weight decay and the batch size the lr is given for."""
    check(optim.name == "sgd", "optim.name", optim.name, "must be 'sgd'")
    check_number("optim.lr", optim.lr, lambda v: v > 0, "> 0")
    check_number("optim.momentum", optim.momentum, lambda v: 0 <= v < 1, "in [0, 1)")
    check_number("optim.weight_decay", optim.weight_decay, lambda v: v >= 0, ">= 0")
    check_int("optim.base_batch_size", optim.base_batch_size, 1)


def check_schedule_config(s: DictConfig) -> None:
    """The ``schedule`` node; a schedule whose ``max_iters`` cuts its warm-up or lr steps off is warned about."""
    check_int("schedule.max_iters", s.max_iters, 1)
    check_int("schedule.checkpoint_every", s.checkpoint_every, 1)
    check_int("schedule.log_every", s.log_every, 1)
    check_int("schedule.warmup_iters", s.warmup_iters, 0)
    check_int("schedule.eval_every", s.eval_every, 0)
    check_number("schedule.warmup_factor", s.warmup_factor, lambda v: 0 < v <= 1, "in (0, 1]")
    check_number("schedule.lr_decay", s.lr_decay, lambda v: v > 0, "> 0")
    steps_ok = isinstance(s.steps, ListConfig | list) and all(isinstance(v, int) for v in s.steps)
    check(steps_ok and list(s.steps) == sorted(s.steps), "schedule.steps", s.steps,
          "must be an increasing list of integers")  # fmt: skip
    message = short_schedule(s)
    if message:
        log.warning("%s", message)


def short_schedule(s: DictConfig) -> str | None:
    """What a ``max_iters`` shorter than the warm-up or the lr steps cuts off, or None.

    Not an error: training the first part of a long schedule, to resume it later with the whole ``max_iters``, is
    legitimate; but a short run that forgot the other two ends mid-warm-up or at full lr without a word.
    """
    late_steps = [step for step in s.steps if step >= s.max_iters]
    if s.warmup_iters <= s.max_iters and not late_steps:
        return None
    cut = [f"schedule.warmup_iters={s.warmup_iters}"] if s.warmup_iters > s.max_iters else []
    cut += [f"the lr step(s) {late_steps} of schedule.steps"] if late_steps else []
    return (
        f"schedule.max_iters={s.max_iters} ends before {' and '.join(cut)}: this run stops "
        + ("during the warm-up" if s.warmup_iters > s.max_iters else "before its lr decays")
        + "; for a short whole run use schedule=smoke schedule.max_iters=N (its warm-up and steps follow N), or set "
        "schedule.warmup_iters and schedule.steps with it"
    )


def scaled_lr(optim_cfg: DictConfig, global_batch: int) -> float:
    """Linear scaling (Goyal et al. 2017): ``lr * global_batch / base_batch_size``."""
    return optim_cfg.lr * global_batch / optim_cfg.base_batch_size


def build_optimizer(model: nn.Module, optim_cfg: DictConfig, cls_lr_mult: float, global_batch: int) -> Optimizer:
    """SGD over trainable parameters; the RPN objectness layer gets ``lr * cls_lr_mult`` and
    ``weight_decay / cls_lr_mult``.

    ``cls_lr_mult = 2`` on the sigmoid form gives its logit the step size the softmax form's logit
    difference gets (the two logits of the softmax form each move, and their difference moves twice).
    The difference still decays at the base rate (each logit shrinks by ``1 - lr * weight_decay`` per step),
    so the group keeps the product ``lr * weight_decay`` of the others.
    """
    lr, weight_decay = scaled_lr(optim_cfg, global_batch), optim_cfg.weight_decay
    cls_params = {id(p) for p in model.rpn.head.cls_logits.parameters()}
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    groups = [
        {"params": [p for _, p in trainable if id(p) not in cls_params], "lr": lr, "name": "base"},
        {
            "params": [p for _, p in trainable if id(p) in cls_params], "name": "rpn_cls",
            "lr": lr * cls_lr_mult, "weight_decay": weight_decay / cls_lr_mult,
        },
    ]  # fmt: skip
    return SGD(groups, lr=lr, momentum=optim_cfg.momentum, weight_decay=weight_decay)


def clip_grad_norm_(model: nn.Module, max_norm: float) -> Tensor:
    """``torch.nn.utils.clip_grad_norm_`` (one factor ``min(1, max_norm / norm)`` for every gradient) with the RPN
    objectness layer counted once per logit difference; returns the norm before clipping (0-d).

    A softmax head's loss depends on ``z_obj - z_bg`` only, so the two rows of each anchor in ``cls_logits`` get
    the gradients ``g`` and ``-g``: the plain norm counts ``|g|^2`` twice where the sigmoid form (one logit,
    gradient ``g``) counts it once. The clip factor, which scales every layer, then differs between
    ``rpn=focal_softmax`` and its control ``rpn=focal_sigmoid_lr2``, and so do their steps. Here the layer's
    squared norm is divided by its logits per anchor (1: sigmoid and sampled, where this is the plain norm;
    2: softmax), i.e. measured on the logit difference, and the two arms keep taking the same steps.
    """
    head = model.rpn.head
    logits_per_anchor = head.cls_logits.out_channels // (head.bbox_pred.out_channels // 4)
    cls_ids = {id(p) for p in head.cls_logits.parameters()}
    params = [p for p in model.parameters() if p.grad is not None]
    other = get_total_norm([p.grad for p in params if id(p) not in cls_ids])
    cls = get_total_norm([p.grad for p in params if id(p) in cls_ids])
    norm = torch.sqrt(other.square() + cls.square() / logits_per_anchor)
    clip_grads_with_norm_(params, max_norm, norm)
    return norm


def lr_factor(iteration: int, schedule: DictConfig) -> float:
    """Multiplier of the base lr at ``iteration``: linear warm-up from ``warmup_factor``, then x lr_decay per step."""
    factor = schedule.lr_decay ** sum(iteration >= s for s in schedule.steps)
    if iteration < schedule.warmup_iters:
        alpha = iteration / schedule.warmup_iters
        factor *= schedule.warmup_factor * (1 - alpha) + alpha
    return factor


def build_scheduler(optimizer: Optimizer, schedule: DictConfig) -> LambdaLR:
    return LambdaLR(optimizer, lambda it: lr_factor(it, schedule))
