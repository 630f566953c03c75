"""Export to plain torchvision: the same proposals and detections as the fl_rpn model, eager, TorchScript and ONNX."""

import json

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from torch import nn
from torchvision.models.detection import FasterRCNN, MaskRCNN, fasterrcnn_resnet50_fpn, maskrcnn_resnet50_fpn
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.rpn import RegionProposalNetwork, RPNHead

from fl_rpn import export_torchvision, use_focal_rpn
from fl_rpn.engine.checkpoint import save_checkpoint
from fl_rpn.engine.evaluate import predict
from fl_rpn.export import export_checkpoint, fold_objectness, torchvision_settings
from fl_rpn.modeling.model import build_backbone, build_model
from fl_rpn.modeling.rpn import FocalLossRPN

SMALL = ["model.detector.min_size=128", "model.detector.max_size=160"]
NUM_CLASSES = 3


def random_model(compose_cfg, *overrides):
    """A tiny randomly initialised detector in eval mode whose objectness logits are spread (std 0.3), so that
    proposals are ranked by the weights rather than by ties of the prior init."""
    cfg = compose_cfg(*SMALL, *overrides)
    model = build_model(cfg, num_classes=NUM_CLASSES).eval()
    with torch.no_grad():
        nn.init.normal_(model.rpn.head.cls_logits.weight, std=0.3)
        nn.init.normal_(model.rpn.head.cls_logits.bias, std=0.3)
    return cfg, model


def random_images(seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.rand(3, 120, 160, generator=g), torch.rand(3, 128, 100, generator=g)]


def write_checkpoint(tmp_path, cfg, model):
    """``tmp_path/last.pt`` as ``fl-rpn-train`` writes it, as far as ``model_from_checkpoint`` reads it."""
    config = {k: OmegaConf.to_container(cfg[k], resolve=True) for k in ("model", "rpn")}
    path = tmp_path / "last.pt"
    save_checkpoint(path, {"model": model.state_dict(), "config": config, "meta": {"class_names": ["a", "b", "c"]}})
    return path


def assert_same_detections(a, b, box_atol=1e-4, score_atol=1e-5):
    """``a``, ``b``: per image dicts of ``boxes`` [D, 4], ``scores`` [D], ``labels`` [D]. The same detections as
    sets: each of ``a`` has one in ``b`` (and back) with the same label, the score within ``score_atol`` and every
    box coordinate within ``box_atol`` pixels; near-equal scores may come in either order (NMS order). Returns the
    largest differences of the matched pairs."""
    worst = {"boxes": 0.0, "scores": 0.0}
    for x, y in zip(a, b, strict=True):
        assert len(x["boxes"]) > 0 and len(x["boxes"]) == len(y["boxes"])
        box = (x["boxes"][:, None] - y["boxes"][None]).abs().amax(-1)  # [D, D]
        score = (x["scores"][:, None] - y["scores"][None]).abs()
        close = (x["labels"][:, None] == y["labels"][None]) & (box <= box_atol) & (score <= score_atol)
        assert close.any(1).all() and close.any(0).all(), f"{int((~close.any(1)).sum())} detections unmatched"
        match = torch.where(close, box, torch.inf).argmin(1)
        rows = torch.arange(len(match))
        worst["boxes"] = max(worst["boxes"], box[rows, match].max().item())
        worst["scores"] = max(worst["scores"], score[rows, match].max().item())
    return worst


def assert_same_proposals(a, b):
    """The same ``[P, 4]`` proposal set per image, and in the same order except for swaps of near ties: the
    folded logit ``(w_obj - w_bg) x`` differs from ``w_obj x - w_bg x`` by float rounding (~1e-7)."""
    for x, y in zip(a, b, strict=True):
        p, q = x["proposals"], y["proposals"]
        assert p.shape == q.shape and len(p) > 100

        def rows_sorted(t):
            return t[torch.from_numpy(np.lexsort(t.T.numpy()[::-1].copy()))]

        torch.testing.assert_close(rows_sorted(p), rows_sorted(q), rtol=0, atol=1e-4)
        assert ((p - q).abs().max(1).values > 1e-4).float().mean() <= 0.01  # at most 1 % of the ranks swapped


def test_fold_objectness_gives_the_object_minus_background_logit():
    two_logit = nn.Conv2d(8, 2 * 3, kernel_size=1)  # anchor-major: a0 bg, a0 obj, a1 bg, ...
    x = torch.randn(2, 8, 5, 7)
    z = two_logit(x)
    folded = fold_objectness(two_logit)
    assert folded.out_channels == 3
    torch.testing.assert_close(folded(x), z[:, 1::2] - z[:, 0::2], rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="even number of channels, got 5"):
        fold_objectness(nn.Conv2d(8, 5, kernel_size=1))


