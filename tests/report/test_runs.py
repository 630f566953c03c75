"""Finding and reading runs: the jobs a sweep asked for, repeated and resumed runs, the diagnostics averaged over a
run's history, and a real 3-arm x 2-seed sweep through the launcher."""

import json
import re
import statistics

import numpy as np
import pytest
import yaml

from fl_rpn.cli.report import main
from fl_rpn.report import report
from fl_rpn.report.runs import expected_jobs, load_runs

from ..conftest import TINY, run_app
from .conftest import fake_run, markdown_table, read_csv


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


def test_a_job_relaunched_in_a_new_sweep_folder_counts_once(tmp_path):
    # a stopped sweep of 2 seeds x 2 arms finished one job; the other three were relaunched as a new sweep, which
    # finished two of them: the first sweep's jobs are then not "not started", and the third is missing once
    first, second = tmp_path / "seeds0-1", tmp_path / "rest"
    first.mkdir(), second.mkdir()
    write_multirun_yaml(first, {"seed": "0,1", "rpn": "sampled,focal_softmax"}, ["experiment=x"])
    write_multirun_yaml(second, {}, ["experiment=x", "seed=0,1", "rpn=focal_softmax,sampled"])
    fake_run(first, "0", ["experiment=x", "seed=0", "rpn=sampled"], {"bbox/AP": 0.5})
    fake_run(second, "0", ["experiment=x", "seed=0", "rpn=focal_softmax"], {"bbox/AP": 0.6})
    fake_run(second, "1", ["experiment=x", "seed=1", "rpn=focal_softmax"], {"bbox/AP": 0.7})
    summary = report([tmp_path])
    assert [(r.overrides["seed"], r.overrides["rpn"]) for r in summary["not_started"]] == [("1", "sampled")]
    text = (tmp_path / "report.md").read_text()
    assert "rest: 4 jobs expected (multirun.yaml), 1 not started, 1 run in another sweep folder." in text
    assert ("seeds0-1: 4 jobs expected (multirun.yaml), 0 not started, 2 run in another sweep folder, 1 more not "
            "started and listed under another sweep folder.") in text  # fmt: skip
    assert "Runs: 4, finished: 3, failed or unfinished: 0, not started: 1." in text


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


def test_where_keeps_a_subset_of_the_runs_of_two_studies(tmp_path):
    # a 3-arm shared-head table of seeds 0-1 and a decoupled sweep of two arms (seed 1's focal run not started): the
    # decoupled-vs-shared report keeps the two arms both studies have, and the jobs not started among them
    table, decoupled = tmp_path / "table", tmp_path / "decoupled"
    table.mkdir(), decoupled.mkdir()
    for seed in (0, 1):
        for num, (rpn, ap) in enumerate((("sampled", 0.50), ("focal_sigmoid", 0.40), ("focal_softmax", 0.52))):
            overrides = [f"rpn={rpn}", "rpn.head.kind=shared", f"seed={seed}"]
            fake_run(table, f"{seed}{num}", overrides, {"bbox/AP": ap + seed / 10})
    write_multirun_yaml(decoupled, {}, ["rpn.head.kind=decoupled", "seed=0,1", "rpn=sampled,focal_softmax"])
    for num, (seed, rpn, ap) in enumerate(((0, "sampled", 0.53), (0, "focal_softmax", 0.50), (1, "sampled", 0.62))):
        fake_run(decoupled, str(num), ["rpn.head.kind=decoupled", f"seed={seed}", f"rpn={rpn}"], {"bbox/AP": ap})
    out = tmp_path / "out"
    main([str(decoupled), str(table), "--out", str(out), "--baseline", "rpn.head.kind=shared",
          "--where", "rpn=sampled,focal_softmax"])  # fmt: skip
    rows = read_csv(out / "runs.csv")
    assert sorted((r["rpn"], r["rpn.head.kind"], r["seed"], r["status"][:11]) for r in rows) == [
        ("focal_softmax", "decoupled", "0", "finished"), ("focal_softmax", "decoupled", "1", "not started"),
        ("focal_softmax", "shared", "0", "finished"), ("focal_softmax", "shared", "1", "finished"),
        ("sampled", "decoupled", "0", "finished"), ("sampled", "decoupled", "1", "finished"),
        ("sampled", "shared", "0", "finished"), ("sampled", "shared", "1", "finished"),
    ]  # fmt: skip
    text = (out / "report.md").read_text()
    title = f"# {tmp_path.name}/{{decoupled, table}} where rpn=sampled,focal_softmax: 4 arms × 2 seeds (7 of 8 runs"
    assert text.startswith(title)
    assert "Selected (--where rpn=sampled,focal_softmax): 8 of the 10 runs and jobs not started." in text
    differences = {r["arm"]: r for r in read_csv(out / "summary.csv") if r["metric"] == "bbox/AP" and r["diff_n"]}
    assert set(differences) == {"rpn=sampled,rpn.head.kind=decoupled", "rpn=focal_softmax,rpn.head.kind=decoupled"}
    assert float(differences["rpn=sampled,rpn.head.kind=decoupled"]["diff_mean"]) == pytest.approx(0.025)  # (3+2)/2
    assert float(differences["rpn=focal_softmax,rpn.head.kind=decoupled"]["diff_mean"]) == pytest.approx(-0.02)
    assert "focal_sigmoid" not in text


@pytest.mark.parametrize(
    "where, message",
    [("seeds=0", "no run has the key 'seeds'"),
     ("rpn=focal_softmx", "no run has rpn=focal_softmx (the runs have focal_softmax, sampled)"),
     ("rpn", "expected KEY=V1,V2"), ("rpn=sampled --where rpn=focal_softmax", "each key once")],
)  # fmt: skip
def test_where_names_a_key_or_value_no_run_has(tmp_path, where, message):
    for seed in (0, 1):
        fake_run(tmp_path, f"s{seed}", ["rpn=sampled", f"seed={seed}"], {"bbox/AP": 0.5})
        fake_run(tmp_path, f"f{seed}", ["rpn=focal_softmax", f"seed={seed}"], {"bbox/AP": 0.6})
    with pytest.raises(SystemExit, match=re.escape(message)):
        main([str(tmp_path), *[part for item in where.split(" --where ") for part in ("--where", item)]])
    assert not (tmp_path / "report.md").exists()


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
