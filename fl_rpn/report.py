"""``fl-rpn-report <multirun dir> [...]``: a sweep's runs -> a markdown table, a CSV and PNG plots.

Runs are the folders holding ``.hydra/overrides.yaml``. The keys whose values differ between runs are
the swept keys; ``seed`` separates repetitions, every other swept key defines an arm. Per arm: mean ±
standard deviation and n over seeds; per non-baseline arm: the paired difference to the baseline arm
(same seed, same values of the other swept keys) with a 95 % Student-t interval across seeds. Runs
without ``metrics.json`` are listed as failed or unfinished, never dropped silently.
"""

import argparse
import csv
import json
import math
import statistics
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import yaml

DEFAULT_METRICS = (
    "bbox/AP", "bbox/AP50", "voc07/mAP", "proposal/AR@100", "proposal/AR@300", "proposal/AR@1000",
    "train/rpn/positive_anchors_per_image", "train/rpn/negative_anchors_per_image",
    "train/rpn/trained_anchors_per_image", "train/rpn/easy_negative_loss_share",
)  # fmt: skip
RECALL_KEYS = ("proposal/AR@100", "proposal/AR@300", "proposal/AR@1000")
# two-sided 95 % Student-t quantiles by degrees of freedom
T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228,
       12: 2.179, 15: 2.131, 20: 2.086, 30: 2.042}  # fmt: skip


def t95(df: int) -> float:
    known = [d for d in T95 if d <= df]
    return T95[max(known)] if df <= 30 else 1.96


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


def swept_keys(runs: list[Run]) -> list[str]:
    keys = sorted({k for r in runs for k in r.overrides})
    return [k for k in keys if len({r.overrides.get(k) for r in runs}) > 1 and not k.startswith("hydra.")]


def arm_of(run: Run, arm_keys: list[str]) -> str:
    return ",".join(f"{k}={run.overrides.get(k, '-')}" for k in arm_keys) or "all"


def summarize_runs(runs: list[Run], metrics: list[str], baseline: str) -> dict:
    """Per-arm statistics and paired differences; ``baseline`` is ``key=value`` (e.g. ``rpn=sampled``)."""
    keys = swept_keys(runs)
    arm_keys = [k for k in keys if k != "seed"]
    finished = [r for r in runs if r.metrics is not None]
    arms: dict[str, list[Run]] = defaultdict(list)
    for r in finished:
        arms[arm_of(r, arm_keys)].append(r)
    table = {}
    for arm, members in sorted(arms.items()):
        row = {}
        for m in metrics:
            values = [float(r.metrics[m]) for r in members if _finite(r.metrics.get(m))]
            if values:
                sd = statistics.stdev(values) if len(values) > 1 else float("nan")
                row[m] = (statistics.fmean(values), sd, len(values))
        table[arm] = row
    base_key, _, base_value = baseline.partition("=")
    diffs = {}
    if base_key in arm_keys:
        other_keys = [k for k in arm_keys if k != base_key]
        base_runs = {
            (tuple(r.overrides.get(k) for k in other_keys), r.overrides.get("seed")): r
            for r in finished
            if r.overrides.get(base_key) == base_value
        }
        for arm, members in sorted(arms.items()):
            if members[0].overrides.get(base_key) == base_value:
                continue
            row = {}
            for m in metrics:
                pairs = []
                for r in members:
                    b = base_runs.get((tuple(r.overrides.get(k) for k in other_keys), r.overrides.get("seed")))
                    if b is not None and _finite(r.metrics.get(m)) and _finite(b.metrics.get(m)):
                        pairs.append(float(r.metrics[m]) - float(b.metrics[m]))
                if pairs:
                    mean = statistics.fmean(pairs)
                    half = (
                        t95(len(pairs) - 1) * statistics.stdev(pairs) / math.sqrt(len(pairs))
                        if len(pairs) > 1
                        else float("nan")
                    )
                    row[m] = (mean, mean - half, mean + half, len(pairs))
            diffs[arm] = row
    return {"swept": keys, "arm_keys": arm_keys, "arms": arms, "table": table, "diffs": diffs}


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


def _fmt(x: float, pct: bool) -> str:
    return "nan" if not math.isfinite(x) else (f"{100 * x:.2f}" if pct else f"{x:.3g}")


def _is_fraction(metric: str) -> bool:
    return metric.startswith(("bbox/", "proposal/", "voc07/")) or metric.endswith("share")


def markdown(summary: dict, runs: list[Run], metrics: list[str], baseline: str) -> str:
    lines = [f"Swept keys: {', '.join(summary['swept']) or '(none)'}; arms by {', '.join(summary['arm_keys']) or '-'}.",
             "AP / AR / shares in percent; mean ± sd (n) over seeds.", ""]  # fmt: skip
    shown = [m for m in metrics if any(m in row for row in summary["table"].values())]
    lines.append("| arm | " + " | ".join(shown) + " |")
    lines.append("|---|" + "---|" * len(shown))
    for arm, row in summary["table"].items():
        cells = []
        for m in shown:
            if m in row:
                mean, sd, n = row[m]
                cells.append(f"{_fmt(mean, _is_fraction(m))} ± {_fmt(sd, _is_fraction(m))} ({n})")
            else:
                cells.append("-")
        lines.append(f"| {arm} | " + " | ".join(cells) + " |")
    if summary["diffs"]:
        lines += ["", f"Paired difference vs {baseline} (same seed), mean [95 % t-interval] (pairs):", ""]
        diff_metrics = [m for m in shown if m.startswith(("bbox/", "proposal/", "voc07/"))]
        lines.append("| arm | " + " | ".join(f"Δ {m}" for m in diff_metrics) + " |")
        lines.append("|---|" + "---|" * len(diff_metrics))
        for arm, row in summary["diffs"].items():
            cells = []
            for m in diff_metrics:
                if m in row:
                    mean, lo, hi, n = row[m]
                    cells.append(f"{100 * mean:+.2f} [{100 * lo:+.2f}, {100 * hi:+.2f}] ({n})")
                else:
                    cells.append("-")
            lines.append(f"| {arm} | " + " | ".join(cells) + " |")
    failed = [r for r in runs if r.metrics is None]
    lines += ["", f"Runs: {len(runs)}, finished: {len(runs) - len(failed)}, failed or unfinished: {len(failed)}."]
    for r in failed:
        lines.append(f"- {r.path.name} ({' '.join(f'{k}={v}' for k, v in r.overrides.items())}): {r.status}")
    return "\n".join(lines) + "\n"


