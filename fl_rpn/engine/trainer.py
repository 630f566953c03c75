"""``train(cfg)``: the training loop as a plain function (the Hydra wrapper lives in ``fl_rpn.cli.train``).

One iteration = one batch of ``cfg.batch_size`` images per process. The run directory receives the
resolved config (``config_resolved.yaml``; Hydra's ``.hydra/`` keeps the unresolved one and the overrides),
TensorBoard events (``tb/``), ``last.pt``, ``history.json`` and ``metrics.json``.

``train`` is setup (process, data, model, optimizer, resume) followed by one loop: per iteration a ``TrainStep``
(``step.py``), the lr schedule, then ``after_step`` of every hook (``hooks.py``: pre-emption, logging,
checkpointing, evaluation; ``ema.py``). What the hooks write is described in their docstrings.
"""

import logging
import time
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch.nn.parallel import DistributedDataParallel

from ..config_check import validate_config
from ..data import build_dataset, require_valid
from ..data.build import shutdown_workers
from ..data.check import drop_bad_images
from ..errors import NonFiniteLossError  # noqa: F401  (raised by the step; imported from here)
from ..evaluation import build_evaluators, evaluator_options
from ..modeling.diagnostics import attach_anchor_diagnostics
from ..modeling.model import apply_speed_options, build_model
from .checkpoint import check_resume_config, load_checkpoint, load_model_state, set_rng_state
from .distributed import DistInfo, broadcast_object, cleanup, init_distributed
from .ema import EMA
from .evaluate import evaluate
from .hooks import Checkpointer, Evaluation, MetricsLogger, Preemption, TrainState
from .optim import build_optimizer, build_scheduler, lr_factor, scaled_lr
from .stability import StabilityMonitor
from .step import TrainStep
from .stream import TrainStream

log = logging.getLogger(__name__)


def select_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device={name} but CUDA is not available; use device=cpu or device=auto")
    return torch.device(name)


def run_evaluation(cfg: DictConfig, model, val_set, device, dist_info: DistInfo) -> dict[str, float]:
    """The configured evaluators (``cfg.eval.evaluators``, each with its options ``cfg.eval.<name>``) over
    ``val_set``; the metrics on rank 0, ``{}`` on other ranks."""
    from ..data import build_loader

    evaluators = build_evaluators(list(cfg.eval.evaluators), val_set.meta, evaluator_options(cfg.eval))
    loader = build_loader(
        val_set, cfg.eval.batch_size, cfg.num_workers, seed=cfg.seed, distributed=dist_info.enabled,
        pin_memory=device.type == "cuda",
    )  # fmt: skip
    return evaluate(model, loader, evaluators, device, dist_info)


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


def _to(value: Any, device: torch.device) -> Any:
    """``value`` on ``device`` if it is a tensor; asynchronous from pinned memory (the loader pins it for CUDA)."""
    return value.to(device, non_blocking=value.is_pinned()) if torch.is_tensor(value) else value


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
    if train_set.meta.class_names != val_set.meta.class_names:
        raise ValueError(
            f"dataset.train and dataset.val have different classes: {train_set.meta.class_names[:5]}... vs "
            f"{val_set.meta.class_names[:5]}..."
        )
    return train_set, val_set


def resume_state(ckpt, cfg, path, *, model, optimizer, scheduler, scaler, dist_info, class_names) -> int:
    """Load a checkpoint's model, optimizer, scheduler, scaler and RNG state; returns its iteration.

    The lr per parameter group and the weight decay follow this run's config (another world size or optim.lr).
    """
    check_resume_config(ckpt, cfg, path, class_names)  # no mixing of two runs
    load_model_state(model, ckpt["model"], path)
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
        scaler.load_state_dict(ckpt["scaler"])
    set_rng_state(ckpt["rng"][dist_info.rank] if dist_info.rank < len(ckpt["rng"]) else ckpt["rng"][0])
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


def build_hooks(cfg: DictConfig, state: TrainState, preemption: Preemption, scaler, saved: dict) -> list:
    """The hooks of a run, in the order they run, with the state ``saved`` in the checkpoint (``hooks/<name>``)."""
    schedule = cfg.schedule
    ema = EMA(model=state.model, decay=cfg.ema) if cfg.ema is not None else None  # after resume: the loaded weights
    logger = MetricsLogger(log_every=schedule.log_every, max_iters=schedule.max_iters)

    def evaluate(model) -> dict[str, float]:
        return run_evaluation(cfg, model, state.val_set, state.device, state.dist_info)

    st = cfg.stability
    stability = StabilityMonitor(
        logger=logger, log_every=schedule.log_every, max_iters=schedule.max_iters, k=st.spike_k,
        median_window=st.median_window, probe_every=st.probe_every,
    ) if st.enabled else None  # fmt: skip
    # evaluation before the checkpoint: a checkpoint holds its iteration's evaluation and the RNG state after it
    hooks = [
        preemption, ema, logger, stability,
        Evaluation(evaluate=evaluate, eval_every=schedule.eval_every, logger=logger, ema=ema),
        Checkpointer(checkpoint_every=schedule.checkpoint_every, scaler=scaler),
    ]  # fmt: skip
    hooks = [h for h in hooks if h is not None]
    for hook in hooks:
        if hook.name in saved:
            hook.load_state_dict(saved[hook.name])
    return hooks


