"""report.md, runs.csv and summary.csv: known statistics on hand-made runs, the provenance, the per-class and
stability tables, the power of the paired differences, the title and the overrides common to every run."""

import math
import statistics

import pytest

from fl_rpn.cli.report import main
from fl_rpn.report import report
from fl_rpn.report.stats import pairs_needed, t95

from .conftest import fake_run, markdown_table, markdown_text, read_csv


def test_statistics_on_known_values(tmp_path):
    ap = {("sampled", 0): 0.50, ("sampled", 1): 0.60, ("sampled", 2): 0.55,
          ("focal_softmax", 0): 0.52, ("focal_softmax", 1): 0.63, ("focal_softmax", 2): 0.60}  # fmt: skip
    for i, ((rpn, seed), value) in enumerate(ap.items()):
        fake_run(tmp_path, str(i), [f"rpn={rpn}", f"seed={seed}"], {"bbox/AP50": value},
                 [{"iteration": 10, "loss": 1.0 + i}])  # fmt: skip
    fake_run(tmp_path, "6", ["rpn=focal_softmax", "seed=3"], None, [{"iteration": 10, "loss": 2.0}])
    summary = report([tmp_path], metrics=["bbox/AP50"])
    mean, sd, n = summary["table"]["rpn=focal_softmax"]["bbox/AP50"]
    assert n == 3 and mean == pytest.approx(0.58333333) and sd == pytest.approx(statistics.stdev([0.52, 0.63, 0.60]))
    diff, lo, hi, pairs = summary["diffs"]["rpn=focal_softmax"]["bbox/AP50"]
    d = [0.02, 0.03, 0.05]
    half = 4.302653 * statistics.stdev(d) / math.sqrt(3)
    assert pairs == 3 and diff == pytest.approx(0.03333333)
    assert (lo, hi) == (pytest.approx(diff - half, abs=1e-6), pytest.approx(diff + half, abs=1e-6))
    text = (tmp_path / "report.md").read_text()
    assert "| rpn=focal_softmax | 58.33 ± 5.69 (3) |" in text
    assert "failed or unfinished: 1, not started: unknown" in text and "last logged iteration 10" in text
    assert "No multirun.yaml" in text and "expected set of jobs is unknown" in text
    assert (tmp_path / "runs.csv").read_text().count("\n") == 8
    assert {p.name for p in tmp_path.glob("*.png")} == {"metrics.png", "differences.png", "loss_curves.png"}
    assert "error bars ± 1 sd" in text and "differences.png" in text


def test_runs_of_an_installed_copy_show_its_version_for_the_commit(tmp_path):
    prov = {"version": "0.1.0", "commit": None, "hardware": "CPU X", "world_size": 1, "dataset": "synthetic",
            "schedule": "s"}  # fmt: skip
    for rpn in ("focal_softmax", "sampled"):
        fake_run(tmp_path, rpn, [f"rpn={rpn}", "seed=0"], {"bbox/AP": 0.5, "provenance": prov})
    report([tmp_path])
    text = (tmp_path / "report.md").read_text()
    assert "commit none (fl-rpn 0.1.0); hardware CPU X" in text and "different commits" not in text


def test_a_missing_baseline_is_said_and_mixed_commits_are_warned_about(tmp_path):
    for seed, commit in ((0, "aaa"), (1, "bbb")):
        prov = {"commit": commit, "hardware": "CPU X", "world_size": 1, "dataset": "synthetic", "schedule": "s"}
        fake_run(tmp_path, f"f{seed}", ["rpn=focal_softmax", f"seed={seed}"], {"bbox/AP": 0.5, "provenance": prov})
        fake_run(tmp_path, f"s{seed}", ["rpn=sampled", f"seed={seed}"], None, [{"iteration": 3, "loss": 1.0}])
    summary = report([tmp_path])
    assert summary["diffs"] == {}
    text = (tmp_path / "report.md").read_text()
    assert "The baseline rpn=sampled has no finished runs: no paired differences." in text
    assert "commit aaa (1 runs), bbb (1 runs); hardware CPU X; world size 1" in text
    assert "Warning: the runs come from 2 different commits" in text
    rows = {r["run"]: r for r in read_csv(tmp_path / "runs.csv")}
    assert (rows["f1"]["commit"], rows["f1"]["hardware"], rows["f1"]["world_size"]) == ("bbb", "CPU X", "1")
    assert rows["s0"]["commit"] == ""


