"""Stability and gradient-conflict diagnostics: known values on hand-made cases, the hook in a short loop, and
the report's combination over a run's windows."""

import json
import math

import pytest
import torch
import yaml
from torch import nn

from fl_rpn.config import compose_config
from fl_rpn.engine.distributed import SINGLE_PROCESS
from fl_rpn.engine.hooks import MetricsLogger, TrainState
from fl_rpn.engine.stability import (
    StabilityMonitor,
    coefficient_of_variation,
    gradient_conflict,
    shared_parameter_groups,
    spike_ratios,
    window_statistics,
)
from fl_rpn.engine.step import TrainStep
from fl_rpn.modeling.model import build_model
from fl_rpn.modeling.rpn_heads import replace_rpn_head
from fl_rpn.report.runs import load_runs
from fl_rpn.report.summary import summarize_runs
from fl_rpn.report.tables import markdown


def test_coefficient_of_variation():
    assert coefficient_of_variation([1.0, 2.0, 3.0, 4.0, 5.0]) == pytest.approx(math.sqrt(2.5) / 3)
    assert coefficient_of_variation([2.0, 2.0, 2.0]) == 0.0
    assert math.isnan(coefficient_of_variation([1.0])) and math.isnan(coefficient_of_variation([-1.0, 1.0]))


def test_spikes_against_the_running_median_of_the_steps_before():
    values = [1.0, 1.0, 1.0, 1.0, 10.0, 1.0, 1.0, 5.0]
    ratios = spike_ratios(values)
    assert math.isnan(ratios[0]) and ratios[1:] == [1.0, 1.0, 1.0, 10.0, 1.0, 1.0, 5.0]
    stats = window_statistics(values, k=3.0)
    assert stats["spikes"] == 2 and stats["max_spike"] == 10.0
    assert window_statistics(values, k=6.0)["spikes"] == 1
    # the steps before the window set the first medians: 4 / median(2, 2, 2), 7 / median(2, 2, 2, 4)
    assert spike_ratios([4.0, 7.0], past=[2.0, 2.0, 2.0]) == [2.0, 3.5]
    assert window_statistics([4.0, 7.0], past=[2.0, 2.0, 2.0])["spikes"] == 1


def test_the_median_window_forgets_the_early_high_losses():
    past, values = [10.0, 10.0, 10.0], [1.0, 1.0, 1.0, 3.5]
    # window 3: medians 10, 10, 1, 1 -> the last step is a spike; over all steps the median is 5.5 -> not
    assert spike_ratios(values, past, median_window=3) == [0.1, 0.1, 1.0, 3.5]
    assert window_statistics(values, past, median_window=3)["spikes"] == 1
    assert window_statistics(values, past, median_window=100) == {
        "cv": pytest.approx(coefficient_of_variation(values)), "spikes": 0.0, "max_spike": pytest.approx(3.5 / 5.5),
    }  # fmt: skip


def test_gradient_conflict_on_known_gradients():
    """L_obj = <w, (3, 4)> + <u, 1>, L_box = <w, (8, 6)> + <v, 1>: on the shared w the gradients are (3, 4) and
    (8, 6), cosine 48 / 50 and norm ratio 10 / 5; u and v are each one loss's own."""
    w = nn.Parameter(torch.tensor([0.5, -1.0]))
    u, v = nn.Parameter(torch.ones(3)), nn.Parameter(torch.ones(2))
    loss_obj = (w * torch.tensor([3.0, 4.0])).sum() + u.sum()
    loss_box = (w * torch.tensor([8.0, 6.0])).sum() + v.sum()
    result = gradient_conflict(loss_obj, loss_box, {"shared": [w], "all": [w, u, v], "empty": []})
    cosine, ratio = result["shared"]
    assert cosine.item() == pytest.approx(0.96) and ratio.item() == pytest.approx(2.0)
    # over (w, u, v): g_obj = (3, 4, 1, 1, 1, 0, 0), g_box = (8, 6, 0, 0, 0, 1, 1)
    cosine, ratio = result["all"]
    assert cosine.item() == pytest.approx(48 / math.sqrt(28 * 102)) and ratio.item() == pytest.approx(
        math.sqrt(102 / 28)
    )
    assert "empty" not in result
    (loss_obj + loss_box).backward()  # the graph was kept for the step's own backward
    assert w.grad.tolist() == [11.0, 10.0]


def test_opposite_gradients_have_cosine_minus_one():
    w = nn.Parameter(torch.randn(4, 3))
    a = torch.randn(4, 3)
    cosine, ratio = gradient_conflict((w * a).sum(), (w * -0.5 * a).sum(), {"shared": [w]})["shared"]
    assert cosine.item() == pytest.approx(-1.0) and ratio.item() == pytest.approx(0.5)


def tiny_model(head):
    cfg = compose_config(["model=tiny_fpn", "rpn=focal_softmax", "model.detector.min_size=64",
                          "model.detector.max_size=64"])  # fmt: skip
    model = build_model(cfg, num_classes=2)
    if head != "shared":
        replace_rpn_head(model, head, "softmax", 0.01)
    return cfg, model


def test_the_shared_parameter_groups():
    _, model = tiny_model("shared")
    groups = shared_parameter_groups(model)
    ids = {name: {id(p) for p in ps} for name, ps in groups.items()}
    assert ids["head"] == {id(p) for p in model.rpn.head.conv.parameters()}
    assert ids["backbone"] == {id(p) for p in model.backbone.parameters()}
    assert ids["shared"] == ids["head"] | ids["backbone"]
    _, model = tiny_model("decoupled")
    groups = shared_parameter_groups(model)
    assert groups["head"] == [] and groups["shared"] == groups["backbone"]


