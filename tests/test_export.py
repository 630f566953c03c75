"""Export to plain torchvision: the same proposals and detections as the fl_rpn model, eager, torch.export (pt2),
TorchScript and ONNX; the deployment recipe of docs/deploying.md runs on exported files."""

import json
import re

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
from fl_rpn.config import CONF_DIR
from fl_rpn.engine.checkpoint import save_checkpoint
from fl_rpn.engine.evaluate import predict
from fl_rpn.export import export_checkpoint, fold_objectness, torchvision_settings
from fl_rpn.modeling.model import build_backbone, build_model
from fl_rpn.modeling.rpn import FocalLossRPN
from fl_rpn.pt2 import export_program

from .conftest import run_app, write_image

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


def assert_same_proposals(a, b, atol=1e-4):
    """The same ``[P, 4]`` proposal set per image (to ``atol`` pixels), and in the same order except for swaps of
    near ties: the folded logit ``(w_obj - w_bg) x`` differs from ``w_obj x - w_bg x`` by float rounding (~1e-7)."""
    for x, y in zip(a, b, strict=True):
        p, q = x["proposals"], y["proposals"]
        assert p.shape == q.shape and len(p) > 100

        def rows_sorted(t):
            return t[torch.from_numpy(np.lexsort(t.T.numpy()[::-1].copy()))]

        torch.testing.assert_close(rows_sorted(p), rows_sorted(q), rtol=0, atol=atol)
        assert ((p - q).abs().max(1).values > atol).float().mean() <= 0.01  # at most 1 % of the ranks swapped


def test_fold_objectness_gives_the_object_minus_background_logit():
    two_logit = nn.Conv2d(8, 2 * 3, kernel_size=1)  # anchor-major: a0 bg, a0 obj, a1 bg, ...
    x = torch.randn(2, 8, 5, 7)
    z = two_logit(x)
    folded = fold_objectness(two_logit)
    assert folded.out_channels == 3
    torch.testing.assert_close(folded(x), z[:, 1::2] - z[:, 0::2], rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="even number of channels, got 5"):
        fold_objectness(nn.Conv2d(8, 5, kernel_size=1))


def test_the_box_normaliser_control_arm_exports_as_torchvisions_own_rpn(compose_cfg):
    """rpn=sampled_boxpos (``BoxPositivesRPN``) differs from torchvision's RPN in its training loss only: it exports
    as torchvision's class with the same parts and sampler, and predicts exactly the same."""
    _, model = random_model(compose_cfg, "rpn=sampled_boxpos")
    exported = export_torchvision(model)
    assert type(exported.rpn) is RegionProposalNetwork and exported.rpn.fg_bg_sampler.batch_size_per_image == 256
    images = random_images()
    for x, y in zip(predict(model, images), predict(exported, images)):
        assert all(torch.equal(x[k], y[k]) for k in ("boxes", "scores", "labels", "proposals"))


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
    """The deployment recipe (docs/deploying.md): ``fasterrcnn_resnet50_fpn`` + model.json + model.pt, no fl_rpn
    class."""
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


def calibrated_mbv2(compose_cfg, *overrides):
    """``random_model`` with ``model=mbv2_fpn`` whose BatchNorm statistics are those of one batch of random images:
    with the init's (mean 0, variance 1) the deep random backbone gives near-constant features, hence near-tied
    detection scores whose order at the 100-detection cut float rounding decides."""
    cfg, model = random_model(compose_cfg, "model=mbv2_fpn", *overrides)
    norms = [m for m in model.backbone.modules() if isinstance(m, nn.BatchNorm2d)]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # a cumulative average: after one batch, that batch's statistics
    with torch.no_grad():
        model.backbone.train()(torch.rand(4, 3, 128, 160, generator=torch.Generator().manual_seed(9)))
    for m in norms:
        m.momentum = 0.1
    return cfg, model.eval()


STRIDE_16 = ["model.returned_layers=[3,4,5]", "model.anchor_sizes=[[16,32],[64,96],[128,192],[256,384]]"]