def test_stability_diagnostics_get_paired_differences_in_their_own_units(tmp_path):
    """Each run's box CV is the mean over its logged windows; the report pairs the runs by seed and gives the mean
    difference with its t-interval, unscaled (a CV is not a percentage)."""
    cvs = {("rpn=focal_softmax", 0): [0.2, 0.4], ("rpn=focal_softmax", 1): [0.5],
           ("rpn=sampled", 0): [0.1], ("rpn=sampled", 1): [0.2]}  # fmt: skip
    for (arm, seed), windows in cvs.items():
        history = [{"iteration": 10 * (i + 1), "stability/box_cv": cv} for i, cv in enumerate(windows)]
        fake_run(tmp_path, f"{arm[4:]}{seed}", [arm, f"seed={seed}"], {"bbox/AP": 0.3}, history)
    report([tmp_path], metrics=["bbox/AP"])
    rows = markdown_table((tmp_path / "report.md").read_text(), "Δ stability/box_cv")
    diffs = [0.3 - 0.1, 0.5 - 0.2]
    half = t95(1) * statistics.stdev(diffs) / math.sqrt(2)
    assert rows["rpn=focal_softmax"]["Δ stability/box_cv"] == f"+0.25 [{0.25 - half:+.2f}, {0.25 + half:+.2f}] (2)"


def test_per_class_ap_gets_its_own_tables_and_csv_columns(tmp_path):
    """voc07/AP/<class> of every run: mean ± sd per arm in the dataset's class order, paired differences in points,
    and a runs.csv column each; the headline table keeps only the headline metrics."""
    aps = {("rpn=focal_softmax", 0): (0.80, 0.90), ("rpn=focal_softmax", 1): (0.70, 0.96),
           ("rpn=sampled", 0): (0.75, 0.99), ("rpn=sampled", 1): (0.60, 0.97)}  # fmt: skip
    for (arm, seed), (wbc, rbc) in aps.items():
        metrics = {"voc07/mAP": (wbc + rbc) / 2, "voc07/AP/WBC": wbc, "voc07/AP/RBC": rbc}
        fake_run(tmp_path, f"{arm[4:]}{seed}", [arm, f"seed={seed}"], metrics)
    report([tmp_path], metrics=["voc07/mAP"])
    text = (tmp_path / "report.md").read_text()
    table = markdown_table(text, "voc07/AP/WBC")
    assert list(table["rpn=sampled"]) == ["voc07/AP/WBC", "voc07/AP/RBC"]  # the first run's (dataset's) order
    assert table["rpn=focal_softmax"]["voc07/AP/WBC"] == f"75.00 ± {100 * statistics.stdev([0.8, 0.7]):.2f} (2)"
    diffs = markdown_table(text, "Δ voc07/AP/WBC")
    wbc = [0.80 - 0.75, 0.70 - 0.60]  # +5 and +10 points
    half = 100 * t95(1) * statistics.stdev(wbc) / math.sqrt(2)
    assert diffs["rpn=focal_softmax"]["Δ voc07/AP/WBC"] == f"+7.50 [{7.5 - half:+.2f}, {7.5 + half:+.2f}] (2)"
    assert diffs["rpn=focal_softmax"]["Δ voc07/AP/RBC"].startswith("-5.00 [")  # -9 and -1 points
    assert "voc07/AP/WBC" not in markdown_table(text, "voc07/mAP")["rpn=sampled"]
    rows = {r["run"]: r for r in read_csv(tmp_path / "runs.csv")}
    assert float(rows["sampled1"]["voc07/AP/RBC"]) == 0.97


def power_runs(root, diffs):
    """3 seeds of rpn=sampled (AP50 0.5 + 0.1 seed) and rpn=focal_softmax at the given paired differences."""
    for seed, diff in enumerate(diffs):
        fake_run(root, f"s{seed}", ["rpn=sampled", f"seed={seed}"], {"bbox/AP50": 0.5 + 0.1 * seed})
        fake_run(root, f"f{seed}", ["rpn=focal_softmax", f"seed={seed}"], {"bbox/AP50": 0.5 + 0.1 * seed + diff})


def test_report_gives_sd_mdd_and_seeds_needed_and_says_when_the_effect_cannot_be_resolved(tmp_path):
    diffs = [0.01, 0.02, 0.06]  # sd 0.02646 (2.65 points) over 3 seeds
    power_runs(tmp_path, diffs)
    summary = report([tmp_path], metrics=["bbox/AP50"])
    sd = statistics.stdev(diffs)
    got_sd, mdd, needed = summary["power"]["rpn=focal_softmax"]["bbox/AP50"]
    assert got_sd == pytest.approx(sd) and mdd == pytest.approx(3.2640435528 * sd, rel=1e-6)
    assert needed == pairs_needed(0.004 / sd) and needed > 300  # d = 0.151: hundreds of seeds
    text = (tmp_path / "report.md").read_text()
    power_table = text.split("### Power of the paired differences")[1]
    assert f"| rpn=focal_softmax | 2.65 / {100 * 3.2640435528 * sd:.2f} / {needed} |" in power_table  # 8.64 / 346
    assert "**This table cannot resolve an effect of the paper's size (0.40 points) with 3 seeds" in text
    # 3 pairs, 2 degrees of freedom: chi2(2) quantiles 0.0506 and 7.378 -> 0.52-6.28x the sd, 0.27-39.5x the seeds
    assert (
        "estimated from 3 pairs (2 degrees of freedom): at 95 % the true sd lies within 0.52–6.28× the observed" in text
    )
    assert "the seeds needed by 0.27–39.5×." in text
    row = next(r for r in read_csv(tmp_path / "summary.csv") if r["arm"] == "rpn=focal_softmax")
    assert float(row["diff_mdd80"]) == pytest.approx(mdd) and int(row["diff_seeds_needed"]) == needed


