"""``train(cfg)``: the training loop as a plain function (the Hydra wrapper lives in ``fl_rpn.train``).

One iteration = one batch of ``cfg.batch_size`` images per process. The run directory receives the
resolved config (``config_resolved.yaml``; Hydra's ``.hydra/`` keeps the unresolved one and the overrides),
TensorBoard events (``tb/``), ``last.pt``, ``history.json`` and ``metrics.json``.
"""

import logging
import signal
import time
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from ..data import build_dataset, require_valid
from ..data.build import shutdown_workers
from ..data.check import drop_bad_images
from ..diagnostics import attach_anchor_diagnostics
from ..errors import NonFiniteLossError  # noqa: F401  (raised by the step; imported from here)
from ..evaluation import build_evaluators, summarize
from ..model import apply_speed_options, build_model
from ..provenance import provenance
from ..validation import validate_config
from .checkpoint import (
    check_resume_config,
    load_checkpoint,
    load_model_state,
    rng_state,
    save_checkpoint,
    set_rng_state,
    write_json,
)
from .distributed import DistInfo, all_reduce_mean, barrier, broadcast_object, cleanup, init_distributed
from .evaluate import evaluate
from .optim import build_optimizer, build_scheduler, lr_factor, scaled_lr
from .step import TrainStep
from .stream import TrainStream

log = logging.getLogger(__name__)

LOSS_KEYS = ("loss_objectness", "loss_rpn_box_reg", "loss_classifier", "loss_box_reg")


def select_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device={name} but CUDA is not available; use device=cpu or device=auto")
    return torch.device(name)


def build_eval_loader(cfg: DictConfig, dataset, dist_info: DistInfo, pin_memory: bool = False):
    from ..data import build_loader

    return build_loader(
        dataset, cfg.eval.batch_size, cfg.num_workers, train=False, seed=cfg.seed,
        group_aspect_ratio=False, distributed=dist_info.enabled, pin_memory=pin_memory,
    )  # fmt: skip


def run_evaluation(cfg: DictConfig, model, val_set, device, dist_info: DistInfo) -> dict[str, float]:
    evaluators = build_evaluators(
        list(cfg.eval.evaluators), val_set.meta, backend=cfg.eval.coco_backend,
        use_07_metric=cfg.eval.voc07_use_07_metric,
    )  # fmt: skip
    loader = build_eval_loader(cfg, val_set, dist_info, pin_memory=device.type == "cuda")
    return evaluate(model, loader, evaluators, device, dist_info)


