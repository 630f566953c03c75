"""The report's text: ``report.md`` (a title, the provenance, one table per section, the power of the paired
differences) and the CSV files (``runs.csv``: one row per run; ``summary.csv``: one row per arm and quantity)."""

import csv
import math
from collections import Counter
from pathlib import Path

from .runs import DIAGNOSTICS, STABILITY, Run, _is_fraction, _is_score, common_overrides
from .stats import sd_ratio_interval
from .summary import RANK_THRESHOLD, too_short_to_rank, unranked


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


def _seeds(n: float) -> str:
    """A number of seeds needed: ``12``, ``> 1,000,000`` (inf) or ``nan``."""
    return "nan" if math.isnan(n) else f"> {10**6:,}" if math.isinf(n) else str(int(n))


def _counted(values: list) -> str:
    """``"a"`` when all equal, else ``"a (4 runs), b (2 runs)"``."""
    counts = Counter(values)
    if len(counts) == 1:
        return str(values[0])
    return ", ".join(f"{v} ({n} runs)" for v, n in counts.most_common())


def _plural(n: int, word: str) -> str:
    """``1 arm``, ``3 arms``."""
    return f"{n} {word}{'' if n == 1 else 's'}"


def _md_table(columns: list[str], rows: dict[str, list[str]]) -> list[str]:
    """A markdown table with an ``arm`` column: one line per ``rows`` item (arm -> cells)."""
    return [
        "| arm | " + " | ".join(columns) + " |",
        "|---|" + "---|" * len(columns),
        *(f"| {arm} | " + " | ".join(cells) + " |" for arm, cells in rows.items()),
    ]


def _row_cells(row: dict, names: list[str]) -> list[str]:
    """An arm's cells ``mean ± sd (n)`` for ``names`` (``-`` where it has none)."""
    cells = []
    for m in names:
        if m in row:
            mean, sd, n = row[m]
            cells.append(f"{_fmt(mean, _is_fraction(m))} ± {_fmt(sd, _is_fraction(m), spread=True)} ({n})")
        else:
            cells.append("-")
    return cells


def _diff_cells(diffs: dict, names: list[str], fmt=_signed) -> dict[str, list[str]]:
    """Paired differences per arm and metric, ``+1.23 [-0.50, +2.96] (3)``: mean [interval] (pairs), each number
    through ``fmt`` (default: a fraction in percentage points)."""
    return {
        arm: [f"{fmt(row[m][0])} [{fmt(row[m][1])}, {fmt(row[m][2])}] ({row[m][3]})" if m in row else "-"
              for m in names]
        for arm, row in diffs.items()
    }  # fmt: skip


def folder_names(roots: list[Path]) -> str:
    """The folders given, each under its parent's name: ``prcv2018/table_b``, ``table_b_box/{seed0, seed1}``."""
    paths = [root.resolve() for root in roots]
    if len({p.parent for p in paths}) > 1:
        return ", ".join(p.name for p in paths)
    names = [p.name for p in paths]
    return f"{paths[0].parent.name}/" + (names[0] if len(names) == 1 else "{" + ", ".join(names) + "}")


def title(folders: str, summary: dict, runs: list[Run]) -> str:
    """``# prcv2018/table_b: 4 arms × 3 seeds (12 runs), baseline rpn=sampled``: the folders reported on (as
    :func:`folder_names` gives them) and the design; the runs counted are the finished ones, of all listed."""
    seeds = len({r.overrides.get("seed") for r in runs})
    finished = sum(r.metrics is not None for r in runs)
    counted = _plural(finished, "run") if finished == len(runs) else f"{finished} of {len(runs)} runs finished"
    return (f"# {folders or 'Runs'}: {_plural(len(summary['arms']), 'arm')} × {_plural(seeds, 'seed')} ({counted}), "
            f"baseline {summary['baseline']}")  # fmt: skip


