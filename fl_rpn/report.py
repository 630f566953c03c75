"""``fl-rpn-report <multirun dir> [...]``: a sweep's runs -> report.md, runs.csv, summary.csv and PNG plots.

Runs are the folders holding ``.hydra/overrides.yaml``. The keys whose values differ between runs are the swept
keys (``hydra.*`` and ``resume`` excepted: a resumed run stays in its arm, and the runs section lists it); ``seed``
separates repetitions, every other swept key defines an arm. Per arm: mean ± standard deviation and n over seeds;
per non-baseline arm: the paired difference to the baseline arm (same seed, same values of the other swept keys)
with a 95 % Student-t interval across seeds, and its power: the sd of the differences, the minimal detectable
difference (80 % power, 5 % two-sided, noncentral t) for the number of seeds run, and the seeds needed to detect an
effect of ``--effect`` points (the paper's 0.4). The imbalance diagnostics (``rpn/...`` in ``history.json``) are
averaged over each run's logged steps first; the stability and gradient-conflict diagnostics (``stability/...``,
``conflict/...``), when logged, are combined over them as :data:`STABILITY` says. Runs with ``eval_history.json``
get learning curves (``fl_rpn.learning_curves``).

Nothing is dropped silently: runs without ``metrics.json`` are listed as failed or unfinished, and the
jobs that Hydra's ``multirun.yaml`` asked for but that have no run folder as not started. Two finished
runs of the same arm and seed are an error (they would count as two seeds and pair arbitrarily).
"""

import csv
import itertools
import json
import math
import statistics
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import yaml

from . import learning_curves
from .evaluation import headline_metrics, metric_spec
from .evaluation.recall import AR

# what the evaluators declare (fl_rpn/evaluation/registry.py): their headline metrics, in the table's order
DEFAULT_METRICS = tuple(headline_metrics())
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


