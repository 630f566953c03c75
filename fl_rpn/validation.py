"""Config checks that run before any data is read, so a typo costs seconds, not hours.

Unknown keys are rejected by Hydra's struct mode; this checks values and names the offending key.
"""

from omegaconf import DictConfig


def _check(ok: bool, key: str, value, requirement: str) -> None:
    if not ok:
        raise ValueError(f"config key {key}={value!r}: {requirement}")


def validate_config(cfg: DictConfig) -> None:
    rpn = cfg.rpn
    _check(rpn.loss in ("sampled", "focal"), "rpn.loss", rpn.loss, "must be 'sampled' or 'focal'")
    if rpn.loss == "focal":
        _check(rpn.form in ("sigmoid", "softmax"), "rpn.form", rpn.form, "must be 'sigmoid' or 'softmax'")
        _check(rpn.gamma >= 0, "rpn.gamma", rpn.gamma, "must be >= 0")
        _check(0 <= rpn.alpha <= 1, "rpn.alpha", rpn.alpha, "must be in [0, 1]")
        _check(rpn.loss_weight > 0, "rpn.loss_weight", rpn.loss_weight, "must be > 0")
        prior = rpn.prior_prob
        _check(prior is None or 0 < prior < 1, "rpn.prior_prob", prior, "must be null or in (0, 1)")
    else:
        _check(rpn.batch_size_per_image > 0, "rpn.batch_size_per_image", rpn.batch_size_per_image, "must be > 0")
        _check(0 < rpn.positive_fraction <= 1, "rpn.positive_fraction", rpn.positive_fraction, "must be in (0, 1]")
    _check(0 <= rpn.bg_iou_thresh <= rpn.fg_iou_thresh <= 1, "rpn.bg_iou_thresh", rpn.bg_iou_thresh,
           f"must satisfy 0 <= rpn.bg_iou_thresh <= rpn.fg_iou_thresh ({rpn.fg_iou_thresh}) <= 1")  # fmt: skip
    _check(rpn.cls_lr_mult > 0, "rpn.cls_lr_mult", rpn.cls_lr_mult, "must be > 0")
    s = cfg.schedule
    _check(s.max_iters > 0, "schedule.max_iters", s.max_iters, "must be > 0")
    _check(s.checkpoint_every > 0, "schedule.checkpoint_every", s.checkpoint_every, "must be > 0")
    _check(s.log_every > 0, "schedule.log_every", s.log_every, "must be > 0")
    _check(list(s.steps) == sorted(s.steps), "schedule.steps", list(s.steps), "must be increasing")
    _check(cfg.optim.lr > 0, "optim.lr", cfg.optim.lr, "must be > 0")
    _check(cfg.batch_size > 0, "batch_size", cfg.batch_size, "must be > 0")
    _check(cfg.amp in (None, "bf16", "fp16"), "amp", cfg.amp, "must be null, bf16 or fp16")
    _check(cfg.nonfinite in ("stop", "skip"), "nonfinite", cfg.nonfinite, "must be 'stop' or 'skip'")
    _check(cfg.clip_grad_norm is None or cfg.clip_grad_norm > 0, "clip_grad_norm", cfg.clip_grad_norm,
           "must be null or > 0")  # fmt: skip
