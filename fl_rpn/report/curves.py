"""Learning curves of a sweep, from each run's ``eval_history.json`` (the metrics of every evaluation).

``fl-rpn-report`` draws them (``learning_curves.png``: each arm's mean over seeds against the iteration) and says in
``report.md`` how far each arm's mean moved over the last quarter of the schedule, so that a reader can tell whether
the runs stopped on a plateau or while still climbing.
"""

import json
import statistics
from pathlib import Path

CURVE_FILE = "eval_history.json"
LATE_FRACTION = 0.25  # "the last quarter of the schedule"


def load_curve(run_dir: Path) -> list[dict[str, float]]:
    """``[{"iteration": i, metric: value, ...}, ...]`` of one run, in iteration order; ``[]`` without the file."""
    path = run_dir / CURVE_FILE
    if not path.is_file():
        return []
    return sorted(json.loads(path.read_text()), key=lambda e: e["iteration"])


def mean_curve(curves: list[list[dict[str, float]]], key: str) -> tuple[list[int], list[float]]:
    """``key`` against the iteration, averaged over the curves at the iterations that all of them evaluated."""
    points = [{e["iteration"]: e[key] for e in curve if key in e} for curve in curves]
    if not points or not all(points):
        return [], []
    iterations = sorted(set.intersection(*(set(p) for p in points)))
    return iterations, [statistics.fmean(p[i] for p in points) for i in iterations]


def late_change(iterations: list[int], values: list[float], fraction: float = LATE_FRACTION) -> dict | None:
    """How far a curve moved over its last ``fraction`` of iterations.

    Returns ``{"from": i0, "to": i1, "start": v0, "end": v1, "change": v1 - v0, "previous": ip, "last_change":
    v1 - vp, "best": max, "best_at": i}`` where ``i0`` is the first evaluated iteration at or after
    ``(1 - fraction) * i1`` and ``ip`` the evaluation before the last, or ``None`` with fewer than two evaluations
    in that span.
    """
    if len(iterations) < 2:
        return None
    last = iterations[-1]
    start = next(k for k, i in enumerate(iterations) if i >= (1 - fraction) * last)
    if start == len(iterations) - 1:
        return None
    best = max(range(len(values)), key=values.__getitem__)
    return {
        "from": iterations[start], "to": last, "start": values[start], "end": values[-1],
        "change": values[-1] - values[start], "previous": iterations[-2], "last_change": values[-1] - values[-2],
        "best": values[best], "best_at": iterations[best],
    }  # fmt: skip


def arm_curves(arms: dict[str, list], metrics: list[str]) -> dict[str, dict[str, tuple[list[int], list[float]]]]:
    """Per arm (runs with a ``path``), per metric it evaluated at least twice: the mean curve over its seeds (a run
    evaluated only at its end has no curve)."""
    out = {}
    for arm, members in arms.items():
        curves = [c for c in (load_curve(r.path) for r in members) if c]
        if not curves:
            continue
        out[arm] = {m: curve for m in metrics if len((curve := mean_curve(curves, m))[0]) >= 2}
    return {arm: by_metric for arm, by_metric in out.items() if by_metric}


def markdown_lines(curves: dict, metrics: list[str]) -> list[str]:
    """The report's "Learning curve" table: per arm and metric, the mean's change over the last quarter (points)."""
    shown = [m for m in metrics if any(m in by_metric for by_metric in curves.values())]
    if not shown:
        return []
    lines = [
        "## Learning curve",
        "",
        f"Mean over seeds of every periodic evaluation (`{CURVE_FILE}`; plot: `learning_curves.png`). Each cell, in "
        f"points: the mean at the last evaluation; its change over the last {LATE_FRACTION:.0%} of the schedule (from "
        "the first evaluation in it) and since the evaluation before the last; the best mean and its iteration.",
        "",
        "| arm | " + " | ".join(shown) + " |",
        "|---|" + "---|" * len(shown),
    ]
    for arm, by_metric in curves.items():
        cells = []
        for m in shown:
            late = late_change(*by_metric[m]) if m in by_metric else None
            cells.append(
                "—" if late is None else f"{100 * late['end']:.2f} ({100 * late['change']:+.2f} since it "
                f"{late['from']}, {100 * late['last_change']:+.2f} since it {late['previous']}; best "
                f"{100 * late['best']:.2f} at it {late['best_at']})"
            )  # fmt: skip
        lines.append(f"| {arm} | " + " | ".join(cells) + " |")
    return [*lines, ""]


def plot(curves: dict, metrics: list[str], path: Path) -> bool:
    """``learning_curves.png``: one panel per metric, one line per arm (mean over seeds); False if nothing to draw."""
    shown = [m for m in metrics if any(m in by_metric for by_metric in curves.values())]
    if not shown:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(shown), figsize=(4.2 * len(shown), 3.4), squeeze=False)
    for ax, m in zip(axes[0], shown):
        for arm, by_metric in curves.items():
            if m in by_metric:
                iterations, values = by_metric[m]
                ax.plot(iterations, [100 * v for v in values], marker=".", label=arm)
        ax.set_title(m)
        ax.set_xlabel("iteration")
        ax.set_ylabel("% (mean over seeds)")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True
