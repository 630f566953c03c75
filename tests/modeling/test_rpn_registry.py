"""RPN variants by registry: ``rpn.loss`` names a builder whose signature declares (and checks) its config keys."""

import inspect
from typing import Annotated

import pytest
from omegaconf import OmegaConf
from torchvision.models.detection.rpn import RegionProposalNetwork

from fl_rpn.config import CONF_DIR, compose_config
from fl_rpn.engine.validate import validate_config
from fl_rpn.modeling import losses
from fl_rpn.modeling.model import build_model
from fl_rpn.modeling.rpn import FOCAL_DEFAULTS, FocalLossRPN, use_focal_rpn
from fl_rpn.modeling.rpn_registry import (
    RPN_BUILDERS,
    SHARED_KEYS,
    check_rpn_config,
    config_keys,
    number,
    register_rpn,
)

RPN_OPTIONS = sorted(p.stem for p in (CONF_DIR / "rpn").glob("[!_]*.yaml"))


def rpn_node(option, **changes):
    """The composed ``rpn`` node of an option, with keys set (a value) or removed (``None``), struct mode off."""
    rpn = compose_config([f"rpn={option}"]).rpn
    OmegaConf.set_struct(rpn, False)
    for key, value in changes.items():
        if value is None:
            del rpn[key]
        else:
            rpn[key] = value
    return rpn


@pytest.mark.parametrize("option", RPN_OPTIONS)
def test_every_option_has_exactly_the_keys_of_its_builder(option):
    rpn = compose_config([f"rpn={option}"]).rpn
    keys = config_keys(RPN_BUILDERS[rpn.loss])
    assert set(rpn) - set(SHARED_KEYS) <= set(keys)
    assert {k for k, (_, required) in keys.items() if required} <= set(rpn)
    check_rpn_config(rpn)


def test_builders_write_no_default_but_absence():
    """The values are the yaml's: a builder parameter is required, or optional with ``None`` (left out)."""
    for name, builder in RPN_BUILDERS.items():
        for p in inspect.signature(builder).parameters.values():
            if p.kind is inspect.Parameter.KEYWORD_ONLY:
                assert p.default in (inspect.Parameter.empty, None), (name, p.name)


@pytest.mark.parametrize(
    "option,changes,message",
    [
        ("focal_softmax", {"gama": 3}, r"^config key rpn\.gama=3: not a key of rpn\.loss=focal, which reads \["),
        ("sampled", {"form": "sigmoid"}, r"^config key rpn\.form='sigmoid': not a key of rpn\.loss=sampled"),
        ("focal_softmax", {"alpha": None}, r"^config key rpn\.alpha is missing: rpn\.loss=focal reads it"),
        ("sampled", {"positive_fraction": None}, r"^config key rpn\.positive_fraction is missing"),
        ("focal_softmax", {"loss": "hinge"}, r"^config key rpn\.loss='hinge': must be 'focal' or 'sampled'"),
        ("focal_softmax", {"form": "cosine"}, r"^config key rpn\.form='cosine': must be 'sigmoid' or 'softmax'"),
        ("focal_softmax", {"gamma": -1}, r"^config key rpn\.gamma=-1: must be a number >= 0"),
        ("focal_softmax", {"gamma": float("inf")}, r"^config key rpn\.gamma=inf: must be a finite number >= 0"),
        ("focal_softmax", {"prior_prob": 1.0}, r"^config key rpn\.prior_prob=1\.0: must be a number in \(0, 1\), or n"),
        ("focal_softmax", {"box_normalizer": "anchors"}, r"^config key rpn\.box_normalizer='anchors': must be 'pos"),
        ("focal_softmax_boxsampled", {"box_sample_size": 0}, r"^config key rpn\.box_sample_size=0: must "),
        ("sampled", {"batch_size_per_image": 2.5}, r"^config key rpn\.batch_size_per_image=2\.5: must be an integ"),
        ("sampled_boxpos", {"box_normalizer": None}, r"^config key rpn\.box_normalizer is missing"),
        ("focal_sigmoid", {"score_thresh": 0.05}, r"^config key rpn\.score_thresh=0\.05: must be below rpn\.prior_p"),
    ],
)
def test_the_check_names_the_key(option, changes, message):
    rpn = rpn_node(option, **changes)
    with pytest.raises(ValueError, match=message):
        check_rpn_config(rpn)
    cfg = compose_config([f"rpn={option}"])
    OmegaConf.set_struct(cfg, False)
    cfg.rpn = rpn
    with pytest.raises(ValueError, match=message):  # the trainer's check, before any data is read
        validate_config(cfg)


