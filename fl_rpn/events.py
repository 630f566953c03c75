"""Scalars that the model computes inside a training step, kept until the trainer reads them (detectron2's
``EventStorage``, for scalars only).

Code deep inside the model (``FocalLossRPN.compute_loss``, the sampled RPN's observer in
``fl_rpn.modeling.diagnostics``) puts its statistics into the current storage; ``TrainStep`` opens one around its
forward pass and returns what was put as ``StepOutput.scalars``, which ``MetricsLogger`` averages over its window and
logs under the names given here.
The values stay 0-d tensors on their device (putting one is no host sync). Outside an open storage (a forward pass
outside the trainer) ``current_storage()`` is None, and the model computes no statistics at all.
"""

from torch import Tensor

__all__ = ["EventStorage", "current_storage"]

_OPEN: list["EventStorage"] = []  # the storages inside whose ``with`` block the code runs, innermost last


class EventStorage:
    """``with EventStorage() as storage:`` makes ``storage`` the current one inside the block; ``drain()`` returns
    the scalars put since the last drain, each name's latest value, in the order of their first put."""

    def __init__(self) -> None:
        self._scalars: dict[str, Tensor] = {}

    def put_scalar(self, name: str, value: Tensor) -> None:
        """``value``: a 0-d tensor, detached and kept where it is."""
        self._scalars[name] = value.detach()

    def put_scalars(self, values: dict[str, Tensor], *, prefix: str = "") -> None:
        for name, value in values.items():
            self.put_scalar(prefix + name, value)

    def scalars(self) -> dict[str, Tensor]:
        """What ``drain()`` would return, without emptying the storage."""
        return dict(self._scalars)

    def drain(self) -> dict[str, Tensor]:
        scalars, self._scalars = self._scalars, {}
        return scalars

    def __enter__(self) -> "EventStorage":
        _OPEN.append(self)
        return self

    def __exit__(self, *exc_info) -> None:
        _OPEN.remove(self)


def current_storage() -> EventStorage | None:
    """The innermost open ``EventStorage``, or None outside every ``with`` block."""
    return _OPEN[-1] if _OPEN else None
