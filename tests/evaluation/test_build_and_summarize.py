"""build_evaluators and summarize."""

from types import SimpleNamespace

import pytest
import torch

from fl_rpn.evaluation import CocoEvaluator, ProposalRecall, VOC07Evaluator, build_evaluators, summarize

META = SimpleNamespace(class_names=["person", "car"], category_ids=[1, 3])


def test_build_evaluators_in_order():
    evs = build_evaluators(["voc07", "coco", "proposal_recall"], META, {"proposal_recall": {"max_proposals": (50,)}})
    assert [type(e) for e in evs] == [VOC07Evaluator, CocoEvaluator, ProposalRecall]
    assert evs[1].category_ids == [1, 3] and evs[0].class_names == ["person", "car"]
    assert evs[2].max_proposals == (50,)


def test_build_evaluators_rejects_unknown_names():
    with pytest.raises(ValueError, match="coco"):
        build_evaluators(["cocoo"], META)


def test_all_evaluators_on_one_batch():
    box = torch.tensor([[10.0, 10.0, 50.0, 50.0]])
    targets = [{"boxes": box, "labels": torch.tensor([2]), "ignore": torch.tensor([False]), "image_id": 5}]
    outputs = [{"boxes": box, "scores": torch.tensor([0.9]), "labels": torch.tensor([2]), "proposals": box}]
    metrics = {}
    for ev in build_evaluators(["coco", "proposal_recall", "voc07"], META):
        ev.update(targets, outputs)
        metrics.update(ev.compute())
    assert metrics["bbox/AP"] == pytest.approx(1.0)
    assert metrics["proposal/AR@100"] == pytest.approx(1.0)
    assert metrics["voc07/mAP"] == pytest.approx(1.0)


def test_summarize_is_an_aligned_table():
    text = summarize({"bbox/AP": 0.371254, "proposal/AR@1000": float("nan"), "voc07/AP/person": 1.0, "epochs": 12})
    lines = text.splitlines()
    assert lines[0].split() == ["metric", "value"]
    assert lines[1].split() == ["bbox/AP", "0.3713"]
    assert lines[2].split() == ["proposal/AR@1000", "nan"]
    assert lines[4].split() == ["epochs", "12"]
    assert len({len(line) for line in lines}) == 1  # aligned: every row equally wide
    for key in ("bbox/AP", "proposal/AR@1000", "voc07/AP/person"):
        assert key in text
