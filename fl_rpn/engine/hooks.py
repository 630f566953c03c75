"""Hooks around the training loop: what happens before training, after each step and after training.

``train()`` (``fl_rpn.engine.trainer``) sets up a ``TrainState`` and a list of hooks, then runs one loop:
``before_train`` of every hook, then per iteration the step, the lr schedule and ``after_step`` of every hook,
then ``after_train`` of every hook (only when the schedule ran to its end) and, on every way out, ``close``.
Hooks run in list order and read and write the ``TrainState``. A hook with state to keep across a resume
returns it from ``state_dict``; ``Checkpointer`` stores it in ``last.pt`` under ``hooks/<name>``, and a resumed
run hands it to ``load_state_dict`` (a checkpoint without it, e.g. one written before the hook existed, does not
call it).
"""

import logging
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn
from torch.optim import Optimizer
from tqdm import tqdm

from ..evaluation import summarize, without_per_class
from ..provenance import provenance, utc_now
from .checkpoint import rng_state, save_checkpoint, write_json
from .distributed import DistInfo, all_reduce_mean, barrier
from .step import StepOutput, TrainStep

log = logging.getLogger(__name__)


@dataclass(kw_only=True)
class TrainState:
    """What the loop and its hooks share. ``iteration`` counts the finished iterations; ``output`` is the last
    step's; ``log_now`` says whether this iteration closes a logging window (every ``log_every`` iterations, the last
    one, and a stop request), the one window every hook logs by; ``log_scalars`` collects what hooks add to that
    window's entry before the ``MetricsLogger`` writes it; ``history`` the logged scalars (one dict per log, kept in
    the checkpoint); ``result`` the final metrics (rank 0; ``{}`` on other ranks)."""

    cfg: DictConfig
    model: nn.Module
    optimizer: Optimizer
    scheduler: Any
    scaler: torch.amp.GradScaler
    step: TrainStep
    dist_info: DistInfo
    device: torch.device
    output_dir: Path
    train_set: Any
    val_set: Any
    start_iter: int
    iteration: int
    max_iters: int
    log_every: int
    history: list[dict[str, float]]
    hooks: list["HookBase"] = field(default_factory=list)
    stream: Any = None
    output: StepOutput | None = None
    log_now: bool = False
    log_scalars: dict[str, float] = field(default_factory=dict)
    tensorboard: Any = None  # rank 0's SummaryWriter, opened by the MetricsLogger
    images_seen: int = 0
    train_seconds: float = 0.0
    result: dict[str, Any] = field(default_factory=dict)

    def advance(self, num_images: int) -> None:
        """One iteration done on ``num_images`` images per process."""
        self.iteration += 1
        self.images_seen += num_images * self.dist_info.world_size
        self.log_now = self.iteration % self.log_every == 0 or self.iteration == self.max_iters or self.output.stop

    def add_scalars(self, scalars: dict[str, float], iteration: int) -> None:
        """TensorBoard scalars under their own names (rank 0)."""
        if self.tensorboard is not None:
            for k, v in scalars.items():
                self.tensorboard.add_scalar(k, v, iteration)


class HookBase:
    """Override what the hook needs; ``name`` is its key in the checkpoint's ``hooks``."""

    name = ""

    def before_train(self, state: TrainState) -> None:
        pass

    def after_step(self, state: TrainState) -> None:
        pass

    def after_train(self, state: TrainState) -> None:
        pass

    def close(self) -> None:
        """Release what the hook holds (files, signal handlers); called on every way out, errors included."""

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


class Preemption(HookBase):
    """SIGTERM (SLURM pre-emption, ``scancel``) sets a flag; the step agrees on it across ranks and the loop
    checkpoints (``Checkpointer``) and exits cleanly."""

    def __init__(self) -> None:
        self.requested = False
        self._previous = None

    def before_train(self, state: TrainState) -> None:
        self._previous = signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame) -> None:
        self.requested = True

    def close(self) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
            self._previous = None


