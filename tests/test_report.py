"""fl-rpn-report: known statistics on hand-made runs, and a real 3-arm x 2-seed sweep through the launcher."""

import json
import math
import statistics

import pytest
import yaml

from fl_rpn.report import load_runs, report, t95, tick_label

from .test_train_app import TINY, run_app


def fake_run(root, name, overrides, metrics=None, history=None):
    run = root / name
    (run / ".hydra").mkdir(parents=True)
    (run / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    if metrics is not None:
        (run / "metrics.json").write_text(json.dumps(metrics))
    if history is not None:
        (run / "history.json").write_text(json.dumps(history))


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
    half = 4.303 * statistics.stdev(d) / math.sqrt(3)
    assert pairs == 3 and diff == pytest.approx(0.03333333)
    assert (lo, hi) == (pytest.approx(diff - half), pytest.approx(diff + half))
    text = (tmp_path / "report.md").read_text()
    assert "| rpn=focal_softmax | 58.33 ± 5.69 (3) |" in text
    assert "failed or unfinished: 1" in text and "last logged iteration 10" in text
    assert (tmp_path / "runs.csv").read_text().count("\n") == 8
    assert {p.name for p in tmp_path.glob("*.png")} == {"metrics.png", "loss_curves.png"}


def test_t_quantiles():
    assert t95(1) == 12.706 and t95(2) == 4.303 and t95(11) == 2.228 and t95(100) == 1.96


def test_a_real_sweep_through_the_launcher(tmp_path):
    sweep = tmp_path / "sweep"
    run_app(
        "fl_rpn.train", "-m", "rpn=sampled,focal_sigmoid,focal_softmax", "seed=0,1", *TINY,
        "eval.evaluators=[coco,proposal_recall]", f"hydra.sweep.dir={sweep}", cache_dir=tmp_path / "cache",
    )  # fmt: skip
    runs = load_runs([sweep])
    assert len(runs) == 6 and all(r.metrics is not None for r in runs)
    summary = report([sweep])
    assert set(summary["table"]) == {"rpn=sampled", "rpn=focal_sigmoid", "rpn=focal_softmax"}
    for arm in summary["table"]:
        members = [r for r in runs if f"rpn={r.overrides['rpn']}" == arm]
        for metric in ("proposal/AR@1000", "train/rpn/trained_anchors_per_image"):
            mean, _, n = summary["table"][arm][metric]
            assert n == 2 and mean == pytest.approx(statistics.fmean(r.metrics[metric] for r in members))
    # the sampled baseline trains 256 anchors per image; the focal arms every anchor with label >= 0
    sampled = summary["table"]["rpn=sampled"]["train/rpn/trained_anchors_per_image"][0]
    focal = summary["table"]["rpn=focal_softmax"]["train/rpn/trained_anchors_per_image"][0]
    assert sampled == 256 and focal > 1000
    diff = summary["diffs"]["rpn=focal_sigmoid"]["proposal/AR@1000"]
    by_seed = {(r.overrides["rpn"], r.overrides["seed"]): r.metrics["proposal/AR@1000"] for r in runs}
    expected = statistics.fmean(by_seed[("focal_sigmoid", s)] - by_seed[("sampled", s)] for s in "01")
    assert diff[0] == pytest.approx(expected) and diff[3] == 2
    assert (sweep / "report.md").is_file() and (sweep / "proposal_recall.png").is_file()


def test_tick_labels_keep_every_swept_value():
    assert tick_label("rpn=focal_sigmoid,rpn.gamma=1") == "focal_sigmoid 1"
    assert tick_label("rpn=sampled") == "sampled"
