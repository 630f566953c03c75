"""The report's figures, one function each (a ``matplotlib`` figure, or None when there is nothing to draw), and
:func:`plot`, which saves them: the metrics, the paired differences, the loss curves, the imbalance diagnostic, the
box-loss spikes and the proposal recall."""

import math
import statistics
from pathlib import Path

from .runs import EASY_SHARE, Run, _finite, _is_fraction, recall_curve
from .summary import RANK_THRESHOLD, unranked


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


GREY = "lightgray"  # the bars and points of metrics too low to rank the arms on (``unranked``)
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


def plain_log_ticks(axis) -> None:
    """A log axis's tick labels as plain numbers ("0.9", "20") instead of "9×10⁻¹", on the ticks matplotlib labels."""
    from matplotlib.ticker import LogFormatterSciNotation

    class Plain(LogFormatterSciNotation):
        def __call__(self, x, pos=None):
            return f"{x:g}" if super().__call__(x, pos) else ""

    axis.set_major_formatter(Plain())
    axis.set_minor_formatter(Plain(labelOnlyBase=False))


def _pyplot():
    """``matplotlib.pyplot`` on the Agg backend (files only, no display)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _bars(summary: dict, metrics: list[str]) -> tuple[list[str], list[str], set[str]]:
    """The arms with statistics, the fraction metrics among ``metrics`` that some of them have, and those of the
    metrics drawn in grey (:func:`unranked`: not results)."""
    arms = [a for a, row in summary["table"].items() if row]
    bar_metrics = [m for m in metrics if _is_fraction(m) and any(m in summary["table"][a] for a in arms)]
    return arms, bar_metrics, set(unranked(summary, bar_metrics))


def _panel_title(ax, name: str, m: str, low: set[str]) -> None:
    """A panel's title; for a metric in ``low``, greyed and saying why it is not a result."""
    if m in low:
        ax.set_title(f"{name}\n(< {100 * RANK_THRESHOLD:g} % in every arm: not a result)", fontsize=8, color="gray")
    else:
        ax.set_title(name, fontsize=9)


def metrics_figure(summary: dict, metrics: list[str]):
    """``metrics.png``: per fraction metric, a bar per arm at its mean over seeds, error bar ± 1 sd."""
    arms, bar_metrics, low = _bars(summary, metrics)
    if not (bar_metrics and arms):
        return None
    fig, axes = _pyplot().subplots(1, len(bar_metrics), figsize=(3.2 * len(bar_metrics), 3.8), squeeze=False)
    for ax, m in zip(axes[0], bar_metrics):
        means = [100 * summary["table"][a].get(m, (math.nan, 0, 0))[0] for a in arms]
        sds = [100 * summary["table"][a].get(m, (0, math.nan, 0))[1] for a in arms]
        ax.bar(range(len(arms)), means, yerr=[0 if math.isnan(s) else s for s in sds], capsize=4,
               color=GREY if m in low else "C0", ecolor="gray" if m in low else "black")  # fmt: skip
        ax.set_xticks(range(len(arms)), [tick_label(a) for a in arms], rotation=45, ha="right", fontsize=7)
        _panel_title(ax, m, m, low)
    axes[0][0].set_ylabel("mean over seeds (%), error bar ± 1 sd")
    return fig


def differences_figure(summary: dict, metrics: list[str]):
    """``differences.png``: per fraction metric, each arm's paired difference to the baseline with its interval."""
    _, bar_metrics, low = _bars(summary, metrics)
    diff_arms = [a for a, row in summary["diffs"].items() if row]
    diff_metrics = [m for m in bar_metrics if any(m in summary["diffs"][a] for a in diff_arms)]
    if not diff_metrics:
        return None
    fig, axes = _pyplot().subplots(1, len(diff_metrics), figsize=(3.2 * len(diff_metrics), 3.8), squeeze=False)
    for ax, m in zip(axes[0], diff_metrics):
        for i, a in enumerate(diff_arms):
            mean, lo, hi, _ = summary["diffs"][a].get(m, (math.nan,) * 4)
            err = [[0], [0]] if math.isnan(lo) else [[100 * (mean - lo)], [100 * (hi - mean)]]
            ax.errorbar([i], [100 * mean], yerr=err, fmt="o", capsize=4, color=GREY if m in low else "C0")
        ax.axhline(0, color="gray", linewidth=0.8)
        ax.set_xticks(range(len(diff_arms)), [tick_label(a) for a in diff_arms], rotation=45, ha="right",
                      fontsize=7)  # fmt: skip
        ax.set_xlim(-0.5, len(diff_arms) - 0.5)
        _panel_title(ax, f"Δ {m}", m, low)
    axes[0][0].set_ylabel(f"paired Δ vs {summary['baseline']} (points),\nmean and 95 % t-interval")
    return fig


