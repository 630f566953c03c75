"""fl-rpn-report: known statistics on hand-made runs, and a real 3-arm x 2-seed sweep through the launcher."""

import csv
import json
import math
import re
import statistics

import numpy as np
import pytest
import yaml

from fl_rpn.cli.report import main
from fl_rpn.report import (
    detectable_effect,
    expected_jobs,
    load_runs,
    pairs_needed,
    report,
    t95,
    t_test_power,
    tick_label,
)

from .conftest import TINY, run_app


def fake_run(root, name, overrides, metrics=None, history=None):
    run = root / name
    (run / ".hydra").mkdir(parents=True)
    (run / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    if metrics is not None:
        (run / "metrics.json").write_text(json.dumps(metrics))
    if history is not None:
        (run / "history.json").write_text(json.dumps(history))


def markdown_table(text, first_header):
    """The markdown table whose header row starts with ``| arm | <first_header>``: {arm: {column: cell}}."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(f"| arm | {first_header} |"))
    header = [c.strip() for c in lines[start].strip("|").split("|")]
    rows = {}
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        cells = [c.strip() for c in line.strip("|").split("|")]
        rows[cells[0]] = dict(zip(header[1:], cells[1:]))
    return rows


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


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


def test_diagnostics_are_averaged_over_each_history_then_over_seeds(tmp_path):
    share = {0: [0.10, 0.20, 0.30], 1: [0.40, 0.40, 0.10]}
    for seed, values in share.items():
        history = [{"iteration": 10 * (i + 1), "loss": 1.0, "rpn/easy_negative_loss_share": v,
                    "rpn/trained_anchors_per_image": 20000.0 + seed} for i, v in enumerate(values)]  # fmt: skip
        fake_run(tmp_path, str(seed), ["rpn=focal_softmax", f"seed={seed}"], {"bbox/AP": 0.5}, history)
    summary = report([tmp_path])
    per_run = [statistics.fmean(share[0]), statistics.fmean(share[1])]
    mean, sd, n = summary["table"]["all"]["rpn/easy_negative_loss_share"]
    assert n == 2 and mean == pytest.approx(statistics.fmean(per_run))
    assert sd == pytest.approx(statistics.stdev(per_run))
    text = (tmp_path / "report.md").read_text()
    row = markdown_table(text, "rpn/trained_anchors_per_image")["all"]
    assert row["rpn/trained_anchors_per_image"] == "20,000 ± 0.71 (2)"
    assert row["rpn/easy_negative_loss_share"] == f"{100 * mean:.2f} ± {100 * sd:.2f} (2)"
    assert "rpn/focal_normalizer" not in row  # no run logged it
    assert (tmp_path / "imbalance.png").is_file()
    csv_rows = read_csv(tmp_path / "runs.csv")
    assert [float(r["mean rpn/easy_negative_loss_share"]) for r in csv_rows] == pytest.approx(per_run)


@pytest.mark.parametrize(
    "df, quantile",
    [(1, 12.706), (2, 4.303), (5, 2.571), (10, 2.228), (30, 2.042), (31, 2.040), (60, 2.000), (120, 1.980),
     (1000, 1.962)],
)  # fmt: skip
def test_t_quantiles(df, quantile):
    assert t95(df) == pytest.approx(quantile, abs=5e-4)


def test_t_quantiles_to_more_digits():
    assert t95(1) == pytest.approx(12.7062047, abs=1e-6) and t95(31) == pytest.approx(2.0395134, abs=1e-6)
    assert t95(1000) == pytest.approx(1.9623391, abs=1e-6)
    with pytest.raises(ValueError, match="positive integer"):
        t95(0)


def write_multirun_yaml(sweep, params, task):
    hydra = {"sweeper": {"_target_": "hydra._internal.core_plugins.basic_sweeper.BasicSweeper", "params": params},
             "overrides": {"hydra": [f"hydra.sweep.dir={sweep}"], "task": task}}  # fmt: skip
    (sweep / "multirun.yaml").write_text(yaml.safe_dump({"hydra": hydra, "seed": 0}, sort_keys=False))


def test_jobs_that_never_started_are_listed(tmp_path):
    # the experiment declares seed 0,1,2 and two rpn forms; the command line narrows seed to 0,1 and adds a fixed key
    write_multirun_yaml(tmp_path, {"seed": "0,1,2", "rpn": "sampled,focal_softmax"},
                        ["experiment=x", "seed=0,1", "schedule.max_iters=2"])  # fmt: skip
    jobs = expected_jobs(tmp_path)
    assert [(j["seed"], j["rpn"]) for j in jobs] == [("0", "sampled"), ("0", "focal_softmax"), ("1", "sampled"),
                                                     ("1", "focal_softmax")]  # fmt: skip
    assert all(j["experiment"] == "x" and j["schedule.max_iters"] == "2" for j in jobs)
    for num, job in enumerate(jobs[:2]):
        fake_run(tmp_path, str(num), [f"{k}={v}" for k, v in job.items()], {"bbox/AP": 0.5 + num})
    fake_run(tmp_path, "2", [f"{k}={v}" for k, v in jobs[2].items()], None, [{"iteration": 1, "loss": 1.0}])
    summary = report([tmp_path])
    assert [r.path.name for r in summary["not_started"]] == ["3"]
    text = (tmp_path / "report.md").read_text()
    assert "4 jobs expected (multirun.yaml), 1 not started" in text
    assert "Runs: 4, finished: 2, failed or unfinished: 1, not started: 1." in text
    assert "- 3 (rpn=focal_softmax seed=1): not started (job 3 has no run folder)" in text
    assert "- 2 (rpn=sampled seed=1): unfinished or failed" in text
    statuses = {r["run"]: r["status"] for r in read_csv(tmp_path / "runs.csv")}
    assert statuses["3"].startswith("not started") and statuses["0"] == "finished"


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


def test_a_repeated_arm_and_seed_is_an_error(tmp_path, capsys):
    for sweep in ("a", "b"):
        fake_run(tmp_path / sweep, "0", ["rpn=sampled", "seed=0"], {"bbox/AP": 0.5})
        fake_run(tmp_path / sweep, "1", ["rpn=focal_softmax", "seed=0"], {"bbox/AP": 0.6})
    with pytest.raises(ValueError, match="more than one finished run of the same arm and seed"):
        report([tmp_path / "a", tmp_path / "b"])
    with pytest.raises(SystemExit, match="rpn=sampled, seed=0: "):
        main([str(tmp_path / "a"), str(tmp_path / "b")])
    assert not (tmp_path / "a" / "report.md").exists()


def test_a_resumed_run_stays_in_its_arm_and_is_listed(tmp_path):
    for seed, (sampled, focal) in enumerate(((0.50, 0.52), (0.60, 0.63))):
        fake_run(tmp_path, f"s{seed}", ["rpn=sampled", f"seed={seed}"], {"bbox/AP": sampled})
        resumed = ["resume=true"] if seed == 1 else []
        fake_run(tmp_path, f"f{seed}", ["rpn=focal_softmax", f"seed={seed}", *resumed], {"bbox/AP": focal})
    summary = report([tmp_path])
    assert summary["arm_keys"] == ["rpn"] and summary["table"]["rpn=focal_softmax"]["bbox/AP"][2] == 2
    diff, _, _, pairs = summary["diffs"]["rpn=focal_softmax"]["bbox/AP"]
    assert pairs == 2 and diff == pytest.approx(0.025)
    text = (tmp_path / "report.md").read_text()
    assert "- f1 (rpn=focal_softmax seed=1): finished, resumed from a checkpoint (resume=true)" in text
    assert "resume=" not in text.split("## Runs")[0]


CELL = re.compile(r"(\S+) ± (\S+) \((\d+)\)")
DIFF_CELL = re.compile(r"(\S+) \[(\S+), (\S+)\] \((\d+)\)")


def test_a_real_sweep_through_the_launcher(tmp_path):
    sweep = tmp_path / "sweep"
    run_app(
        "-m", "rpn=sampled,focal_sigmoid,focal_softmax", "seed=0,1", *TINY,
        "eval.evaluators=[coco,proposal_recall]", f"hydra.sweep.dir={sweep}", cache=tmp_path / "cache",
    )  # fmt: skip
    runs = load_runs([sweep])
    assert len(runs) == 6 and all(r.metrics is not None for r in runs)
    main([str(sweep)])
    text = (sweep / "report.md").read_text()
    assert "6 jobs expected (multirun.yaml), 0 not started" in text and "failed or unfinished: 0" in text

    # by hand, from each run's metrics.json and history.json
    metrics = ("bbox/AP", "bbox/AP50", "proposal/AR@100", "proposal/AR@1000")
    value, history_mean = {}, {}
    for run_dir in sweep.iterdir():
        if not (run_dir / "metrics.json").is_file():
            continue
        overrides = dict(o.split("=", 1) for o in yaml.safe_load((run_dir / ".hydra" / "overrides.yaml").read_text()))
        key = (overrides["rpn"], int(overrides["seed"]))
        value[key] = json.loads((run_dir / "metrics.json").read_text())
        history = json.loads((run_dir / "history.json").read_text())
        history_mean[key] = {k: np.mean([h[k] for h in history if k in h]) for k in history[0] if k.startswith("rpn/")}
    arms = ("sampled", "focal_sigmoid", "focal_softmax")
    table = markdown_table(text, "bbox/AP")
    diff_table = markdown_table(text, "Δ bbox/AP")
    diag_table = markdown_table(text, "rpn/positive_anchors_per_image")
    summary = {(r["arm"], r["metric"]): r for r in read_csv(sweep / "summary.csv")}
    assert set(table) == set(diag_table) == {f"rpn={a}" for a in arms} and set(diff_table) == {
        "rpn=focal_sigmoid", "rpn=focal_softmax"}  # fmt: skip
    for arm in arms:
        for m in (*metrics, "rpn/trained_anchors_per_image", "rpn/easy_negative_loss_share"):
            x = np.array([value[(arm, s)][m] if m in metrics else history_mean[(arm, s)][m] for s in (0, 1)])
            row = summary[(f"rpn={arm}", m)]
            assert int(row["n"]) == 2
            assert float(row["mean"]) == pytest.approx(x.mean()) and float(row["sd"]) == pytest.approx(x.std(ddof=1))
            if m in metrics or m.endswith("share"):
                cell = (table if m in metrics else diag_table)[f"rpn={arm}"][m]
                mean, sd, n = CELL.fullmatch(cell).groups()
                assert float(mean) == pytest.approx(100 * x.mean(), abs=0.006) and int(n) == 2
                assert float(sd) == pytest.approx(100 * x.std(ddof=1), abs=0.006)
            if arm == "sampled":
                assert row["diff_n"] == ""
            if arm == "sampled" or m not in metrics:
                continue
            d = x - np.array([value[("sampled", s)][m] for s in (0, 1)])
            half = 12.706 * d.std(ddof=1) / np.sqrt(2)
            assert int(row["diff_n"]) == 2 and float(row["diff_mean"]) == pytest.approx(d.mean())
            assert float(row["diff_low"]) == pytest.approx(d.mean() - half, rel=1e-4, abs=1e-12)
            assert float(row["diff_high"]) == pytest.approx(d.mean() + half, rel=1e-4, abs=1e-12)
            mean, lo, hi, n = DIFF_CELL.fullmatch(diff_table[f"rpn={arm}"][f"Δ {m}"]).groups()
            assert [float(mean), float(lo), float(hi)] == pytest.approx(
                [100 * d.mean(), 100 * (d.mean() - half), 100 * (d.mean() + half)], abs=0.006)  # fmt: skip
            assert int(n) == 2
    # the sampled baseline trains 256 anchors per image; the focal arms every anchor with label >= 0
    assert float(summary[("rpn=sampled", "rpn/trained_anchors_per_image")]["mean"]) == 256
    assert float(summary[("rpn=focal_softmax", "rpn/trained_anchors_per_image")]["mean"]) > 1000

    csv_rows = read_csv(sweep / "runs.csv")
    assert len(csv_rows) == 6 and {r["status"] for r in csv_rows} == {"finished"}
    for r in csv_rows:
        prov = value[(r["rpn"], int(r["seed"]))]["provenance"]
        assert (r["commit"], r["hardware"], r["world_size"]) == (prov["commit"], prov["hardware"], "1")
        assert float(r["proposal/AR@1000"]) == value[(r["rpn"], int(r["seed"]))]["proposal/AR@1000"]
    assert f"commit {prov['commit']}; hardware {prov['hardware']}; world size 1; dataset synthetic" in text
    assert {p.name for p in sweep.glob("*.png")} == {
        "metrics.png", "differences.png", "loss_curves.png", "imbalance.png", "proposal_recall.png"}  # fmt: skip


def test_tick_labels_keep_every_swept_value():
    assert tick_label("rpn=focal_sigmoid,rpn.gamma=1") == "focal_sigmoid 1"
    assert tick_label("rpn=sampled") == "sampled"


def test_loss_curves_plot_comparable_terms_and_short_runs_are_warned_about(tmp_path):
    """The box head's terms are summed as they are; each arm's RPN terms are relative to its first logged value."""
    history = {
        "sampled": [{"iteration": 10, "loss_objectness": 0.6, "loss_rpn_box_reg": 0.2, "loss_classifier": 0.5,
                     "loss_box_reg": 0.3},
                    {"iteration": 20, "loss_objectness": 0.3, "loss_rpn_box_reg": 0.1, "loss_classifier": 0.4,
                     "loss_box_reg": 0.2}],
        "focal_softmax": [{"iteration": 10, "loss_objectness": 0.05, "loss_rpn_box_reg": 0.4, "loss_classifier": 0.7,
                           "loss_box_reg": 0.1},
                          {"iteration": 20, "loss_objectness": 0.04, "loss_rpn_box_reg": 0.1, "loss_classifier": 0.6,
                           "loss_box_reg": 0.1}],
    }  # fmt: skip
    for rpn, h in history.items():
        fake_run(tmp_path, rpn, [f"rpn={rpn}", "seed=0"], {"bbox/AP": 0.001, "bbox/AP50": 0.004,
                                                            "train/iterations": 20}, h)  # fmt: skip
    from fl_rpn.report import loss_curve_panels

    summary = report([tmp_path], metrics=["bbox/AP", "bbox/AP50"])
    head, objectness, rpn_box = loss_curve_panels(summary).values()
    assert head["rpn=sampled"] == ([10, 20], [pytest.approx(0.8), pytest.approx(0.6)])
    assert head["rpn=focal_softmax"] == ([10, 20], [pytest.approx(0.8), pytest.approx(0.7)])
    assert objectness["rpn=sampled"] == ([10, 20], [1.0, pytest.approx(0.5)])
    assert objectness["rpn=focal_softmax"] == ([10, 20], [1.0, pytest.approx(0.8)])
    assert rpn_box["rpn=focal_softmax"] == ([10, 20], [1.0, pytest.approx(0.25)])
    assert (tmp_path / "loss_curves.png").stat().st_size > 0
    text = (tmp_path / "report.md").read_text()
    assert "Warning: every arm's bbox/AP, bbox/AP50 is below 1 %: these runs (20 iterations) are far too short" in text
    # a run that learnt something: no warning
    (tmp_path / "sampled" / "metrics.json").write_text(json.dumps({"bbox/AP": 0.2, "train/iterations": 20}))
    assert "Warning" not in markdown_text(tmp_path)


def test_box_loss_spikes_are_marked_at_the_windows_that_held_them(tmp_path):
    """box_loss_spikes.png: one panel per arm that logged stability/box_spikes, each run's box loss, a mark per
    window with spikes at that window's loss; runs without the stability diagnostics get no panel."""
    logged = [(10, 0.30, 0.0), (20, 0.25, 2.0), (30, 0.20, 0.0), (40, 0.22, 1.0)]
    for seed in (0, 1):
        history = [{"iteration": i, "loss_rpn_box_reg": loss + seed, "stability/box_spikes": n}
                   for i, loss, n in logged]  # fmt: skip
        fake_run(tmp_path, f"focal{seed}", ["rpn=focal_softmax", f"seed={seed}"], {"bbox/AP": 0.3}, history)
        fake_run(tmp_path, f"sampled{seed}", ["rpn=sampled", f"seed={seed}"], {"bbox/AP": 0.3},
                 [{"iteration": 10, "loss_rpn_box_reg": 0.1}])  # fmt: skip
    from fl_rpn.report import box_spike_panels

    summary = report([tmp_path], metrics=["bbox/AP"])
    panels = box_spike_panels(summary)
    assert list(panels) == ["rpn=focal_softmax"]
    (seed0, its, loss, marks), (seed1, _, loss1, marks1) = panels["rpn=focal_softmax"]
    assert (seed0, seed1) == ("0", "1") and its == [10, 20, 30, 40] and loss == [0.30, 0.25, 0.20, 0.22]
    assert marks == [(20, 0.25, 2.0), (40, 0.22, 1.0)] and marks1 == [(20, 1.25, 2.0), (40, 1.22, 1.0)]
    assert (tmp_path / "box_loss_spikes.png").stat().st_size > 0
    assert "box_loss_spikes.png" in (tmp_path / "report.md").read_text()
    assert summary["table"]["rpn=focal_softmax"]["stability/box_spikes"] == (3.0, 0.0, 2)  # summed per run


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


def markdown_text(root):
    report([root], metrics=["bbox/AP", "bbox/AP50"])
    return (root / "report.md").read_text()


# Power of the paired (one-sample) two-sided t-test at alpha 0.05. The reference values were computed independently
# with statsmodels 0.15 (statsmodels.stats.power.TTestPower, alternative="two-sided"), and agree with Cohen (1988),
# Statistical Power Analysis, table 2.3.5 / 2.4.1 (d = 0.5: n = 34 at 80 % power for the one-sample test):
#   TTestPower().power(effect_size=1.0, nobs=10, alpha=0.05)            -> 0.8030968566
#   TTestPower().power(effect_size=0.5, nobs=33 / 34, alpha=0.05)       -> 0.7953658 / 0.8077775
#   TTestPower().solve_power(effect_size=None, nobs=n, power=0.8)       -> 11.5498898 (n=2), 3.2640436 (3),
#                                                                          1.6819971 (5), 0.9960019 (10)
#   TTestPower().solve_power(effect_size=0.8, power=0.8)                -> 14.30 (so 15 pairs)
@pytest.mark.parametrize("d,n,power", [(1.0, 10, 0.8030968566), (0.5, 33, 0.7953658415), (0.5, 34, 0.8077775013)])
def test_t_test_power_matches_published_values(d, n, power):
    assert t_test_power(d, n) == pytest.approx(power, abs=1e-7)


@pytest.mark.parametrize("n,d", [(2, 11.5498897550), (3, 3.2640435528), (5, 1.6819970833), (10, 0.9960019108)])
def test_detectable_effect_matches_published_values(n, d):
    assert detectable_effect(n) == pytest.approx(d, rel=1e-6)  # statsmodels' root finder stops at ~1e-7 relative


def test_pairs_needed_matches_published_values():
    assert pairs_needed(0.5) == 34 and pairs_needed(0.8) == 15 and pairs_needed(1.0) == 10
    assert pairs_needed(1e-4) == math.inf  # beyond a million pairs


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