class MetricsLogger(HookBase):
    """The logged scalars: the mean of every loss term and of every scalar the model put into the step's
    ``EventStorage`` (the RPN statistics, ``rpn/...``; ``StepOutput.scalars``) over the logging window (one host sync
    per log), with ``lr``, ``skipped_steps`` and what other hooks put into ``state.log_scalars`` (the stability
    diagnostics), appended to ``state.history`` and written to ``train.log``, TensorBoard (``tb/``, rank 0) and the
    progress bar. It runs after the hooks that add to the window's entry."""

    def __init__(self) -> None:
        self.window: dict[str, list[torch.Tensor]] = {}  # the scalars of each step since the last log, on the device
        self.progress = None

    def before_train(self, state: TrainState) -> None:
        if state.dist_info.is_main:
            from torch.utils.tensorboard import SummaryWriter

            # the checkpoint's own step was logged before it was written: drop only the steps after it
            state.tensorboard = SummaryWriter(str(state.output_dir / "tb"), purge_step=state.start_iter + 1)
        self.state = state
        self.progress = tqdm(
            total=state.max_iters, initial=state.start_iter, desc="train", disable=not state.dist_info.is_main,
            dynamic_ncols=True,
        )  # fmt: skip

    def after_step(self, state: TrainState) -> None:
        out = state.output
        if not out.skipped:
            step_scalars = {**out.losses, **out.scalars}
            for k, v in step_scalars.items():
                self.window.setdefault(k, []).append(v.detach())
        self.progress.update(1)
        # SIGTERM: the partial window is logged too, so that the history in the checkpoint misses no step
        if not state.log_now:
            return
        iteration, others = state.iteration, state.log_scalars
        state.log_scalars = {}
        if not self.window:  # a window of skipped steps only has nothing of its own to log
            if others:
                state.history.append({"iteration": iteration, **others})
            return
        means = torch.stack([torch.stack(v).float().mean() for v in self.window.values()]).tolist()
        scalars = all_reduce_mean(dict(zip(self.window, means)), state.dist_info)
        self.window = {}
        scalars["lr"] = state.optimizer.param_groups[0]["lr"]
        scalars["skipped_steps"] = state.step.skipped_steps
        state.history.append({"iteration": iteration, **scalars, **others})
        if state.dist_info.is_main:  # train.log keeps the curves too
            log.info("iteration %d: %s", iteration, ", ".join(f"{k}={v:.4g}" for k, v in scalars.items()))
        if state.tensorboard is not None:
            state.add_scalars({(k if "/" in k else f"train/{k}"): v for k, v in scalars.items()}, iteration)
            terms = {k.removeprefix("loss_"): f"{v:.3f}" for k, v in scalars.items() if k.startswith("loss")}
            self.progress.set_postfix(ordered_dict={**terms, "lr": f"{scalars['lr']:.2g}"})

    def after_train(self, state: TrainState) -> None:
        self.progress.close()

    def close(self) -> None:
        if self.progress is not None:
            self.progress.close()
        state = getattr(self, "state", None)
        if state is not None and state.tensorboard is not None:
            state.tensorboard.close()
            state.tensorboard = None


class Checkpointer(HookBase):
    """``last.pt`` every ``checkpoint_every`` iterations, on a stop request, at the last iteration and after the
    final evaluation (written atomically by ``save_checkpoint``, which also removes the temporary files of killed
    writers), and ``history.json`` with it.

    Besides the model, optimizer, scheduler and scaler it holds the iteration, the skipped steps, every rank's
    RNG state, the history, the resolved config, the classes and ``hooks`` (each hook's ``state_dict``).
    """

    def __init__(self, *, checkpoint_every: int) -> None:
        self.checkpoint_every = checkpoint_every

    def after_step(self, state: TrainState) -> None:
        # the last iteration is saved here, before the final evaluation (``Evaluation.after_train``) can fail ...
        last = state.iteration >= state.max_iters
        if state.iteration % self.checkpoint_every == 0 or state.output.stop or last:
            self.save(state)

    def after_train(self, state: TrainState) -> None:
        # ... and again after it, so that a run resumed with a longer schedule keeps the final evaluation in its
        # learning curve (the hooks' state)
        if state.iteration > state.start_iter:
            self.save(state)

    def save(self, state: TrainState) -> None:
        dist_info = state.dist_info
        rngs = [rng_state()]
        if dist_info.enabled:
            rngs = [None] * dist_info.world_size
            torch.distributed.all_gather_object(rngs, rng_state())
        if dist_info.is_main:
            meta = state.train_set.meta
            hooks = {h.name: h.state_dict() for h in state.hooks if h.name}
            save_checkpoint(
                state.output_dir / "last.pt",
                {
                    "model": state.model.state_dict(), "optimizer": state.optimizer.state_dict(),
                    "scheduler": state.scheduler.state_dict(), "scaler": state.scaler.state_dict(),
                    "iteration": state.iteration, "skipped_steps": state.step.skipped_steps, "rng": rngs,
                    "history": state.history, "config": OmegaConf.to_container(state.cfg, resolve=True),
                    "meta": {"class_names": meta.class_names, "category_ids": meta.category_ids},
                    "hooks": {name: s for name, s in hooks.items() if s},
                },
            )  # fmt: skip
            write_json(state.output_dir / "history.json", state.history)  # a killed or pre-empted run keeps its curves
        barrier(dist_info)