def provenance_lines(runs: list[Run]) -> list[str]:
    """The finished runs' commit, hardware, world size, dataset and schedule, and a warning when the commits
    differ."""
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
    folders: str = "",
) -> str:
    """The report; ``notes`` on the expected jobs go to the runs section (``expected_known``: whether every sweep's
    expected jobs could be read), ``plots`` (file names) get captions, ``curve_lines`` (the learning-curve section,
    ``curves.markdown_lines``) go before the runs, ``per_class`` metrics get their own section; ``folders``
    (:func:`folder_names`) goes into the title."""
    shown = [m for m in metrics if any(m in row for row in summary["table"].values())]
    lines = [
        *head_lines(summary, runs, folders),
        *metrics_section(summary, shown, plots),
        *differences_section(summary, shown, baseline, plots),
        *per_class_section(summary, per_class, baseline),
        *diagnostics_section(summary, plots),
        *stability_section(summary, baseline, plots),
    ]
    if curve_lines:
        lines += ["", *curve_lines]
    lines += runs_section(summary, runs, notes, expected_known)
    return "\n".join(lines) + "\n"


def head_lines(summary: dict, runs: list[Run], folders: str) -> list[str]:
    """The title, the swept keys, the overrides common to every run and the runs' provenance."""
    common = ", ".join(f"{k}={v}" for k, v in common_overrides(runs).items()) or "(none)"
    return [title(folders, summary, runs), "",
            f"Swept keys: {', '.join(summary['swept']) or '(none)'}; arms by {', '.join(summary['arm_keys']) or '-'}.",
            "", f"Overrides common to every run: {common}.",
            "", *provenance_lines(runs)]  # fmt: skip


def metrics_section(summary: dict, shown: list[str], plots: list[str]) -> list[str]:
    """The ``shown`` metrics per arm (mean ± sd (n)), a warning when the runs are too short to rank the arms, and
    the captions of the plots drawn from them."""
    lines = ["", "## Metrics", "",
             "AP / AR / shares in percent; mean ± sd (n) over seeds, sd the sample standard deviation across seeds.",
             ""]  # fmt: skip
    if warning := too_short_to_rank(summary, shown):
        lines += [warning, ""]
    lines += _md_table(shown, {arm: _row_cells(row, shown) for arm, row in summary["table"].items()})
    if "metrics.png" in plots:
        lines += ["", "metrics.png: bars are the means over seeds, error bars ± 1 sd (a spread, not an interval)."]
    greyed = [p for p in ("metrics.png", "differences.png") if p in plots]
    if greyed and (low := unranked(summary, shown)):
        lines += ["", f"Greyed out in {' and '.join(greyed)}: {', '.join(low)}, below {100 * RANK_THRESHOLD:g} % in "
                  "every arm: too low to rank the arms on, not results."]  # fmt: skip
    if "proposal_recall.png" in plots:
        lines += ["", "proposal_recall.png: AR@100 / 300 / 1000 per arm, mean ± 1 sd over seeds."]
    if "loss_curves.png" in plots:
        lines += [
            "",
            "loss_curves.png: the box head's loss (the same function in every arm) per arm; the RPN's "
            "objectness and box terms are different functions across arms (focal × λ / N_pos vs BCE over "
            "sampled anchors), so each is drawn relative to its arm's first logged value. Means over seeds.",
        ]
    return lines


def differences_section(summary: dict, shown: list[str], baseline: str, plots: list[str]) -> list[str]:
    """The paired differences to the baseline of the fraction metrics among ``shown``, and their power."""
    lines = ["", f"## Paired differences vs {baseline}", "", *summary["notes"]]
    if summary["diffs"]:
        lines += ["Same seed (and same other swept values), mean [95 % Student-t interval] (pairs), in percent:", ""]
        diff_metrics = [m for m in shown if _is_score(m)]
        lines += _md_table([f"Δ {m}" for m in diff_metrics], _diff_cells(summary["diffs"], diff_metrics))
        if "differences.png" in plots:
            lines += ["", "differences.png: the same differences, points at the mean, bars the 95 % interval "
                      "(t-quantile for pairs − 1 degrees of freedom; none for a single pair)."]  # fmt: skip
        lines += power_lines(summary, diff_metrics)
    return lines