def test_report_says_when_every_difference_resolves_the_effect(tmp_path):
    power_runs(tmp_path, [0.0100, 0.0101, 0.0102])  # sd 0.0001: MDD 0.03 points
    main([str(tmp_path), "--metrics", "bbox/AP50", "--effect", "0.4"])
    text = (tmp_path / "report.md").read_text()
    assert "With 3 seeds every difference here can resolve an effect of the paper's size (0.40 points)" in text
    _, _, needed = report([tmp_path], metrics=["bbox/AP50"], effect=0.04)["power"]["rpn=focal_softmax"]["bbox/AP50"]
    assert needed == pairs_needed(0.0004 / 0.0001)  # --effect in points: 0.04 points is d = 4


def test_report_lists_the_differences_that_cannot_resolve_the_effect(tmp_path):
    """focal_softmax: sd 0.0001 (resolves 0.4 points); focal_sigmoid: sd 0.02646 (does not): 1 of 2 named."""
    for seed, (tight, loose) in enumerate(zip([0.0100, 0.0101, 0.0102], [0.01, 0.02, 0.06])):
        base = 0.5 + 0.1 * seed
        fake_run(tmp_path, f"s{seed}", ["rpn=sampled", f"seed={seed}"], {"bbox/AP50": base})
        fake_run(tmp_path, f"f{seed}", ["rpn=focal_softmax", f"seed={seed}"], {"bbox/AP50": base + tight})
        fake_run(tmp_path, f"g{seed}", ["rpn=focal_sigmoid", f"seed={seed}"], {"bbox/AP50": base + loose})
    summary = report([tmp_path], metrics=["bbox/AP50"])
    _, mdd, needed = summary["power"]["rpn=focal_sigmoid"]["bbox/AP50"]
    text = (tmp_path / "report.md").read_text()
    assert (
        "**With 3 seeds, 1 of the 2 differences here cannot resolve an effect of the paper's size (0.40 points):** "
        f"rpn=focal_sigmoid bbox/AP50 (MDD {100 * mdd:.2f}, {needed} seeds needed). The others can"
    ) in text


def test_the_report_has_a_title_naming_the_folders_and_the_design(tmp_path):
    """The folders under their parent's name, the arms, the seeds, the finished runs of those listed, the baseline."""
    for folder, rpns in (("sweep_a", ("sampled", "focal_softmax")), ("sweep_b", ("focal_sigmoid",))):
        for rpn in rpns:
            for seed in range(3):
                metrics = None if (folder, seed) == ("sweep_b", 2) else {"bbox/AP": 0.5}  # one run failed
                fake_run(tmp_path / folder, f"{rpn}{seed}", [f"rpn={rpn}", f"seed={seed}"], metrics)
    report([tmp_path / "sweep_a", tmp_path / "sweep_b"], tmp_path / "out", metrics=["bbox/AP"])
    first = (tmp_path / "out" / "report.md").read_text().splitlines()[0]
    design = "3 arms × 3 seeds (8 of 9 runs finished), baseline rpn=sampled"
    assert first == f"# {tmp_path.name}/{{sweep_a, sweep_b}}: {design}"
    report([tmp_path / "sweep_a"], metrics=["bbox/AP"], baseline="rpn=focal_softmax")
    first = (tmp_path / "sweep_a" / "report.md").read_text().splitlines()[0]
    assert first == f"# {tmp_path.name}/sweep_a: 2 arms × 3 seeds (6 runs), baseline rpn=focal_softmax"


def test_the_report_lists_the_overrides_common_to_every_run(tmp_path):
    """An image size given to the whole sweep is a setting of the whole table: it is listed with the other common
    overrides (in the runs' order), not hydra.* keys, not a key some run lacks or has with another value."""
    for seed in (0, 1):
        for rpn in ("sampled", "focal_softmax"):
            extra = ["resume=true"] if (rpn, seed) == ("focal_softmax", 1) else []
            overrides = [f"rpn={rpn}", f"seed={seed}", "model.detector.min_size=96", f"hydra.job.num={seed}",
                         "hydra.launcher.n_jobs=2", "num_workers=0", "+data_root=d", *extra]  # fmt: skip
            fake_run(tmp_path, f"{rpn}{seed}", overrides, {"bbox/AP": 0.5})
    text = markdown_text(tmp_path)
    assert "\nOverrides common to every run: model.detector.min_size=96, num_workers=0, data_root=d.\n" in text
    assert "Swept keys: rpn, seed; arms by rpn." in text
