"""What every evaluator shares: one record per image, kept in a plain list.

Shape shorthand used across ``fl_rpn.evaluation``: N images; in one image M ground-truth boxes,
D detections and P proposals; K classes with labels ``1..K``. Boxes are absolute ``xyxy`` in the
original image's continuous pixel coordinates, on the CPU.

An evaluator is used as ``reset()`` → ``update(targets, outputs)`` per batch → ``compute()``.
``update`` turns each (target, output) pair into a small record (a dict of CPU tensors and ints) and
appends it to ``self.records``; ``compute`` reads only ``self.records``. So a distributed run needs
one extra step before ``compute``: ``gather()`` on every rank (``all_gather_object`` of the record
lists), or, by hand, ``ev.merge([other.state() for other in ...])``. Records of an ``image_id`` seen
twice (a ``DistributedSampler`` pads the last batch with repeats) count once.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class MetricSpec:
    """One metric, or one family of metrics, that an evaluator's ``compute()`` returns.

    Args:
        name: the key, with ``{placeholder}`` for a part that varies: ``"bbox/AP"``, ``"proposal/AR@{k}"``,
            ``"voc07/AP/{class_name}"``.
        unit: ``"fraction"`` (a value in [0, 1], reported in percent) or another, e.g. ``"count"`` (reported as is).
        higher_is_better: the direction in which the metric improves.
        per_class: one key per class of the dataset (left out of the printed summaries).
    """

    name: str
    unit: str = "fraction"
    higher_is_better: bool = True
    per_class: bool = False

    def key(self, **values: Any) -> str:
        """The key for the placeholders' ``values``: ``AR.key(k=100) == "proposal/AR@100"``."""
        return self.name.format(**values)

    def match(self, key: str) -> dict[str, str] | None:
        """The placeholders' values if ``key`` is one of these metrics, else None."""
        found = _pattern(self.name).fullmatch(key)
        return None if found is None else found.groupdict()


def _pattern(name: str) -> re.Pattern:
    parts = re.split(r"\{(\w+)\}", name)  # literal, placeholder, literal, ...
    body = "".join(re.escape(p) if i % 2 == 0 else f"(?P<{p}>.+)" for i, p in enumerate(parts))
    return re.compile(body)


class OptionError(ValueError):
    """An evaluator option (a keyword argument of its constructor) with a value it refuses.

    ``key`` names the option, so that the config check can report it as ``eval.<evaluator>.<key>``.
    """

    def __init__(self, key: str, value: Any, requirement: str) -> None:
        super().__init__(f"{key}={value!r}: {requirement}")
        self.key, self.value, self.requirement = key, value, requirement


class Evaluator:
    """Base class: accumulates per-image records; subclasses define ``_record`` and ``compute``.

    Subclasses take their options as keyword-only constructor arguments (the keys of their config node
    ``eval.<name>``), build from a dataset's label space with ``from_meta``, and declare the metrics that
    ``compute`` returns in ``metric_specs``; ``headline`` lists the keys a report shows by default.
    """

    metric_specs: ClassVar[tuple[MetricSpec, ...]] = ()
    headline: ClassVar[tuple[str, ...]] = ()
    records: list[dict[str, Any]]

    def __init__(self) -> None:
        self.reset()

    @classmethod
    def from_meta(cls, meta: Any, **options: Any) -> Evaluator:
        """An evaluator for the label space ``meta`` (``class_names``, ``category_ids``: one per label 1..K)."""
        return cls(**options)

    def reset(self) -> None:
        """Forget everything accumulated so far."""
        self.records = []

    def update(self, targets: Sequence[dict], outputs: Sequence[dict]) -> None:
        """Add one batch: ``targets[i]`` and ``outputs[i]`` describe the same image."""
        if len(targets) != len(outputs):
            raise ValueError(f"update() got {len(targets)} targets but {len(outputs)} outputs.")
        self.records.extend(self._record(t, o) for t, o in zip(targets, outputs))

    def compute(self) -> dict[str, float]:
        raise NotImplementedError

    def _record(self, target: dict, output: dict) -> dict[str, Any]:
        raise NotImplementedError

    # -- distributed evaluation -------------------------------------------------------------------
    def state(self) -> list[dict[str, Any]]:
        """The accumulated records (picklable), to be sent to another process."""
        return list(self.records)

    def merge(self, states: Sequence[list[dict[str, Any]]]) -> None:
        """Append the records of other evaluators' ``state()``."""
        for records in states:
            self.records.extend(records)

    def gather(self) -> None:
        """Collect every rank's records on every rank; a no-op outside ``torch.distributed``.

        Call it on all ranks (it is a collective; with NCCL, after ``torch.cuda.set_device``), then
        ``compute()`` on any rank.
        """
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return
        parts: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(parts, self.records)
        self.records = [r for part in parts for r in part]

    def unique_records(self) -> list[dict[str, Any]]:
        """``self.records`` with repeated ``image_id`` s dropped (first one kept)."""
        seen: set[int] = set()
        out = []
        for r in self.records:
            image_id = r.get("image_id")
            if image_id is not None:
                if image_id in seen:
                    continue
                seen.add(image_id)
            out.append(r)
        return out


def as_boxes(x: Any) -> torch.Tensor:
    """Any box container → float64 CPU tensor [B, 4] (float64 keeps IoUs like 0.6 exact)."""
    return torch.as_tensor(x).detach().to("cpu", torch.float64).reshape(-1, 4)


def as_vector(x: Any, dtype: torch.dtype) -> torch.Tensor:
    """Any per-box container → 1-D CPU tensor of ``dtype``."""
    return torch.as_tensor(x).detach().to("cpu", dtype).reshape(-1)


def image_id_of(target: dict) -> int | None:
    """``target['image_id']`` as a Python int (it may be a 0-d tensor), or None."""
    image_id = target.get("image_id")
    return None if image_id is None else int(image_id)


def ground_truth(target: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(boxes [M, 4] float64, labels [M] int64, ignore [M] bool)`` of one target."""
    boxes = as_boxes(target["boxes"])
    labels = as_vector(target["labels"], torch.int64)
    ignore = target.get("ignore")
    ignore = torch.zeros(len(boxes), dtype=torch.bool) if ignore is None else as_vector(ignore, torch.bool)
    return boxes, labels, ignore


def detections(output: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(boxes [D, 4] float64, scores [D] float64, labels [D] int64)`` of one output."""
    return (
        as_boxes(output["boxes"]),
        as_vector(output["scores"], torch.float64),
        as_vector(output["labels"], torch.int64),
    )