def loss_curves_figure(summary: dict, metrics: list[str]):
    """``loss_curves.png``: a panel per :data:`LOSS_PANELS` entry, a line per arm (drawn even when nothing was
    logged, to say so)."""
    panels = loss_curve_panels(summary)
    fig, axes = _pyplot().subplots(1, len(panels), figsize=(4.2 * len(panels), 4), squeeze=False)
    for ax, (title, curves) in zip(axes[0], panels.items()):
        for i, arm in enumerate(summary["arms"]):  # one colour per arm in every panel
            if arm in curves:
                ax.plot(*curves[arm], label=arm, color=f"C{i % 10}")
        ax.set_title(title, fontsize=8)
        ax.set_xlabel("iteration")
        ax.set_yscale("log")
        plain_log_ticks(ax.yaxis)
        if not ax.lines:
            ax.text(0.5, 0.5, "not logged", ha="center", va="center", transform=ax.transAxes)
    axes[0][0].set_ylabel("training loss (mean over seeds)")
    if any(ax.lines for ax in axes[0]):
        next(ax for ax in axes[0] if ax.lines).legend(fontsize=7)
    return fig


def imbalance_figure(summary: dict, metrics: list[str]):
    """``imbalance.png``: the easy-negative share of the objectness loss per arm against the iteration."""
    shares = {arm: mean_curve(members, EASY_SHARE) for arm, members in summary["arms"].items()}
    if not any(iterations for iterations, _ in shares.values()):
        return None
    fig, ax = _pyplot().subplots(figsize=(6, 4))
    for arm, (iterations, mean) in shares.items():
        if iterations:
            ax.plot(iterations, [100 * x for x in mean], label=arm)
    ax.set_xlabel("iteration")
    ax.set_ylabel("easy-negative share of objectness loss (%)\n(p_t > 0.9; mean over seeds)")
    ax.legend(fontsize=7)
    return fig


def box_spikes_figure(summary: dict, metrics: list[str]):
    """``box_loss_spikes.png``: a panel per arm of :func:`box_spike_panels`, each run's box loss, its spikes
    circled."""
    spikes = box_spike_panels(summary)
    if not spikes:
        return None
    cols = min(3, len(spikes))
    rows = math.ceil(len(spikes) / cols)
    fig, axes = _pyplot().subplots(rows, cols, figsize=(4.2 * cols, 3.2 * rows), squeeze=False, sharex=True)
    for ax, (arm, runs) in zip(axes.flat, spikes.items()):
        for i, (seed, iterations, loss, marks) in enumerate(runs):
            ax.plot(iterations, loss, color=f"C{i % 10}", linewidth=0.9, label=f"seed {seed}")
            if marks:
                ax.scatter([m[0] for m in marks], [m[1] for m in marks], s=[18 * m[2] for m in marks],
                           facecolors="none", edgecolors="red", linewidths=1.0, zorder=3)  # fmt: skip
        total = sum(m[2] for *_, marks in runs for m in marks)
        ax.set_title(f"{tick_label(arm)}: {total:g} spikes", fontsize=8)
        ax.set_yscale("log")
        plain_log_ticks(ax.yaxis)
    for ax in axes.flat[len(spikes) :]:
        ax.axis("off")
    for ax in axes[-1]:
        ax.set_xlabel("iteration")
    axes[0][0].set_ylabel("loss_rpn_box_reg (logging-window mean)")
    axes[0][0].legend(fontsize=6)
    fig.suptitle("RPN box loss per run; red circles: windows with spikes (a step > k x its running median), "
                 "area ~ count", fontsize=8)  # fmt: skip
    return fig


def proposal_recall_figure(summary: dict, metrics: list[str]):
    """``proposal_recall.png``: AR against the number of proposals per image (the ``proposal/AR@k`` metrics), a line
    per arm, mean ± 1 sd over seeds."""
    arms, _, _ = _bars(summary, metrics)
    curve = recall_curve(metrics)
    if not any(key in summary["table"][a] for a in arms for _, key in curve):
        return None
    fig, ax = _pyplot().subplots(figsize=(5, 4))
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
    return fig


# the report's figures, in the order they are drawn
FIGURES = {
    "metrics.png": metrics_figure,
    "differences.png": differences_figure,
    "loss_curves.png": loss_curves_figure,
    "imbalance.png": imbalance_figure,
    "box_loss_spikes.png": box_spikes_figure,
    "proposal_recall.png": proposal_recall_figure,
}


def plot(summary: dict, metrics: list[str], out_dir: Path) -> list[Path]:
    """Save each of :data:`FIGURES` that has something to draw into ``out_dir``; the paths written."""
    plt = _pyplot()
    written = []
    for name, figure in FIGURES.items():
        fig = figure(summary, metrics)
        if fig is None:
            continue
        fig.tight_layout()
        written.append(out_dir / name)
        fig.savefig(written[-1], dpi=110)
        plt.close(fig)
    return written
