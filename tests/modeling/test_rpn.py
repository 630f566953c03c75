"""FocalLossRPN: the loss, the two-logit head, proposal scoring and the prior init, on tiny inputs."""

import math

import pytest
import torch
import torch.nn.functional as F
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.rpn import RegionProposalNetwork, RPNHead

from fl_rpn import FocalLossRPN, TwoLogitRPNHead
from fl_rpn.events import EventStorage
from fl_rpn.modeling.rpn import use_focal_rpn

CHANNELS = 8
SIZES = ((16,), (32,))
RATIOS = ((0.5, 1.0, 2.0),) * 2
A = 3


def make_rpn(form="softmax", **kwargs):
    head = (TwoLogitRPNHead if form == "softmax" else RPNHead)(CHANNELS, A)
    defaults = dict(
        fg_iou_thresh=0.7, bg_iou_thresh=0.3, pre_nms_top_n=dict(training=200, testing=100),
        post_nms_top_n=dict(training=200, testing=100), nms_thresh=0.7,
    )  # fmt: skip
    defaults.update(kwargs)
    return FocalLossRPN(AnchorGenerator(SIZES, RATIOS), head, form=form, **defaults)


def inputs(num_images=2, boxes=None):
    images = ImageList(torch.rand(num_images, 3, 64, 64), [(64, 64)] * num_images)
    features = {"0": torch.randn(num_images, CHANNELS, 16, 16), "1": torch.randn(num_images, CHANNELS, 8, 8)}
    if boxes is None:
        boxes = [torch.tensor([[4.0, 4.0, 20.0, 24.0], [30.0, 30.0, 62.0, 60.0]])] * num_images
    targets = [{"boxes": b, "labels": torch.ones(len(b), dtype=torch.int64)} for b in boxes]
    return images, features, targets


