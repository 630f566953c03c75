"""A sweep's runs summarised: per arm the mean, sd and n over seeds, per non-baseline arm the paired differences to
the baseline and their power; and which fraction metrics are too low in every arm to rank the arms on."""

from collections import defaultdict

from .runs import DIAGNOSTICS, STABILITY, Run, _finite, _is_score, arm_of, run_values, swept_keys
from .stats import mean_sd_n, paired_interval, paired_power


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


RANK_THRESHOLD = 0.01  # a fraction metric below it in every arm (1 %) is far too low to rank the arms on


def unranked(summary: dict, metrics: list[str], threshold: float = RANK_THRESHOLD) -> list[str]:
    """The fraction metrics (AP, AR, mAP) among ``metrics`` whose mean is below ``threshold`` in every arm that has
    them: differences between arms there are noise around zero (the plots grey them out)."""
    means = {m: [row[m][0] for row in summary["table"].values() if m in row] for m in metrics if _is_score(m)}
    return [m for m, values in means.items() if values and max(values) < threshold]


def too_short_to_rank(summary: dict, metrics: list[str], threshold: float = RANK_THRESHOLD) -> str | None:
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