def t_central_probability(t: float, df: int) -> float:
    """P(|T| <= t) for Student's t with an integer ``df``, exactly (Abramowitz & Stegun 26.7.3 and 26.7.4)."""
    theta = math.atan(t / math.sqrt(df))
    c2 = math.cos(theta) ** 2
    total, term = 0.0, 1.0
    for k in range(df // 2 if df % 2 == 0 else (df - 1) // 2):
        total += term
        term *= (2 * k + 1) / (2 * k + 2) * c2 if df % 2 == 0 else (2 * k + 2) / (2 * k + 3) * c2
        if term < 1e-17 * total:
            break
    if df % 2 == 0:
        return math.sin(theta) * total
    return 2 / math.pi * (theta + math.sin(theta) * math.cos(theta) * total)


@lru_cache
def t_quantile(df: int, level: float = 0.95) -> float:
    """The two-sided ``level`` quantile of Student's t: P(|T| <= q) = level, by bisection on the exact CDF."""
    if df < 1 or int(df) != df:
        raise ValueError(f"degrees of freedom must be a positive integer, got {df}")
    lo, hi = 0.0, 1.0
    while t_central_probability(hi, df) < level:
        lo, hi = hi, 2 * hi
    for _ in range(100):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if t_central_probability(mid, df) < level else (lo, mid)
        if hi - lo < 1e-12:
            break
    return (lo + hi) / 2


def t95(df: int) -> float:
    return t_quantile(df, 0.95)


@dataclass
class Run:
    path: Path
    overrides: dict[str, str]
    metrics: dict | None
    history: list[dict] = field(default_factory=list)
    status: str = "finished"


def parse_overrides(lines: list[str]) -> dict[str, str]:
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
    across the sweep's jobs (so a job rerun by hand with extra overrides such as ``resume=true`` counts).
    """
    missing, notes, known = [], [], True
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
            absent = []
            for num, job in enumerate(jobs):
                if not any(all(r.overrides.get(k) == job[k] for k in varying) for r in inside):
                    status = f"not started (job {num} has no run folder)"
                    absent.append(Run(sweep_dir / str(num), job, None, [], status))
            notes.append(f"{where}: {len(jobs)} jobs expected (multirun.yaml), {len(absent)} not started.")
            missing += absent
    return missing, notes, known


# Keys that say how a run was carried out, not what it trains: a run resumed from its checkpoint (``resume=...``)
# is the same job continued, so it stays in its arm instead of making one of its own.
RUN_CONTROL_KEYS = {"resume"}


def swept_keys(runs: list[Run]) -> list[str]:
    keys = sorted({k for r in runs for k in r.overrides} - RUN_CONTROL_KEYS)
    return [k for k in keys if len({r.overrides.get(k) for r in runs}) > 1 and not k.startswith("hydra.")]


def arm_of(run: Run, arm_keys: list[str]) -> str:
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


def mean_sd_n(values: list[float]) -> tuple[float, float, int]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else math.nan, len(values)


def paired_interval(diffs: list[float]) -> tuple[float, float, float, int]:
    """Mean of paired differences with its 95 % Student-t interval: (mean, low, high, n)."""
    mean, sd, n = mean_sd_n(diffs)
    half = t95(n - 1) * sd / math.sqrt(n) if n > 1 else math.nan
    return mean, mean - half, mean + half, n


POWER, ALPHA = 0.8, 0.05  # the power analysis: 80 % power, 5 % two-sided


def t_test_power(d: float, n: int, alpha: float = ALPHA) -> float:
    """Power of the two-sided paired (one-sample) t-test with ``n`` pairs at standardised effect ``d`` = mean / sd.

    Exact under normal differences: the statistic is noncentral t with ``n - 1`` degrees of freedom and
    noncentrality ``d sqrt(n)``; power = P(T' > t_crit) + P(T' < -t_crit), t_crit the 1 - alpha/2 quantile of t.
    """
    from scipy import stats

    df, nc = n - 1, d * math.sqrt(n)
    crit = stats.t.ppf(1 - alpha / 2, df)
    upper, lower = stats.nct.sf(crit, df, abs(nc)), stats.nct.cdf(-crit, df, abs(nc))
    if math.isnan(lower):  # scipy returns NaN for this far tail at few degrees of freedom; it is below 1e-10 there
        lower = 0.0
    return float(upper + lower)


def detectable_effect(n: int, power: float = POWER, alpha: float = ALPHA) -> float:
    """The standardised effect ``d`` that the paired t-test with ``n`` pairs detects with ``power`` (n >= 2)."""
    from scipy.optimize import brentq

    if n < 2:
        return math.nan
    hi = 1.0
    while t_test_power(hi, n, alpha) < power:
        hi *= 2
    return float(brentq(lambda d: t_test_power(d, n, alpha) - power, 0.0, hi, xtol=1e-10))


def pairs_needed(d: float, power: float = POWER, alpha: float = ALPHA, limit: int = 10**6) -> float:
    """The smallest number of pairs (>= 2) with which the paired t-test detects ``d`` with ``power``; inf above
    ``limit`` (or for d = 0)."""
    d = abs(d)
    if d == 0 or t_test_power(d, limit, alpha) < power:
        return math.inf
    lo, hi = 1, 2  # power(lo) < power <= power(hi), power increasing in n
    while t_test_power(d, hi, alpha) < power:
        lo, hi = hi, 2 * hi
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if t_test_power(d, mid, alpha) < power else (lo, mid)
    return hi


def paired_power(diffs: list[float], effect: float) -> tuple[float, float, float]:
    """``(sd, mdd, n_needed)`` of paired differences: their sample sd, the minimal detectable difference
    ``detectable_effect(n) x sd`` for their number n, and the pairs needed to detect ``effect`` (same units)
    at that sd. The sd is the observed one, so both figures are estimates; nan for fewer than 2 pairs."""
    _, sd, n = mean_sd_n(diffs)
    if n < 2:
        return math.nan, math.nan, math.nan
    if sd == 0:
        return 0.0, 0.0, 2
    return sd, detectable_effect(n) * sd, pairs_needed(effect / sd)


def summarize_runs(runs: list[Run], metrics: list[str], baseline: str, effect: float = 0.004) -> dict:
    """Per-arm statistics and paired differences; ``baseline`` is ``key=value`` (e.g. ``rpn=sampled``).

    ``power[arm][metric]`` is ``paired_power`` of the differences, for the fraction metrics (AP, AR, mAP) with
    ``effect`` (a fraction: 0.004 is 0.4 points).

    Statistics cover ``metrics`` and :data:`DIAGNOSTICS`. Raises ``ValueError`` when two finished runs share
    an arm and a seed.
    """
    keys = swept_keys(runs)
    arm_keys = [k for k in keys if k != "seed"]
    finished = [r for r in runs if r.metrics is not None]
    by_pair = defaultdict(list)
    for r in finished:
        by_pair[(arm_of(r, arm_keys), r.overrides.get("seed"))].append(r)
    repeated = [f"{arm}, seed={seed}: {', '.join(str(r.path) for r in rs)}" for (arm, seed), rs in by_pair.items()
                if len(rs) > 1]  # fmt: skip
    if repeated:
        raise ValueError("more than one finished run of the same arm and seed; they would count as separate seeds "
                         "and pair arbitrarily. Leave all but one of each out of the folders given:\n"
                         + "\n".join(repeated))  # fmt: skip
    values = {r.path: run_values(r, metrics) for r in finished}
    names = [*metrics, *DIAGNOSTICS, *STABILITY]
    arms: dict[str, list[Run]] = {arm: [] for arm in sorted({arm_of(r, arm_keys) for r in runs})}
    for r in finished:
        arms[arm_of(r, arm_keys)].append(r)
    table = {}
    for arm, members in arms.items():
        row = {}
        for m in names:
            xs = [values[r.path][m] for r in members if m in values[r.path]]
            if xs:
                row[m] = mean_sd_n(xs)
        table[arm] = row

    base_key, _, base_value = baseline.partition("=")
    diffs, power, notes = {}, {}, []
    if base_key not in arm_keys:
        notes.append(f"The baseline {baseline} is not an arm ({base_key} is not a swept key): no paired differences.")
    elif not any(r.overrides.get(base_key) == base_value for r in finished):
        notes.append(f"The baseline {baseline} has no finished runs: no paired differences.")
    else:
        other_keys = [k for k in arm_keys if k != base_key]
        base_runs = {
            (tuple(r.overrides.get(k) for k in other_keys), r.overrides.get("seed")): r
            for r in finished
            if r.overrides.get(base_key) == base_value
        }
        for arm, members in arms.items():
            if not members or members[0].overrides.get(base_key) == base_value:
                continue
            row, power_row = {}, {}
            for m in names:
                pairs = []
                for r in members:
                    b = base_runs.get((tuple(r.overrides.get(k) for k in other_keys), r.overrides.get("seed")))
                    if b is not None and m in values[r.path] and m in values[b.path]:
                        pairs.append(values[r.path][m] - values[b.path][m])
                if pairs:
                    row[m] = paired_interval(pairs)
                    if _is_score(m):
                        power_row[m] = paired_power(pairs, effect)
            diffs[arm], power[arm] = row, power_row
    return {"swept": keys, "arm_keys": arm_keys, "arms": arms, "table": table, "diffs": diffs, "notes": notes,
            "values": values, "baseline": baseline, "power": power, "effect": effect}  # fmt: skip


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _fmt(x: float, pct: bool, spread: bool = False) -> str:
    """A fraction in percent with 2 decimals; a count with 2 decimals, or none from 1,000 on unless it is a
    ``spread`` (an sd, which is often far below its mean)."""
    if not math.isfinite(x):
        return "nan"
    if pct:
        return f"{100 * x:.2f}"
    return f"{x:,.0f}" if abs(x) >= 1000 and not spread else f"{x:,.2f}"


def _signed(x: float) -> str:
    """A difference in percentage points: ``+1.23``."""
    return f"{100 * x:+.2f}" if math.isfinite(x) else "nan"


def _is_score(metric: str) -> bool:
    """An evaluator's metric that is a fraction (AP, AR, mAP), as the evaluators declare it."""
    spec = metric_spec(metric)
    return spec is not None and spec.unit == "fraction"


def _is_fraction(metric: str) -> bool:
    """Shown in percent: an evaluator's fraction or a diagnostic share."""
    return _is_score(metric) or metric.endswith("share")


def per_class_metrics(runs: list[Run]) -> list[str]:
    """The per-class metrics (``voc07/AP/<class>``) the finished runs recorded, in the order of the first run that
    has each (the dataset's class order)."""
    keys = {}
    for r in runs:
        for k in r.metrics or {}:
            if getattr(metric_spec(k), "per_class", False):
                keys.setdefault(k)
    return list(keys)


def _diff_cells(diffs: dict, names: list[str], fmt=_signed) -> dict[str, list[str]]:
    """Paired differences per arm and metric, ``+1.23 [-0.50, +2.96] (3)``: mean [interval] (pairs), each number
    through ``fmt`` (default: a fraction in percentage points)."""
    return {
        arm: [f"{fmt(row[m][0])} [{fmt(row[m][1])}, {fmt(row[m][2])}] ({row[m][3]})" if m in row else "-"
              for m in names]
        for arm, row in diffs.items()
    }  # fmt: skip


def recall_curve(metrics: list[str]) -> list[tuple[int, str]]:
    """``(k, key)`` of the ``proposal/AR@k`` keys among ``metrics``, by k: the points of proposal_recall.png."""
    points = [(AR.match(m), m) for m in metrics]
    return sorted((int(found["k"]), m) for found, m in points if found is not None and found["k"].isdigit())


def _counted(values: list) -> str:
    """``"a"`` when all equal, else ``"a (4 runs), b (2 runs)"``."""
    counts = Counter(values)
    if len(counts) == 1:
        return str(values[0])
    return ", ".join(f"{v} ({n} runs)" for v, n in counts.most_common())


def provenance_lines(runs: list[Run]) -> list[str]:
    prov = [(r.metrics or {}).get("provenance") or {} for r in runs if r.metrics is not None]
    if not prov:
        return ["Provenance: no finished runs."]
    get = {k: [p.get(k, "unknown") for p in prov] for k in ("commit", "hardware", "world_size", "dataset", "schedule")}
    # an installed copy records no commit (fl_rpn.provenance.git_commit), only its version
    get["commit"] = [f"none (fl-rpn {p.get('version', '?')})" if c is None else c for c, p in zip(get["commit"], prov)]
    lines = [f"Provenance of the {len(prov)} finished runs: commit {_counted(get['commit'])}; hardware "
             f"{_counted(get['hardware'])}; world size {_counted(get['world_size'])}; dataset "
             f"{_counted(get['dataset'])}; schedule {_counted(get['schedule'])}."]  # fmt: skip
    if len(set(get["commit"])) > 1:
        lines.append(f"**Warning: the runs come from {len(set(get['commit']))} different commits**; differences "
                     "between arms may be differences between code versions.")  # fmt: skip
    return lines


def _md_table(columns: list[str], rows: dict[str, list[str]]) -> list[str]:
    """A markdown table with an ``arm`` column: one line per ``rows`` item (arm -> cells)."""
    return [
        "| arm | " + " | ".join(columns) + " |",
        "|---|" + "---|" * len(columns),
        *(f"| {arm} | " + " | ".join(cells) + " |" for arm, cells in rows.items()),
    ]


def _row_cells(row: dict, names: list[str]) -> list[str]:
    cells = []
    for m in names:
        if m in row:
            mean, sd, n = row[m]
            cells.append(f"{_fmt(mean, _is_fraction(m))} ± {_fmt(sd, _is_fraction(m), spread=True)} ({n})")
        else:
            cells.append("-")
    return cells


def markdown(
    summary: dict,
    runs: list[Run],
    metrics: list[str],
    baseline: str,
    notes: list[str] = (),
    plots: list[str] = (),
    expected_known: bool = True,
    curve_lines: list[str] = (),
    per_class: list[str] = (),
) -> str:
    """The report; ``notes`` on the expected jobs go to the runs section (``expected_known``: whether every sweep's
    expected jobs could be read), ``plots`` (file names) get captions, ``curve_lines`` (the learning-curve section,
    ``learning_curves.markdown_lines``) go before the runs, ``per_class`` metrics get their own section."""
    table = summary["table"]
    lines = [f"Swept keys: {', '.join(summary['swept']) or '(none)'}; arms by {', '.join(summary['arm_keys']) or '-'}.",
             "", *provenance_lines(runs), "", "## Metrics", "",
             "AP / AR / shares in percent; mean ± sd (n) over seeds, sd the sample standard deviation across seeds.",
             ""]  # fmt: skip
    shown = [m for m in metrics if any(m in row for row in table.values())]
    if warning := too_short_to_rank(summary, shown):
        lines += [warning, ""]
    lines += _md_table(shown, {arm: _row_cells(row, shown) for arm, row in table.items()})
    if "metrics.png" in plots:
        lines += ["", "metrics.png: bars are the means over seeds, error bars ± 1 sd (a spread, not an interval)."]
    if "proposal_recall.png" in plots:
        lines += ["", "proposal_recall.png: AR@100 / 300 / 1000 per arm, mean ± 1 sd over seeds."]
    if "loss_curves.png" in plots:
        lines += [
            "",
            "loss_curves.png: the box head's loss (the same function in every arm) per arm; the RPN's "
            "objectness and box terms are different functions across arms (focal × λ / N_pos vs BCE over "
            "sampled anchors), so each is drawn relative to its arm's first logged value. Means over seeds.",
        ]

    lines += ["", f"## Paired differences vs {baseline}", ""]
    lines += summary["notes"]
    if summary["diffs"]:
        lines += ["Same seed (and same other swept values), mean [95 % Student-t interval] (pairs), in percent:", ""]
        diff_metrics = [m for m in shown if _is_score(m)]
        lines += _md_table([f"Δ {m}" for m in diff_metrics], _diff_cells(summary["diffs"], diff_metrics))
        if "differences.png" in plots:
            lines += ["", "differences.png: the same differences, points at the mean, bars the 95 % interval "
                      "(t-quantile for pairs − 1 degrees of freedom; none for a single pair)."]  # fmt: skip
        lines += power_lines(summary, diff_metrics)

    classes = [m for m in per_class if any(m in row for row in table.values())]
    if classes:
        lines += ["", "## Per-class AP", "", "In percent; mean ± sd (n) over seeds:", ""]
        lines += _md_table(classes, {arm: _row_cells(row, classes) for arm, row in table.items()})
        if summary["diffs"]:
            lines += ["", f"Paired differences vs {baseline}, mean [95 % Student-t interval] (pairs), in points:", ""]
            lines += _md_table([f"Δ {m}" for m in classes], _diff_cells(summary["diffs"], classes))

    diagnostics = [k for k in DIAGNOSTICS if any(k in row for row in table.values())]
    if diagnostics:
        lines += ["", "## Imbalance diagnostics", "",
                  "Per run the mean over its logged training steps (history.json), then mean ± sd (n) over seeds; "
                  "the share in percent.", ""]  # fmt: skip
        lines += _md_table(diagnostics, {arm: _row_cells(row, diagnostics) for arm, row in table.items()})
        if "imbalance.png" in plots:
            lines += ["", "imbalance.png: easy-negative share of the objectness loss vs iteration, mean over seeds."]

    stability = [k for k in STABILITY if any(k in row for row in table.values())]
    if stability:
        lines += ["", "## Stability and gradient conflict", "",
                  "Per run: the coefficients of variation (per logging window), cosines and norm ratios averaged over "
                  "its logged windows, the spikes (a step above k × the median of the steps before it) summed and "
                  "the largest spike (its loss over that median) the maximum; then mean ± sd (n) over seeds.",
                  ""]  # fmt: skip
        lines += _md_table(stability, {arm: _row_cells(row, stability) for arm, row in table.items()})
        paired = [k for k in stability if any(k in row for row in summary["diffs"].values())]
        if paired:
            lines += ["", f"Paired differences vs {baseline} (same seed and other swept values), mean [95 % "
                      "Student-t interval] (pairs), in the diagnostics' own units:", ""]  # fmt: skip
            cells = _diff_cells(summary["diffs"], paired, fmt=lambda x: f"{x:+.2f}")
            lines += _md_table([f"Δ {m}" for m in paired], cells)
        if "box_loss_spikes.png" in plots:
            lines += ["", "box_loss_spikes.png: each run's RPN box loss (logging-window means), the windows holding "
                      "spikes circled in red."]  # fmt: skip

    incomplete = [r for r in runs if r.metrics is None]
    started = [r for r in incomplete if not r.status.startswith("not started")]
    never = len(incomplete) - len(started)
    if not expected_known:
        never = f"at least {never}" if never else "unknown"
    if curve_lines:
        lines += ["", *curve_lines]
    lines += ["", "## Runs", "", *notes,
              f"Runs: {len(runs)}, finished: {len(runs) - len(incomplete)}, failed or unfinished: {len(started)}, "
              f"not started: {never}.", ""]  # fmt: skip
    resumed = [r for r in runs if r.metrics is not None and r.overrides.get("resume", "false").lower() != "false"]
    for r in [*incomplete, *resumed]:
        described = " ".join(f"{k}={r.overrides.get(k, '-')}" for k in summary["swept"] or list(r.overrides))
        how = r.status if r.metrics is None else f"finished, resumed from a checkpoint (resume={r.overrides['resume']})"
        lines.append(f"- {r.path.name} ({described}): {how}")
    return "\n".join(lines) + "\n"


def _seeds(n: float) -> str:
    return "nan" if math.isnan(n) else f"> {10**6:,}" if math.isinf(n) else str(int(n))


def power_lines(summary: dict, metrics: list[str]) -> list[str]:
    """The power section under the paired differences: a table of sd / MDD / seeds needed, and in words whether
    the table can resolve an effect of ``summary["effect"]`` (the paper's 0.4 points by default)."""
    power, effect = summary.get("power") or {}, summary.get("effect", 0.004)
    metrics = [m for m in metrics if any(m in row for row in power.values())]
    if not metrics:
        return []
    size = f"{100 * effect:.2f} points"
    lines = ["", "### Power of the paired differences", "",
             "Per arm: the sd of the paired differences across seeds; the MDD, the smallest true difference a paired "
             "two-sided t-test at 5 % detects with 80 % power with this many pairs (noncentral t, the observed sd "
             f"taken as the true one); and the seeds (pairs) needed to detect an effect of {size} at that sd. "
             "In points; sd / MDD / seeds needed:", ""]  # fmt: skip
    cells = {
        arm: [" / ".join((_fmt(row[m][0], True, spread=True), _fmt(row[m][1], True, spread=True), _seeds(row[m][2])))
              if m in row else "-" for m in metrics]
        for arm, row in power.items() if row
    }  # fmt: skip
    lines += _md_table([f"Δ {m}" for m in metrics], cells)
    checked = [(arm, m, row[m]) for arm, row in power.items() for m in metrics if m in row]
    cannot = [(arm, m, p) for arm, m, p in checked if not p[1] <= effect]  # nan (a single pair) cannot either
    pairs = sorted({summary["diffs"][arm][m][3] for arm, m, _ in checked})
    seeds = ", ".join(map(str, pairs))
    lines.append("")
    if not cannot:
        lines.append(f"With {seeds} seeds every difference here can resolve an effect of the paper's size ({size}): "
                     "each MDD is at or below it.")  # fmt: skip
    elif len(cannot) == len(checked):
        mdds = [p[1] for _, _, p in checked if math.isfinite(p[1])]
        smallest = f" (the smallest MDD is {100 * min(mdds):.2f} points)" if mdds else ""
        needed = [p[2] for _, _, p in checked if not math.isnan(p[2])]
        most = f"; detecting it would take up to {_seeds(max(needed))} seeds" if needed else ""
        lines.append(f"**This table cannot resolve an effect of the paper's size ({size}) with {seeds} seeds: every "
                     f"MDD is above it{smallest}{most}.** A difference of that size here is not distinguishable "
                     "from seed noise, whether or not its interval excludes zero.")  # fmt: skip
    else:
        listed = "; ".join(f"{arm} {m} (MDD {100 * p[1]:.2f}, {_seeds(p[2])} seeds needed)" for arm, m, p in cannot)
        lines.append(f"**With {seeds} seeds, {len(cannot)} of the {len(checked)} differences here cannot "
                     f"resolve an effect of the paper's size ({size}):** {listed}. The others can (MDD at or "
                     "below it).")  # fmt: skip
    stuck = [m for m in metrics if all(row[m][0] < 0.01 for row in summary["table"].values() if m in row)]
    if stuck:
        lines.append(f"{', '.join(stuck)}: below 1 % in every arm. A metric stuck near zero has almost no spread "
                     "across seeds, so its small MDD does not mean this table can rank the arms on it.")  # fmt: skip
    return lines


def write_csv(path: Path, runs: list[Run], metrics: list[str], values: dict | None = None) -> None:
    """One row per run: overrides, ``metrics``, the diagnostics' means over logged steps, the stability diagnostics
    combined over them (:data:`STABILITY`), provenance."""
    keys = sorted({k for r in runs for k in r.overrides})
    values = values or {}
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["run", "status", *keys, *metrics, *(f"mean {k}" for k in DIAGNOSTICS), *STABILITY,
                    "commit", "hardware", "world_size"])  # fmt: skip
        for r in runs:
            got = values.get(r.path, {})
            prov = (r.metrics or {}).get("provenance") or {}
            w.writerow([r.path.name, r.status, *(r.overrides.get(k, "") for k in keys),
                        *(r.metrics.get(m, "") if r.metrics else "" for m in metrics),
                        *(got.get(k, "") for k in (*DIAGNOSTICS, *STABILITY)),
                        *(prov.get(k, "") for k in ("commit", "hardware", "world_size"))])  # fmt: skip