def batch():
    torch.manual_seed(1)
    images = [torch.rand(3, 64, 64)]
    return images, [{"boxes": torch.tensor([[8.0, 8.0, 40.0, 48.0]]), "labels": torch.tensor([1])}]


def make_step(model):
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    return TrainStep(model=model, optimizer=optimizer, device=torch.device("cpu"))


@pytest.mark.parametrize("head", ["shared", "decoupled"])
def test_the_monitor_logs_into_the_loggers_entries(tmp_path, head):
    cfg, model = tiny_model(head)
    step = make_step(model)
    state = TrainState(
        cfg=cfg, model=model.train(), optimizer=step.optimizer, scheduler=None, scaler=step.scaler, step=step,
        dist_info=SINGLE_PROCESS, device=torch.device("cpu"), output_dir=tmp_path, train_set=None, val_set=None,
        start_iter=0, iteration=0, max_iters=6, log_every=2, history=[],
    )  # fmt: skip
    logger = MetricsLogger()
    monitor = StabilityMonitor(probe_every=4)
    state.hooks = [monitor, logger]
    for hook in state.hooks:
        hook.before_train(state)
    images, targets = batch()
    try:
        while state.iteration < 6:
            state.output = step(images, targets, iteration=state.iteration)
            state.advance(len(images))
            for hook in state.hooks:
                hook.after_step(state)
    finally:
        for hook in state.hooks:
            hook.close()
    assert [h["iteration"] for h in state.history] == [2, 4, 6]
    for entry in state.history:
        assert "loss_rpn_box_reg" in entry and {f"stability/{t}_cv" for t in ("box", "obj")} <= set(entry)
        assert entry["stability/box_spikes"] in (0.0, 1.0, 2.0)
    assert not math.isnan(state.history[0]["stability/box_max_spike"])  # the 2nd step has a median
    probed = [h for h in state.history if "conflict/cosine" in h]
    assert [h["iteration"] for h in probed] == [4]  # probe_every=4: the 4th iteration only
    entry = probed[0]
    assert -1.0 <= entry["conflict/cosine"] <= 1.0 and entry["conflict/norm_ratio"] > 0
    assert ("conflict/head_cosine" in entry) == (head == "shared")
    if head == "decoupled":  # the backbone + FPN are all the layers both losses reach
        assert entry["conflict/cosine"] == entry["conflict/backbone_cosine"]
    past = monitor.state_dict()["past"]
    assert len(past["box"]) == len(past["obj"]) == 6  # every step, for the running medians after a resume
    resumed = StabilityMonitor()
    resumed.load_state_dict({"past": past})
    assert list(resumed.past["box"]) == past["box"]


def test_the_probe_does_not_change_the_step():
    results = []
    for probe in (False, True):
        torch.manual_seed(0)
        _, model = tiny_model("shared")
        step = make_step(model.train())
        if probe:
            monitor = StabilityMonitor(probe_every=1)
            monitor.groups, monitor.scaler = shared_parameter_groups(model), step.scaler
            step.before_backward.append(monitor.probe)
        images, targets = batch()
        step(images, targets, iteration=0)
        results.append({k: v.clone() for k, v in model.state_dict().items()})
        if probe:
            assert set(monitor.probes) == {f"conflict/{g}{n}" for g in ("", "backbone_", "head_")
                                           for n in ("cosine", "norm_ratio")}  # fmt: skip
    for k in results[0]:
        torch.testing.assert_close(results[1][k], results[0][k], rtol=1e-5, atol=1e-7)


def test_the_report_combines_each_runs_windows(tmp_path):
    windows = {0: [(0.2, 1.0, 2.5, 0.5), (0.4, 2.0, 4.0, 0.1)], 1: [(0.3, 0.0, 1.5, -0.2), (0.5, 3.0, 3.0, 0.0)]}
    for seed, rows in windows.items():
        run = tmp_path / str(seed)
        (run / ".hydra").mkdir(parents=True)
        (run / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(["rpn.head=decoupled", f"seed={seed}"]))
        (run / "metrics.json").write_text(json.dumps({"bbox/AP": 0.5}))
        history = [{"iteration": 10 * (i + 1), "stability/box_cv": cv, "stability/box_spikes": spikes,
                    "stability/box_max_spike": top, "conflict/cosine": cosine}
                   for i, (cv, spikes, top, cosine) in enumerate(rows)]  # fmt: skip
        history[0]["stability/obj_cv"] = float("nan")  # a window of one step
        (run / "history.json").write_text(json.dumps(history))
    runs = load_runs([tmp_path])
    summary = summarize_runs(runs, ["bbox/AP"], "rpn.head=shared")
    row = summary["table"]["all"]
    assert row["stability/box_cv"][0] == pytest.approx((0.3 + 0.4) / 2)  # per run the mean, then over seeds
    assert row["stability/box_spikes"][0] == pytest.approx((3.0 + 3.0) / 2)  # per run the sum
    assert row["stability/box_max_spike"][0] == pytest.approx((4.0 + 3.0) / 2)  # per run the maximum
    assert row["conflict/cosine"][0] == pytest.approx((0.3 - 0.1) / 2)
    assert "stability/obj_cv" not in row
    text = markdown(summary, runs, ["bbox/AP"], "rpn.head=shared")
    assert "## Stability and gradient conflict" in text and "| arm | stability/box_cv |" in text
