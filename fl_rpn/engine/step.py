"""``TrainStep``: one optimisation step, the same for the trainer, the benchmarks and the tests.

A step is: forward in train mode under autocast (the loss terms, and the scalars the model puts into the
``EventStorage`` the step opens around it, ``fl_rpn.events``), their sum, the agreement of all ranks on
whether it is finite (and on a pending stop request, e.g. SIGTERM), then zero_grad, backward through the AMP
``GradScaler``, gradient clipping (``fl_rpn.engine.optim.clip_grad_norm_``) and the optimizer step. A non-finite
loss either raises ``NonFiniteLossError`` (``nonfinite="stop"``) or skips the step (``nonfinite="skip"``), which
stops too once skipping cannot recover. The lr schedule is the caller's: a skipped step is still an iteration.
"""

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from ..errors import NonFiniteLossError
from ..events import EventStorage
from .checkpoint import nonfinite_tensors
from .distributed import SINGLE_PROCESS, DistInfo, any_rank
from .optim import clip_grad_norm_

log = logging.getLogger(__name__)

# nonfinite=skip stops after this many skipped steps in a row: the weights are finite but diverged (huge), and
# every batch gives a non-finite loss, so skipping more would only burn the rest of the schedule
MAX_CONSECUTIVE_SKIPS = 10
NONFINITE = ("stop", "skip")  # config key nonfinite: what a non-finite loss does
AMP_DTYPES = {None: None, "bf16": torch.bfloat16, "fp16": torch.float16}  # config key amp -> autocast dtype


@dataclass
class StepOutput:
    """What one step did.

    ``losses``: ``{"loss": total, "loss_objectness": ..., ...}``, 0-d tensors on the device (read them only when
    logging: ``.item()`` is a host sync); ``skipped``: the loss was not finite on some rank and no parameter
    moved; ``stop``: some rank asked to stop (the caller checkpoints and exits); ``scalars``: what the model put
    into the step's ``EventStorage`` during the forward pass (the RPN's statistics, ``rpn/...``), 0-d tensors on
    the device too.
    """

    losses: dict[str, Tensor]
    skipped: bool
    stop: bool
    scalars: dict[str, Tensor] = field(default_factory=dict)