class Evaluation(HookBase):
    """Evaluation every ``eval_every`` iterations and at the end. Every evaluation's metrics go to TensorBoard
    and, as ``{"iteration": i, **metrics}``, to the learning curve ``eval_history.json`` (rank 0; kept in the
    checkpoint, so a resumed run's curve is whole). The final metrics with a ``train/...`` summary go to
    ``state.result`` and ``metrics.json`` (rank 0).

    ``evaluate(model) -> metrics`` runs the configured evaluators on the val split. With ``ema`` (an ``EMA``
    hook) the averaged weights are evaluated too, their metrics prefixed ``ema/``.
    """

    name = "evaluation"

    def __init__(self, *, evaluate, eval_every: int, ema=None) -> None:
        self.evaluate, self.eval_every, self.ema = evaluate, eval_every, ema
        self.curve: list[dict[str, float]] = []

    def before_train(self, state: TrainState) -> None:
        # the code that runs is the code at the start: the checkout may change while a run trains
        self.provenance = {**provenance(state.cfg, state.dist_info.world_size), "started": utc_now()}

    def state_dict(self) -> dict[str, Any]:
        return {"curve": self.curve} if self.curve else {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.curve = list(state.get("curve", []))

    def _record(self, state: TrainState, metrics: dict[str, float]) -> None:
        state.add_scalars(metrics, state.iteration)
        if metrics and state.dist_info.is_main:  # no evaluators (eval.evaluators=[]): no curve
            # a resumed run re-evaluates the iterations after its checkpoint: those entries are replaced
            self.curve = [e for e in self.curve if e["iteration"] < state.iteration]
            self.curve.append({"iteration": state.iteration, **metrics})
            write_json(state.output_dir / "eval_history.json", self.curve)

    def _metrics(self, state: TrainState) -> dict[str, float]:
        metrics = self.evaluate(state.model)
        if self.ema is not None:
            with self.ema.applied(state.model):
                metrics.update({f"ema/{k}": v for k, v in self.evaluate(state.model).items()})
        return metrics

    def after_step(self, state: TrainState) -> None:
        iteration = state.iteration
        if state.output.stop or not self.eval_every or iteration % self.eval_every or iteration >= state.max_iters:
            return
        self._record(state, self._metrics(state))

    def after_train(self, state: TrainState) -> None:
        t_eval = time.perf_counter()
        metrics = self._metrics(state)
        eval_seconds = time.perf_counter() - t_eval
        if not state.dist_info.is_main:
            state.result = {}
            return
        last = state.history[-1] if state.history else {}
        summary = {f"train/{k}": v for k, v in last.items() if k not in ("iteration", "lr")}
        summary.update(
            {
                "train/iterations": state.iteration,
                "train/seconds": state.train_seconds,
                "train/images_per_second": state.images_seen / max(state.train_seconds, 1e-9),
                "train/skipped_steps": state.step.skipped_steps,
                "train/bad_images_skipped": state.train_set.stats.get("bad_images_skipped", 0),
                "eval/bad_images_skipped": state.val_set.stats.get("bad_images_skipped", 0),
                "eval/seconds": eval_seconds,
            }
        )
        result = {**metrics, **summary}
        self._record(state, metrics)
        provenance_now = {**self.provenance, "finished": utc_now()}
        write_json(state.output_dir / "metrics.json", {**result, "provenance": provenance_now})
        write_json(state.output_dir / "history.json", state.history)
        log.info("final metrics:\n%s", summarize(without_per_class(result)))
        state.result = result
