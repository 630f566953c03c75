"""The evaluator table: config nodes checked against the constructors, declared metrics, and what the report takes
from those declarations."""

import re
from types import SimpleNamespace

import pytest
import torch
from omegaconf import OmegaConf

from fl_rpn.config import compose_config
from fl_rpn.engine.validate import validate_config
from fl_rpn.evaluation import (
    EVALUATORS,
    CocoEvaluator,
    MetricSpec,
    OptionError,
    ProposalRecall,
    VOC07Evaluator,
    build_evaluators,
    check_evaluators,
    evaluator_options,
    headline_metrics,
    metric_spec,
    without_per_class,
)
from fl_rpn.evaluation.recall import AR, R50
from fl_rpn.evaluation.registry import option_names
from fl_rpn.report import DEFAULT_METRICS, _is_fraction, _is_score, recall_curve

META = SimpleNamespace(class_names=["person", "car"], category_ids=[1, 3])


def test_the_table_and_the_options_of_each_evaluator():
    assert EVALUATORS == {"coco": CocoEvaluator, "voc07": VOC07Evaluator, "proposal_recall": ProposalRecall}
    assert option_names(CocoEvaluator) == ["backend", "verbose"]
    assert option_names(VOC07Evaluator) == ["use_07_metric", "iou_thresh"]
    assert option_names(ProposalRecall) == ["max_proposals"]


def test_every_config_node_holds_exactly_its_constructors_options():
    eval_cfg = compose_config().eval
    for name, cls in EVALUATORS.items():
        assert list(eval_cfg[name]) == option_names(cls), name


def test_the_options_reach_the_evaluators():
    overrides = ["eval.evaluators=[coco,voc07,proposal_recall]", "eval.coco.backend=pycocotools",
                 "eval.voc07.use_07_metric=false", "eval.voc07.iou_thresh=0.6",
                 "eval.proposal_recall.max_proposals=[10,20]"]  # fmt: skip
    cfg = compose_config(overrides)
    validate_config(cfg)
    coco, voc, recall = build_evaluators(list(cfg.eval.evaluators), META, evaluator_options(cfg.eval))
    assert (coco.backend, coco.verbose, coco.category_ids) == ("pycocotools", False, [1, 3])
    assert (voc.use_07_metric, voc.iou_thresh, voc.class_names) == (False, 0.6, ["person", "car"])
    assert recall.max_proposals == (10, 20)


@pytest.mark.parametrize(
    "override,message",
    [
        ("+eval.coco.backnd=pycocotools",
         "config key eval.coco.backnd='pycocotools': unknown; eval.coco takes ['backend', 'verbose']"),
        ("eval.coco.backend=nope",
         "config key eval.coco.backend='nope': must be one of ['pycocotools', 'faster_coco_eval']"),
        ("eval.coco.verbose=1", "config key eval.coco.verbose=1: must be true or false"),
        ("eval.voc07.use_07_metric=yes", "config key eval.voc07.use_07_metric='yes': must be true or false"),
        ("eval.voc07.iou_thresh=1.5", "config key eval.voc07.iou_thresh=1.5: must be a number in [0, 1)"),
        ("eval.proposal_recall.max_proposals=[100,0]",
         "config key eval.proposal_recall.max_proposals=[100, 0]: must be a non-empty list of integers >= 1"),
        ("eval.proposal_recall.max_proposals=[]",
         "config key eval.proposal_recall.max_proposals=[]: must be a non-empty list of integers >= 1"),
        ("eval.evaluators=[coco,vco07]",
         "config key eval.evaluators=['coco', 'vco07']: unknown ['vco07']; choose from ['coco', 'voc07', "
         "'proposal_recall']"),
        ("eval.evaluators=coco", "config key eval.evaluators='coco': must be a list of evaluator names"),
    ],
)  # fmt: skip
def test_a_bad_option_is_rejected_by_the_config_check_naming_its_key(override, message):
    evaluators = [] if override.startswith("eval.evaluators") else ["eval.evaluators=[coco,voc07,proposal_recall]"]
    with pytest.raises(ValueError, match="^" + re.escape(message)):
        validate_config(compose_config([*evaluators, override]))


def test_unknown_keys_are_rejected_even_in_the_node_of_an_evaluator_not_run():
    with pytest.raises(ValueError, match=r"^config key eval\.voc07\.use_07=True: unknown; eval\.voc07 takes"):
        validate_config(compose_config(["eval.evaluators=[coco]", "+eval.voc07.use_07=true"]))
    validate_config(compose_config(["eval.evaluators=[coco]", "eval.voc07.iou_thresh=7"]))  # values: only if run


