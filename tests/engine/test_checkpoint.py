"""Checkpoints of runs with a pretrained backbone: rebuilt without fetching weights, resumed under the same layout."""

import pytest
import torch
import torchvision.models._api
from omegaconf import OmegaConf
from torchvision.ops.misc import FrozenBatchNorm2d

from fl_rpn import build_model
from fl_rpn.config import compose_config
from fl_rpn.engine.checkpoint import check_resume_config, model_from_checkpoint, save_checkpoint

from ..conftest import FAST

# FAST on 2 train / 1 val images, one per batch
TWO_IMAGES = [*FAST, "dataset.train.num_images=2", "dataset.val.num_images=1", "batch_size=1"]


def saved_run(cfg, model, class_names):
    return {
        "model": model.state_dict(),
        "config": {group: OmegaConf.to_container(cfg[group], resolve=True) for group in ("model", "rpn")},
        "meta": {"class_names": class_names, "category_ids": list(range(1, len(class_names) + 1))},
    }


@pytest.fixture
def offline(monkeypatch):
    def refuse(url, *args, **kwargs):
        raise OSError(f"offline: {url}")

    monkeypatch.setattr(torchvision.models._api, "load_state_dict_from_url", refuse)


def test_a_pretrained_run_is_rebuilt_from_its_checkpoint_offline(compose_cfg, tmp_path, offline):
    cfg = compose_cfg("model=mbv3_fpn", "model.backbone_weights=IMAGENET1K_V1", "rpn=focal_softmax")
    model = build_model(cfg, num_classes=2, load_backbone_weights=False)
    with torch.no_grad():
        model.roi_heads.box_predictor.cls_score.bias.fill_(0.5)
    save_checkpoint(tmp_path / "last.pt", saved_run(cfg, model, ["cat", "dog"]))

    rebuilt, ckpt = model_from_checkpoint(tmp_path / "last.pt")  # no download: the weights are in the file
    assert not rebuilt.training and ckpt["meta"]["class_names"] == ["cat", "dog"]
    assert any(isinstance(m, FrozenBatchNorm2d) for m in rebuilt.backbone.body.modules())
    torch.testing.assert_close(rebuilt.roi_heads.box_predictor.cls_score.bias, torch.full((3,), 0.5))
    for k, v in model.state_dict().items():
        torch.testing.assert_close(rebuilt.state_dict()[k], v, msg=k)


def test_resume_accepts_other_weights_of_the_same_layout_but_not_another_layout(compose_cfg):
    saved = {"config": OmegaConf.to_container(compose_cfg("model=r50_fpn", "model.backbone_weights=IMAGENET1K_V1"))}
    # the file moved, or another weights name: the weights are overwritten by the checkpoint anyway
    for now in ("model.backbone_weights=/elsewhere/resnet50.pth", "model.backbone_weights=IMAGENET1K_V2"):
        check_resume_config(saved, compose_cfg("model=r50_fpn", now), "last.pt")
    with pytest.raises(ValueError) as err:
        check_resume_config(saved, compose_cfg("model=r50_fpn", "model.backbone_weights=null"), "last.pt")
    message = str(err.value)
    expected = "model.backbone_weights: checkpoint 'pretrained (frozen BatchNorm)', now 'null (trained BatchNorm)'"
    assert expected in message
    assert message.startswith("cannot resume from last.pt")


def test_a_pretrained_run_resumes_after_its_weights_file_is_gone(compose_cfg, tmp_path, cache):
    from torchvision.models import mobilenet_v3_large

    from fl_rpn.engine.checkpoint import load_checkpoint
    from fl_rpn.engine.trainer import train

    weights = tmp_path / "mbv3.pth"
    torch.save(mobilenet_v3_large().state_dict(), weights)
    tiny = [*TWO_IMAGES, "model=mbv3_fpn", f"model.backbone_weights={weights}", f"output_dir={tmp_path / 'run'}"]
    train(compose_cfg(*tiny, "schedule.max_iters=1"))
    weights.unlink()  # moved, or another machine: the checkpoint holds the weights
    train(compose_cfg(*tiny, "schedule.max_iters=2", "resume=true"))
    assert load_checkpoint(tmp_path / "run" / "last.pt")["iteration"] == 2


def test_a_resumed_run_takes_its_weight_decay_from_its_own_config(compose_cfg, tmp_path, cache):
    from fl_rpn.engine.checkpoint import load_checkpoint
    from fl_rpn.engine.trainer import train

    tiny = [*TWO_IMAGES, "rpn=focal_sigmoid_lr2", f"output_dir={tmp_path}"]
    train(compose_cfg(*tiny, "schedule.max_iters=1"))
    train(compose_cfg(*tiny, "schedule.max_iters=2", "resume=true", "optim.weight_decay=0.0003"))
    groups = {g["name"]: g for g in load_checkpoint(tmp_path / "last.pt")["optimizer"]["param_groups"]}
    assert groups["base"]["weight_decay"] == pytest.approx(3e-4)
    assert groups["rpn_cls"]["weight_decay"] == pytest.approx(1.5e-4)  # lr x 2, weight decay / 2


class _Payload:
    """Pickles as a call of ``os.system``: what ``weights_only=True`` exists to refuse."""

    def __reduce__(self):
        import os

        return os.system, ("echo should-not-run",)


def test_checkpoints_are_read_with_weights_only(tmp_path):
    from fl_rpn.engine.checkpoint import load_checkpoint

    path = tmp_path / "last.pt"
    torch.save({"model": {}, "payload": _Payload()}, path)
    with pytest.raises(ValueError, match=rf"checkpoint {path} cannot be read \(UnpicklingError: .*weights_only"):
        load_checkpoint(path)


def test_a_checkpoint_written_before_rpn_head_existed_resumes_with_the_default_head_only(compose_cfg):
    saved = {"config": OmegaConf.to_container(compose_cfg("rpn=focal_softmax"))}
    del saved["config"]["rpn"]["head"]  # as every checkpoint written before the key was added
    check_resume_config(saved, compose_cfg("rpn=focal_softmax"), "last.pt")
    with pytest.raises(ValueError, match=r"rpn.head.kind: checkpoint 'shared', now 'decoupled'"):
        check_resume_config(saved, compose_cfg("rpn=focal_softmax", "rpn.head.kind=decoupled"), "last.pt")


def test_a_focal_checkpoint_with_the_old_name_of_the_box_sample_size_resumes():
    """``rpn.box_sample_size`` was the focal RPN's ``rpn.batch_size_per_image`` (it samples nothing); a checkpoint
    written under the old name is read with the new one, and a sampled RPN keeps its sampler key."""
    cfg = compose_config(["rpn=focal_softmax_boxsampled"])
    saved = {"config": OmegaConf.to_container(cfg)}
    saved["config"]["rpn"]["batch_size_per_image"] = saved["config"]["rpn"].pop("box_sample_size")
    check_resume_config(saved, cfg, "last.pt")
    with pytest.raises(ValueError, match=r"rpn.box_sample_size: checkpoint 256, now 128"):
        check_resume_config(saved, compose_config(["rpn=focal_softmax_boxsampled", "rpn.box_sample_size=128"]), "x")
    sampled = compose_config(["rpn=sampled"])
    check_resume_config({"config": OmegaConf.to_container(sampled)}, sampled, "last.pt")