def write_summary_csv(path: Path, summary: dict) -> None:
    """One row per arm and quantity: n, mean, sd, and the paired difference to the baseline (mean, 95 % interval,
    and for AP / AR / mAP its sd, minimal detectable difference at 80 % power and the seeds needed for the effect)."""
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["arm", "metric", "n", "mean", "sd", "diff_n", "diff_mean", "diff_low", "diff_high",
                    "diff_sd", "diff_mdd80", "diff_seeds_needed"])  # fmt: skip
        for arm, row in summary["table"].items():
            for m, (mean, sd, n) in row.items():
                diff = summary["diffs"].get(arm, {}).get(m)
                power = (summary.get("power") or {}).get(arm, {}).get(m)
                w.writerow([arm, m, n, mean, sd, *((diff[3], *diff[:3]) if diff else ("", "", "", "")),
                            *(power if power else ("", "", ""))])  # fmt: skip


def tick_label(arm: str) -> str:
    """An arm's override values, for a crowded axis: ``"rpn=focal_sigmoid,rpn.gamma=1"`` -> ``"focal_sigmoid 1"``."""
    return " ".join(part.split("=", 1)[-1] for part in arm.split(","))


def mean_curve(members: list[Run], key: str) -> tuple[list[int], list[float]]:
    """``key`` vs iteration, averaged over the runs at the iterations all of them logged."""
    curves = [{h["iteration"]: h[key] for h in r.history if _finite(h.get(key))} for r in members]
    iterations = sorted(set.intersection(*(set(c) for c in curves))) if curves else []
    return iterations, [statistics.fmean(c[i] for c in curves) for i in iterations]


