"""``validate_config(cfg)``: every key of a composed root config checked before any data is read, each by the code
that owns it (the validators themselves: ``fl_rpn.checks``).

Unknown keys are rejected by Hydra's struct mode (and named, with the nearest existing key, by the console scripts'
preflight); this checks values and names the offending key: ``ValueError("config key rpn.gamma=-1: must be a number
>= 0")``. Owners: ``rpn.*`` the RPN registry, ``model.*`` the model builder, ``schedule.*`` and ``optim.*`` the
optimizer module, ``stability.*`` the stability hook, ``eval.*`` the evaluator registry; the root keys below.
"""

from omegaconf import DictConfig

from ..checks import check, check_bool, check_choice, check_int, check_number, is_number
from ..evaluation import check_eval_config
from ..modeling.model import COMPILE_MODES, check_model_config
from ..modeling.rpn_registry import check_rpn_config
from .optim import check_optim_config, check_schedule_config
from .stability import check_stability_config
from .step import AMP_DTYPES, NONFINITE

__all__ = ["validate_config"]

IMAGE_CHECKS = (False, "header", "decode")


def check_root_keys(cfg: DictConfig) -> None:
    """The keys at the top of ``conf/train.yaml``: batch, loader, augmentation, precision, speed, failure handling,
    weight averaging and the image checks."""
    check_int("batch_size", cfg.batch_size, 1)
    check_int("num_workers", cfg.num_workers, 0)
    check_number("hflip_prob", cfg.hflip_prob, lambda v: 0 <= v <= 1, "in [0, 1]")
    check(cfg.amp in AMP_DTYPES, "amp", cfg.amp, "must be null, bf16 or fp16")
    check(not (cfg.amp == "fp16" and str(cfg.device) == "cpu"), "amp", cfg.amp,
          "fp16 needs CUDA (its GradScaler); on the CPU use amp=bf16 or null")  # fmt: skip
    check_bool("channels_last", cfg.channels_last)
    check(cfg.compile in COMPILE_MODES, "compile", cfg.compile, "must be null, 'default' or 'max-autotune'")
    check_choice("nonfinite", cfg.nonfinite, NONFINITE)
    check(cfg.clip_grad_norm is None or (is_number(cfg.clip_grad_norm) and cfg.clip_grad_norm > 0),
          "clip_grad_norm", cfg.clip_grad_norm, "must be null or a number > 0")  # fmt: skip
    check(cfg.ema is None or (is_number(cfg.ema) and 0 < cfg.ema < 1), "ema", cfg.ema,
          "must be null or a decay in (0, 1), e.g. 0.999")  # fmt: skip
    check(cfg.check_images in IMAGE_CHECKS, "check_images", cfg.check_images, "must be false, 'header' or 'decode'")
    check_choice("bad_images", cfg.bad_images, ("error", "skip"))
    check(cfg.check_val_images in IMAGE_CHECKS, "check_val_images", cfg.check_val_images,
          "must be false, 'header' or 'decode'")  # fmt: skip


def validate_config(cfg: DictConfig) -> None:
    """Check every value of ``cfg`` (the composed root config); raises ``ValueError`` naming the first bad key."""
    check_rpn_config(cfg.rpn)
    check_schedule_config(cfg.schedule)
    check_optim_config(cfg.optim)
    check_root_keys(cfg)
    check_stability_config(cfg.stability)
    check_model_config(cfg)
    check_eval_config(cfg.eval)
