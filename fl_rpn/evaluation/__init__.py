"""Evaluators: COCO box AP, RPN proposal recall, PASCAL VOC mAP.

Each is a plain object: ``reset()``, ``update(targets, outputs)`` once per batch, ``compute()`` →
``{metric_key: float}``; in a distributed run call ``gather()`` on every rank before ``compute()``
(see ``fl_rpn.evaluation.base``). Per image, ``targets[i]`` holds ``boxes`` [M, 4] (absolute xyxy in
the original image), ``labels`` [M] (1..K), ``ignore`` [M] (crowd / difficult), optionally ``area``
[M], ``image_id`` and ``orig_size`` (h, w); ``outputs[i]`` holds the detections ``boxes`` [D, 4],
``scores`` [D], ``labels`` [D] and, for proposal recall, ``proposals`` [P, 4] (best first).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from fl_rpn.evaluation.base import Evaluator
from fl_rpn.evaluation.coco import CocoEvaluator
from fl_rpn.evaluation.recall import ProposalRecall
from fl_rpn.evaluation.voc import VOC07Evaluator

EVALUATORS = ("coco", "proposal_recall", "voc07")


def build_evaluators(
    names: Sequence[str],
    meta: Any,
    *,
    backend: str = "faster_coco_eval",
    max_proposals: Sequence[int] = (100, 300, 1000),
    use_07_metric: bool = True,
) -> list[Evaluator]:
    """One evaluator per name in ``names`` (from ``EVALUATORS``), in that order.

    ``meta`` has ``class_names`` and ``category_ids`` (one per label 1..K, e.g. a ``DatasetMeta``);
    ``backend`` goes to the COCO evaluator, ``max_proposals`` to proposal recall and
    ``use_07_metric`` to VOC.
    """
    options = {
        "coco": lambda: CocoEvaluator(list(meta.category_ids), list(meta.class_names), backend=backend),
        "proposal_recall": lambda: ProposalRecall(max_proposals),
        "voc07": lambda: VOC07Evaluator(list(meta.class_names), use_07_metric=use_07_metric),
    }
    unknown = [n for n in names if n not in options]
    if unknown:
        raise ValueError(f"Unknown evaluator(s) {unknown}; choose from {list(EVALUATORS)}.")
    return [options[n]() for n in names]


def summarize(metrics: dict[str, Any]) -> str:
    """An aligned two-column text table, one ``metric  value`` row per key, in the given order.

    Floats are printed with 4 decimals (``nan`` as ``nan``); other values as ``str``.
    """

    def fmt(v: Any) -> str:
        if isinstance(v, float):
            return "nan" if math.isnan(v) else f"{v:.4f}"
        return str(v)

    rows = [("metric", "value")] + [(str(k), fmt(v)) for k, v in metrics.items()]
    key_width = max(len(k) for k, _ in rows)
    value_width = max(len(v) for _, v in rows)
    return "\n".join(f"{k:<{key_width}}  {v:>{value_width}}" for k, v in rows)


__all__ = [
    "EVALUATORS",
    "CocoEvaluator",
    "Evaluator",
    "ProposalRecall",
    "VOC07Evaluator",
    "build_evaluators",
    "summarize",
]