# loss_curves.png: the box head's terms are the same function in every arm; the RPN's are not (focal x lambda / N_pos
# over all anchors vs BCE over 256 sampled ones, and focal arms differ in gamma, alpha, lambda), so each arm's RPN
# terms are drawn relative to its own first logged value: their trends compare, their levels do not.
LOSS_PANELS = {
    "box head: loss_classifier + loss_box_reg\n(the same function in every arm)": (("loss_classifier", "loss_box_reg"),
                                                                                   False),
    "RPN objectness: each arm's own loss\n(relative to its first logged value)": (("loss_objectness",), True),
    "RPN box regression: each arm's own normaliser\n(relative to its first logged value)": (("loss_rpn_box_reg",),
                                                                                           True),
}  # fmt: skip


def loss_curve_panels(summary: dict) -> dict[str, dict[str, tuple[list[int], list[float]]]]:
    """Per panel of ``loss_curves.png`` (:data:`LOSS_PANELS`), per arm: iterations and the summed terms, mean over
    seeds, divided by its first value for the RPN terms. Arms that did not log a panel's terms are left out."""
    panels = {}
    for title, (keys, relative) in LOSS_PANELS.items():
        panels[title] = {}
        for arm, members in summary["arms"].items():
            curves = [mean_curve(members, k) for k in keys]
            if not curves or not all(iterations for iterations, _ in curves):
                continue
            common = sorted(set.intersection(*(set(iterations) for iterations, _ in curves)))
            by_key = [dict(zip(*curve)) for curve in curves]
            values = [sum(c[i] for c in by_key) for i in common]
            if relative and values and values[0] > 0:
                values = [v / values[0] for v in values]
            if common:
                panels[title][arm] = (common, values)
    return panels