def random_loss_inputs(form, n=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    c = 2 if form == "softmax" else 1
    objectness = torch.randn(2 * n, c, generator=g, dtype=torch.float64, requires_grad=True)
    deltas = torch.randn(2 * n, 4, generator=g, dtype=torch.float64, requires_grad=True)
    labels = [torch.randint(-1, 2, (n,), generator=g).double() for _ in range(2)]
    targets = [torch.randn(n, 4, generator=g, dtype=torch.float64) for _ in range(2)]
    return objectness, deltas, labels, targets


@pytest.mark.parametrize("form", ["sigmoid", "softmax"])
def test_compute_loss_matches_the_formula(form):
    rpn = make_rpn(form, loss_weight=0.3, alpha=0.4, gamma=1.5)
    objectness, deltas, labels, targets = random_loss_inputs(form)
    loss_obj, loss_box = rpn.compute_loss(objectness, deltas, labels, targets)

    lab, tgt = torch.cat(labels), torch.cat(targets)
    d = objectness[:, 1] - objectness[:, 0] if form == "softmax" else objectness[:, 0]
    p = torch.sigmoid(d)
    p_t = torch.where(lab == 1, p, 1 - p)
    alpha_t = torch.where(lab == 1, 0.4, 0.6)
    fl = -alpha_t * (1 - p_t) ** 1.5 * torch.log(p_t)
    n_pos = (lab == 1).sum()
    torch.testing.assert_close(loss_obj, 0.3 * fl[lab >= 0].sum() / n_pos)
    pos = lab == 1
    box = F.smooth_l1_loss(deltas[pos], tgt[pos], beta=1 / 9, reduction="sum")
    torch.testing.assert_close(loss_box, box / (2 * n_pos))


def test_gamma0_alpha_half_is_half_bce_over_positives():
    rpn = make_rpn("sigmoid", loss_weight=0.1, alpha=0.5, gamma=0.0)
    objectness, deltas, labels, targets = random_loss_inputs("sigmoid")
    loss_obj, _ = rpn.compute_loss(objectness, deltas, labels, targets)
    lab = torch.cat(labels)
    valid = lab >= 0
    bce = F.binary_cross_entropy_with_logits(objectness[valid, 0], lab[valid], reduction="sum")
    torch.testing.assert_close(loss_obj, 0.1 * 0.5 * bce / (lab == 1).sum())


def test_sigmoid_on_d_equals_softmax_on_zero_d():
    objectness, deltas, labels, targets = random_loss_inputs("sigmoid")
    two = torch.cat([torch.zeros_like(objectness), objectness], dim=1)
    sig = make_rpn("sigmoid").compute_loss(objectness, deltas, labels, targets)
    soft = make_rpn("softmax").compute_loss(two, deltas, labels, targets)
    torch.testing.assert_close(sig[0], soft[0])
    torch.testing.assert_close(sig[1], soft[1])


@pytest.mark.parametrize("form", ["sigmoid", "softmax"])
def test_gradients_reach_every_labelled_anchor_and_no_ignored_one(form):
    rpn = make_rpn(form)
    objectness, deltas, labels, targets = random_loss_inputs(form)
    loss_obj, loss_box = rpn.compute_loss(objectness, deltas, labels, targets)
    (loss_obj + loss_box).backward()
    lab = torch.cat(labels)
    grad = objectness.grad.abs().sum(dim=1)
    assert (grad[lab >= 0] > 0).all()
    assert (grad[lab == -1] == 0).all()
    box_grad = deltas.grad.abs().sum(dim=1)
    assert (box_grad[lab != 1] == 0).all() and (box_grad[lab == 1] > 0).any()


def test_wrong_objectness_shape_is_an_error_not_a_wrong_number():
    # torchvision's stock compute_loss flattens [R, 2] into 2R logits and returns a plausible number:
    # the focal RPN must refuse shapes that do not fit its form.
    objectness, deltas, labels, targets = random_loss_inputs("softmax")
    with pytest.raises(ValueError, match=r"expects objectness \(80, 1\)"):
        make_rpn("sigmoid").compute_loss(objectness, deltas, labels, targets)
    with pytest.raises(ValueError, match=r"expects objectness \(80, 2\)"):
        make_rpn("softmax").compute_loss(objectness[:, :1], deltas, labels, targets)


def test_head_channels_must_fit_the_form():
    with pytest.raises(ValueError, match="TwoLogitRPNHead"):
        FocalLossRPN(AnchorGenerator(SIZES, RATIOS), RPNHead(CHANNELS, A), 0.7, 0.3, {}, {}, 0.7, form="softmax")


@pytest.mark.parametrize("form", ["sigmoid", "softmax"])
def test_no_boxes_gives_positive_objectness_and_zero_box_loss(form):
    rpn = make_rpn(form).train()
    images, features, targets = inputs(boxes=[torch.zeros(0, 4)] * 2)
    with EventStorage() as events:
        _, losses = rpn(images, features, targets)
    assert torch.isfinite(losses["loss_objectness"]) and losses["loss_objectness"] > 0
    assert losses["loss_rpn_box_reg"].item() == 0.0
    # all anchors are background: the normaliser is clamped to 1
    assert events.drain()["rpn/focal_normalizer"].item() == 1.0


def test_two_logit_head_channel_order_and_anchor_counts():
    rpn = make_rpn("softmax").eval()
    head = rpn.head
    assert head.cls_logits.out_channels == 2 * A
    with torch.no_grad():  # make channel 2a + c equal 10 * a + c everywhere
        head.cls_logits.weight.zero_()
        head.cls_logits.bias.copy_(torch.tensor([10.0 * a + c for a in range(A) for c in range(2)]))
    images, features, _ = inputs(num_images=1)
    captured = {}
    original = rpn.filter_proposals

    def capture(proposals, objectness, image_shapes, num_anchors_per_level):
        captured.update(objectness=objectness, levels=num_anchors_per_level)
        return original(proposals, objectness, image_shapes, num_anchors_per_level)

    rpn.filter_proposals = capture
    boxes, losses = rpn(images, features)
    assert captured["levels"] == [A * 16 * 16, A * 8 * 8]
    # each anchor's object minus background logit is (10a + 1) - 10a = 1
    torch.testing.assert_close(captured["objectness"], torch.ones(A * (16 * 16 + 8 * 8)))
    assert losses == {} and boxes[0].shape[1] == 4


def test_stock_forward_cannot_handle_two_logits():
    # fact 3 of the design notes: the parent counts 2A anchors per location and crashes
    rpn = make_rpn("softmax").eval()
    images, features, _ = inputs(num_images=1)
    with pytest.raises((IndexError, RuntimeError)):
        RegionProposalNetwork.forward(rpn, images, features)


def test_softmax_proposals_are_scored_with_the_softmax_object_probability():
    rpn = make_rpn("softmax", prior_prob=None).eval()
    images, features, _ = inputs(num_images=1)
    with torch.no_grad():
        cls_maps, _ = rpn.head(list(features.values()))
    from torchvision.models.detection.rpn import concat_box_prediction_layers

    _, deltas = rpn.head(list(features.values()))
    objectness, _ = concat_box_prediction_layers(cls_maps, deltas)
    softmax_prob = objectness.softmax(dim=1)[:, 1]
    scores = {}
    original = rpn.filter_proposals

    def capture(proposals, objectness, image_shapes, num_anchors_per_level):
        out = original(proposals, objectness, image_shapes, num_anchors_per_level)
        scores["logit"] = objectness
        scores["kept"] = out[1][0]
        return out

    rpn.filter_proposals = capture
    rpn(images, features)
    torch.testing.assert_close(torch.sigmoid(scores["logit"]), softmax_prob.detach())
    # the kept scores are a subset of the softmax probabilities, highest first
    assert torch.all(scores["kept"][:-1] >= scores["kept"][1:])
    assert torch.isin(scores["kept"], softmax_prob.detach()).all()


@pytest.mark.parametrize("form", ["sigmoid", "softmax"])
@pytest.mark.parametrize("prior", [0.01, 0.2])
def test_prior_init_gives_initial_object_probability_pi(form, prior):
    rpn = make_rpn(form, prior_prob=prior)
    images, features, _ = inputs()
    cls_maps, deltas = rpn.head(list(features.values()))
    from torchvision.models.detection.rpn import concat_box_prediction_layers

    objectness, _ = concat_box_prediction_layers(cls_maps, deltas)
    from fl_rpn.modeling.losses import objectness_probability

    assert abs(objectness_probability(objectness).mean().item() - prior) < 0.02 * prior + 1e-3
    bias = rpn.head.cls_logits.bias
    if form == "sigmoid":
        torch.testing.assert_close(bias, torch.full_like(bias, -math.log((1 - prior) / prior)))
    else:
        torch.testing.assert_close(bias[1::2] - bias[0::2], torch.full((A,), math.log(prior / (1 - prior))))


def test_prior_none_keeps_zero_bias():
    rpn = make_rpn("softmax", prior_prob=None)
    assert rpn.head.cls_logits.bias.abs().sum() == 0


@pytest.mark.parametrize(
    "kwargs,match",
    [({"gamma": -1.0}, "gamma"), ({"alpha": 1.5}, "alpha"), ({"loss_weight": 0.0}, "loss_weight"),
     ({"prior_prob": 1.0}, "prior_prob"), ({"form": "tanh"}, "form")],
)  # fmt: skip
def test_invalid_arguments_name_the_argument(kwargs, match):
    form = kwargs.pop("form", "softmax")
    with pytest.raises(ValueError, match=match):
        make_rpn("softmax", **kwargs) if form == "softmax" else FocalLossRPN(
            AnchorGenerator(SIZES, RATIOS), RPNHead(CHANNELS, A), 0.7, 0.3, {}, {}, 0.7, form=form
        )


def test_no_sampler_is_used():
    rpn = make_rpn("sigmoid").train()
    assert rpn.fg_bg_sampler is None
    images, features, targets = inputs()
    _, losses = rpn(images, features, targets)
    assert set(losses) == {"loss_objectness", "loss_rpn_box_reg"}


def test_fixed_seed_loss_values():
    # detectron2-style regression guard: exact numbers on a tiny fixed input
    torch.manual_seed(0)
    rpn = make_rpn("softmax").train()
    images, features, targets = inputs()
    with EventStorage() as events:
        _, losses = rpn(images, features, targets)
    stats = {k.removeprefix("rpn/"): v.item() for k, v in events.drain().items()}
    n_pos = stats["focal_normalizer"]
    assert n_pos == 2 * stats["positive_anchors_per_image"] and n_pos >= 4
    # every anchor starts at p = 0.01: positives cost 0.25 * 0.99^2 * -ln 0.01 each, negatives
    # 0.75 * 0.01^2 * -ln 0.99 each, up to the head's small random weights
    num_neg = 2 * stats["negative_anchors_per_image"]
    expected = 0.1 * (n_pos * 0.25 * 0.99**2 * math.log(100) + num_neg * 0.75 * 1e-4 * -math.log(0.99)) / n_pos
    assert losses["loss_objectness"].item() == pytest.approx(expected, rel=0.05)


def test_use_focal_rpn_keeps_torchvision_settings():
    from torchvision.models.detection import fasterrcnn_mobilenet_v3_large_320_fpn, maskrcnn_resnet50_fpn

    for builder in (fasterrcnn_mobilenet_v3_large_320_fpn, maskrcnn_resnet50_fpn):
        model = builder(weights=None, weights_backbone=None, num_classes=3)
        old = model.rpn
        use_focal_rpn(model, form="softmax", gamma=1.0)
        new = model.rpn
        assert isinstance(new, FocalLossRPN) and new.gamma == 1.0
        assert new.anchor_generator is old.anchor_generator
        assert new._pre_nms_top_n == old._pre_nms_top_n and new._post_nms_top_n == old._post_nms_top_n
        assert new.nms_thresh == old.nms_thresh and new.score_thresh == 0.0  # not the replaced RPN's 0.05
        assert new.proposal_matcher.high_threshold == old.proposal_matcher.high_threshold
        assert new.proposal_matcher.low_threshold == old.proposal_matcher.low_threshold
        torch.testing.assert_close(new.head.bbox_pred.weight, old.head.bbox_pred.weight)
        assert new.head.cls_logits.out_channels == 2 * old.head.cls_logits.out_channels
        model.eval()(torch.rand(1, 3, 128, 128))


def test_use_focal_rpn_keeps_the_models_mode():
    from torchvision.models.detection import fasterrcnn_mobilenet_v3_large_320_fpn

    model = fasterrcnn_mobilenet_v3_large_320_fpn(weights=None, weights_backbone=None, num_classes=3).eval()
    use_focal_rpn(model, form="softmax")
    assert not model.rpn.training
    detections = model([torch.rand(3, 96, 96)])  # would need targets if the new RPN were in training mode
    assert set(detections[0]) == {"boxes", "labels", "scores"}


def rpn_builders() -> list[str]:
    """Every builder of ``torchvision.models.detection`` whose model has an RPN (a ``GeneralizedRCNN``)."""
    import inspect

    import torchvision
    from torchvision.models import get_model_builder, list_models
    from torchvision.models.detection.generalized_rcnn import GeneralizedRCNN

    names = list_models(module=torchvision.models.detection)
    returns = {n: inspect.signature(get_model_builder(n)).return_annotation for n in names}
    return [n for n, r in returns.items() if isinstance(r, type) and issubclass(r, GeneralizedRCNN)]


def test_the_rpn_builders_are_the_faster_mask_and_keypoint_rcnn_variants():
    assert sorted(rpn_builders()) == [
        "fasterrcnn_mobilenet_v3_large_320_fpn", "fasterrcnn_mobilenet_v3_large_fpn", "fasterrcnn_resnet50_fpn",
        "fasterrcnn_resnet50_fpn_v2", "keypointrcnn_resnet50_fpn", "maskrcnn_resnet50_fpn", "maskrcnn_resnet50_fpn_v2",
    ]  # fmt: skip


@pytest.mark.parametrize("name", rpn_builders())
def test_use_focal_rpn_gives_proposals_on_every_torchvision_rpn_builder(name, caplog):
    """The MobileNet builders set rpn_score_thresh=0.05, above the 0.01 prior of every anchor: kept, it left
    0 proposals in eval and in training. use_focal_rpn resets it to 0 and logs that it did."""
    from torchvision.models import get_model_builder

    model = get_model_builder(name)(weights=None, weights_backbone=None, num_classes=2, min_size=64, max_size=64)
    replaced = model.rpn.score_thresh
    with caplog.at_level("INFO", logger="fl_rpn.modeling.rpn"):
        use_focal_rpn(model, form="sigmoid")
    assert model.rpn.score_thresh == 0.0
    assert ("score_thresh 0.05 of the replaced RPN is not kept" in caplog.text) == (replaced == 0.05)
    proposals = []
    model.rpn.register_forward_hook(lambda module, args, out: proposals.append([len(b) for b in out[0]]))
    image = torch.rand(3, 64, 64)
    model.eval()([image])
    target = {"boxes": torch.tensor([[8.0, 8.0, 40.0, 48.0]]), "labels": torch.tensor([1])}
    if name.startswith("mask"):
        target["masks"] = torch.zeros(1, 64, 64, dtype=torch.uint8)
        target["masks"][0, 8:48, 8:40] = 1
    if name.startswith("keypoint"):
        target["keypoints"] = torch.tensor([[[20.0, 20.0, 1.0]] * 17])
    losses = model.train()([image], [target])
    assert all(torch.isfinite(v) for v in losses.values())
    assert len(proposals) == 2 and min(proposals[0]) > 0 and min(proposals[1]) > 0, proposals


@pytest.mark.parametrize("form", ["sigmoid", "softmax"])
def test_loss_is_float32_under_bf16_autocast(form):
    # 301 positives: bf16 holds 8 significant bits and would count them as 300
    n, num_pos = 4000, 301
    labels = torch.zeros(n)
    labels[:num_pos] = 1.0
    labels[-100:] = -1.0
    g = torch.Generator().manual_seed(0)
    objectness = torch.randn(n, 2 if form == "softmax" else 1, generator=g)
    deltas, targets = torch.randn(n, 4, generator=g), torch.randn(n, 4, generator=g)
    rpn = make_rpn(form)
    reference = rpn.compute_loss(objectness, deltas, [labels], [targets])
    with torch.autocast("cpu", dtype=torch.bfloat16), EventStorage() as events:
        low = rpn.compute_loss(objectness.bfloat16(), deltas.bfloat16(), [labels], [targets.bfloat16()])
    assert events.drain()["rpn/focal_normalizer"].item() == num_pos
    for got, want in zip(low, reference):
        assert got.dtype == torch.float32
        # only the bf16 rounding of the inputs remains (relative 2^-8 per logit), not of the sum or the count
        assert got.item() == pytest.approx(want.item(), rel=1e-2)


# rpn.box_normalizer. Every prediction is 0 and every target 1, so each positive anchor's smooth L1 (beta 1/9) is
# 4 x (1 - 1/18) = 34/9 and the box-loss sum is 34/9 x (the anchors with a box loss): closed-form values below.
SMOOTH_L1_PER_ANCHOR = 4 * (1 - 0.5 / 9)


def box_case(positives_per_image, negatives_per_image, form="sigmoid"):
    """labels (2 images of 20 anchors) with the given positives and negatives, the rest ignored (-1)."""
    labels = []
    for p, n in zip(positives_per_image, negatives_per_image):
        lab = torch.full((20,), -1.0)
        lab[:p], lab[p : p + n] = 1.0, 0.0
        labels.append(lab)
    objectness = torch.zeros(40, 2 if form == "softmax" else 1)
    return objectness, torch.zeros(40, 4), labels, [torch.ones(20, 4), torch.ones(20, 4)]


def sampled_rpn(cls, batch_size_per_image=8, positive_fraction=0.25):
    return cls(
        AnchorGenerator(SIZES, RATIOS), RPNHead(CHANNELS, A), 0.7, 0.3, batch_size_per_image, positive_fraction,
        dict(training=200, testing=100), dict(training=200, testing=100), 0.7,
    )  # fmt: skip


@pytest.mark.parametrize("form", ["sigmoid", "softmax"])
def test_focal_box_normalizers_closed_form(form):
    """3 + 1 positives in 2 images: positives -> sum / (2 x 4); sampled -> sum / (256 x 2) (and / (8 x 2))."""
    case = box_case([3, 1], [10, 12], form)
    box_sum = 4 * SMOOTH_L1_PER_ANCHOR
    _, loss = make_rpn(form).compute_loss(*case)  # the default is the paper's
    assert loss.item() == pytest.approx(box_sum / 8, rel=1e-6)
    _, loss = make_rpn(form, box_normalizer="sampled").compute_loss(*case)
    assert loss.item() == pytest.approx(box_sum / 512, rel=1e-6)
    _, loss = make_rpn(form, box_normalizer="sampled", batch_size_per_image=8).compute_loss(*case)
    assert loss.item() == pytest.approx(box_sum / 16, rel=1e-6)
    with pytest.raises(ValueError, match="box_normalizer must be one of"):
        make_rpn(form, box_normalizer="anchors")


def test_sampled_box_normalizers_closed_form_and_torchvision_unchanged():
    """batch_size_per_image 8 at 1/4 positives: 2 positives and 6 negatives sampled per image (each image has more
    of both), 16 sampled anchors. torchvision: sum over the 4 sampled positives / 16; BoxPositivesRPN: / (2 x 4);
    with the same sampler draws the objectness losses are equal."""
    from fl_rpn.modeling.rpn import BoxPositivesRPN

    case = box_case([5, 3], [10, 12])
    box_sum = 4 * SMOOTH_L1_PER_ANCHOR
    torch.manual_seed(0)
    obj_tv, box_tv = sampled_rpn(RegionProposalNetwork).compute_loss(*case)
    torch.manual_seed(0)
    obj_pos, box_pos = sampled_rpn(BoxPositivesRPN).compute_loss(*case)
    assert box_tv.item() == pytest.approx(box_sum / 16, rel=1e-6)  # torchvision's own: / sampled_inds.numel()
    assert box_pos.item() == pytest.approx(box_sum / 8, rel=1e-6)
    assert obj_pos.item() == obj_tv.item() == pytest.approx(math.log(2), rel=1e-6)  # BCE of logit 0


def test_rpn_presets_and_their_box_normalizers():
    """rpn=sampled is exactly torchvision's class; the cross arms change the box normaliser only."""
    from fl_rpn.config import compose_config
    from fl_rpn.modeling.model import build_model
    from fl_rpn.modeling.rpn import BoxPositivesRPN

    def rpn(name):
        return build_model(compose_config([f"rpn={name}"]), 3).rpn

    assert type(rpn("sampled")) is RegionProposalNetwork
    boxpos = rpn("sampled_boxpos")
    assert type(boxpos) is BoxPositivesRPN and boxpos.fg_bg_sampler.batch_size_per_image == 256
    assert boxpos.fg_bg_sampler.positive_fraction == 0.5 and boxpos.score_thresh == 0.0
    assert (rpn("focal_softmax").box_normalizer, rpn("focal_sigmoid").box_normalizer) == ("positives", "positives")
    crossed = rpn("focal_softmax_boxsampled")
    assert (crossed.form, crossed.box_normalizer, crossed.box_sample_size) == ("softmax", "sampled", 256)


# rpn.npos_ema: the losses are divided by a bias-corrected moving average of max(1, N_pos), closed-form below
@pytest.mark.parametrize("form", ["sigmoid", "softmax"])
def test_npos_ema_divides_by_the_corrected_average_of_the_counts(form):
    """Counts 4, then 1 (one positive, the other image none), then 0 (clamped to 1), momentum 0.9. The corrected
    averages are 4, (0.9 x 0.1 x 4 + 0.1 x 1) / 0.19 = 0.46 / 0.19 and (0.9 x 0.046 + 0.1 x 1) / 0.271: each step's
    box loss is its sum / (2 x that average), and its objectness loss the plain one's x N_pos / that average."""
    m = 0.9
    plain, averaged = make_rpn(form), make_rpn(form, npos_ema=m)
    expected_averages = [4.0, (m * (1 - m) * 4 + (1 - m) * 1) / (1 - m**2)]
    expected_averages.append((m * (m * (1 - m) * 4 + (1 - m) * 1) + (1 - m) * 1) / (1 - m**3))
    cases = [box_case([3, 1], [10, 12], form), box_case([1, 0], [10, 12], form), box_case([0, 0], [10, 12], form)]
    for (positives, *_), case, average in zip(([4], [1], [0]), cases, expected_averages):
        with EventStorage() as events:
            obj, box = averaged.compute_loss(*case)
        stats = events.drain()
        obj_plain, _ = plain.compute_loss(*case)
        count = max(1, positives)
        assert stats["rpn/focal_normalizer"].item() == count  # the batch's own count, logged beside
        assert stats["rpn/npos_ema"].item() == pytest.approx(average, rel=1e-6)
        assert box.item() == pytest.approx(SMOOTH_L1_PER_ANCHOR * positives / (2 * average), rel=1e-6)
        assert obj.item() == pytest.approx(obj_plain.item() * count / average, rel=1e-6)
    assert averaged.state_dict()["npos_ema_steps"].item() == 3  # the state a checkpoint keeps
    assert "npos_ema_sum" not in plain.state_dict()  # null: the paper's RPN, its state dict unchanged


def test_npos_ema_zero_is_the_batch_count_and_bad_momentum_is_refused():
    case = box_case([3, 1], [10, 12])
    assert make_rpn("sigmoid", npos_ema=0.0).compute_loss(*case)[1].item() == pytest.approx(
        make_rpn("sigmoid").compute_loss(*case)[1].item(), rel=1e-7
    )
    for bad in (1.0, -0.1):
        with pytest.raises(ValueError, match="npos_ema must be in"):
            make_rpn("sigmoid", npos_ema=bad)


def test_npos_ema_resumes_from_the_state_dict():
    """Two steps then a reload into a fresh RPN equals three steps in one: the average lives in the state dict."""
    cases = [box_case(p, [10, 12], "softmax") for p in ([3, 1], [1, 0], [2, 2])]
    whole = make_rpn("softmax", npos_ema=0.9)
    losses = [whole.compute_loss(*c)[1].item() for c in cases]
    first = make_rpn("softmax", npos_ema=0.9)
    for c in cases[:2]:
        first.compute_loss(*c)
    resumed = make_rpn("softmax", npos_ema=0.9)
    resumed.load_state_dict(first.state_dict())
    assert resumed.compute_loss(*cases[2])[1].item() == losses[2]
