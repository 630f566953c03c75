"""``EMA``: an exponential moving average of the weights, kept by a hook (config key ``ema: <decay>``).

After every step that moved the weights (a step skipped by ``nonfinite=skip`` did not), each floating-point tensor
of the model's state dict (parameters and BatchNorm statistics) becomes ``ema = decay * ema + (1 - decay) * w``,
from ``ema = w`` at the start; integer buffers are copied. After ``n`` updates from ``w_0``:
``ema_n = decay^n w_0 + (1 - decay) * sum_k decay^(n-k) w_k``. The averaged weights are evaluated next to the live
ones (``Evaluation``; their metrics prefixed ``ema/``) and travel in ``last.pt`` under ``hooks/ema``.
"""

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn

from .hooks import HookBase, TrainState

log = logging.getLogger(__name__)


class EMA(HookBase):
    """The average of ``model``'s weights with ``decay`` in (0, 1), starting from its weights now."""

    name = "ema"

    def __init__(self, *, model: nn.Module, decay: float) -> None:
        if not 0 < decay < 1:
            raise ValueError(f"ema decay must be in (0, 1), got {decay}")
        self.model, self.decay = model, float(decay)
        self.weights: dict[str, Tensor] = {k: v.detach().clone() for k, v in model.state_dict().items()}
        self.updates = 0  # steps averaged in
        self.resumed = False

    @torch.no_grad()
    def update(self) -> None:
        """Average the model's current weights in."""
        for k, v in self.model.state_dict().items():
            average = self.weights[k]
            if average.is_floating_point():
                average.mul_(self.decay).add_(v.detach(), alpha=1 - self.decay)
            else:
                average.copy_(v)
        self.updates += 1

    def before_train(self, state: TrainState) -> None:
        if state.start_iter and not self.resumed:
            log.info("ema: the checkpoint holds no averaged weights; averaging from iteration %d", state.start_iter)

    def after_step(self, state: TrainState) -> None:
        if not state.output.skipped:
            self.update()

    @contextmanager
    def applied(self, model: nn.Module) -> Iterator[None]:
        """``model`` (this hook's model) holds the averaged weights inside the block, its own ones again after."""
        live = {k: v.detach().clone() for k, v in model.state_dict().items()}
        model.load_state_dict(self.weights)
        try:
            yield
        finally:
            model.load_state_dict(live)

    def state_dict(self) -> dict[str, Any]:
        return {"decay": self.decay, "updates": self.updates, "weights": self.weights}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        own = self.model.state_dict()
        if set(state["weights"]) != set(own):
            raise ValueError("the checkpoint's EMA weights do not fit this model (another model or rpn config?)")
        self.weights = {k: v.to(device=own[k].device, dtype=own[k].dtype) for k, v in state["weights"].items()}
        self.updates = state["updates"]
        self.resumed = True
        if state["decay"] != self.decay:
            log.info("ema: decay %g in the checkpoint, now %g", state["decay"], self.decay)
