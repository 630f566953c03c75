"""Evaluators: COCO box AP, RPN proposal recall, PASCAL VOC mAP.

Each is a plain object: ``reset()``, ``update(targets, outputs)`` once per batch, ``compute()`` →
``{metric_key: float}``; in a distributed run call ``gather()`` on every rank before ``compute()``
(see ``fl_rpn.evaluation.base``). Per image, ``targets[i]`` holds ``boxes`` [M, 4] (absolute xyxy in
the original image), ``labels`` [M] (1..K), ``ignore`` [M] (crowd / difficult), optionally ``area``
[M], ``image_id`` and ``orig_size`` (h, w); ``outputs[i]`` holds the detections ``boxes`` [D, 4],
``scores`` [D], ``labels`` [D] and, for proposal recall, ``proposals`` [P, 4] (best first).

Which evaluators exist, their options (``eval.<name>``) and their declared metrics: ``fl_rpn.evaluation.registry``.
"""

from __future__ import annotations

import math
from typing import Any

from fl_rpn.evaluation.base import Evaluator, MetricSpec, OptionError
from fl_rpn.evaluation.coco import CocoEvaluator
from fl_rpn.evaluation.recall import ProposalRecall
from fl_rpn.evaluation.registry import (
    EVALUATORS,
    build_evaluators,
    check_eval_config,
    check_evaluators,
    evaluator_options,
    headline_metrics,
    metric_spec,
    without_per_class,
)
from fl_rpn.evaluation.voc import VOC07Evaluator


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
    "MetricSpec",
    "OptionError",
    "ProposalRecall",
    "VOC07Evaluator",
    "build_evaluators",
    "check_eval_config",
    "check_evaluators",
    "evaluator_options",
    "headline_metrics",
    "metric_spec",
    "summarize",
    "without_per_class",
]
