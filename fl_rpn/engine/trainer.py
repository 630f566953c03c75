"""``train(cfg)``: ``run(build_run(cfg))``, the training loop as plain functions (the Hydra wrapper lives in
``fl_rpn.cli.train``).

One iteration = one batch of ``cfg.batch_size`` images per process. The run directory receives the
resolved config (``config_resolved.yaml``; Hydra's ``.hydra/`` keeps the unresolved one and the overrides),
TensorBoard events (``tb/``), ``last.pt``, ``history.json`` and ``metrics.json``.

``build_run`` (``build.py``) assembles the ``TrainState``; ``run`` is one loop: ``before_train`` of every hook, then
per iteration a ``TrainStep`` (``step.py``), the lr schedule and ``after_step`` of every hook (``hooks.py``:
pre-emption, EMA, stability, logging, evaluation, checkpointing), then ``after_train``. What the hooks write is
described in their docstrings.
"""

import logging
import time
from typing import Any

import torch
from omegaconf import DictConfig

from ..data.build import shutdown_workers
from ..errors import NonFiniteLossError  # noqa: F401  (raised by the step; imported from here)
from .build import build_run
from .distributed import cleanup
from .hooks import TrainState

log = logging.getLogger(__name__)


def _to(value: Any, device: torch.device) -> Any:
    """``value`` on ``device`` if it is a tensor; asynchronous from pinned memory (the loader pins it for CUDA)."""
    return value.to(device, non_blocking=value.is_pinned()) if torch.is_tensor(value) else value


def run_iteration(state: TrainState, images: list, targets: list) -> None:
    """One iteration of the loop on a batch already on ``state.device``: the step, the lr schedule (a skipped step is
    still an iteration: the schedule, checkpoints and SIGTERM go on) and every hook's ``after_step``."""
    state.output = state.step(images, targets, iteration=state.iteration)
    state.scheduler.step()
    state.advance(len(images))
    for hook in state.hooks:
        hook.after_step(state)


def run(state: TrainState) -> dict[str, Any]:
    """Train ``state`` to ``state.max_iters``, evaluate, and return the final metrics (rank 0; ``{}`` on others).

    On SIGTERM it checkpoints at the end of the current iteration and returns
    ``{"preempted": True, "train/iterations": n}`` without evaluating (resume with ``resume=true``).
    """
    batches = None
    try:
        for hook in state.hooks:
            hook.before_train(state)
        t_start = time.perf_counter()
        state.model.train()
        batches = state.stream.from_iteration(state.start_iter)
        while state.iteration < state.max_iters:
            images, targets = next(batches)
            images = [_to(img, state.device) for img in images]
            targets = [{k: _to(v, state.device) for k, v in t.items()} for t in targets]
            run_iteration(state, images, targets)
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
        cleanup(state.dist_info)


def train(cfg: DictConfig) -> dict[str, Any]:
    """Build the run of ``cfg`` and train it: ``run(build_run(cfg))``."""
    return run(build_run(cfg))
