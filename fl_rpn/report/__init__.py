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
get learning curves (:mod:`.curves`).

``report.md`` opens with a title (the folders given, arms × seeds, the baseline), the swept keys, the overrides common
to every run (the settings of the whole table, ``hydra.*`` excepted) and the runs' provenance. In the plots, a
fraction metric below 1 % in every arm (:func:`.summary.unranked`) is greyed out: it cannot rank the arms.

Nothing is dropped silently: runs without ``metrics.json`` are listed as failed or unfinished, and the
jobs that Hydra's ``multirun.yaml`` asked for but that have no run folder as not started (a job relaunched under
another sweep folder of the report counts as run, and one missing from two is listed once). ``--where KEY=V1,V2``
keeps only the runs (and jobs not started) with those values. Two finished
runs of the same arm and seed are an error (they would count as two seeds and pair arbitrarily).

The package, one module per part (each imports only those after it): :mod:`.tables` (report.md and the CSV files)
and :mod:`.plots` (the figures), :mod:`.summary` (arms, paired differences, power), :mod:`.runs` (finding and
reading the runs) and :mod:`.stats` (the statistics); :mod:`.curves` (the learning curves) stands alone.
"""

from pathlib import Path

from ..evaluation import headline_metrics
from . import curves
from .plots import plot
from .runs import (
    DIAGNOSTICS,
    STABILITY,
    Run,
    _is_fraction,
    _is_score,
    load_runs,
    not_started,
    per_class_metrics,
    recall_curve,
    select_runs,
)
from .summary import summarize_runs
from .tables import folder_names, markdown, write_csv, write_summary_csv

__all__ = [
    "DEFAULT_METRICS", "DIAGNOSTICS", "STABILITY", "Run", "_is_fraction", "_is_score", "load_runs", "markdown",
    "plot", "recall_curve", "report", "summarize_runs", "write_csv", "write_summary_csv",
]  # fmt: skip

# what the evaluators declare (fl_rpn/evaluation/registry.py): their headline metrics, in the table's order
DEFAULT_METRICS = tuple(headline_metrics())


def report(
    roots: list[Path],
    out_dir: Path | None = None,
    metrics=DEFAULT_METRICS,
    baseline="rpn=sampled",
    effect=0.4,
    where: dict[str, list[str]] | None = None,
) -> dict:
    """Write report.md, runs.csv, summary.csv and the plots; ``effect`` in points (percent), the power analysis's;
    ``where`` keeps only the runs (and jobs not started) with those values (:func:`.runs.select_runs`)."""
    found = load_runs(roots)
    missing, notes, known = not_started(roots, found)
    runs = found + missing
    folders = folder_names(roots)
    if where:
        selection = "; ".join(f"{k}={','.join(v)}" for k, v in where.items())
        kept = select_runs(runs, where)
        notes.append(f"Selected (--where {selection}): {len(kept)} of the {len(runs)} runs and jobs not started.")
        kept_ids = {id(r) for r in kept}
        runs, missing = kept, [r for r in missing if id(r) in kept_ids]
        folders += f" where {selection}"
    out_dir = out_dir or roots[0]
    out_dir.mkdir(parents=True, exist_ok=True)
    metrics = list(metrics)
    per_class = [m for m in per_class_metrics(runs) if m not in metrics]
    summary = summarize_runs(runs, metrics + per_class, baseline, effect / 100)
    summary["not_started"] = missing
    plots = [p.name for p in plot(summary, metrics, out_dir)]
    learning = curves.arm_curves(summary["arms"], metrics)  # runs with eval_history.json
    if curves.plot(learning, metrics, out_dir / "learning_curves.png"):
        plots.append("learning_curves.png")
    curve_lines = curves.markdown_lines(learning, metrics)
    text = markdown(summary, runs, metrics, baseline, notes, plots, expected_known=known, curve_lines=curve_lines,
                    per_class=per_class, folders=folders)  # fmt: skip
    (out_dir / "report.md").write_text(text)
    write_csv(out_dir / "runs.csv", runs, metrics + per_class, summary["values"])
    write_summary_csv(out_dir / "summary.csv", summary)
    print(text)
    return summary
