"""Finding and reading a sweep's runs: their overrides, metrics and logged history, the jobs the sweep asked for,
the swept keys and arms, and what a metric is (an evaluator's fraction, a per-class AP, a proposal-recall point)."""

import itertools
import json
import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from ..evaluation import metric_spec
from ..evaluation.recall import AR

# the imbalance diagnostics each run logs (fl_rpn/modeling/diagnostics.py); the focal normaliser only for FL-RPN
DIAGNOSTICS = (
    "rpn/positive_anchors_per_image", "rpn/negative_anchors_per_image", "rpn/trained_anchors_per_image",
    "rpn/focal_normalizer", "rpn/easy_negative_loss_share",
)  # fmt: skip
# the stability and gradient-conflict diagnostics (fl_rpn/engine/stability.py), when a run logged them, and how a
# run's logging windows are combined: spikes summed (the run's count), the largest spike the maximum, others the mean
_MEAN, _SUM, _MAX = statistics.fmean, math.fsum, max
STABILITY = {
    **{f"stability/{t}_{name}": how for t in ("box", "obj")
       for name, how in (("cv", _MEAN), ("spikes", _SUM), ("max_spike", _MAX))},
    **{f"conflict/{group}{name}": _MEAN for group in ("", "backbone_", "head_") for name in ("cosine", "norm_ratio")},
}  # fmt: skip
EASY_SHARE = "rpn/easy_negative_loss_share"


@dataclass
class Run:
    """A run folder: its overrides, ``metrics.json`` (None when it did not finish), ``history.json``, status."""

    path: Path
    overrides: dict[str, str]
    metrics: dict | None
    history: list[dict] = field(default_factory=list)
    status: str = "finished"


def parse_overrides(lines: list[str]) -> dict[str, str]:
    """``["+key=value", ...]`` (Hydra's ``overrides.yaml``) -> ``{key: value}``, without ``+`` / ``~``."""
    out = {}
    for line in lines:
        key, _, value = line.lstrip("+~").partition("=")
        out[key] = value
    return out


def load_runs(roots: list[Path]) -> list[Run]:
    """The run folders under ``roots``, finished or not (jobs that never started: :func:`not_started`)."""
    runs = []
    for root in roots:
        if not root.is_dir():
            raise FileNotFoundError(f"{root} is not a directory")
        for overrides_file in sorted(root.rglob(".hydra/overrides.yaml")):
            run_dir = overrides_file.parent.parent
            overrides = parse_overrides(yaml.safe_load(overrides_file.read_text()) or [])
            metrics_file, history_file = run_dir / "metrics.json", run_dir / "history.json"
            metrics = json.loads(metrics_file.read_text()) if metrics_file.is_file() else None
            history = json.loads(history_file.read_text()) if history_file.is_file() else []
            status = "finished"
            if metrics is None:
                last = history[-1]["iteration"] if history else 0
                status = f"unfinished or failed (no metrics.json; last logged iteration {last})"
            runs.append(Run(run_dir, overrides, metrics, history, status))
    if not runs:
        raise ValueError(f"no runs (folders with .hydra/overrides.yaml) under {[str(r) for r in roots]}")
    return runs


def expected_jobs(sweep_dir: Path) -> list[dict[str, str]]:
    """The jobs a Hydra sweep asked for, in job-number order, from its ``multirun.yaml``.

    As Hydra's basic sweeper expands them: the cartesian product of ``hydra.sweeper.params`` (where an
    experiment config declares its sweep) and the command line's overrides (``hydra.overrides.task``);
    a command-line override replaces a param of the same key.
    """
    from hydra.core.override_parser.overrides_parser import OverridesParser

    hydra = (yaml.safe_load((sweep_dir / "multirun.yaml").read_text()) or {}).get("hydra") or {}
    sweeper = hydra.get("sweeper") or {}
    if not str(sweeper.get("_target_", "")).endswith("BasicSweeper"):
        raise ValueError(f"its sweeper is {sweeper.get('_target_')}, not Hydra's basic sweeper")
    params = [f"{k}={v}" for k, v in (sweeper.get("params") or {}).items()]
    choices: dict[str, list[str]] = {}
    for o in OverridesParser.create().parse_overrides(params + list((hydra.get("overrides") or {}).get("task") or [])):
        key = o.get_key_element()
        values = list(o.sweep_string_iterator()) if o.is_sweep_override() else [o.get_value_element_as_str()]
        choices[key] = [f"{key}={v}" for v in values]
    return [parse_overrides(list(job)) for job in itertools.product(*choices.values())]