@pytest.mark.parametrize("levels", [[], STRIDE_16])
def test_mbv2_export_rebuilds_with_mobilenet_backbone_and_fasterrcnn(compose_cfg, tmp_path, levels):
    """torchvision has no mbv2 detector builder: model.json names ``mobilenet_backbone``'s arguments, and
    ``FasterRCNN`` + those + model.json's settings load model.pt (docs/deploying.md), no fl_rpn class; with
    torchvision's two stride-32 stages and with a stride-16 stage added (``model.returned_layers``)."""
    from torchvision.models.detection import backbone_utils

    cfg, model = calibrated_mbv2(compose_cfg, "rpn=focal_softmax", "model.box_head_dim=256", *levels)
    strides = [round(128 / f.shape[-2]) for f in model.backbone(torch.zeros(1, 3, 128, 128)).values()]
    assert strides == ([16, 32, 32, 64] if levels else [32, 32, 64])
    path = export_checkpoint(write_checkpoint(tmp_path, cfg, model), "torchvision", tmp_path / "deploy")

    spec = json.loads((tmp_path / "deploy" / "model.json").read_text())
    assert spec["torchvision_builder"] == "FasterRCNN" and spec["box_head_dim"] == 256
    module, builder = spec["torchvision_backbone"]["builder"].rsplit(".", 1)
    assert module == "torchvision.models.detection.backbone_utils"
    backbone = getattr(backbone_utils, builder)(**spec["torchvision_backbone"]["kwargs"])
    anchors = AnchorGenerator(tuple(map(tuple, spec["anchor_sizes"])), tuple(map(tuple, spec["aspect_ratios"])))
    dim = spec["box_head_dim"]  # the TwoMLPHead width (1024: FasterRCNN's own head)
    deployed = FasterRCNN(
        backbone, rpn_anchor_generator=anchors, box_head=TwoMLPHead(backbone.out_channels * 7**2, dim),
        box_predictor=FastRCNNPredictor(dim, spec["num_classes"]), **spec["kwargs"],
    )  # fmt: skip
    deployed.load_state_dict(torch.load(path, weights_only=True))
    images = random_images(4)
    ours, theirs = predict(model, images), predict(deployed.eval(), images)
    # mobilenet_backbone's FrozenBatchNorm2d folds the statistics into one scale and shift: the boxes agree to
    # float rounding amplified by the deep backbone (measured: 6e-4 px; scores 1e-6)
    assert_same_detections(ours, theirs, box_atol=1e-3)
    assert_same_proposals(ours, theirs, atol=1e-3)


@pytest.mark.parametrize("fmt", ["torchscript", "onnx"])
def test_mbv2_exports_as_torchscript_and_onnx(compose_cfg, tmp_path, fmt):
    cfg, model = calibrated_mbv2(compose_cfg, "rpn=focal_sigmoid")
    path = export_checkpoint(write_checkpoint(tmp_path, cfg, model), fmt, tmp_path / "deploy", 17, (120, 160))
    image = random_images(5)[0]
    (expected,) = predict(export_torchvision(model), [image])
    if fmt == "torchscript":
        with torch.no_grad():
            _, (got,) = torch.jit.load(str(path))([image])
    else:
        ort = pytest.importorskip("onnxruntime")
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        boxes, labels, scores = session.run(None, {"image": image.numpy()})
        got = {"boxes": torch.from_numpy(boxes), "labels": torch.from_numpy(labels), "scores": torch.from_numpy(scores)}
    assert_same_detections([expected], [got], box_atol=1e-3, score_atol=1e-4)


def test_pt2_program_gives_the_same_detections_at_other_image_sizes(compose_cfg, tmp_path):
    """``format=pt2``: ``torch.export`` traced at 120 x 160, loaded with ``torch.export.load`` and run at 128 x 100
    and 300 x 200: the detections of the eager torchvision model (measured: identical). One RPN form is enough:
    every form exports as torchvision's own RPN (softmax folded to one logit, checked for each form above), so
    the traced graph is the same and only the weights differ."""
    cfg, model = random_model(compose_cfg, "rpn=focal_softmax")
    path = export_checkpoint(write_checkpoint(tmp_path, cfg, model), "pt2", tmp_path / "deploy", 17, (120, 160))
    assert path.name == "model.pt2" and json.loads((tmp_path / "deploy" / "model.json").read_text())["format"] == "pt2"
    program = torch.export.load(str(path)).module()
    exported = export_torchvision(model)
    for image in (random_images(6)[1], torch.rand(3, 300, 200, generator=torch.Generator().manual_seed(6))):
        (expected,) = predict(exported, [image])
        with torch.no_grad():
            got = program([image])
        assert_same_detections([expected], got)


