"""Assembling a training run: ``build_run(cfg) -> TrainState``, which ``fl_rpn.engine.trainer.run`` trains.

As detectron2 separates building from ``TrainerBase.train``, building is here and the loop in ``trainer.py``:

- ``build_trainable(cfg, num_classes, ...)``: the model with its speed options and anchor diagnostics, the optimizer,
  the lr schedule, the AMP scaler and the ``TrainStep``; no data, run directory or hook. Benchmarks build through it.
- ``build_run(cfg)``: the process (device, ranks, seed), the checked datasets, the trainable parts, a checkpoint's
  state when resuming, DDP, the run directory's header, the hooks and the data stream, in a ``TrainState``. Tests
  build through it and change what they need in the state (a forward hook on ``state.model``, another
  ``state.stream``) before ``run(state)``.

The order of the steps that draw random numbers (the model's initialisation after the seed) is the trainer's of
old, so a seeded run gives the same weights as before this split.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from ..data import build_dataset, require_valid
from ..data.check import drop_bad_images
from ..modeling.diagnostics import attach_anchor_diagnostics
from ..modeling.model import apply_speed_options, build_model, fetch_backbone_weights
from .checkpoint import check_resume_config, load_checkpoint, load_model_state, set_rng_state
from .distributed import SINGLE_PROCESS, DistInfo, broadcast_object, init_distributed
from .ema import EMA
from .evaluate import run_evaluation, select_device
from .hooks import Checkpointer, Evaluation, MetricsLogger, Preemption, TrainState
from .optim import build_optimizer, build_scheduler, lr_factor, scaled_lr
from .stability import StabilityMonitor
from .step import AMP_DTYPES, TrainStep
from .stream import TrainStream
from .validate import validate_config

log = logging.getLogger(__name__)


@dataclass(kw_only=True)
class Trainable:
    """What trains: ``model`` (on its device), ``optimizer``, ``scheduler`` (per iteration), ``scaler`` (AMP, enabled
    for fp16 only) and ``step``, the ``TrainStep`` that runs one batch through them."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any
    scaler: torch.amp.GradScaler
    step: TrainStep


def build_trainable(
    cfg: DictConfig,
    num_classes: int,
    *,
    device: torch.device,
    dist_info: DistInfo = SINGLE_PROCESS,
    load_backbone_weights: bool = True,
    checkpoint_path: Path | None = None,
    stop_requested=lambda: False,
) -> Trainable:
    """The model, optimizer, lr schedule, scaler and ``TrainStep`` of ``cfg`` (the composed root config).

    The optimizer's lr follows the global batch, ``cfg.batch_size`` x the world size. ``checkpoint_path`` is named in
    the step's errors; ``stop_requested`` is polled by the step (SIGTERM). The step runs ``model`` itself: under DDP
    the caller sets ``step.forward_model`` to the wrapped model once the weights are final (after a resume).
    """
    model = build_model(cfg, num_classes, load_backbone_weights=load_backbone_weights).to(device)
    apply_speed_options(model, channels_last=cfg.channels_last, compile_mode=cfg.compile)
    attach_anchor_diagnostics(model.rpn)  # a sampled RPN's statistics, observed by hooks (FocalLossRPN puts its own)
    optimizer = build_optimizer(model, cfg.optim, cfg.rpn.cls_lr_mult, cfg.batch_size * dist_info.world_size)
    scheduler = build_scheduler(optimizer, cfg.schedule)
    amp_dtype = AMP_DTYPES[cfg.amp]
    scaler = torch.amp.GradScaler("cuda", enabled=amp_dtype is torch.float16)
    step = TrainStep(
        model=model, optimizer=optimizer, device=device, scaler=scaler, amp_dtype=amp_dtype,
        clip_grad_norm=cfg.clip_grad_norm, nonfinite=cfg.nonfinite, checkpoint_path=checkpoint_path,
        stop_requested=stop_requested, dist_info=dist_info,
    )  # fmt: skip
    return Trainable(model=model, optimizer=optimizer, scheduler=scheduler, scaler=scaler, step=step)


def drop_file_logging() -> None:
    """Remove the root logger's file handlers (ranks > 0: ``train.log`` is rank 0's).

    Under torchrun and srun ``fl_rpn.cli.train.main`` gives ranks > 0 stdout logging, but Hydra's submitit launcher
    sets up every rank's job itself, each with a handler appending to the same ``train.log``.
    """
    root = logging.getLogger()
    for handler in [h for h in root.handlers if isinstance(h, logging.FileHandler)]:
        root.removeHandler(handler)
        handler.close()