def test_the_constructors_name_the_option_they_refuse():
    with pytest.raises(OptionError, match=r"^use_07_metric='no': must be true or false$") as caught:
        VOC07Evaluator(["cat"], use_07_metric="no")
    assert (caught.value.key, caught.value.value) == ("use_07_metric", "no")
    with pytest.raises(TypeError):  # options are keyword-only
        ProposalRecall((100,))
    with pytest.raises(ValueError, match=r"^config key eval\.proposal_recall\.max_proposals=\(0,\)"):
        build_evaluators(["proposal_recall"], META, {"proposal_recall": {"max_proposals": (0,)}})
    with pytest.raises(ValueError, match=r"^config key eval\.cocoo: options of an unknown evaluator; choose from "):
        check_evaluators(["coco"], {"cocoo": {}})


def test_the_flat_keys_of_older_configs_are_read_as_their_new_keys():
    old = OmegaConf.create({"evaluators": ["coco", "voc07"], "coco_backend": "pycocotools",
                            "voc07_use_07_metric": False, "batch_size": 4})  # fmt: skip
    options = evaluator_options(old)
    assert options == {"coco": {"backend": "pycocotools"}, "voc07": {"use_07_metric": False}, "proposal_recall": {}}
    check_evaluators(list(old.evaluators), options)
    coco, voc = build_evaluators(list(old.evaluators), META, options)
    assert coco.backend == "pycocotools" and voc.use_07_metric is False
    both = OmegaConf.create({"evaluators": ["coco"], "coco_backend": "pycocotools", "coco": {"backend": "pycocotools"}})
    with pytest.raises(ValueError, match=r"^config key eval\.coco_backend: the old name of eval\.coco\.backend; set "):
        evaluator_options(both)


def test_metric_specs_match_keys_and_make_them():
    assert AR.key(k=300) == "proposal/AR@300" and AR.match("proposal/AR@300") == {"k": "300"}
    assert AR.match("proposal/R50@300") is None and AR.match("x/proposal/AR@300") is None
    assert metric_spec("voc07/AP/traffic light") == MetricSpec("voc07/AP/{class_name}", per_class=True)
    assert metric_spec("ema/bbox/AP") == MetricSpec("bbox/AP")  # under the EMA hook's prefix
    assert metric_spec("proposal/R50@100") is R50
    for key in ("train/loss", "eval/seconds", "rpn/easy_negative_loss_share", "bbox/AP90"):
        assert metric_spec(key) is None, key


def test_every_key_compute_returns_is_declared():
    box = torch.tensor([[10.0, 10.0, 50.0, 50.0]])
    targets = [{"boxes": box, "labels": torch.tensor([2]), "ignore": torch.tensor([False]), "image_id": 5}]
    outputs = [{"boxes": box, "scores": torch.tensor([0.9]), "labels": torch.tensor([2]), "proposals": box}]
    for ev in build_evaluators(list(EVALUATORS), META):
        ev.update(targets, outputs)
        metrics = ev.compute()
        for key in metrics:
            assert any(s.match(key) is not None for s in type(ev).metric_specs), key
        assert set(type(ev).headline) <= set(metrics)
    assert without_per_class({"voc07/mAP": 1.0, "voc07/AP/car": 1.0, "ema/voc07/AP/car": 1.0, "train/loss": 2.0}) == {
        "voc07/mAP": 1.0, "train/loss": 2.0,
    }  # fmt: skip


def test_the_reports_metric_knowledge_comes_from_the_declarations():
    assert headline_metrics() == ["bbox/AP", "bbox/AP50", "voc07/mAP", "proposal/AR@100", "proposal/AR@300",
                                  "proposal/AR@1000"]  # fmt: skip
    assert DEFAULT_METRICS == tuple(headline_metrics())
    assert _is_score("voc07/AP/cat") and _is_score("proposal/R50@10") and _is_score("ema/bbox/AP")
    assert not _is_score("train/loss") and not _is_score("rpn/easy_negative_loss_share")
    assert _is_fraction("rpn/easy_negative_loss_share") and not _is_fraction("rpn/positive_anchors_per_image")
    keys = ["bbox/AP", "proposal/AR@1000", "proposal/R50@100", "proposal/AR@50", "ema/proposal/AR@100"]
    assert recall_curve(keys) == [(50, "proposal/AR@50"), (1000, "proposal/AR@1000")]


def test_a_declared_count_metric_is_not_a_fraction(monkeypatch):
    """A new evaluator's declaration is all the report needs: its count metric is shown as is, without power."""

    class Counter(ProposalRecall):
        metric_specs = (MetricSpec("count/objects", unit="count"), MetricSpec("count/recall"))

    monkeypatch.setitem(EVALUATORS, "counter", Counter)
    assert metric_spec("count/objects").unit == "count"
    assert not _is_score("count/objects") and _is_score("count/recall")