def test_pt2_program_runs_on_an_image_without_detections(compose_cfg):
    """torchvision's fake ``nms`` declares 2 or more kept boxes: unless ``fl_rpn.pt2`` swaps it, the program asserts
    that at run time (``Runtime assertion failed for expression u9 >= 2``). The swaps are undone afterwards."""
    from torchvision.ops import boxes as box_ops

    batched_nms = box_ops.batched_nms
    _, model = random_model(compose_cfg, "model.detector.box_score_thresh=1.0")  # no score is above 1
    image, other = random_images(7)
    program = export_program(export_torchvision(model), image).module()
    with torch.no_grad():
        (got,) = program([other])
    assert got["boxes"].shape == (0, 4) and len(got["labels"]) == len(got["scores"]) == 0
    assert box_ops.batched_nms is batched_nms


def test_torchvision_format_is_refused_for_tiny_fpn_before_anything_is_written(compose_cfg, tmp_path):
    cfg, model = random_model(compose_cfg)
    checkpoint = write_checkpoint(tmp_path, cfg, model)
    message = (
        "format=torchvision cannot deploy model=tiny_fpn: model.pt would be a state dict that only a torchvision "
        "builder of the same layout can load, and tiny_fpn's backbone is fl_rpn's own (only fl_rpn could load it). "
        "Use format=pt2, torchscript or onnx: each holds the whole program, which torch (onnxruntime for onnx) loads "
        "without fl_rpn. Nothing was written."
    )
    with pytest.raises(ValueError) as e:
        export_checkpoint(checkpoint, "torchvision", tmp_path / "deploy")
    assert str(e.value) == message and not (tmp_path / "deploy").exists()
    proc = run_app(f"checkpoint={checkpoint}", "format=torchvision", f"out_dir={tmp_path / 'cli'}",
                   f"hydra.run.dir={tmp_path / 'run'}", module="fl_rpn.cli.export", cache=tmp_path, full_error=False,
                   check=False)  # fmt: skip
    assert proc.returncode == 1 and proc.stderr.strip().endswith(f"ValueError: {message}"), proc.stderr
    assert not (tmp_path / "cli").exists()


def test_the_deployment_recipe_runs_on_exported_files(compose_cfg, tmp_path):
    """The ``# needs:`` block of docs/deploying.md, as written, in a fresh process in a folder holding ``photo.jpg`` and
    ``deploy/``: ``tiny_fpn`` as pt2, TorchScript and ONNX, then ``r50_fpn`` as a state dict (its ``model.json``
    last). It imports no fl_rpn module."""
    pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    blocks = re.findall(r"```python\n(.*?)```", (CONF_DIR.parent / "docs" / "deploying.md").read_text(), flags=re.S)
    (recipe,) = [b for b in blocks if b.startswith("# needs:")]
    cfg, model = random_model(compose_cfg, "rpn=focal_softmax")
    checkpoint = write_checkpoint(tmp_path / "tiny", cfg, model)
    for fmt in ("pt2", "torchscript", "onnx"):
        export_checkpoint(checkpoint, fmt, tmp_path / "deploy", 17, (120, 160))
    cfg, model = random_model(compose_cfg, "model=r50_fpn")
    export_checkpoint(write_checkpoint(tmp_path / "r50", cfg, model), "torchvision", tmp_path / "deploy")
    write_image(tmp_path / "photo.jpg", 150, 110)
    checks = [
        "import sys",
        "assert not [m for m in sys.modules if m.split('.')[0] == 'fl_rpn'], 'the recipe imported fl_rpn'",
        "assert len(names) == len(boxes) > 0, (len(names), len(boxes))  # tiny_fpn's detections: pt2 and onnx",
    ]
    (tmp_path / "recipe.py").write_text(recipe + "\n".join(checks) + "\n")
    run_app(script=tmp_path / "recipe.py", cache=tmp_path, cwd=tmp_path)
