"""``train(cfg)``: the training loop as a plain function (the Hydra wrapper lives in ``fl_rpn.train``).

One iteration = one batch of ``cfg.batch_size`` images per process. The run directory receives the
resolved config (Hydra's ``.hydra/``), TensorBoard events (``tb/``), ``last.pt`` and ``metrics.json``.
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
from ..diagnostics import attach_anchor_diagnostics
from ..evaluation import build_evaluators, summarize
from ..model import build_model
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
from .distributed import DistInfo, all_reduce_mean, any_rank, barrier, broadcast_object, cleanup, init_distributed
from .evaluate import evaluate
from .optim import build_optimizer, build_scheduler, lr_factor, scaled_lr
from .stream import TrainStream

log = logging.getLogger(__name__)

LOSS_KEYS = ("loss_objectness", "loss_rpn_box_reg", "loss_classifier", "loss_box_reg")


class NonFiniteLossError(RuntimeError):
    pass


def select_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device={name} but CUDA is not available; use device=cpu or device=auto")
    return torch.device(name)


def build_eval_loader(cfg: DictConfig, dataset, dist_info: DistInfo):
    from ..data import build_loader

    return build_loader(
        dataset, cfg.eval.batch_size, cfg.num_workers, train=False, seed=cfg.seed,
        group_aspect_ratio=False, distributed=dist_info.enabled,
    )  # fmt: skip


def run_evaluation(cfg: DictConfig, model, val_set, device, dist_info: DistInfo) -> dict[str, float]:
    evaluators = build_evaluators(
        list(cfg.eval.evaluators), val_set.meta, backend=cfg.eval.coco_backend,
        use_07_metric=cfg.eval.voc07_use_07_metric,
    )  # fmt: skip
    return evaluate(model, build_eval_loader(cfg, val_set, dist_info), evaluators, device, dist_info)


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
        return path if path.is_file() else None  # nothing yet: start from scratch
    return Path(str(resume)).expanduser()


def train(cfg: DictConfig) -> dict[str, Any]:
    """Train, evaluate and write ``metrics.json``; returns the metrics (rank 0; ``{}`` on other ranks).

    On SIGTERM it checkpoints at the end of the current iteration and returns
    ``{"preempted": True, "train/iterations": n}`` without evaluating (resume with ``resume=true``).
    """
    validate_config(cfg)
    device = select_device(cfg.device)
    dist_info = init_distributed(str(device))
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
    # empty splits and missing image files fail here, not at the first batch or after training
    require_valid({"dataset.train": train_set, "dataset.val": val_set}, depth=cfg.check_images or "exists")
    if train_set.meta.class_names != val_set.meta.class_names:
        raise ValueError(
            f"dataset.train and dataset.val have different classes: {train_set.meta.class_names[:5]}... vs "
            f"{val_set.meta.class_names[:5]}..."
        )
    model = build_model(cfg, num_classes=train_set.meta.num_classes).to(device)
    attach_anchor_diagnostics(model.rpn)
    global_batch = cfg.batch_size * dist_info.world_size
    optimizer = build_optimizer(model, cfg.optim, cfg.rpn.cls_lr_mult, global_batch)
    scheduler = build_scheduler(optimizer, cfg.schedule)
    amp_dtype = {None: None, "bf16": torch.bfloat16, "fp16": torch.float16}[cfg.amp]
    if amp_dtype is not None and device.type != "cuda":
        raise ValueError(f"amp={cfg.amp} needs CUDA; this run is on {device}")
    scaler = torch.amp.GradScaler("cuda", enabled=amp_dtype is torch.float16)

    start_iter = 0
    history: list[dict[str, float]] = []  # the logged scalars; kept in the checkpoint, so a resumed run has them all
    checkpoint_path = broadcast_object(resolve_resume(cfg.resume, output_dir), dist_info)  # rank 0 decides
    if checkpoint_path is not None:
        ckpt = load_checkpoint(checkpoint_path)
        check_resume_config(ckpt, cfg, checkpoint_path, train_set.meta.class_names)  # no mixing of two runs
        load_model_state(model, ckpt["model"], checkpoint_path)
        base_lrs = [group["initial_lr"] for group in optimizer.param_groups]  # this run's scaled lr
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        if scheduler.base_lrs != base_lrs:  # another global batch (world size) or optim.lr: follow this run's
            log.info("lr per parameter group: %s in the checkpoint, now %s", scheduler.base_lrs, base_lrs)
            scheduler.base_lrs = base_lrs
            for group, base in zip(optimizer.param_groups, base_lrs):
                group["initial_lr"], group["lr"] = base, base * lr_factor(scheduler.last_epoch, cfg.schedule)
        scaler.load_state_dict(ckpt["scaler"])
        set_rng_state(ckpt["rng"][dist_info.rank] if dist_info.rank < len(ckpt["rng"]) else ckpt["rng"][0])
        start_iter = ckpt["iteration"]
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

        writer = SummaryWriter(str(output_dir / "tb"), purge_step=start_iter)
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
                    "iteration": iteration, "rng": rngs, "history": history,
                    "config": OmegaConf.to_container(cfg, resolve=True),
                    "meta": {"class_names": train_set.meta.class_names, "category_ids": train_set.meta.category_ids},
                },
            )  # fmt: skip
            write_json(output_dir / "history.json", history)  # a killed or pre-empted run keeps its curves
        barrier(dist_info)

    schedule = cfg.schedule
    stream = TrainStream(train_set, cfg.batch_size, cfg.num_workers, cfg.seed, cfg.group_aspect_ratio, dist_info)
    preemption = _Preemption()
    window: dict[str, list[float]] = {}
    skipped_steps = 0
    t_start = time.perf_counter()
    images_seen = 0
    progress = tqdm(
        total=schedule.max_iters, initial=start_iter, desc="train", disable=not dist_info.is_main, dynamic_ncols=True
    )
    iteration = start_iter
    try:
        model.train()
        batches = stream.from_iteration(start_iter)
        while iteration < schedule.max_iters:
            images, targets = next(batches)
            images = [img.to(device, non_blocking=True) for img in images]
            targets = [{k: (v.to(device) if torch.is_tensor(v) else v) for k, v in t.items()} for t in targets]
            with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                losses = ddp_model(images, targets)
            loss = sum(losses.values())
            # all ranks skip / stop together, or the others would wait in DDP's all_reduce forever
            nonfinite, stop = any_rank([~torch.isfinite(loss), preemption.requested], dist_info)
            if nonfinite:
                terms = ", ".join(f"{k}={v.item():.4g}" for k, v in losses.items())
                where = f" on rank {dist_info.rank}" if not torch.isfinite(loss) else " on another rank"
                message = f"non-finite loss{where if dist_info.enabled else ''} at iteration {iteration}: {terms}"
                if cfg.nonfinite != "skip":
                    raise NonFiniteLossError(message + f"; the last good checkpoint is {output_dir / 'last.pt'}")
                log.warning("%s: step skipped", message)
                skipped_steps += 1
                optimizer.zero_grad(set_to_none=True)
                iteration += 1
                scheduler.step()
                continue
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            if cfg.clip_grad_norm is not None:
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip_grad_norm)
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            iteration += 1
            images_seen += len(images) * dist_info.world_size
            progress.update(1)

            for k, v in losses.items():
                window.setdefault(k, []).append(v.detach())
            window.setdefault("loss", []).append(loss.detach())
            if iteration % schedule.log_every == 0 or iteration == schedule.max_iters:
                scalars = {k: torch.stack(v).mean().item() for k, v in window.items()}
                scalars.update({f"rpn/{k}": v.item() for k, v in getattr(model.rpn, "stats", {}).items()})
                scalars = all_reduce_mean(scalars, dist_info)
                window = {}
                scalars["lr"] = optimizer.param_groups[0]["lr"]
                history.append({"iteration": iteration, **scalars})
                if writer is not None:
                    for k, v in scalars.items():
                        writer.add_scalar(k if "/" in k else f"train/{k}", v, iteration)
                    progress.set_postfix(loss=f"{scalars['loss']:.3f}", lr=f"{scalars['lr']:.2g}")
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
                "train/skipped_steps": skipped_steps,
                "eval/seconds": eval_seconds,
            }
        )
        result = {**metrics, **summary}
        for k, v in metrics.items():
            writer.add_scalar(k, v, iteration)
        write_json(output_dir / "metrics.json", {**result, "provenance": provenance(cfg, dist_info.world_size)})
        write_json(output_dir / "history.json", history)
        print(summarize({k: v for k, v in result.items() if "/AP/" not in k}))
        return result
    finally:
        progress.close()
        preemption.restore()
        if writer is not None:
            writer.close()
        cleanup(dist_info)