SPIKES = "stability/box_spikes"
SpikeRun = tuple[str, list[int], list[float], list[tuple[int, float, float]]]


def box_spike_panels(summary: dict) -> dict[str, list[SpikeRun]]:
    """Per arm that logged :data:`SPIKES`, per run: ``(seed, iterations, loss_rpn_box_reg, marks)``, the logged
    box loss (each logging window's mean) and one ``(iteration, box loss, spikes)`` per window that held a spike."""
    panels = {}
    for arm, members in summary["arms"].items():
        runs = []
        for r in sorted(members, key=lambda r: str(r.overrides.get("seed"))):
            logged = [h for h in r.history if _finite(h.get("loss_rpn_box_reg"))]
            if not any(SPIKES in h for h in logged):
                continue
            marks = [(h["iteration"], h["loss_rpn_box_reg"], h[SPIKES]) for h in logged if h.get(SPIKES, 0) > 0]
            runs.append((str(r.overrides.get("seed", "-")), [h["iteration"] for h in logged],
                         [h["loss_rpn_box_reg"] for h in logged], marks))  # fmt: skip
        if runs:
            panels[arm] = runs
    return panels


def too_short_to_rank(summary: dict, metrics: list[str], threshold: float = 0.01) -> str | None:
    """A warning when every arm's mean of every fraction metric (AP, AR, mAP) is below ``threshold``: runs far
    too short to rank the arms, whose differences are noise around zero."""
    metrics = [m for m in metrics if _is_score(m)]
    means = [row[m][0] for row in summary["table"].values() for m in metrics if m in row]
    if not means or max(means) >= threshold:
        return None
    iterations = sorted({int(r.metrics["train/iterations"]) for members in summary["arms"].values() for r in members
                         if r.metrics and _finite(r.metrics.get("train/iterations"))})  # fmt: skip
    trained = f" ({', '.join(map(str, iterations))} iterations)" if iterations else ""
    return (f"**Warning: every arm's {', '.join(metrics)} is below "
            f"{100 * threshold:g} %: these runs{trained} are far too short to rank the arms; the differences below "
            "are noise.**")  # fmt: skip


