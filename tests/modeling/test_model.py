"""build_model: every model x rpn option composes and builds; the swap is one word."""

import pytest
import torch
from torchvision.models.detection import FasterRCNN
from torchvision.models.detection.rpn import RegionProposalNetwork

from fl_rpn import FocalLossRPN, TwoLogitRPNHead, build_model
from fl_rpn.config import CONF_DIR, compose_config
from fl_rpn.engine.validate import validate_config
from fl_rpn.modeling.model import build_backbone
from fl_rpn.modeling.rpn import BoxPositivesRPN
from fl_rpn.modeling.rpn_registry import RPN_BUILDERS

from ..conftest import TINY

RPN_OPTIONS = sorted(p.stem for p in (CONF_DIR / "rpn").glob("[!_]*.yaml"))
MODEL_OPTIONS = sorted(p.stem for p in (CONF_DIR / "model").glob("[!_]*.yaml"))


def test_the_options_exist():
    losses = {compose_config([f"rpn={option}"]).rpn.loss for option in RPN_OPTIONS}
    assert losses == set(RPN_BUILDERS)  # every option's variant is registered, and every variant has an option
    assert {"r50_fpn", "mbv3_fpn", "mbv2_fpn", "tiny_fpn"} <= set(MODEL_OPTIONS)


@pytest.mark.parametrize("model_name", MODEL_OPTIONS)
@pytest.mark.parametrize("rpn_name", RPN_OPTIONS)
def test_every_model_and_rpn_option_builds(compose_cfg, model_name, rpn_name):
    cfg = compose_cfg(f"model={model_name}", f"rpn={rpn_name}")
    model = build_model(cfg, num_classes=7)
    assert isinstance(model, FasterRCNN)
    assert model.roi_heads.box_predictor.cls_score.out_features == 8
    if rpn_name == "sampled":
        assert type(model.rpn) is RegionProposalNetwork
    elif rpn_name == "sampled_boxpos":
        assert type(model.rpn) is BoxPositivesRPN and model.rpn.fg_bg_sampler.batch_size_per_image == 256
    else:
        assert type(model.rpn) is FocalLossRPN
        assert model.rpn.form == cfg.rpn.form
        assert isinstance(model.rpn.head, TwoLogitRPNHead) == (cfg.rpn.form == "softmax")
    assert model.rpn.proposal_matcher.high_threshold == cfg.rpn.fg_iou_thresh
    assert model.rpn._post_nms_top_n["testing"] == cfg.rpn.post_nms_top_n_test


def test_sampled_is_torchvision_untouched(compose_cfg):
    model = build_model(compose_cfg("rpn=sampled"), num_classes=3)
    rpn = model.rpn
    assert type(rpn) is RegionProposalNetwork
    assert type(rpn).compute_loss is RegionProposalNetwork.compute_loss
    assert rpn.fg_bg_sampler.batch_size_per_image == 256 and rpn.fg_bg_sampler.positive_fraction == 0.5


def test_hyper_parameters_flow_from_overrides(compose_cfg):
    cfg = compose_cfg("rpn=focal_sigmoid", "rpn.gamma=3", "rpn.alpha=0.5", "rpn.loss_weight=0.2")
    rpn = build_model(cfg, num_classes=3).rpn
    assert (rpn.form, rpn.gamma, rpn.alpha, rpn.loss_weight) == ("sigmoid", 3.0, 0.5, 0.2)


def test_backbone_weights_errors(compose_cfg, tmp_path):
    with pytest.raises(FileNotFoundError, match="no_such.pth"):
        build_backbone(compose_cfg("model=r50_fpn", f"model.backbone_weights={tmp_path}/no_such.pth").model)
    with pytest.raises(ValueError, match="neither a file nor a torchvision weights name"):
        build_backbone(compose_cfg("model=r50_fpn", "model.backbone_weights=NOT_A_WEIGHT").model)
    with pytest.raises(ValueError, match="tiny_fpn has no pretrained weights"):
        build_backbone(compose_cfg("model.backbone_weights=IMAGENET1K_V1").model)


def test_backbone_weights_from_a_local_file(compose_cfg, tmp_path):
    from torchvision.models import mobilenet_v3_large

    reference = mobilenet_v3_large()
    path = tmp_path / "mbv3.pth"
    torch.save(reference.state_dict(), path)
    backbone = build_backbone(compose_cfg("model=mbv3_fpn", f"model.backbone_weights={path}").model)
    torch.testing.assert_close(backbone.body["0"][0].weight, reference.features[0][0].weight)
    bad = tmp_path / "bad.pth"
    torch.save({"conv.weight": torch.zeros(1)}, bad)
    with pytest.raises(ValueError, match="not a mobilenet_v3_large state dict"):
        build_backbone(compose_cfg("model=mbv3_fpn", f"model.backbone_weights={bad}").model)


def test_offline_weights_name_says_where_to_put_the_file(compose_cfg, monkeypatch, tmp_path):
    import torchvision.models._api

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    calls = []

    def offline(url, *args, **kwargs):
        calls.append(url)
        raise OSError("network is unreachable")

    # torchvision's weights enums call the copy imported into torchvision.models._api, not torch.hub's
    monkeypatch.setattr(torchvision.models._api, "load_state_dict_from_url", offline)
    with pytest.raises(RuntimeError, match=r"put that file at .*checkpoints.*resnet50-"):
        build_backbone(compose_cfg("model=r50_fpn", "model.backbone_weights=IMAGENET1K_V1").model)
    assert calls and calls[0].endswith(".pth")