class _Preemption:
    """SIGTERM (SLURM pre-emption, ``scancel``) sets a flag; the loop checkpoints and exits cleanly."""

    def __init__(self) -> None:
        self.requested = False
        self._previous = signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame) -> None:
        self.requested = True

    def restore(self) -> None:
        signal.signal(signal.SIGTERM, self._previous)


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

    Under torchrun and srun ``fl_rpn.train.main`` gives ranks > 0 stdout logging, but Hydra's submitit launcher
    sets up every rank's job itself, each with a handler appending to the same ``train.log``.
    """
    root = logging.getLogger()
    for handler in [h for h in root.handlers if isinstance(h, logging.FileHandler)]:
        root.removeHandler(handler)
        handler.close()


def train(cfg: DictConfig) -> dict[str, Any]:
    """Train, evaluate and write ``metrics.json``; returns the metrics (rank 0; ``{}`` on other ranks).

    On SIGTERM it checkpoints at the end of the current iteration and returns
    ``{"preempted": True, "train/iterations": n}`` without evaluating (resume with ``resume=true``).
    """
    validate_config(cfg)
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
    checkpoint_path = resolve_resume(cfg.resume, output_dir) if dist_info.is_main else None
    checkpoint_path = broadcast_object(checkpoint_path, dist_info)  # rank 0 decides
    # resuming: the checkpoint holds every weight, so pretrained backbone weights are not fetched again
    model = build_model(cfg, train_set.meta.num_classes, load_backbone_weights=checkpoint_path is None).to(device)
    apply_speed_options(model, channels_last=cfg.channels_last, compile_mode=cfg.compile)
    attach_anchor_diagnostics(model.rpn)
    global_batch = cfg.batch_size * dist_info.world_size
    optimizer = build_optimizer(model, cfg.optim, cfg.rpn.cls_lr_mult, global_batch)
    scheduler = build_scheduler(optimizer, cfg.schedule)
    amp_dtype = {None: None, "bf16": torch.bfloat16, "fp16": torch.float16}[cfg.amp]
    scaler = torch.amp.GradScaler("cuda", enabled=amp_dtype is torch.float16)

    start_iter = skipped_steps = 0
    history: list[dict[str, float]] = []  # the logged scalars; kept in the checkpoint, so a resumed run has them all
    if checkpoint_path is not None:
        ckpt = load_checkpoint(checkpoint_path)
        check_resume_config(ckpt, cfg, checkpoint_path, train_set.meta.class_names)  # no mixing of two runs
        load_model_state(model, ckpt["model"], checkpoint_path)
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
        start_iter = ckpt["iteration"]
        skipped_steps = ckpt.get("skipped_steps", 0)
        history = [h for h in ckpt.get("history", []) if h["iteration"] <= start_iter]
        log.info("resumed from %s at iteration %d", checkpoint_path, start_iter)

    ddp_model = model
    if dist_info.enabled:
        # Every trainable parameter gets a gradient at every step, with either RPN and with images without
        # boxes (tests/test_distributed.py checks), so DDP needs no find_unused_parameters.
        ddp_model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)

    writer = None
    if dist_info.is_main:
        from torch.utils.tensorboard import SummaryWriter

        output_dir.mkdir(parents=True, exist_ok=True)
        (output_dir / "config_resolved.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
        # the checkpoint's own step was logged before it was written: drop only the steps after it
        writer = SummaryWriter(str(output_dir / "tb"), purge_step=start_iter + 1)
        log.info(
            "train: %d images, val: %d images, %d classes; global batch %d, lr %.4g",
            len(train_set), len(val_set), train_set.meta.num_classes, global_batch,
            scaled_lr(cfg.optim, global_batch),
        )  # fmt: skip

    def save(iteration: int) -> None:
        rngs = [rng_state()]
        if dist_info.enabled:
            rngs = [None] * dist_info.world_size
            torch.distributed.all_gather_object(rngs, rng_state())
        if dist_info.is_main:
            save_checkpoint(
                output_dir / "last.pt",
                {
                    "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(),
                    "iteration": iteration, "skipped_steps": step.skipped_steps, "rng": rngs, "history": history,
                    "config": OmegaConf.to_container(cfg, resolve=True),
                    "meta": {"class_names": train_set.meta.class_names, "category_ids": train_set.meta.category_ids},
                },
            )  # fmt: skip
            write_json(output_dir / "history.json", history)  # a killed or pre-empted run keeps its curves
        barrier(dist_info)

    schedule = cfg.schedule
    stream = TrainStream(
        train_set, cfg.batch_size, cfg.num_workers, cfg.seed, cfg.group_aspect_ratio, dist_info,
        pin_memory=device.type == "cuda",
    )  # fmt: skip
    preemption = _Preemption()
    window: dict[str, list[torch.Tensor]] = {}  # the logged scalars of each step since the last log, on the device
    t_start = time.perf_counter()
    images_seen = 0
    progress = tqdm(
        total=schedule.max_iters, initial=start_iter, desc="train", disable=not dist_info.is_main, dynamic_ncols=True
    )
    iteration = start_iter
    batches = None
    step = TrainStep(
        model=model, optimizer=optimizer, device=device, forward_model=ddp_model, scaler=scaler, amp_dtype=amp_dtype,
        clip_grad_norm=cfg.clip_grad_norm, nonfinite=cfg.nonfinite, checkpoint_path=output_dir / "last.pt",
        stop_requested=lambda: preemption.requested, dist_info=dist_info,
    )  # fmt: skip
    step.skipped_steps = skipped_steps
    try:
        model.train()
        batches = stream.from_iteration(start_iter)
        while iteration < schedule.max_iters:
            images, targets = next(batches)
            images = [_to(img, device) for img in images]
            targets = [{k: _to(v, device) for k, v in t.items()} for t in targets]
            out = step(images, targets, iteration=iteration)
            stop = out.stop
            if not out.skipped:
                step_scalars = {**out.losses, **{f"rpn/{k}": v for k, v in model.rpn.stats.items()}}
                for k, v in step_scalars.items():
                    window.setdefault(k, []).append(v.detach())
            # a skipped step still counts as an iteration: the schedule, checkpoints and SIGTERM carry on
            scheduler.step()
            iteration += 1
            images_seen += len(images) * dist_info.world_size
            progress.update(1)

            # SIGTERM: the partial window is logged too, so that the history in the checkpoint misses no step
            log_now = iteration % schedule.log_every == 0 or iteration == schedule.max_iters or stop
            if log_now and window:  # a window of skipped steps only has nothing to log
                # the mean of every scalar over the window, in one host sync
                means = torch.stack([torch.stack(v).float().mean() for v in window.values()]).tolist()
                scalars = all_reduce_mean(dict(zip(window, means)), dist_info)
                window = {}
                scalars["lr"] = optimizer.param_groups[0]["lr"]
                scalars["skipped_steps"] = step.skipped_steps
                history.append({"iteration": iteration, **scalars})
                if dist_info.is_main:  # train.log keeps the curves too
                    log.info("iteration %d: %s", iteration, ", ".join(f"{k}={v:.4g}" for k, v in scalars.items()))
                if writer is not None:
                    for k, v in scalars.items():
                        writer.add_scalar(k if "/" in k else f"train/{k}", v, iteration)
                    terms = {k.removeprefix("loss_"): f"{v:.3f}" for k, v in scalars.items() if k.startswith("loss")}
                    progress.set_postfix(ordered_dict={**terms, "lr": f"{scalars['lr']:.2g}"})
            if iteration % schedule.checkpoint_every == 0 or stop:
                save(iteration)
            if stop:
                log.warning("SIGTERM: checkpoint written at iteration %d; exiting", iteration)
                return {"preempted": True, "train/iterations": iteration}  # fl-rpn-train exits with 143
            if schedule.eval_every and iteration % schedule.eval_every == 0 and iteration < schedule.max_iters:
                metrics = run_evaluation(cfg, model, val_set, device, dist_info)
                if writer is not None:
                    for k, v in metrics.items():
                        writer.add_scalar(k, v, iteration)
        train_seconds = time.perf_counter() - t_start
        if iteration > start_iter and iteration % schedule.checkpoint_every != 0:
            save(iteration)
        progress.close()

        t_eval = time.perf_counter()
        metrics = run_evaluation(cfg, model, val_set, device, dist_info)
        eval_seconds = time.perf_counter() - t_eval
        if not dist_info.is_main:
            return {}
        summary = {f"train/{k}": v for k, v in (history[-1] if history else {}).items() if k not in ("iteration", "lr")}
        summary.update(
            {
                "train/iterations": iteration,
                "train/seconds": train_seconds,
                "train/images_per_second": images_seen / max(train_seconds, 1e-9),
                "train/skipped_steps": step.skipped_steps,
                "train/bad_images_skipped": train_set.stats.get("bad_images_skipped", 0),
                "eval/bad_images_skipped": val_set.stats.get("bad_images_skipped", 0),
                "eval/seconds": eval_seconds,
            }
        )
        result = {**metrics, **summary}
        for k, v in metrics.items():
            writer.add_scalar(k, v, iteration)
        write_json(output_dir / "metrics.json", {**result, "provenance": provenance(cfg, dist_info.world_size)})
        write_json(output_dir / "history.json", history)
        log.info("final metrics:\n%s", summarize({k: v for k, v in result.items() if "/AP/" not in k}))
        return result
    finally:  # every way out (return, exception, Ctrl-C) stops the loader's workers before anything else
        shutdown_workers(batches)
        progress.close()
        preemption.restore()
        if writer is not None:
            writer.close()
        cleanup(dist_info)