def setup_process(cfg: DictConfig) -> tuple[torch.device, DistInfo, Path]:
    """This process's device, its place in the process group and the run directory (rank 0's); seeds torch."""
    device = select_device(cfg.device)
    if cfg.amp == "fp16" and device.type != "cuda":  # bf16 autocast runs on the CPU too
        raise ValueError(f"config key amp=fp16: needs CUDA (GradScaler); this run is on {device}: use amp=bf16 or null")
    dist_info = init_distributed(str(device))
    if not dist_info.is_main:
        drop_file_logging()
    if dist_info.enabled and device.type == "cuda":
        device = torch.device("cuda", dist_info.cuda_index)
    # Every rank works in rank 0's run directory (Hydra's ${now:...} can differ between processes) and
    # only rank 0 writes to it.
    output_dir = Path(broadcast_object(str(cfg.output_dir), dist_info))
    torch.manual_seed(cfg.seed + dist_info.rank)
    if cfg.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
    return device, dist_info, output_dir


@contextlib.contextmanager
def quiet_below_error(dist_info: DistInfo, *logger_names: str):
    """On ranks > 0, the loggers ``logger_names`` pass only errors meanwhile: every rank reads the same files, so
    their warnings would repeat rank 0's line for line."""
    if dist_info.is_main:
        yield
        return
    loggers = [logging.getLogger(name) for name in logger_names]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


def build_datasets(cfg: DictConfig):
    """The train and val splits, checked (and with ``bad_images=skip`` cleaned) before anything is trained."""
    train_set = build_dataset(cfg.dataset.train, train=True, hflip_prob=cfg.hflip_prob)
    val_set = build_dataset(cfg.dataset.val, train=False)
    # empty splits and missing image files fail here, not at the first batch or after training; the val split
    # (small) is decoded too by default (check_val_images), or a bad val image would stop the run after training
    depths = {"dataset.train": cfg.check_images or "exists", "dataset.val": cfg.check_val_images or "exists"}
    if cfg.bad_images == "skip":  # drop what the check finds, before the stream and the shards are made
        depths["dataset.train"] = cfg.check_images or "decode"
        for name, dataset in (("dataset.train", train_set), ("dataset.val", val_set)):
            problems = drop_bad_images(dataset, depths[name])
            if problems:
                log.warning("bad_images=skip: %s: %d image(s) skipped:\n  %s%s", name, len(problems),
                            "\n  ".join(problems[:20]), "\n  ..." if len(problems) > 20 else "")  # fmt: skip
    require_valid({"dataset.train": train_set, "dataset.val": val_set}, depth=depths)
    require_boxes(train_set, val_set)
    if train_set.meta.class_names != val_set.meta.class_names:
        raise ValueError(
            f"dataset.train and dataset.val have different classes: {train_set.meta.class_names[:5]}... vs "
            f"{val_set.meta.class_names[:5]}..."
        )
    return train_set, val_set


def require_boxes(train_set, val_set) -> None:
    """A training split without one box to learn from is refused; a val split without boxes is warned about."""
    if not any((~r.ignore).any() for r in train_set.records):
        raise ValueError(
            f"dataset.train: none of its {len(train_set)} images has a box to train on (all are empty, or every box "
            "is crowd / difficult): nothing can be learnt. Check the split's annotations (fl-rpn-check-data)."
        )
    if not any((~r.ignore).any() for r in val_set.records):  # crowd / difficult boxes are ignored by the metrics
        log.warning(
            "dataset.val: none of its %d images has a box: AP and AR are undefined (NaN), since there is no object "
            "to find; only the training losses say anything about this run", len(val_set.records),
        )  # fmt: skip


def resolve_resume(resume: Any, output_dir: Path) -> Path | None:
    if resume in (False, None, "false"):
        return None
    if resume in (True, "true"):
        path = output_dir / "last.pt"
        if path.is_file():
            return path
        # legitimate for a requeued job that was stopped before its first checkpoint, so not an error
        log.warning("resume=true but %s does not exist: training from scratch", path)
        return None
    return Path(str(resume)).expanduser()


def resume_state(ckpt: dict, cfg: DictConfig, path: Path, trainable: Trainable, dist_info: DistInfo,
                 class_names: list[str]) -> int:  # fmt: skip
    """Load a checkpoint's model, optimizer, scheduler, scaler and RNG state; returns its iteration.

    The lr per parameter group and the weight decay follow this run's config (another world size or optim.lr).
    """
    check_resume_config(ckpt, cfg, path, class_names)  # no mixing of two runs
    optimizer, scheduler = trainable.optimizer, trainable.scheduler
    load_model_state(trainable.model, ckpt["model"], path)
    base_lrs = [group["initial_lr"] for group in optimizer.param_groups]  # this run's scaled lr
    weight_decays = [group["weight_decay"] for group in optimizer.param_groups]
    optimizer.load_state_dict(ckpt["optimizer"])
    for group, weight_decay in zip(optimizer.param_groups, weight_decays):  # this run's optim config
        group["weight_decay"] = weight_decay
    scheduler.load_state_dict(ckpt["scheduler"])
    if scheduler.base_lrs != base_lrs:  # another global batch (world size) or optim.lr: follow this run's
        log.info("lr per parameter group: %s in the checkpoint, now %s", scheduler.base_lrs, base_lrs)
        scheduler.base_lrs = base_lrs
        for group, base in zip(optimizer.param_groups, base_lrs):
            group["initial_lr"], group["lr"] = base, base * lr_factor(scheduler.last_epoch, cfg.schedule)
    if ckpt["scaler"]:  # empty when written without fp16, which GradScaler.load_state_dict refuses
        trainable.scaler.load_state_dict(ckpt["scaler"])
    set_rng_state(ckpt["rng"][dist_info.rank] if dist_info.rank < len(ckpt["rng"]) else ckpt["rng"][0])
    trainable.step.skipped_steps = ckpt.get("skipped_steps", 0)
    log.info("resumed from %s at iteration %d", path, ckpt["iteration"])
    return ckpt["iteration"]


