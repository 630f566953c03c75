"""What the engine tests share: 2-rank DDP runs, and runs changed through their state.

- ``DDP_TINY`` (``FAST`` on the CPU with 1 image per process: a global batch of 2, 4 iterations, a checkpoint every
  2) and ``launch_ddp``: 2 ranks of ``ddp_worker.py`` on gloo, with a ``free_port`` rendezvous.
- ``train_with(cfg, *prepare)``: a real run whose state each ``prepare(state)`` changes first (hooks on its model or
  optimizer, another stream); ``nan_rpn_losses`` and ``inf_weight_after_step`` make the two made-up failures.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import torch

from fl_rpn.engine.build import build_run
from fl_rpn.engine.trainer import run

from ..conftest import FAST, app_env, free_port

# -- DDP ---------------------------------------------------------------------------------------------------------
# batch_size is per process: the global batch of 2 processes is 2
DDP_TINY = [*FAST, "device=cpu", "batch_size=1", "schedule.max_iters=4", "schedule.checkpoint_every=2"]
DDP_TIMEOUT = 180
DDP_WORKER = Path(__file__).with_name("ddp_worker.py")


def launch_ddp(tmp_path: Path, name: str, cache: Path, overrides: list[str], rank_overrides=None, nan_on_rank=None,
               check=True, kind="train", timeout=DDP_TIMEOUT):  # fmt: skip
    """Run 2 ranks of ``ddp_worker.py`` (``kind``: ``train``, the app; ``normalizer``, the focal loss alone); returns
    ``(returncodes, outputs, records)``. Rank r runs in ``tmp_path/name/cwd<r>``; a time-out (a deadlock) fails the
    test with both ranks' output, and so does a non-zero exit with ``check``."""
    base = tmp_path / name
    spec = {"overrides": overrides, "rank_overrides": rank_overrides or {}, "record": str(base / "record")}
    spec["nan_on_rank"] = nan_on_rank
    spec["kind"] = kind
    env = app_env(cache, extra={"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "WORLD_SIZE": "2",
                                "OMP_NUM_THREADS": "1"})  # fmt: skip
    procs = []
    for rank in range(2):
        cwd = base / f"cwd{rank}"
        cwd.mkdir(parents=True)
        procs.append(
            subprocess.Popen(
                [sys.executable, str(DDP_WORKER), json.dumps(spec)],
                cwd=cwd,
                env={**env, "RANK": str(rank), "LOCAL_RANK": str(rank)},
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
        )
    outputs = []
    try:
        for p in procs:
            outputs.append(p.communicate(timeout=timeout)[0])
    except subprocess.TimeoutExpired:
        for p in procs:
            p.kill()
        outputs = [p.communicate()[0] for p in procs]
        raise AssertionError("DDP run timed out (a deadlock?):\n" + "\n".join(o[-3000:] for o in outputs)) from None
    codes = [p.returncode for p in procs]
    if check and any(codes):
        logs = "\n".join(f"--- rank {r}\n{out[-4000:]}" for r, out in enumerate(outputs))
        raise AssertionError(f"DDP run failed {codes}:\n{logs}")
    records = [torch.load(f) if (f := Path(f"{spec['record']}.{r}.pt")).is_file() else None for r in range(2)]
    return codes, outputs, records


# -- changing a run through its state -----------------------------------------------------------------------------
def train_with(cfg, *prepare):
    """``run(build_run(cfg))`` after ``fn(state)`` for each of ``prepare``: how a test hooks into a real run (a forward
    hook on ``state.model``, an optimizer hook, another ``state.stream``) without patching the engine."""
    state = build_run(cfg)
    for fn in prepare:
        fn(state)
    return run(state)


def nan_rpn_losses(at_calls):
    """A ``prepare`` for ``train_with``: the RPN's losses become NaN at the given (0-based) forward passes, counting
    every pass of the model's RPN, the poisoned ones only in training."""
    calls = {"n": 0}

    def hook(module, args, output):
        boxes, losses = output
        n, calls["n"] = calls["n"], calls["n"] + 1
        if module.training and n in at_calls:
            losses = {k: v * float("nan") for k, v in losses.items()}
        return boxes, losses

    return lambda state: state.model.rpn.register_forward_hook(hook)


def inf_weight_after_step(n):
    """A ``prepare`` for ``train_with``: right after the n-th optimizer step one weight of the RPN head becomes +inf
    (a finite loss whose step blows the weights up)."""

    def attach(state):
        steps = []

        def after_step(opt, args, kwargs):
            steps.append(1)
            if len(steps) == n:
                with torch.no_grad():
                    state.model.rpn.head.conv[0][0].weight[0, 0, 0, 0] = float("inf")

        state.optimizer.register_step_post_hook(after_step)

    return attach
