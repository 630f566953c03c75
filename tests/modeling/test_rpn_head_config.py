"""rpn.head and stability through the config: the head each config word builds, its checks, and the monitor's keys
in a run's history."""

import json

import pytest
from torchvision.models.detection.rpn import RegionProposalNetwork, RPNHead

from fl_rpn import FocalLossRPN, TwoLogitRPNHead, build_model
from fl_rpn.engine.trainer import train
from fl_rpn.engine.validate import validate_config
from fl_rpn.export import export_torchvision
from fl_rpn.modeling.rpn_heads import DecoupledRPNHead, SharedRPNHead, count_parameters, head_parameters

from ..conftest import FAST


@pytest.mark.parametrize("rpn, form, cls", [("sampled", "sigmoid", RPNHead), ("focal_sigmoid", "sigmoid", RPNHead),
                                            ("focal_softmax", "softmax", TwoLogitRPNHead)])  # fmt: skip
def test_the_default_head_is_the_one_the_rpn_builds(compose_cfg, rpn, form, cls):
    model = build_model(compose_cfg(f"rpn={rpn}"), num_classes=3)
    assert type(model.rpn.head) is cls
    if rpn == "sampled":
        assert type(model.rpn) is RegionProposalNetwork


@pytest.mark.parametrize(
    "rpn, form", [("sampled", "sigmoid"), ("focal_sigmoid", "sigmoid"), ("focal_softmax", "softmax")]
)
def test_rpn_head_decoupled_in_every_form(compose_cfg, rpn, form):
    cfg = compose_cfg(f"rpn={rpn}", "rpn.head.kind=decoupled", "rpn.head.num_convs=2", "rpn.head.norm=group")
    model = build_model(cfg, num_classes=3)
    head = model.rpn.head
    assert isinstance(head, DecoupledRPNHead) and len(head.cls_tower) == len(head.box_tower) == 2
    c, a = model.backbone.out_channels, 3
    assert count_parameters(head) == head_parameters("decoupled", c, a, form, num_convs=2, norm="group")
    assert head.cls_logits.out_channels == a * (2 if form == "softmax" else 1)
    if rpn == "sampled":  # torchvision's own RPN, its head swapped: BCE on one logit, torchvision's init
        assert type(model.rpn) is RegionProposalNetwork and float(head.cls_logits.bias.detach().abs().max()) == 0.0
    else:  # the prior init: p = 0.01 for every anchor at the start
        assert isinstance(model.rpn, FocalLossRPN)
        bias = head.cls_logits.bias
        logit = bias if form == "sigmoid" else bias[1::2] - bias[0::2]
        assert logit.detach().sigmoid().tolist() == pytest.approx([0.01] * a, rel=1e-5)


def test_rpn_head_shared_matched_is_the_control_of_the_decoupled_head(compose_cfg):
    decoupled = build_model(compose_cfg("rpn.head.kind=decoupled", "rpn.head.num_convs=2"), num_classes=3).rpn.head
    matched = build_model(compose_cfg("rpn.head.kind=shared_matched", "rpn.head.num_convs=2"), num_classes=3).rpn.head
    deeper = build_model(
        compose_cfg("rpn.head.kind=shared_matched", "rpn.head.num_convs=2", "rpn.head.vary=depth"), num_classes=3
    ).rpn.head
    assert type(matched) is SharedRPNHead and type(deeper) is SharedRPNHead
    assert count_parameters(matched) == pytest.approx(count_parameters(decoupled), rel=0.005)
    assert len(deeper.conv) == 4 and count_parameters(deeper) == pytest.approx(count_parameters(decoupled), rel=0.01)


@pytest.mark.parametrize("override, message", [
    ("rpn.head.kind=split", "config key rpn.head.kind='split': must be 'shared' or 'decoupled' or 'shared_matched'"),
    ("rpn.head.num_convs=5", "config key rpn.head.num_convs=5: must be 1 to 4"),
    ("rpn.head.num_convs=0", "config key rpn.head.num_convs=0"),
    ("rpn.head.norm=batch", "config key rpn.head.norm='batch': must be null or 'group'"),
    ("rpn.head.width=48", None),  # fine without a norm
    ("stability.spike_k=1", "config key stability.spike_k=1: must be a number > 1"),
    ("stability.probe_every=10", "config key stability.probe_every=10: needs stability.enabled=true"),
])  # fmt: skip
def test_bad_head_and_stability_values_are_named(compose_cfg, override, message):
    cfg = compose_cfg(override)
    if message is None:
        validate_config(cfg)
        return
    with pytest.raises(ValueError) as err:
        validate_config(cfg)
    assert str(err.value).startswith(message)


def test_group_norm_needs_a_width_of_32s(compose_cfg):
    with pytest.raises(ValueError, match=r"config key rpn.head.width=48: must be a multiple of 32"):
        validate_config(compose_cfg("rpn.head.norm=group", "rpn.head.width=48"))


def test_only_the_default_head_exports_to_torchvision(compose_cfg):
    model = build_model(compose_cfg("rpn.head.kind=decoupled"), num_classes=3)
    with pytest.raises(ValueError, match="has no torchvision RPNHead form; only the default rpn.head exports"):
        export_torchvision(model)


def test_a_run_with_stability_on_logs_its_keys_and_rpn_head_decoupled_trains(tmp_path, cache):
    overrides = [*FAST, "rpn.head.kind=decoupled", "stability.enabled=true", "stability.probe_every=1",
                 "schedule.max_iters=2", "schedule.log_every=2", f"output_dir={tmp_path}"]  # fmt: skip
    from fl_rpn.config import compose_config

    train(compose_config(overrides))
    (entry,) = json.loads((tmp_path / "history.json").read_text())
    for t in ("box", "obj"):
        assert {f"stability/{t}_cv", f"stability/{t}_spikes", f"stability/{t}_max_spike"} <= set(entry)
    # the decoupled head shares only the backbone + FPN: its head group is empty
    assert -1 <= entry["conflict/cosine"] <= 1 and entry["conflict/norm_ratio"] > 0
    assert entry["conflict/cosine"] == pytest.approx(entry["conflict/backbone_cosine"])
