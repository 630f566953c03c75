"""RPN heads: shapes, the decoupled head's separation of the two losses, the matched control's parameter count,
the prior init and the swap on torchvision detectors."""

import math

import pytest
import torch
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.rpn import RegionProposalNetwork, RPNHead

from fl_rpn import FocalLossRPN, TwoLogitRPNHead, build_model
from fl_rpn.engine.optim import clip_grad_norm_
from fl_rpn.modeling.rpn import use_focal_rpn
from fl_rpn.modeling.rpn_heads import (
    DecoupledRPNHead,
    SharedRPNHead,
    build_rpn_head,
    count_parameters,
    head_parameters,
    match_parameters,
    replace_rpn_head,
)

C, A = 32, 3
LEVELS = [(16, 16), (8, 8)]
MATCH_TOLERANCE = {None: 0.005, "group": 0.07}  # relative; with GroupNorm the width moves in steps of 32


def features(num_images=2, requires_grad=False):
    return [torch.randn(num_images, C, h, w, requires_grad=requires_grad) for h, w in LEVELS]


@pytest.mark.parametrize("form, k", [("sigmoid", 1), ("softmax", 2)])
@pytest.mark.parametrize("kind", ["shared", "decoupled", "shared_matched"])
@pytest.mark.parametrize("norm", [None, "group"])
def test_output_shapes(form, k, kind, norm):
    head = build_rpn_head(kind, C, A, form, num_convs=2, width=64, norm=norm)
    logits, deltas = head(features())
    assert [tuple(t.shape) for t in logits] == [(2, k * A, h, w) for h, w in LEVELS]
    assert [tuple(t.shape) for t in deltas] == [(2, 4 * A, h, w) for h, w in LEVELS]


def test_the_default_shared_head_is_torchvisions():
    for form, reference in (("sigmoid", RPNHead(C, A)), ("softmax", TwoLogitRPNHead(C, A))):
        head = SharedRPNHead(C, A, form=form)
        assert {k: v.shape for k, v in head.state_dict().items()} == {
            k: v.shape for k, v in reference.state_dict().items()
        }
        head.load_state_dict(reference.state_dict())
        x = features()
        for ours, theirs in zip(head(x), reference(x)):
            for a, b in zip(ours, theirs):
                torch.testing.assert_close(a, b)


def test_the_softmax_layout_is_anchor_major_background_then_object():
    head = DecoupledRPNHead(C, A, form="softmax")
    with torch.no_grad():  # channel 2a + c equals 10 a + c everywhere
        head.cls_logits.weight.zero_()
        head.cls_logits.bias.copy_(torch.tensor([10.0 * a + c for a in range(A) for c in range(2)]))
    logits, _ = head(features(num_images=1))
    assert logits[0][0, :, 0, 0].tolist() == [0.0, 1.0, 10.0, 11.0, 20.0, 21.0]


@pytest.mark.parametrize("kind", ["shared", "decoupled"])
@pytest.mark.parametrize("norm", [None, "group"])
@pytest.mark.parametrize("num_convs, width", [(1, None), (3, 64)])
def test_the_counted_parameters_are_the_modules(kind, norm, num_convs, width):
    for form in ("sigmoid", "softmax"):
        head = build_rpn_head(kind, C, A, form, num_convs=num_convs, width=width, norm=norm)
        assert count_parameters(head) == head_parameters(kind, C, A, form, num_convs=num_convs, width=width, norm=norm)


@pytest.mark.parametrize("form", ["sigmoid", "softmax"])
@pytest.mark.parametrize("norm", [None, "group"])
@pytest.mark.parametrize("num_convs", [1, 2, 3, 4])
def test_the_matched_shared_head_has_the_decoupled_heads_parameter_count(form, norm, num_convs):
    """The ResNet-50 FPN head (C = 256, A = 3): widened within MATCH_TOLERANCE, deepened exactly."""
    target = head_parameters("decoupled", 256, 3, form, num_convs=num_convs, norm=norm)
    wide = match_parameters(256, 3, form, num_convs=num_convs, norm=norm, vary="width")
    assert wide["num_convs"] == num_convs and wide["width"] > 256 and wide["norm"] == norm
    wide_count = head_parameters("shared", 256, 3, form, **wide)
    assert abs(wide_count - target) <= MATCH_TOLERANCE[norm] * target
    deep = match_parameters(256, 3, form, num_convs=num_convs, norm=norm, vary="depth")
    assert deep == {"num_convs": 2 * num_convs, "width": 256, "norm": norm}  # two towers of n convs: 2n shared
    assert head_parameters("shared", 256, 3, form, **deep) == target


