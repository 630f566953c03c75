"""Every option of every config group composes, validates, and (where it needs no external files) builds."""

import re

import pytest
from omegaconf import OmegaConf

from fl_rpn.config import CONF_DIR, compose_config
from fl_rpn.data import build_dataset
from fl_rpn.engine.optim import build_optimizer, build_scheduler, lr_factor
from fl_rpn.engine.validate import validate_config
from fl_rpn.modeling.model import build_model
from fl_rpn.modeling.rpn_registry import RPN_BUILDERS

GROUPS = ["dataset", "model", "rpn", "optim", "schedule", "eval", "scale", "experiment"]


def options(group):
    return sorted(p.stem for p in (CONF_DIR / group).glob("[!_]*.yaml"))


@pytest.mark.parametrize("group,option", [(g, o) for g in GROUPS for o in options(g)])
def test_every_option_composes_and_validates(group, option):
    cfg = compose_config([f"{group}={option}"])
    validate_config(cfg)
    OmegaConf.to_container(cfg.dataset, resolve=True)  # every interpolation resolves
    assert cfg.dataset.train.format in {"coco", "voc", "yolo", "synthetic"}


@pytest.mark.parametrize(
    "override",
    ["rpn.gamma=inf", "rpn.gamma=nan", "rpn.loss_weight=inf", "rpn.loss_weight=nan", "rpn.alpha=nan", "optim.lr=inf"],
)
def test_non_finite_numbers_are_rejected_naming_the_key(override):
    key, value = override.split("=")
    with pytest.raises(ValueError, match=rf"^config key {re.escape(key)}={value}: must be a finite number "):
        validate_config(compose_config([override]))


def test_the_default_is_the_cpu_demo():
    cfg = compose_config()
    assert (cfg.dataset.name, cfg.model.name, cfg.rpn.name, cfg.schedule.name) == (
        "synthetic", "tiny_fpn", "focal_softmax", "cpu_demo",
    )  # fmt: skip


def test_synthetic_dataset_and_optimizer_build(tmp_path):
    cfg = compose_config([f"cache_dir={tmp_path}", "dataset.train.num_images=3", "dataset.val.num_images=2"])
    train_set = build_dataset(cfg.dataset.train, train=True)
    assert len(train_set) == 3 and train_set.meta.num_classes == len(train_set.meta.class_names) > 1
    model = build_model(cfg, train_set.meta.num_classes)
    optimizer = build_optimizer(model, cfg.optim, cls_lr_mult=2.0, global_batch=8)
    base, cls = optimizer.param_groups
    assert base["lr"] == pytest.approx(0.02 * 8 / 16) and cls["lr"] == pytest.approx(2 * base["lr"])
    assert {id(p) for p in cls["params"]} == {id(p) for p in model.rpn.head.cls_logits.parameters()}
    build_scheduler(optimizer, cfg.schedule)


def test_lr_schedule_values():
    s = OmegaConf.create({"warmup_iters": 10, "warmup_factor": 0.001, "steps": [20, 30], "lr_decay": 0.1})
    assert lr_factor(0, s) == pytest.approx(0.001)
    assert lr_factor(5, s) == pytest.approx(0.001 * 0.5 + 0.5)
    assert lr_factor(10, s) == 1.0 and lr_factor(19, s) == 1.0
    assert lr_factor(20, s) == pytest.approx(0.1) and lr_factor(30, s) == pytest.approx(0.01)


def test_experiment_sweeps_name_real_options():
    for name in options("experiment"):
        params = OmegaConf.load(CONF_DIR / "experiment" / f"{name}.yaml").hydra.sweeper.params
        for rpn in str(params.rpn).split(","):
            assert rpn in options("rpn")


def test_impossible_backbone_weights_are_reported_by_the_config_check(tmp_path):
    """Before any data is read (``train`` and ``fl-rpn-check-data`` call ``validate_config`` first)."""
    with pytest.raises(ValueError, match=r"^model.backbone_weights='NOT_A_WEIGHT' is neither a file nor a torchvis"):
        validate_config(compose_config(["model=r50_fpn", "model.backbone_weights=NOT_A_WEIGHT"]))
    with pytest.raises(ValueError, match="torchvision weights name of mobilenet_v3_large"):  # another model's weights
        validate_config(compose_config(["model=mbv3_fpn", "model.backbone_weights=ResNet50_Weights.IMAGENET1K_V1"]))
    with pytest.raises(FileNotFoundError, match="no such file .*no_such.pth"):
        validate_config(compose_config(["model=r50_fpn", f"model.backbone_weights={tmp_path}/no_such.pth"]))
    with pytest.raises(ValueError, match="tiny_fpn has no pretrained weights"):
        validate_config(compose_config(["model.backbone_weights=IMAGENET1K_V1"]))
    # valid: a weights name (nothing is downloaded here), a full enum name, an existing file; a missing one on resume
    (tmp_path / "r50.pth").touch()
    for weights in ("IMAGENET1K_V2", "ResNet50_Weights.IMAGENET1K_V1", str(tmp_path / "r50.pth")):
        validate_config(compose_config(["model=r50_fpn", f"model.backbone_weights={weights}"]))
    validate_config(compose_config(["model=r50_fpn", f"model.backbone_weights={tmp_path}/gone.pth", "resume=true"]))


def test_a_score_threshold_above_the_prior_is_refused_for_the_focal_rpn():
    with pytest.raises(ValueError, match=r"^config key rpn.score_thresh=0.05: must be below rpn.prior_prob \(0.01\)"):
        validate_config(compose_config(["rpn=focal_sigmoid", "rpn.score_thresh=0.05"]))
    validate_config(compose_config(["rpn=sampled", "rpn.score_thresh=0.05"]))
    validate_config(compose_config(["rpn=focal_sigmoid", "rpn.score_thresh=0.005"]))
    validate_config(compose_config(["rpn=focal_sigmoid", "rpn.score_thresh=0.05", "rpn.prior_prob=null"]))


def test_the_shared_rpn_keys_are_a_base_not_an_option():
    """``conf/_base/rpn.yaml`` holds the keys every rpn option shares; ``rpn=_common`` (it used to be offered, and
    failed later) is now an unknown option, and the rpn group lists only real options."""
    from hydra.errors import MissingConfigException

    assert not list((CONF_DIR / "rpn").glob("_*.yaml"))
    assert options("rpn") and all(compose_config([f"rpn={o}"]).rpn.loss in RPN_BUILDERS for o in options("rpn"))
    with pytest.raises(MissingConfigException, match="Could not find 'rpn/_common'"):
        compose_config(["rpn=_common"])
    for rpn in options("rpn"):  # every option still has the shared keys, with their values
        cfg = compose_config([f"rpn={rpn}"])
        assert (cfg.rpn.fg_iou_thresh, cfg.rpn.score_thresh, cfg.rpn.pre_nms_top_n_train) == (0.7, 0.0, 2000)