def plot(summary: dict, metrics: list[str], out_dir: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def save(fig, name: str) -> None:
        fig.tight_layout()
        written.append(out_dir / name)
        fig.savefig(written[-1], dpi=110)
        plt.close(fig)

    written: list[Path] = []
    arms = [a for a, row in summary["table"].items() if row]
    bar_metrics = [m for m in metrics if _is_fraction(m) and any(m in summary["table"][a] for a in arms)]
    if bar_metrics and arms:
        fig, axes = plt.subplots(1, len(bar_metrics), figsize=(3.2 * len(bar_metrics), 3.8), squeeze=False)
        for ax, m in zip(axes[0], bar_metrics):
            means = [100 * summary["table"][a].get(m, (math.nan, 0, 0))[0] for a in arms]
            sds = [100 * summary["table"][a].get(m, (0, math.nan, 0))[1] for a in arms]
            ax.bar(range(len(arms)), means, yerr=[0 if math.isnan(s) else s for s in sds], capsize=4, color="C0")
            ax.set_xticks(range(len(arms)), [tick_label(a) for a in arms], rotation=45, ha="right", fontsize=7)
            ax.set_title(m, fontsize=9)
        axes[0][0].set_ylabel("mean over seeds (%), error bar ± 1 sd")
        save(fig, "metrics.png")

    diff_arms = [a for a, row in summary["diffs"].items() if row]
    diff_metrics = [m for m in bar_metrics if any(m in summary["diffs"][a] for a in diff_arms)]
    if diff_metrics:
        fig, axes = plt.subplots(1, len(diff_metrics), figsize=(3.2 * len(diff_metrics), 3.8), squeeze=False)
        for ax, m in zip(axes[0], diff_metrics):
            for i, a in enumerate(diff_arms):
                mean, lo, hi, _ = summary["diffs"][a].get(m, (math.nan,) * 4)
                err = [[0], [0]] if math.isnan(lo) else [[100 * (mean - lo)], [100 * (hi - mean)]]
                ax.errorbar([i], [100 * mean], yerr=err, fmt="o", capsize=4, color="C0")
            ax.axhline(0, color="gray", linewidth=0.8)
            ax.set_xticks(range(len(diff_arms)), [tick_label(a) for a in diff_arms], rotation=45, ha="right",
                          fontsize=7)  # fmt: skip
            ax.set_xlim(-0.5, len(diff_arms) - 0.5)
            ax.set_title(f"Δ {m}", fontsize=9)
        axes[0][0].set_ylabel(f"paired Δ vs {summary['baseline']} (points),\nmean and 95 % t-interval")
        save(fig, "differences.png")

    panels = loss_curve_panels(summary)
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 4), squeeze=False)
    for ax, (title, curves) in zip(axes[0], panels.items()):
        for i, arm in enumerate(summary["arms"]):  # one colour per arm in every panel
            if arm in curves:
                ax.plot(*curves[arm], label=arm, color=f"C{i % 10}")
        ax.set_title(title, fontsize=8)
        ax.set_xlabel("iteration")
        ax.set_yscale("log")
        if not ax.lines:
            ax.text(0.5, 0.5, "not logged", ha="center", va="center", transform=ax.transAxes)
    axes[0][0].set_ylabel("training loss (mean over seeds)")
    if any(ax.lines for ax in axes[0]):
        next(ax for ax in axes[0] if ax.lines).legend(fontsize=7)
    save(fig, "loss_curves.png")

    shares = {arm: mean_curve(members, EASY_SHARE) for arm, members in summary["arms"].items()}
    if any(iterations for iterations, _ in shares.values()):
        fig, ax = plt.subplots(figsize=(6, 4))
        for arm, (iterations, mean) in shares.items():
            if iterations:
                ax.plot(iterations, [100 * x for x in mean], label=arm)
        ax.set_xlabel("iteration")
        ax.set_ylabel("easy-negative share of objectness loss (%)\n(p_t > 0.9; mean over seeds)")
        ax.legend(fontsize=7)
        save(fig, "imbalance.png")

    spikes = box_spike_panels(summary)
    if spikes:
        cols = min(3, len(spikes))
        rows = math.ceil(len(spikes) / cols)
        fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.2 * rows), squeeze=False, sharex=True)
        for ax, (arm, runs) in zip(axes.flat, spikes.items()):
            for i, (seed, iterations, loss, marks) in enumerate(runs):
                ax.plot(iterations, loss, color=f"C{i % 10}", linewidth=0.9, label=f"seed {seed}")
                if marks:
                    ax.scatter([m[0] for m in marks], [m[1] for m in marks], s=[18 * m[2] for m in marks],
                               facecolors="none", edgecolors="red", linewidths=1.0, zorder=3)  # fmt: skip
            total = sum(m[2] for *_, marks in runs for m in marks)
            ax.set_title(f"{tick_label(arm)}: {total:g} spikes", fontsize=8)
            ax.set_yscale("log")
        for ax in axes.flat[len(spikes) :]:
            ax.axis("off")
        for ax in axes[-1]:
            ax.set_xlabel("iteration")
        axes[0][0].set_ylabel("loss_rpn_box_reg (logging-window mean)")
        axes[0][0].legend(fontsize=6)
        fig.suptitle("RPN box loss per run; red circles: windows with spikes (a step > k x its running median), "
                     "area ~ count", fontsize=8)  # fmt: skip
        save(fig, "box_loss_spikes.png")

    curve = recall_curve(metrics)
    if any(key in summary["table"][a] for a in arms for _, key in curve):
        fig, ax = plt.subplots(figsize=(5, 4))
        for arm in arms:
            row = summary["table"][arm]
            points = [(k, key) for k, key in curve if key in row]
            ax.errorbar([k for k, _ in points], [100 * row[key][0] for _, key in points],
                        yerr=[0 if math.isnan(row[key][1]) else 100 * row[key][1] for _, key in points], marker="o",
                        label=arm, capsize=3)  # fmt: skip
        ax.set_xscale("log")
        ax.set_xlabel("proposals per image")
        ax.set_ylabel("AR@IoU 0.5:0.95 (%), mean ± 1 sd over seeds")
        ax.legend(fontsize=7)
        save(fig, "proposal_recall.png")
    return written