def test_build_shared_matched_builds_the_matched_head():
    head = build_rpn_head("shared_matched", C, A, "softmax", num_convs=2, width=64, norm="group")
    target = count_parameters(DecoupledRPNHead(C, A, form="softmax", num_convs=2, width=64, norm="group"))
    assert isinstance(head, SharedRPNHead) and abs(count_parameters(head) - target) <= 0.07 * target


def test_invalid_options_are_named():
    with pytest.raises(ValueError, match="num_convs"):
        DecoupledRPNHead(C, A, num_convs=0)
    with pytest.raises(ValueError, match="divisible by 32"):
        DecoupledRPNHead(C, A, width=48, norm="group")
    with pytest.raises(ValueError, match="norm"):
        SharedRPNHead(C, A, norm="batch")
    with pytest.raises(ValueError, match="rpn head must be one of"):
        build_rpn_head("separate", C, A, "sigmoid")


def make_rpn(kind, form, **opts):
    """A FocalLossRPN (or torchvision's sampled RPN when ``form`` is ``"sampled"``) with a ``kind`` head."""
    common = dict(
        fg_iou_thresh=0.7, bg_iou_thresh=0.3, pre_nms_top_n=dict(training=200, testing=100),
        post_nms_top_n=dict(training=200, testing=100), nms_thresh=0.7,
    )  # fmt: skip
    anchors = AnchorGenerator(((16,), (32,)), ((0.5, 1.0, 2.0),) * 2)
    if form == "sampled":
        head = build_rpn_head(kind, C, A, "sigmoid", **opts)
        return RegionProposalNetwork(anchors, head, batch_size_per_image=256, positive_fraction=0.5, **common)
    return FocalLossRPN(anchors, build_rpn_head(kind, C, A, form, **opts), form=form, **common)


def rpn_losses(rpn, feats):
    images = ImageList(torch.rand(2, 3, 64, 64), [(64, 64)] * 2)
    boxes = torch.tensor([[4.0, 4.0, 20.0, 24.0], [30.0, 30.0, 62.0, 60.0]])
    targets = [{"boxes": boxes, "labels": torch.ones(2, dtype=torch.int64)}] * 2
    _, losses = rpn.train()(images, dict(zip("01", feats)), targets)
    return losses["loss_objectness"], losses["loss_rpn_box_reg"]


def grads(loss, params):
    return torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True, materialize_grads=True)


@pytest.mark.parametrize("form", ["sigmoid", "softmax", "sampled"])
@pytest.mark.parametrize("norm", [None, "group"])
def test_in_the_decoupled_head_each_loss_reaches_only_its_own_tower(form, norm):
    rpn = make_rpn("decoupled", form, num_convs=2, width=32, norm=norm)
    head = rpn.head
    cls_params = [*head.cls_tower.parameters(), *head.cls_logits.parameters()]
    box_params = [*head.box_tower.parameters(), *head.bbox_pred.parameters()]
    feats = features(requires_grad=True)
    loss_obj, loss_box = rpn_losses(rpn, feats)
    assert loss_box > 0
    assert all(torch.equal(g, torch.zeros_like(g)) for g in grads(loss_obj, box_params))
    assert all(torch.equal(g, torch.zeros_like(g)) for g in grads(loss_box, cls_params))
    # each loss does reach its own tower and the shared features below
    assert all(g.abs().sum() > 0 for g in grads(loss_obj, [head.cls_tower[0][0].weight, *feats]))
    assert all(g.abs().sum() > 0 for g in grads(loss_box, [head.box_tower[0][0].weight, *feats]))


def test_in_the_shared_head_both_losses_reach_the_tower():
    rpn = make_rpn("shared", "softmax")
    loss_obj, loss_box = rpn_losses(rpn, features())
    tower = rpn.head.conv[0][0].weight
    assert grads(loss_obj, [tower])[0].abs().sum() > 0 and grads(loss_box, [tower])[0].abs().sum() > 0


def tiny_model(compose_cfg, rpn):
    return build_model(compose_cfg("model=tiny_fpn", f"rpn={rpn}"), num_classes=3)