def per_class_section(summary: dict, per_class: list[str], baseline: str) -> list[str]:
    """The per-class APs per arm and their paired differences; nothing when no run recorded them."""
    table = summary["table"]
    classes = [m for m in per_class if any(m in row for row in table.values())]
    if not classes:
        return []
    lines = ["", "## Per-class AP", "", "In percent; mean ± sd (n) over seeds:", ""]
    lines += _md_table(classes, {arm: _row_cells(row, classes) for arm, row in table.items()})
    if summary["diffs"]:
        lines += ["", f"Paired differences vs {baseline}, mean [95 % Student-t interval] (pairs), in points:", ""]
        lines += _md_table([f"Δ {m}" for m in classes], _diff_cells(summary["diffs"], classes))
    return lines


def diagnostics_section(summary: dict, plots: list[str]) -> list[str]:
    """The imbalance diagnostics (:data:`DIAGNOSTICS`) per arm; nothing when no run logged them."""
    table = summary["table"]
    diagnostics = [k for k in DIAGNOSTICS if any(k in row for row in table.values())]
    if not diagnostics:
        return []
    lines = ["", "## Imbalance diagnostics", "",
             "Per run the mean over its logged training steps (history.json), then mean ± sd (n) over seeds; "
             "the share in percent.", ""]  # fmt: skip
    lines += _md_table(diagnostics, {arm: _row_cells(row, diagnostics) for arm, row in table.items()})
    if "imbalance.png" in plots:
        lines += ["", "imbalance.png: easy-negative share of the objectness loss vs iteration, mean over seeds."]
    return lines


def stability_section(summary: dict, baseline: str, plots: list[str]) -> list[str]:
    """The stability and gradient-conflict diagnostics (:data:`STABILITY`) per arm and their paired differences, in
    their own units; nothing when no run logged them."""
    table = summary["table"]
    stability = [k for k in STABILITY if any(k in row for row in table.values())]
    if not stability:
        return []
    lines = ["", "## Stability and gradient conflict", "",
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
    return lines


def runs_section(summary: dict, runs: list[Run], notes: list[str], expected_known: bool) -> list[str]:
    """The runs counted by status, ``notes`` on the expected jobs, and a line per run that did not finish or was
    resumed."""
    incomplete = [r for r in runs if r.metrics is None]
    started = [r for r in incomplete if not r.status.startswith("not started")]
    never = len(incomplete) - len(started)
    if not expected_known:
        never = f"at least {never}" if never else "unknown"
    lines = ["", "## Runs", "", *notes,
             f"Runs: {len(runs)}, finished: {len(runs) - len(incomplete)}, failed or unfinished: {len(started)}, "
             f"not started: {never}.", ""]  # fmt: skip
    resumed = [r for r in runs if r.metrics is not None and r.overrides.get("resume", "false").lower() != "false"]
    for r in [*incomplete, *resumed]:
        described = " ".join(f"{k}={r.overrides.get(k, '-')}" for k in summary["swept"] or list(r.overrides))
        how = r.status if r.metrics is None else f"finished, resumed from a checkpoint (resume={r.overrides['resume']})"
        lines.append(f"- {r.path.name} ({described}): {how}")
    return lines


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
    if pairs and pairs[0] > 2:
        low, high = sd_ratio_interval(pairs[0] - 1)
        lines.append(f"Each sd is itself estimated from {pairs[0]} pairs ({pairs[0] - 1} degrees of freedom): at 95 % "
                     f"the true sd lies within {low:.2f}–{high:.2f}× the observed one, so the MDD is uncertain by the "
                     f"same factors and the seeds needed by {low**2:.2f}–{high**2:.1f}×.")  # fmt: skip
    stuck = unranked(summary, metrics)
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