class TrainStep:
    """``step(images, targets)`` trains ``model`` on one batch and returns a ``StepOutput``.

    Args:
        model: the detector (its parameters are clipped and checked).
        optimizer: steps the parameters of ``model``.
        device: where the batch is (the autocast device type).
        forward_model: what runs the forward pass, e.g. ``model`` wrapped in DistributedDataParallel; ``model``
            when None.
        scaler: an AMP ``GradScaler`` (fp16); a disabled one when None.
        amp_dtype: autocast dtype (``torch.bfloat16`` / ``torch.float16``), or None for float32.
        clip_grad_norm: max gradient norm, or None for no clipping.
        nonfinite: ``"stop"`` (raise) or ``"skip"`` (skip the step) on a non-finite loss.
        checkpoint_path: the run's checkpoint, named in the errors (None: no checkpoint is written).
        stop_requested: called after the forward pass; True when this rank is asked to stop (SIGTERM). The ranks
            agree on it in the same all_reduce as on the finiteness of the loss.
        dist_info: this process's rank and world size.
        before_backward: functions called as ``fn(losses, iteration)`` with the loss terms (their graph still
            alive) when the loss is finite, before the backward pass (e.g. a gradient probe); a hook appends its own
            to ``step.before_backward``.
    """

    def __init__(
        self,
        *,
        model: nn.Module,
        optimizer: Optimizer,
        device: torch.device,
        forward_model: nn.Module | None = None,
        scaler: torch.amp.GradScaler | None = None,
        amp_dtype: torch.dtype | None = None,
        clip_grad_norm: float | None = None,
        nonfinite: str = "stop",
        checkpoint_path: Path | None = None,
        stop_requested: Callable[[], bool] = lambda: False,
        dist_info: DistInfo = SINGLE_PROCESS,
        before_backward: list[Callable[[dict[str, Tensor], int], None]] | None = None,
    ) -> None:
        if nonfinite not in NONFINITE:
            raise ValueError(f"nonfinite must be 'stop' or 'skip', got {nonfinite!r}")
        self.model = model
        self.forward_model = forward_model if forward_model is not None else model
        self.optimizer = optimizer
        self.device = torch.device(device)
        self.scaler = scaler if scaler is not None else torch.amp.GradScaler(self.device.type, enabled=False)
        self.amp_dtype = amp_dtype
        self.clip_grad_norm = clip_grad_norm
        self.nonfinite = nonfinite
        self.checkpoint_path = checkpoint_path
        self.stop_requested = stop_requested
        self.dist_info = dist_info
        self.before_backward = list(before_backward or [])
        self.skipped_steps = 0  # in the whole run (the trainer restores it on resume)
        self.consecutive_skips = 0

    def __call__(self, images: list[Tensor], targets: list[dict[str, Tensor]], *, iteration: int = 0) -> StepOutput:
        """Train on ``images`` (N tensors ``[3, H_n, W_n]``) and ``targets`` (N dicts: ``boxes`` ``[B_n, 4]``,
        ``labels`` ``[B_n]``), on ``device``. ``iteration`` only names the step in messages."""
        with (
            EventStorage() as events,
            torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None),
        ):
            losses = self.forward_model(images, targets)
        loss = sum(losses.values())
        # all ranks skip / stop together, or the others would wait in DDP's all_reduce forever
        nonfinite, stop = any_rank([~torch.isfinite(loss), self.stop_requested()], self.dist_info)
        if nonfinite:
            self._skip_or_raise(loss, losses, iteration)
        else:
            self.consecutive_skips = 0
            for observe in self.before_backward:
                observe(losses, iteration)
            self.optimizer.zero_grad(set_to_none=True)
            self.scaler.scale(loss).backward()
            if self.clip_grad_norm is not None:
                self.scaler.unscale_(self.optimizer)
                clip_grad_norm_(self.model, self.clip_grad_norm)  # the softmax logit difference counted once
            self.scaler.step(self.optimizer)
            self.scaler.update()
        return StepOutput(losses={"loss": loss, **losses}, skipped=nonfinite, stop=stop, scalars=events.drain())

    def _last_checkpoint(self, yet: str) -> str:
        last = self.checkpoint_path
        return f"the last good checkpoint is {last}" if last is not None and last.is_file() else yet

    def _skip_or_raise(self, loss: Tensor, losses: dict[str, Tensor], iteration: int) -> None:
        terms = ", ".join(f"{k}={v.item():.4g}" for k, v in losses.items())
        where = f" on rank {self.dist_info.rank}" if not torch.isfinite(loss) else " on another rank"
        message = f"non-finite loss{where if self.dist_info.enabled else ''} at iteration {iteration}: {terms}"
        if self.nonfinite != "skip":
            raise NonFiniteLossError(f"{message}; {self._last_checkpoint('no checkpoint was written yet')}")
        # Skipping cannot recover from weights that are no longer finite (every later loss is non-finite
        # too) nor from a long run of non-finite losses: stop. Checked on this rare path only; the
        # weights and the count are the same on every rank, so all ranks stop together.
        bad = nonfinite_tensors(self.model.state_dict())
        self.consecutive_skips += 1
        if bad or self.consecutive_skips >= MAX_CONSECUTIVE_SKIPS:
            why = (f"{len(bad)} model tensor(s) are not finite (e.g. {bad[0]})" if bad
                   else f"{self.consecutive_skips} steps in a row were skipped")  # fmt: skip
            raise NonFiniteLossError(
                f"{message}, and {why}: training diverged and nonfinite=skip cannot recover; "
                f"{self._last_checkpoint('no checkpoint was written')}. "
                "Lower optim.lr or set clip_grad_norm, then resume from it (resume=PATH) or start again."
            )
        log.warning("%s: step skipped", message)
        self.skipped_steps += 1