@pytest.mark.parametrize("kind", ["shared", "decoupled", "shared_matched"])
@pytest.mark.parametrize("rpn, form", [("focal_sigmoid", "sigmoid"), ("focal_softmax", "softmax")])
@pytest.mark.parametrize("prior", [0.01, 0.2])
def test_replace_keeps_the_prior_init(compose_cfg, kind, rpn, form, prior):
    model = tiny_model(compose_cfg, rpn)
    head = replace_rpn_head(model, kind, form, prior, num_convs=2, width=64, norm="group")
    assert model.rpn.head is head
    bias = head.cls_logits.bias
    if form == "sigmoid":
        torch.testing.assert_close(bias, torch.full_like(bias, -math.log((1 - prior) / prior)))
    else:  # init_objectness_prior's layout: background 0, object log(pi / (1 - pi))
        torch.testing.assert_close(bias[0::2], torch.zeros(A))
        torch.testing.assert_close(bias[1::2], torch.full((A,), math.log(prior / (1 - prior))))


def test_replace_on_the_sampled_rpn_keeps_torchvisions_init(compose_cfg):
    model = tiny_model(compose_cfg, "sampled")
    head = replace_rpn_head(model, "decoupled", "sigmoid", None, num_convs=2)
    assert type(model.rpn) is RegionProposalNetwork and isinstance(head, DecoupledRPNHead)
    for conv in (head.cls_logits, head.bbox_pred, head.cls_tower[0][0], head.box_tower[1][0]):
        assert conv.bias.abs().sum() == 0 and abs(conv.weight.std().item() - 0.01) < 0.002
    with pytest.raises(ValueError, match="needs 'sigmoid'"):
        replace_rpn_head(model, "decoupled", "softmax", None)
    with pytest.raises(ValueError, match="needs 'softmax'"):
        replace_rpn_head(tiny_model(compose_cfg, "focal_softmax"), "decoupled", "sigmoid", 0.01)


@pytest.mark.parametrize("rpn", ["sampled", "sampled_boxpos", "focal_sigmoid", "focal_softmax"])
def test_the_decoupled_head_trains_in_every_rpn_form(compose_cfg, rpn):
    model = tiny_model(compose_cfg, rpn)
    form = model.rpn.form if isinstance(model.rpn, FocalLossRPN) else "sigmoid"
    replace_rpn_head(model, "decoupled", form, 0.01 if rpn.startswith("focal") else None, num_convs=2, norm="group")
    target = {"boxes": torch.tensor([[8.0, 8.0, 60.0, 80.0]]), "labels": torch.tensor([1])}
    losses = model.train()([torch.rand(3, 96, 128)], [target])
    sum(losses.values()).backward()
    assert all(torch.isfinite(v) for v in losses.values())
    assert all(p.grad is not None for p in model.rpn.head.parameters())


def test_use_focal_rpn_keeps_its_head_by_default():
    from torchvision.models.detection import fasterrcnn_mobilenet_v3_large_320_fpn

    model = fasterrcnn_mobilenet_v3_large_320_fpn(weights=None, weights_backbone=None, num_classes=3)
    use_focal_rpn(model, form="softmax", head="shared")
    assert type(model.rpn.head) is TwoLogitRPNHead


def test_use_focal_rpn_decoupled_on_mask_rcnn_trains_one_step():
    from torchvision.models.detection import maskrcnn_resnet50_fpn

    model = maskrcnn_resnet50_fpn(weights=None, weights_backbone=None, num_classes=3, min_size=64, max_size=64)
    use_focal_rpn(model, form="softmax", head="decoupled", head_options={"num_convs": 2, "norm": "group"})
    head = model.rpn.head
    assert isinstance(head, DecoupledRPNHead) and len(head.cls_tower) == 2 and model.rpn.training
    assert head.cls_logits.out_channels == 2 * A and model.rpn.form == "softmax"
    before = head.box_tower[0][0].weight.detach().clone()
    image = torch.rand(3, 64, 64)
    target = {"boxes": torch.tensor([[8.0, 8.0, 40.0, 48.0]]), "labels": torch.tensor([1]),
              "masks": torch.zeros(1, 64, 64, dtype=torch.uint8)}  # fmt: skip
    target["masks"][0, 8:48, 8:40] = 1
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    losses = model([image], [target])
    assert {"loss_objectness", "loss_rpn_box_reg", "loss_mask"} <= set(losses)
    assert all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    assert torch.isfinite(clip_grad_norm_(model, 10.0))
    optimizer.step()
    assert not torch.equal(head.box_tower[0][0].weight, before)