def test_optional_keys_may_be_left_out_or_null():
    rpn = rpn_node("focal_softmax")
    rpn.prior_prob = None  # torchvision's bias
    check_rpn_config(rpn)
    assert "box_sample_size" not in compose_config(["rpn=focal_softmax"]).rpn
    assert "batch_size_per_image" not in compose_config(["rpn=focal_softmax_boxsampled"]).rpn  # it samples nothing
    crossed = build_model(compose_config(["rpn=focal_softmax", "rpn.box_normalizer=sampled"]), num_classes=3)
    assert crossed.rpn.box_sample_size == 256  # left out: torchvision's sample size


def test_a_new_variant_is_one_registered_builder():
    class MarginRPN(RegionProposalNetwork):
        pass

    @register_rpn("margin_test")
    def margin_rpn(parts, *, margin: Annotated[float, number(lambda v: v > 0, "> 0")]) -> MarginRPN:
        rpn = MarginRPN(**parts, batch_size_per_image=256, positive_fraction=0.5)
        rpn.margin = margin
        return rpn

    try:
        with pytest.raises(ValueError, match="registered twice"):
            register_rpn("margin_test")(margin_rpn)
        cfg = compose_config(["rpn=sampled"])
        OmegaConf.set_struct(cfg, False)
        cfg.rpn = rpn_node("sampled", loss="margin_test", batch_size_per_image=None, positive_fraction=None,
                           box_normalizer=None, margin=0.5)  # fmt: skip
        validate_config(cfg)
        model = build_model(cfg, num_classes=3)
        assert type(model.rpn) is MarginRPN and model.rpn.margin == 0.5
        cfg.rpn.margin = 0
        with pytest.raises(ValueError, match=r"^config key rpn\.margin=0: must be a number > 0"):
            validate_config(cfg)
    finally:
        del RPN_BUILDERS["margin_test"]


def test_sampled_is_torchvision_s_own_class_and_compute_loss():
    rpn = build_model(compose_config(["rpn=sampled"]), num_classes=3).rpn
    assert type(rpn) is RegionProposalNetwork
    assert rpn.compute_loss.__func__ is RegionProposalNetwork.compute_loss and "compute_loss" not in vars(rpn)


def test_the_python_defaults_are_the_yaml_s():
    """``FocalLossRPN``'s keyword defaults (``FOCAL_DEFAULTS``, which ``use_focal_rpn`` takes) and
    ``conf/_base/focal.yaml`` both write the paper's settings, and the focal losses (pure functions, RetinaNet's and
    torchvision's defaults) write alpha and gamma themselves: this holds them together."""
    rpn = compose_config(["rpn=focal_softmax"]).rpn
    keys = ("form", "loss_weight", "alpha", "gamma", "prior_prob", "box_normalizer", "npos_ema")
    assert set(FOCAL_DEFAULTS) == set(keys) and FOCAL_DEFAULTS == {k: rpn[k] for k in keys}
    params = inspect.signature(FocalLossRPN.__init__).parameters
    assert {k: params[k].default for k in keys} == FOCAL_DEFAULTS
    assert use_focal_rpn(build_model(compose_config(["rpn=sampled"]), 3)).rpn.gamma == FOCAL_DEFAULTS["gamma"]
    for function in (losses.sigmoid_focal_loss, losses.softmax_focal_loss):
        params = inspect.signature(function).parameters
        assert (params["alpha"].default, params["gamma"].default) == (rpn.alpha, rpn.gamma), function