def train(cfg: DictConfig) -> dict[str, Any]:
    """Train, evaluate and write ``metrics.json``; returns the metrics (rank 0; ``{}`` on other ranks).

    On SIGTERM it checkpoints at the end of the current iteration and returns
    ``{"preempted": True, "train/iterations": n}`` without evaluating (resume with ``resume=true``).
    """
    validate_config(cfg)
    device, dist_info, output_dir = setup_process(cfg)
    train_set, val_set = build_datasets(cfg)
    checkpoint_path = broadcast_object(resolve_resume(cfg.resume, output_dir) if dist_info.is_main else None, dist_info)
    # resuming: the checkpoint holds every weight, so pretrained backbone weights are not fetched again
    model = build_model(cfg, train_set.meta.num_classes, load_backbone_weights=checkpoint_path is None).to(device)
    apply_speed_options(model, channels_last=cfg.channels_last, compile_mode=cfg.compile)
    attach_anchor_diagnostics(model.rpn)  # a sampled RPN's statistics, observed by hooks (FocalLossRPN puts its own)
    global_batch = cfg.batch_size * dist_info.world_size
    optimizer = build_optimizer(model, cfg.optim, cfg.rpn.cls_lr_mult, global_batch)
    scheduler = build_scheduler(optimizer, cfg.schedule)
    amp_dtype = {None: None, "bf16": torch.bfloat16, "fp16": torch.float16}[cfg.amp]
    scaler = torch.amp.GradScaler("cuda", enabled=amp_dtype is torch.float16)
    ckpt = load_checkpoint(checkpoint_path) if checkpoint_path is not None else {}
    start_iter = 0
    if ckpt:
        start_iter = resume_state(
            ckpt, cfg, checkpoint_path, model=model, optimizer=optimizer, scheduler=scheduler, scaler=scaler,
            dist_info=dist_info, class_names=train_set.meta.class_names,
        )  # fmt: skip
    # Every trainable parameter gets a gradient at every step, with either RPN and with images without
    # boxes (tests/engine/test_distributed.py checks), so DDP needs no find_unused_parameters.
    ddp_model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None) \
        if dist_info.enabled else model  # fmt: skip
    if dist_info.is_main:
        write_run_header(cfg, output_dir, train_set, val_set, global_batch)

    schedule = cfg.schedule
    preemption = Preemption()
    step = TrainStep(
        model=model, optimizer=optimizer, device=device, forward_model=ddp_model, scaler=scaler, amp_dtype=amp_dtype,
        clip_grad_norm=cfg.clip_grad_norm, nonfinite=cfg.nonfinite, checkpoint_path=output_dir / "last.pt",
        stop_requested=lambda: preemption.requested, dist_info=dist_info,
    )  # fmt: skip
    step.skipped_steps = ckpt.get("skipped_steps", 0)
    history = [h for h in ckpt.get("history", []) if h["iteration"] <= start_iter]  # a resumed run has them all
    state = TrainState(
        cfg=cfg, model=model, optimizer=optimizer, scheduler=scheduler, step=step, dist_info=dist_info, device=device,
        output_dir=output_dir, train_set=train_set, val_set=val_set, start_iter=start_iter, iteration=start_iter,
        history=history,
    )  # fmt: skip
    state.hooks = build_hooks(cfg, state, preemption, scaler, ckpt.get("hooks", {}))
    stream = TrainStream(
        train_set, cfg.batch_size, cfg.num_workers, cfg.seed, cfg.group_aspect_ratio, dist_info,
        pin_memory=device.type == "cuda",
    )  # fmt: skip
    batches = None
    try:
        for hook in state.hooks:
            hook.before_train(state)
        t_start = time.perf_counter()
        model.train()
        batches = stream.from_iteration(start_iter)
        while state.iteration < schedule.max_iters:
            images, targets = next(batches)
            images = [_to(img, device) for img in images]
            targets = [{k: _to(v, device) for k, v in t.items()} for t in targets]
            state.output = step(images, targets, iteration=state.iteration)
            scheduler.step()  # a skipped step still counts as an iteration: the schedule, checkpoints, SIGTERM carry on
            state.iteration += 1
            state.images_seen += len(images) * dist_info.world_size
            for hook in state.hooks:
                hook.after_step(state)
            if state.output.stop:
                log.warning("SIGTERM: checkpoint written at iteration %d; exiting", state.iteration)
                return {"preempted": True, "train/iterations": state.iteration}  # fl-rpn-train exits with 143
        state.train_seconds = time.perf_counter() - t_start
        for hook in state.hooks:
            hook.after_train(state)
        return state.result
    finally:  # every way out (return, exception, Ctrl-C) stops the loader's workers before anything else
        shutdown_workers(batches)
        for hook in state.hooks:
            hook.close()
        cleanup(dist_info)
