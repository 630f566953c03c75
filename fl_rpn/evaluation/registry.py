"""The table of evaluators: name -> class, each configured by its own node ``eval.<name>``.

A node's keys are the keyword-only arguments of the evaluator's constructor; ``check_evaluators`` checks them
against that signature and lets the constructor check their values, so a typo fails before training with the
key named: ``ValueError("config key eval.voc07.use_07_metric='yes': must be true or false")``. The metrics each
evaluator returns are declared in its ``metric_specs`` (``metric_spec`` finds the one of a key).

Adding an evaluator: a module with an ``Evaluator`` subclass (keyword-only options, ``from_meta`` if it needs the
label space, ``metric_specs``, ``headline``), its line in ``EVALUATORS`` and its node in ``conf/_base/eval.yaml``.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping, Sequence
from types import SimpleNamespace
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

from fl_rpn.checks import check, check_int
from fl_rpn.evaluation.base import Evaluator, MetricSpec, OptionError
from fl_rpn.evaluation.coco import CocoEvaluator
from fl_rpn.evaluation.recall import ProposalRecall
from fl_rpn.evaluation.voc import VOC07Evaluator

# The order is the report's default column order (their ``headline`` keys).
EVALUATORS: dict[str, type[Evaluator]] = {
    "coco": CocoEvaluator,
    "voc07": VOC07Evaluator,
    "proposal_recall": ProposalRecall,
}
# Flat keys of configs written before each evaluator had its own node (run folders' .hydra/, checkpoints).
LEGACY_KEYS = {"coco_backend": ("coco", "backend"), "voc07_use_07_metric": ("voc07", "use_07_metric")}
_NO_CLASSES = SimpleNamespace(class_names=[], category_ids=[])


def option_names(cls: type[Evaluator]) -> list[str]:
    """The keyword-only parameters of ``cls``'s constructor: the keys its config node may hold."""
    params = inspect.signature(cls.__init__).parameters.values()
    return [p.name for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY]


def evaluator_options(eval_cfg: Mapping) -> dict[str, dict[str, Any]]:
    """``{name: keyword arguments}`` for every evaluator in the table, from ``eval.<name>`` (absent: ``{}``).

    The legacy flat keys (``eval.coco_backend``, ``eval.voc07_use_07_metric``) are read as the keys they became.
    """
    options = {}
    for name in EVALUATORS:
        node = eval_cfg.get(name)
        if isinstance(node, DictConfig):
            node = OmegaConf.to_container(node, resolve=True)
        if node is not None and not isinstance(node, dict):
            raise ValueError(f"config key eval.{name}={node!r}: must be a mapping of {name}'s options")
        options[name] = dict(node or {})
    for old, (name, key) in LEGACY_KEYS.items():
        if old in eval_cfg:
            if key in options[name]:
                raise ValueError(f"config key eval.{old}: the old name of eval.{name}.{key}; set only that one")
            options[name][key] = eval_cfg[old]
    return options


def _check_names(names: Sequence[str]) -> None:
    unknown = [n for n in names if n not in EVALUATORS]
    if unknown:
        choices = list(EVALUATORS)
        raise ValueError(f"config key eval.evaluators={list(names)!r}: unknown {unknown}; choose from {choices}")


def _check_keys(name: str, options: Mapping[str, Any]) -> None:
    allowed = option_names(EVALUATORS[name])
    for key, value in options.items():
        if key not in allowed:
            raise ValueError(f"config key eval.{name}.{key}={value!r}: unknown; eval.{name} takes {allowed}")


def _build(name: str, meta: Any, options: Mapping[str, Any]) -> Evaluator:
    _check_keys(name, options)
    try:
        return EVALUATORS[name].from_meta(meta, **options)
    except OptionError as err:
        raise ValueError(f"config key eval.{name}.{err}") from err


def check_evaluators(names: Sequence[str], options: Mapping[str, Mapping[str, Any]]) -> None:
    """Raise ``ValueError`` naming the key for an unknown evaluator, an unknown option in any node of ``options``,
    or an option value that the constructor of an evaluator in ``names`` refuses (it is built without classes)."""
    _check_names(names)
    for name, opts in options.items():
        if name not in EVALUATORS:
            raise ValueError(f"config key eval.{name}: options of an unknown evaluator; choose from {list(EVALUATORS)}")
        _check_keys(name, opts)
    for name in names:
        _build(name, _NO_CLASSES, options.get(name, {}))


def check_eval_config(eval_cfg: Mapping) -> None:
    """The ``eval`` node: a list of known evaluators, each one's options, and the batch size. The evaluators run
    after training: a typo here must fail now, not hours later."""
    names = eval_cfg["evaluators"]
    check(isinstance(names, ListConfig | list), "eval.evaluators", names,
          "must be a list of evaluator names, e.g. [coco,proposal_recall]")  # fmt: skip
    check_evaluators(list(names), evaluator_options(eval_cfg))
    check_int("eval.batch_size", eval_cfg["batch_size"], 1)


def build_evaluators(
    names: Sequence[str], meta: Any, options: Mapping[str, Mapping[str, Any]] | None = None
) -> list[Evaluator]:
    """One evaluator per name in ``names`` (keys of ``EVALUATORS``), in that order, with ``options[name]``.

    ``meta`` has ``class_names`` and ``category_ids`` (one per label 1..K, e.g. a ``DatasetMeta``);
    ``options`` maps a name to its keyword arguments (``evaluator_options(cfg.eval)``).
    """
    _check_names(names)
    options = options or {}
    return [_build(name, meta, options.get(name, {})) for name in names]


def metric_spec(key: str) -> MetricSpec | None:
    """The declared spec of metric ``key`` (``"voc07/AP/cat"``), or None if no evaluator returns it.

    A prefix of whole path segments is allowed, such as the EMA hook's: ``"ema/bbox/AP"`` is ``bbox/AP``'s.
    """
    parts = key.split("/")
    for start in range(len(parts)):
        rest = "/".join(parts[start:])
        for cls in EVALUATORS.values():
            for spec in cls.metric_specs:
                if spec.match(rest) is not None:
                    return spec
    return None


def headline_metrics() -> list[str]:
    """The evaluators' ``headline`` keys, in table order: a report's default columns."""
    return [key for cls in EVALUATORS.values() for key in cls.headline]


def without_per_class(metrics: Mapping[str, Any]) -> dict[str, Any]:
    """``metrics`` without the per-class ones (``voc07/AP/<class>``), for a printed summary."""
    return {k: v for k, v in metrics.items() if not getattr(metric_spec(k), "per_class", False)}
