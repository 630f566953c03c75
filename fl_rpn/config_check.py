"""Config checks that run before any data is read, so a typo costs seconds, not hours.

Unknown keys are rejected by Hydra's struct mode; this checks values and names the offending key:
``ValueError("config key rpn.gamma=-1: must be a number >= 0")``.
"""

import math
from collections.abc import Callable
from typing import Any

from omegaconf import DictConfig, ListConfig


def _check(ok: bool, key: str, value, requirement: str) -> None:
    if not ok:
        raise ValueError(f"config key {key}={value!r}: {requirement}")


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _check_number(key: str, value: Any, ok: Callable[[float], bool], requirement: str) -> None:
    """``value`` must be a finite int or float (not a string, bool, NaN or inf) and satisfy ``ok``."""
    _check(not _is_number(value) or math.isfinite(value), key, value, f"must be a finite number {requirement}")
    _check(_is_number(value) and ok(value), key, value, f"must be a number {requirement}")


def _check_int(key: str, value: Any, minimum: int) -> None:
    _check(isinstance(value, int) and not isinstance(value, bool) and value >= minimum, key, value,
           f"must be an integer >= {minimum}")  # fmt: skip


def validate_config(cfg: DictConfig) -> None:
    from .modeling.rpn_registry import check_rpn_config  # which imports the checks above

    rpn = cfg.rpn  # the shared keys here; rpn.loss and its variant's keys: check_rpn_config, after them
    _check_number("rpn.fg_iou_thresh", rpn.fg_iou_thresh, lambda v: 0 <= v <= 1, "in [0, 1]")
    _check_number("rpn.bg_iou_thresh", rpn.bg_iou_thresh, lambda v: 0 <= v <= rpn.fg_iou_thresh,
                  f"with 0 <= rpn.bg_iou_thresh <= rpn.fg_iou_thresh ({rpn.fg_iou_thresh})")  # fmt: skip
    _check_number("rpn.nms_thresh", rpn.nms_thresh, lambda v: 0 < v <= 1, "in (0, 1]")
    _check_number("rpn.score_thresh", rpn.score_thresh, lambda v: 0 <= v < 1, "in [0, 1)")
    for key in ("pre_nms_top_n_train", "pre_nms_top_n_test", "post_nms_top_n_train", "post_nms_top_n_test"):
        _check_int(f"rpn.{key}", rpn[key], 1)
    _check_number("rpn.cls_lr_mult", rpn.cls_lr_mult, lambda v: v > 0, "> 0")
    check_rpn_config(rpn)

    s = cfg.schedule
    _check_int("schedule.max_iters", s.max_iters, 1)
    _check_int("schedule.checkpoint_every", s.checkpoint_every, 1)
    _check_int("schedule.log_every", s.log_every, 1)
    _check_int("schedule.warmup_iters", s.warmup_iters, 0)
    _check_int("schedule.eval_every", s.eval_every, 0)
    _check_number("schedule.warmup_factor", s.warmup_factor, lambda v: 0 < v <= 1, "in (0, 1]")
    _check_number("schedule.lr_decay", s.lr_decay, lambda v: v > 0, "> 0")
    steps_ok = isinstance(s.steps, ListConfig | list) and all(isinstance(v, int) for v in s.steps)
    _check(steps_ok and list(s.steps) == sorted(s.steps), "schedule.steps", s.steps,
           "must be an increasing list of integers")  # fmt: skip
    _check_number("optim.lr", cfg.optim.lr, lambda v: v > 0, "> 0")
    _check_number("optim.momentum", cfg.optim.momentum, lambda v: 0 <= v < 1, "in [0, 1)")
    _check_number("optim.weight_decay", cfg.optim.weight_decay, lambda v: v >= 0, ">= 0")
    _check_int("optim.base_batch_size", cfg.optim.base_batch_size, 1)

    _check_int("batch_size", cfg.batch_size, 1)
    _check_int("num_workers", cfg.num_workers, 0)
    _check_number("hflip_prob", cfg.hflip_prob, lambda v: 0 <= v <= 1, "in [0, 1]")
    _check(cfg.amp in (None, "bf16", "fp16"), "amp", cfg.amp, "must be null, bf16 or fp16")
    _check(not (cfg.amp == "fp16" and str(cfg.device) == "cpu"), "amp", cfg.amp,
           "fp16 needs CUDA (its GradScaler); on the CPU use amp=bf16 or null")  # fmt: skip
    _check(isinstance(cfg.channels_last, bool), "channels_last", cfg.channels_last, "must be true or false")
    _check(cfg.compile in (None, "default", "max-autotune"), "compile", cfg.compile,
           "must be null, 'default' or 'max-autotune'")  # fmt: skip
    _check(cfg.nonfinite in ("stop", "skip"), "nonfinite", cfg.nonfinite, "must be 'stop' or 'skip'")
    _check(cfg.clip_grad_norm is None or (_is_number(cfg.clip_grad_norm) and cfg.clip_grad_norm > 0),
           "clip_grad_norm", cfg.clip_grad_norm, "must be null or a number > 0")  # fmt: skip
    _check(cfg.ema is None or (_is_number(cfg.ema) and 0 < cfg.ema < 1), "ema", cfg.ema,
           "must be null or a decay in (0, 1), e.g. 0.999")  # fmt: skip
    st = cfg.stability
    _check(isinstance(st.enabled, bool), "stability.enabled", st.enabled, "must be true or false")
    _check_number("stability.spike_k", st.spike_k, lambda v: v > 1, "> 1")
    _check_int("stability.median_window", st.median_window, 1)
    _check_int("stability.probe_every", st.probe_every, 0)
    _check(st.enabled or not st.probe_every, "stability.probe_every", st.probe_every,
           "needs stability.enabled=true")  # fmt: skip
    _check(cfg.check_images in (False, "header", "decode"), "check_images", cfg.check_images,
           "must be false, 'header' or 'decode'")  # fmt: skip
    _check(cfg.bad_images in ("error", "skip"), "bad_images", cfg.bad_images, "must be 'error' or 'skip'")
    _check(cfg.check_val_images in (False, "header", "decode"), "check_val_images", cfg.check_val_images,
           "must be false, 'header' or 'decode'")  # fmt: skip

    _validate_model(cfg)
    _validate_eval(cfg.eval)


def _validate_model(cfg: DictConfig) -> None:
    """``model.name`` and ``model.backbone_weights`` (null, a torchvision weights name, or an existing file)."""
    from .modeling.model import _BACKBONES, backbone_weights_source

    _check(cfg.model.name in _BACKBONES, "model.name", cfg.model.name, f"must be one of {list(_BACKBONES)}")
    resuming = cfg.get("resume") not in (False, None, "false")  # the checkpoint then holds the weights
    backbone_weights_source(cfg.model, need_file=not resuming)


def _validate_eval(e: DictConfig) -> None:
    """The evaluators run after training: a typo here must fail now, not hours later."""
    from .evaluation import check_evaluators, evaluator_options

    _check(isinstance(e.evaluators, ListConfig | list), "eval.evaluators", e.evaluators,
           "must be a list of evaluator names, e.g. [coco,proposal_recall]")  # fmt: skip
    check_evaluators(list(e.evaluators), evaluator_options(e))
    _check_int("eval.batch_size", e.batch_size, 1)