def write_csv(path: Path, runs: list[Run], metrics: list[str]) -> None:
    keys = sorted({k for r in runs for k in r.overrides})
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["run", "status", *keys, *metrics])
        for r in runs:
            values = [r.metrics.get(m, "") if r.metrics else "" for m in metrics]
            w.writerow([r.path.name, r.status, *(r.overrides.get(k, "") for k in keys), *values])


def tick_label(arm: str) -> str:
    """An arm's override values, for a crowded axis: ``"rpn=focal_sigmoid,rpn.gamma=1"`` -> ``"focal_sigmoid 1"``."""
    return " ".join(part.split("=", 1)[-1] for part in arm.split(","))


def plot(summary: dict, metrics: list[str], out_dir: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    arms = list(summary["table"])
    bar_metrics = [m for m in metrics if _is_fraction(m) and any(m in summary["table"][a] for a in arms)]
    if bar_metrics and arms:
        fig, axes = plt.subplots(1, len(bar_metrics), figsize=(3.2 * len(bar_metrics), 3.6), squeeze=False)
        for ax, m in zip(axes[0], bar_metrics):
            means = [100 * summary["table"][a].get(m, (math.nan, 0, 0))[0] for a in arms]
            sds = [100 * summary["table"][a].get(m, (0, math.nan, 0))[1] for a in arms]
            ax.bar(range(len(arms)), means, yerr=[0 if math.isnan(s) else s for s in sds], capsize=4, color="C0")
            ax.set_xticks(range(len(arms)), [tick_label(a) for a in arms], rotation=45, ha="right", fontsize=7)
            ax.set_title(m, fontsize=9)
        fig.tight_layout()
        written.append(out_dir / "metrics.png")
        fig.savefig(written[-1], dpi=110)
        plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 4))
    for arm, members in summary["arms"].items():
        curves = [{h["iteration"]: h["loss"] for h in r.history if "loss" in h} for r in members]
        iterations = sorted(set.intersection(*(set(c) for c in curves))) if curves else []
        if iterations:
            ax.plot(iterations, [statistics.fmean(c[i] for c in curves) for i in iterations], label=arm)
    ax.set_xlabel("iteration")
    ax.set_ylabel("total training loss (mean over seeds)")
    ax.set_yscale("log")
    ax.legend(fontsize=7)
    fig.tight_layout()
    written.append(out_dir / "loss_curves.png")
    fig.savefig(written[-1], dpi=110)
    plt.close(fig)

    if any(k in summary["table"][a] for a in arms for k in RECALL_KEYS):
        fig, ax = plt.subplots(figsize=(5, 4))
        for arm in arms:
            row = summary["table"][arm]
            ks = [k for k in RECALL_KEYS if k in row]
            ax.errorbar([int(k.split("@")[1]) for k in ks], [100 * row[k][0] for k in ks],
                        yerr=[0 if math.isnan(row[k][1]) else 100 * row[k][1] for k in ks], marker="o", label=arm,
                        capsize=3)  # fmt: skip
        ax.set_xscale("log")
        ax.set_xlabel("proposals per image")
        ax.set_ylabel("AR@IoU 0.5:0.95 (%)")
        ax.legend(fontsize=7)
        fig.tight_layout()
        written.append(out_dir / "proposal_recall.png")
        fig.savefig(written[-1], dpi=110)
        plt.close(fig)
    return written


def report(roots: list[Path], out_dir: Path | None = None, metrics=DEFAULT_METRICS, baseline="rpn=sampled") -> dict:
    runs = load_runs(roots)
    out_dir = out_dir or roots[0]
    out_dir.mkdir(parents=True, exist_ok=True)
    metrics = list(metrics)
    summary = summarize_runs(runs, metrics, baseline)
    text = markdown(summary, runs, metrics, baseline)
    (out_dir / "report.md").write_text(text)
    write_csv(out_dir / "runs.csv", runs, metrics)
    plot(summary, metrics, out_dir)
    print(text)
    return summary


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="fl-rpn-report", description=__doc__.split("\n\n")[0])
    parser.add_argument("dirs", nargs="+", type=Path, help="multirun directories (or any folders of runs)")
    parser.add_argument("--out", type=Path, default=None, help="output folder (default: the first dir)")
    parser.add_argument("--baseline", default="rpn=sampled", help="the arm differences are taken against")
    parser.add_argument("--metrics", nargs="*", default=list(DEFAULT_METRICS))
    args = parser.parse_args(argv)
    report(args.dirs, args.out, args.metrics, args.baseline)


if __name__ == "__main__":
    main()