def not_started(roots: list[Path], runs: list[Run]) -> tuple[list[Run], list[str], bool]:
    """The expected jobs without a run folder (as runs with status ``not started``), notes on the expected
    jobs, and whether the expected set is known for every folder given.

    A job counts as started when a run folder under its sweep folder has its values of the keys that vary
    across the sweep's jobs (so a job rerun by hand with extra overrides such as ``resume=true`` counts), or when a
    run under another folder of the report has all of its values (the job relaunched in a new sweep folder). A job
    that two sweep folders expect and neither ran is listed once.
    """
    missing, notes, known = [], [], True

    def same_job(job: dict[str, str], overrides: dict[str, str]) -> bool:
        keys = [k for k in job if k not in RUN_CONTROL_KEYS and not k.startswith("hydra.")]
        return all(overrides.get(k) == job[k] for k in keys)

    def relaunched(job: dict[str, str], sweep_dir: Path) -> bool:
        return any(not r.path.is_relative_to(sweep_dir) and same_job(job, r.overrides) for r in runs)

    for root in roots:
        sweep_dirs = sorted(p.parent for p in root.rglob("multirun.yaml"))
        if not sweep_dirs:
            known = False
            notes.append(f"No multirun.yaml in {root.name}, so the expected set of jobs is unknown "
                         "(jobs that never started cannot be listed).")  # fmt: skip
        for sweep_dir in sweep_dirs:
            where = root.name if sweep_dir == root else str(sweep_dir.relative_to(root))
            try:
                jobs = expected_jobs(sweep_dir)
            except Exception as err:  # an unreadable or unusual sweep must not hide the finished runs
                notes.append(f"{where}: the expected set of jobs is unknown (multirun.yaml: {err}).")
                known = False
                continue
            varying = [k for k in jobs[0] if len({job.get(k) for job in jobs}) > 1] if jobs else []
            inside = [r for r in runs if r.path.is_relative_to(sweep_dir)]
            absent, elsewhere, twice = [], 0, 0
            for num, job in enumerate(jobs):
                if any(all(r.overrides.get(k) == job[k] for k in varying) for r in inside):
                    continue
                if relaunched(job, sweep_dir):
                    elsewhere += 1
                    continue
                if any(same_job(job, m.overrides) for m in missing):
                    twice += 1
                    continue
                status = f"not started (job {num} has no run folder)"
                absent.append(Run(sweep_dir / str(num), job, None, [], status))
            moved = f", {elsewhere} run in another sweep folder" if elsewhere else ""
            moved += f", {twice} more not started and listed under another sweep folder" if twice else ""
            notes.append(f"{where}: {len(jobs)} jobs expected (multirun.yaml), {len(absent)} not started{moved}.")
            missing += absent
    return missing, notes, known


def select_runs(runs: list[Run], where: dict[str, list[str]]) -> list[Run]:
    """The runs whose override of each key in ``where`` is one of its values (``{"seed": ["0", "1"]}``); a run
    without an override of such a key is left out. A key no run has, or a value none has, is a ``ValueError``
    naming it: a typo must not silently empty or shrink the table."""
    for key, values in where.items():
        have = sorted({r.overrides[key] for r in runs if key in r.overrides})
        if not have:
            raise ValueError(f"--where {key}=...: no run has the key {key!r}")
        if unknown := [v for v in values if v not in have]:
            raise ValueError(f"--where {key}={','.join(values)}: no run has {key}={unknown[0]} "
                             f"(the runs have {', '.join(have)})")  # fmt: skip
    return [r for r in runs if all(r.overrides.get(k) in values for k, values in where.items())]


# Keys that say how a run was carried out, not what it trains: a run resumed from its checkpoint (``resume=...``)
# is the same job continued, so it stays in its arm instead of making one of its own.
RUN_CONTROL_KEYS = {"resume"}


def swept_keys(runs: list[Run]) -> list[str]:
    """The keys whose values differ between runs, sorted (``hydra.*`` and :data:`RUN_CONTROL_KEYS` excepted)."""
    keys = sorted({k for r in runs for k in r.overrides} - RUN_CONTROL_KEYS)
    return [k for k in keys if len({r.overrides.get(k) for r in runs}) > 1 and not k.startswith("hydra.")]


def arm_of(run: Run, arm_keys: list[str]) -> str:
    """A run's arm: ``"rpn=focal_sigmoid,rpn.gamma=1"`` (``"all"`` without arm keys)."""
    return ",".join(f"{k}={run.overrides.get(k, '-')}" for k in arm_keys) or "all"


def run_values(run: Run, metrics: list[str]) -> dict[str, float]:
    """A finished run's numbers: its finite ``metrics``, each diagnostic averaged over its logged steps and each of
    :data:`STABILITY` combined over them."""
    values = {m: float(run.metrics[m]) for m in metrics if _finite(run.metrics.get(m))}
    for key, combine in {**dict.fromkeys(DIAGNOSTICS, statistics.fmean), **STABILITY}.items():
        steps = [h[key] for h in run.history if _finite(h.get(key))]
        if steps:
            values[key] = combine(steps)
    return values


def common_overrides(runs: list[Run]) -> dict[str, str]:
    """The overrides every run has, with one value (``hydra.*`` excepted), in the first run's order: the settings
    under which the whole table was made, besides the config's defaults."""
    return {k: v for k, v in runs[0].overrides.items()
            if not k.startswith("hydra.") and all(r.overrides.get(k) == v for r in runs)}  # fmt: skip


def per_class_metrics(runs: list[Run]) -> list[str]:
    """The per-class metrics (``voc07/AP/<class>``) the finished runs recorded, in the order of the first run that
    has each (the dataset's class order)."""
    keys = {}
    for r in runs:
        for k in r.metrics or {}:
            if getattr(metric_spec(k), "per_class", False):
                keys.setdefault(k)
    return list(keys)


def recall_curve(metrics: list[str]) -> list[tuple[int, str]]:
    """``(k, key)`` of the ``proposal/AR@k`` keys among ``metrics``, by k: the points of proposal_recall.png."""
    points = [(AR.match(m), m) for m in metrics]
    return sorted((int(found["k"]), m) for found, m in points if found is not None and found["k"].isdigit())


def _finite(x) -> bool:
    """A finite int or float (not a bool)."""
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _is_score(metric: str) -> bool:
    """An evaluator's metric that is a fraction (AP, AR, mAP), as the evaluators declare it."""
    spec = metric_spec(metric)
    return spec is not None and spec.unit == "fraction"


def _is_fraction(metric: str) -> bool:
    """Shown in percent: an evaluator's fraction or a diagnostic share."""
    return _is_score(metric) or metric.endswith("share")
