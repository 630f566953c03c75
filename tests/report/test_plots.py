"""The report's figures: tick labels, the loss curves, the box-loss spikes, metrics too low to rank the arms on
greyed out, and plain tick labels on a narrow log range."""

import json

import pytest

from fl_rpn.report import report
from fl_rpn.report.plots import box_spike_panels, loss_curve_panels, tick_label

from .conftest import fake_run, markdown_text


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
    summary = report([tmp_path], metrics=["bbox/AP"])
    panels = box_spike_panels(summary)
    assert list(panels) == ["rpn=focal_softmax"]
    (seed0, its, loss, marks), (seed1, _, loss1, marks1) = panels["rpn=focal_softmax"]
    assert (seed0, seed1) == ("0", "1") and its == [10, 20, 30, 40] and loss == [0.30, 0.25, 0.20, 0.22]
    assert marks == [(20, 0.25, 2.0), (40, 0.22, 1.0)] and marks1 == [(20, 1.25, 2.0), (40, 1.22, 1.0)]
    assert (tmp_path / "box_loss_spikes.png").stat().st_size > 0
    assert "box_loss_spikes.png" in (tmp_path / "report.md").read_text()
    assert summary["table"]["rpn=focal_softmax"]["stability/box_spikes"] == (3.0, 0.0, 2)  # summed per run


def test_metrics_below_one_percent_in_every_arm_are_greyed_out_in_the_plots(tmp_path, saved_figures):
    """bbox/AP at 0.004 % with a large spread reads as a result in a bar chart: its panels are grey and say why;
    bbox/AP50 (above 1 % in one arm) keeps its colour."""
    from matplotlib.colors import to_rgba

    for seed in (0, 1, 2):
        fake_run(tmp_path, f"s{seed}", ["rpn=sampled", f"seed={seed}"],
                 {"bbox/AP": 0.00001 * seed, "bbox/AP50": 0.005})  # fmt: skip
        fake_run(tmp_path, f"f{seed}", ["rpn=focal_softmax", f"seed={seed}"],
                 {"bbox/AP": 0.00004 * seed, "bbox/AP50": 0.02 + 0.001 * seed})  # fmt: skip
    text = markdown_text(tmp_path)
    (ap, ap50), (d_ap, d_ap50) = saved_figures["metrics.png"].axes, saved_figures["differences.png"].axes
    grey, blue = to_rgba("lightgray"), to_rgba("C0")
    assert {p.get_facecolor() for p in ap.patches} == {grey} and {p.get_facecolor() for p in ap50.patches} == {blue}
    assert ap.get_title() == "bbox/AP\n(< 1 % in every arm: not a result)" and ap50.get_title() == "bbox/AP50"
    assert to_rgba(d_ap.lines[0].get_color()) == grey and to_rgba(d_ap50.lines[0].get_color()) == blue
    assert d_ap.get_title().startswith("Δ bbox/AP\n(< 1 %")
    assert ("Greyed out in metrics.png and differences.png: bbox/AP, below 1 % in every arm: too low to rank the "
            "arms on, not results.") in text  # fmt: skip


def test_loss_curves_label_a_narrow_log_range_with_plain_numbers(tmp_path, saved_figures):
    """Three logged points between 0.95 and 0.85: the ticks read 0.9, not 9×10⁻¹."""
    history = [{"iteration": 10 * (i + 1), "loss_classifier": v, "loss_box_reg": 0.0, "loss_objectness": v,
                "loss_rpn_box_reg": v} for i, v in enumerate((0.95, 0.9, 0.85))]  # fmt: skip
    fake_run(tmp_path, "0", ["rpn=sampled", "seed=0"], {"bbox/AP": 0.5}, history)
    markdown_text(tmp_path)
    head = saved_figures["loss_curves.png"].axes[0]
    labels = [t.get_text() for t in head.yaxis.get_ticklabels(which="both") if t.get_text()]
    assert "0.9" in labels and not any("10" in label or "$" in label for label in labels), labels