def report(
    roots: list[Path], out_dir: Path | None = None, metrics=DEFAULT_METRICS, baseline="rpn=sampled", effect=0.4
) -> dict:
    """Write report.md, runs.csv, summary.csv and the plots; ``effect`` in points (percent), the power analysis's."""
    found = load_runs(roots)
    missing, notes, known = not_started(roots, found)
    runs = found + missing
    out_dir = out_dir or roots[0]
    out_dir.mkdir(parents=True, exist_ok=True)
    metrics = list(metrics)
    per_class = [m for m in per_class_metrics(runs) if m not in metrics]
    summary = summarize_runs(runs, metrics + per_class, baseline, effect / 100)
    summary["not_started"] = missing
    plots = [p.name for p in plot(summary, metrics, out_dir)]
    curves = learning_curves.arm_curves(summary["arms"], metrics)  # runs with eval_history.json
    if learning_curves.plot(curves, metrics, out_dir / "learning_curves.png"):
        plots.append("learning_curves.png")
    curve_lines = learning_curves.markdown_lines(curves, metrics)
    text = markdown(summary, runs, metrics, baseline, notes, plots, expected_known=known, curve_lines=curve_lines,
                    per_class=per_class)  # fmt: skip
    (out_dir / "report.md").write_text(text)
    write_csv(out_dir / "runs.csv", runs, metrics + per_class, summary["values"])
    write_summary_csv(out_dir / "summary.csv", summary)
    print(text)
    return summary