def write_run_header(cfg: DictConfig, output_dir: Path, train_set, val_set, global_batch: int) -> None:
    """Rank 0: the run directory with ``config_resolved.yaml``, and the data and batch in ``train.log``."""
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / "config_resolved.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    log.info(
        "train: %d images, val: %d images, %d classes; global batch %d, lr %.4g", len(train_set), len(val_set),
        train_set.meta.num_classes, global_batch, scaled_lr(cfg.optim, global_batch),
    )  # fmt: skip


def build_hooks(cfg: DictConfig, state: TrainState, preemption: Preemption, saved: dict) -> list:
    """The hooks of a run, in the order they run, with the state ``saved`` in the checkpoint (``hooks/<name>``)."""
    ema = EMA(model=state.model, decay=cfg.ema) if cfg.ema is not None else None  # after resume: the loaded weights
    logger = MetricsLogger()

    def evaluate(model) -> dict[str, float]:
        return run_evaluation(cfg, model, state.val_set, state.device, state.dist_info)

    st = cfg.stability
    stability = StabilityMonitor(k=st.spike_k, median_window=st.median_window, probe_every=st.probe_every) \
        if st.enabled else None  # fmt: skip
    # the stability window's scalars join the logger's entry; evaluation before the checkpoint: a checkpoint holds
    # its iteration's evaluation and the RNG state after it
    hooks = [
        preemption, ema, stability, logger, Evaluation(evaluate=evaluate, eval_every=cfg.schedule.eval_every, ema=ema),
        Checkpointer(checkpoint_every=cfg.schedule.checkpoint_every),
    ]  # fmt: skip
    hooks = [h for h in hooks if h is not None]
    for hook in hooks:
        if hook.name in saved:
            hook.load_state_dict(saved[hook.name])
    return hooks


def build_run(cfg: DictConfig) -> TrainState:
    """Everything a run needs, checked and (when resuming) restored; ``fl_rpn.engine.trainer.run`` trains it."""
    validate_config(cfg)
    device, dist_info, output_dir = setup_process(cfg)
    checkpoint_path = broadcast_object(resolve_resume(cfg.resume, output_dir) if dist_info.is_main else None, dist_info)
    if checkpoint_path is None:  # pretrained weights that cannot be had stop the run before any data is read
        fetch_backbone_weights(cfg.model)
    with quiet_below_error(dist_info, "fl_rpn.data", __name__):
        train_set, val_set = build_datasets(cfg)
    preemption = Preemption()
    # resuming: the checkpoint holds every weight, so pretrained backbone weights are not fetched again
    trainable = build_trainable(
        cfg, train_set.meta.num_classes, device=device, dist_info=dist_info,
        load_backbone_weights=checkpoint_path is None, checkpoint_path=output_dir / "last.pt",
        stop_requested=lambda: preemption.requested,
    )  # fmt: skip
    ckpt = load_checkpoint(checkpoint_path) if checkpoint_path is not None else {}
    start_iter = resume_state(ckpt, cfg, checkpoint_path, trainable, dist_info, train_set.meta.class_names) \
        if ckpt else 0  # fmt: skip
    # Every trainable parameter gets a gradient at every step, with either RPN and with images without
    # boxes (tests/engine/test_distributed.py checks), so DDP needs no find_unused_parameters.
    if dist_info.enabled:
        ids = [device.index] if device.type == "cuda" else None
        trainable.step.forward_model = DistributedDataParallel(trainable.model, device_ids=ids)
    if dist_info.is_main:
        write_run_header(cfg, output_dir, train_set, val_set, cfg.batch_size * dist_info.world_size)
    state = TrainState(
        cfg=cfg, model=trainable.model, optimizer=trainable.optimizer, scheduler=trainable.scheduler,
        scaler=trainable.scaler, step=trainable.step, dist_info=dist_info, device=device, output_dir=output_dir,
        train_set=train_set, val_set=val_set, start_iter=start_iter, iteration=start_iter,
        max_iters=cfg.schedule.max_iters, log_every=cfg.schedule.log_every,
        history=[h for h in ckpt.get("history", []) if h["iteration"] <= start_iter],  # a resumed run has them all
    )  # fmt: skip
    state.hooks = build_hooks(cfg, state, preemption, ckpt.get("hooks", {}))
    state.stream = TrainStream(
        train_set, cfg.batch_size, cfg.num_workers, cfg.seed, cfg.group_aspect_ratio, dist_info,
        pin_memory=device.type == "cuda",
    )  # fmt: skip
    return state