@pytest.mark.parametrize("rpn", ["focal_softmax", "focal_sigmoid"])
def test_exported_model_gives_the_same_proposals_and_detections_eager_and_scripted(compose_cfg, rpn):
    cfg, model = random_model(compose_cfg, f"rpn={rpn}")
    exported = export_torchvision(model)
    assert type(exported) is FasterRCNN and type(exported.rpn) is RegionProposalNetwork
    assert type(exported.rpn.head) is RPNHead and exported.rpn.head.cls_logits.out_channels == 3  # A = 3 anchors
    assert isinstance(model.rpn, FocalLossRPN)  # the original is left as it was
    images = random_images()
    ours, theirs = predict(model, images), predict(exported, images)
    assert_same_detections(ours, theirs)
    assert_same_proposals(ours, theirs)
    if rpn == "focal_sigmoid":  # the head is torchvision's already, the same operations in the same order
        for x, y in zip(ours, theirs):
            assert all(torch.equal(x[k], y[k]) for k in ("boxes", "scores", "labels", "proposals"))

    scripted = torch.jit.script(exported)
    with torch.no_grad():
        _, detections = scripted(images)  # a scripted GeneralizedRCNN returns (losses, detections)
    assert_same_detections(theirs, detections)

    # the state dict loads into torchvision's own constructor, given the backbone, num_classes and the anchors
    settings = json.loads(json.dumps(torchvision_settings(exported)))  # what model.json holds
    assert settings["num_classes"] == NUM_CLASSES + 1 and settings["anchor_sizes"] == [[12], [24], [48], [96], [192]]
    backbone = build_backbone(cfg.model)
    rebuilt = FasterRCNN(
        backbone,
        rpn_anchor_generator=AnchorGenerator(
            tuple(map(tuple, settings["anchor_sizes"])), tuple(map(tuple, settings["aspect_ratios"]))
        ),
        box_head=TwoMLPHead(backbone.out_channels * 7**2, settings["box_head_dim"]),
        box_predictor=FastRCNNPredictor(settings["box_head_dim"], settings["num_classes"]),
        **settings["kwargs"],
    )
    rebuilt.load_state_dict(exported.state_dict())
    assert_same_detections(theirs, predict(rebuilt.eval(), images), box_atol=0, score_atol=0)


def test_r50_export_rebuilds_with_torchvisions_builder_alone(compose_cfg, tmp_path):
    """The README's deployment recipe: ``fasterrcnn_resnet50_fpn`` + model.json + model.pt, no fl_rpn class."""
    cfg, model = random_model(compose_cfg, "model=r50_fpn", "rpn=focal_softmax")
    path = export_checkpoint(write_checkpoint(tmp_path, cfg, model), "torchvision", tmp_path / "deploy")

    spec = json.loads((tmp_path / "deploy" / "model.json").read_text())
    assert spec["torchvision_builder"] == "fasterrcnn_resnet50_fpn" and spec["class_names"] == ["a", "b", "c"]
    anchors = AnchorGenerator(tuple(map(tuple, spec["anchor_sizes"])), tuple(map(tuple, spec["aspect_ratios"])))
    deployed = fasterrcnn_resnet50_fpn(
        weights=None, weights_backbone=None, num_classes=spec["num_classes"], rpn_anchor_generator=anchors,
        **spec["kwargs"],
    )  # fmt: skip
    deployed.load_state_dict(torch.load(path, weights_only=True))
    images = random_images(1)
    ours, theirs = predict(model, images), predict(deployed.eval(), images)
    assert_same_detections(ours, theirs)
    assert_same_proposals(ours, theirs)


def test_onnx_export_runs_and_onnxruntime_gives_the_same_detections(compose_cfg, tmp_path):
    """Traced at 120 x 160, run by onnxruntime at that size and another: the same detections within 1e-3 pixels
    and 1e-4 in score (measured: 3e-5 and 1e-6)."""
    onnx = pytest.importorskip("onnx")
    cfg, model = random_model(compose_cfg, "rpn=focal_softmax")
    path = export_checkpoint(write_checkpoint(tmp_path, cfg, model), "onnx", tmp_path / "deploy", 17, (120, 160))
    assert onnx.load(str(path)).opset_import[0].version == 17
    assert json.loads((tmp_path / "deploy" / "model.json").read_text())["format"] == "onnx"
    ort = pytest.importorskip("onnxruntime")
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    exported = export_torchvision(model)
    for image in random_images(2):
        boxes, labels, scores = session.run(None, {"image": image.numpy()})
        (expected,) = predict(exported, [image])  # one image at a time: a batch pads the smaller image
        got = {"boxes": torch.from_numpy(boxes), "labels": torch.from_numpy(labels), "scores": torch.from_numpy(scores)}
        assert_same_detections([expected], [got], box_atol=1e-3, score_atol=1e-4)


def test_any_generalized_rcnn_through_use_focal_rpn_exports(compose_cfg):
    """Mask R-CNN with the softmax focal RPN: still a ``MaskRCNN``, with torchvision's RPN, the same detections."""
    small = {"min_size": 128, "max_size": 160, "box_detections_per_img": 10, "rpn_post_nms_top_n_test": 200}
    model = maskrcnn_resnet50_fpn(weights=None, weights_backbone=None, num_classes=3, **small)
    model = use_focal_rpn(model, form="softmax").eval()
    with torch.no_grad():
        nn.init.normal_(model.rpn.head.cls_logits.weight, std=0.3)
    exported = export_torchvision(model)
    assert type(exported) is MaskRCNN and type(exported.rpn) is RegionProposalNetwork
    images = random_images(3)[:1]
    ours, theirs = predict(model, images), predict(exported, images)
    assert_same_detections(ours, theirs)
    assert_same_proposals(ours, theirs)


def test_export_refuses_what_it_cannot_convert():
    with pytest.raises(TypeError, match="expects a torchvision GeneralizedRCNN, got Linear"):
        export_torchvision(nn.Linear(2, 2))
