"""Learning curves from eval_history.json: the mean over seeds and the change over the last quarter."""

import json
from types import SimpleNamespace

import pytest

from fl_rpn.report import curves as lc


def write_curve(run_dir, points):
    run_dir.mkdir(parents=True)
    (run_dir / "eval_history.json").write_text(json.dumps([{"iteration": i, "m": v} for i, v in points]))
    return SimpleNamespace(path=run_dir)


def test_mean_curve_averages_the_seeds_at_the_iterations_all_evaluated(tmp_path):
    a = write_curve(tmp_path / "a", [(100, 0.2), (200, 0.4), (300, 0.5)])
    b = write_curve(tmp_path / "b", [(200, 0.6), (100, 0.4)])  # stopped early, written out of order
    curves = lc.arm_curves({"arm": [a, b], "none": [SimpleNamespace(path=tmp_path / "missing")]}, ["m", "other"])
    assert list(curves) == ["arm"] and list(curves["arm"]) == ["m"]
    iterations, values = curves["arm"]["m"]
    assert iterations == [100, 200] and values == pytest.approx([0.3, 0.5])


def test_late_change_spans_the_last_quarter_and_finds_the_best():
    iterations = [50, 100, 150, 200, 250, 300, 350, 400]
    values = [0.1, 0.3, 0.5, 0.6, 0.65, 0.7, 0.72, 0.71]
    late = lc.late_change(iterations, values)
    # the last quarter of 400 iterations starts at 300
    assert late == pytest.approx({"from": 300, "to": 400, "start": 0.7, "end": 0.71, "change": 0.01, "previous": 350,
                                  "last_change": -0.01, "best": 0.72, "best_at": 350})  # fmt: skip
    assert lc.late_change([400], [0.5]) is None
    assert lc.late_change([100, 400], [0.1, 0.5]) is None  # no evaluation in the last quarter before the last


def test_the_report_table_and_plot(tmp_path):
    run = write_curve(tmp_path / "a", [(100, 0.2), (300, 0.5), (400, 0.55)])
    curves = lc.arm_curves({"rpn=sampled": [run]}, ["m"])
    lines = lc.markdown_lines(curves, ["m", "absent"])
    assert lines[-2] == "| rpn=sampled | 55.00 (+5.00 since it 300, +5.00 since it 300; best 55.00 at it 400) |"
    assert "| arm | m |" in lines
    assert lc.plot(curves, ["m"], tmp_path / "lc.png") and (tmp_path / "lc.png").stat().st_size > 1000
    final_only = write_curve(tmp_path / "b", [(400, 0.55)])
    assert lc.arm_curves({"rpn=sampled": [final_only]}, ["m"]) == {}
    assert not lc.plot(curves, ["absent"], tmp_path / "none.png") and lc.markdown_lines(curves, ["absent"]) == []


def test_fl_rpn_report_draws_the_curves_of_runs_that_have_them(tmp_path):
    from fl_rpn.report import report

    for n, (rpn, seed, end) in enumerate([("sampled", 0, 0.5), ("focal_softmax", 0, 0.6)]):
        run = write_curve(tmp_path / "sweep" / str(n), [(100, 0.3), (300, end - 0.01), (400, end)]).path
        (run / ".hydra").mkdir()
        (run / ".hydra" / "overrides.yaml").write_text(f"- rpn={rpn}\n- seed={seed}\n")
        (run / "metrics.json").write_text(json.dumps({"m": end, "bbox/AP": end, "train/iterations": 400}))
    report([tmp_path / "sweep"], tmp_path / "out", metrics=["bbox/AP", "m"])
    text = (tmp_path / "out" / "report.md").read_text()
    assert "| rpn=focal_softmax | 60.00 (+1.00 since it 300, +1.00 since it 300; best 60.00 at it 400) |" in text
    assert (tmp_path / "out" / "learning_curves.png").is_file()