def test_pretrained_layout_without_loading_reads_nothing(compose_cfg, monkeypatch):
    import torchvision.models._api
    from torchvision.ops.misc import FrozenBatchNorm2d

    def no_download(*args, **kwargs):
        raise AssertionError("a checkpoint supplies the weights: nothing may be downloaded")

    monkeypatch.setattr(torchvision.models._api, "load_state_dict_from_url", no_download)
    cfg = compose_cfg("model=r50_fpn", "model.backbone_weights=IMAGENET1K_V1", "rpn=focal_sigmoid")
    model = build_model(cfg, num_classes=3, load_backbone_weights=False)
    body = model.backbone.body
    assert isinstance(body.bn1, FrozenBatchNorm2d)
    # torchvision's rule for a pretrained backbone: 3 trainable stages, conv1 and layer1 frozen
    assert not body.conv1.weight.requires_grad and not body.layer1[0].conv1.weight.requires_grad
    assert body.layer2[0].conv1.weight.requires_grad
    random_init = build_model(compose_cfg("model=r50_fpn", "rpn=focal_sigmoid"), num_classes=3)
    assert isinstance(random_init.backbone.body.bn1, torch.nn.BatchNorm2d)
    assert random_init.backbone.body.conv1.weight.requires_grad


def fixed_batch():
    g = torch.Generator().manual_seed(0)
    images = [torch.rand(3, 128, 160, generator=g) * 0.2 for _ in range(2)]
    boxes = [
        torch.tensor([[20.0, 20.0, 60.0, 70.0], [80.0, 30.0, 140.0, 100.0]]),
        torch.tensor([[30.0, 40.0, 90.0, 90.0]]),
    ]
    for img, b in zip(images, boxes):
        for x1, y1, x2, y2 in b.int().tolist():
            img[:, y1:y2, x1:x2] = 0.9
    targets = [{"boxes": b, "labels": torch.ones(len(b), dtype=torch.int64)} for b in boxes]
    return images, targets


@pytest.mark.parametrize("rpn_name", RPN_OPTIONS)
def test_training_steps_decrease_the_loss_on_a_fixed_batch(compose_cfg, rpn_name):
    torch.manual_seed(0)
    cfg = compose_cfg(f"rpn={rpn_name}", "model.detector.min_size=128", "model.detector.max_size=160")
    model = build_model(cfg, num_classes=1).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    images, targets = fixed_batch()
    history = []
    for _ in range(8):
        losses = model(images, targets)
        rpn_loss = losses["loss_objectness"] + losses["loss_rpn_box_reg"]
        total = sum(losses.values())
        optimizer.zero_grad()
        total.backward()
        optimizer.step()
        history.append((total.item(), rpn_loss.item()))
    assert all(torch.isfinite(torch.tensor(h)).all() for h in history)
    assert history[-1][0] < 0.8 * history[0][0]
    assert history[-1][1] < history[0][1]


@pytest.mark.parametrize("kind", ["shared", "decoupled", "shared_matched"])
def test_mbv2_fpn_is_torchvisions_mobilenet_backbone_and_trains_with_every_head(compose_cfg, kind):
    from torchvision.models.detection.backbone_utils import mobilenet_backbone

    cfg = compose_cfg("model=mbv2_fpn", f"rpn.head.kind={kind}", "model.detector.min_size=128",
                      "model.detector.max_size=160")  # fmt: skip
    model = build_model(cfg, num_classes=1).train()
    reference = mobilenet_backbone(backbone_name="mobilenet_v2", weights=None, fpn=True, trainable_layers=6)
    assert {k: tuple(v.shape) for k, v in model.backbone.state_dict().items() if "num_batches" not in k} == {
        k: tuple(v.shape) for k, v in reference.state_dict().items()
    }
    assert isinstance(model.backbone.body["0"][1], torch.nn.BatchNorm2d)  # random init: BatchNorm trained
    assert all(p.requires_grad for p in model.backbone.parameters())
    images, targets = fixed_batch()
    losses = model(images, targets)
    sum(losses.values()).backward()
    assert all(torch.isfinite(v) for v in losses.values())
    assert model.rpn.head.cls_logits.weight.grad is not None


def test_one_training_iteration_with_mbv2_fpn(tmp_path, cache):
    from fl_rpn.config import compose_config
    from fl_rpn.engine.trainer import train

    metrics = train(compose_config([*TINY, "model=mbv2_fpn", "schedule.max_iters=1", f"output_dir={tmp_path}"]))
    assert metrics["train/iterations"] == 1 and (tmp_path / "last.pt").is_file()
    assert "bbox/AP" in metrics


@pytest.mark.parametrize("overrides,message", [
    (["model.returned_layers=[5,4]"], r"model.returned_layers=\[5, 4\]: must be null or increasing stage numbers"),
    (["model.returned_layers=[3,6]"], r"model.returned_layers=\[3, 6\]: must be null or increasing stage numbers"),
    (["model.returned_layers=[3,4,5]"], "model.anchor_sizes=.*: must have one list per feature map: 4 "),
    (["model.anchor_sizes=[[32],[64,128],[256]]"], "model.anchor_sizes=.*: every level must have as many sizes"),
])  # fmt: skip
def test_mbv2_fpn_levels_are_checked_before_any_data_is_read(overrides, message):
    """torchvision's own message for anchors that do not match the feature maps comes at the first step and names
    neither key; the default anchors (3 lists) fit the default stages (2 maps + the max-pool map)."""
    validate_config(compose_config(["model=mbv2_fpn"]))
    with pytest.raises(ValueError, match=message):
        validate_config(compose_config(["model=mbv2_fpn", *overrides]))
