"""The event storage: the RPN statistics travel from inside the model to the trainer through it, for both arms."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torchvision.models.detection.rpn import RegionProposalNetwork

from fl_rpn.config import compose_config
from fl_rpn.engine.step import TrainStep
from fl_rpn.events import EventStorage, current_storage
from fl_rpn.modeling.diagnostics import EASY_LOGIT, attach_anchor_diagnostics
from fl_rpn.modeling.model import build_model
from fl_rpn.modeling.rpn import BoxPositivesRPN

SAMPLED_NAMES = [
    "rpn/positive_anchors_per_image", "rpn/negative_anchors_per_image", "rpn/trained_anchors_per_image",
    "rpn/easy_negative_loss_share",
]  # fmt: skip
TINY = ["model.detector.min_size=96", "model.detector.max_size=128"]


def batch(n=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    images = [torch.rand(3, 96, 128, generator=g) for _ in range(n)]
    boxes = torch.tensor([[10.0, 12.0, 50.0, 60.0], [40.0, 30.0, 110.0, 90.0]])
    return images, [{"boxes": boxes, "labels": torch.tensor([1, 2])} for _ in range(n)]


def test_storage_keeps_the_latest_tensor_per_name_until_drained():
    assert current_storage() is None
    x = torch.tensor(2.0, requires_grad=True)
    with EventStorage() as outer:
        assert current_storage() is outer
        outer.put_scalar("a", x * 1)
        with EventStorage() as inner:
            assert current_storage() is inner
            inner.put_scalars({"b": x * 2}, prefix="rpn/")
        assert current_storage() is outer and inner.scalars() == {"rpn/b": pytest.approx(4.0)}
        outer.put_scalar("c", x * 3)
        outer.put_scalar("a", x * 4)  # a second put replaces the value, the name keeps its place
    assert current_storage() is None
    scalars = outer.drain()
    assert list(scalars) == ["a", "c"] and scalars["a"].item() == 8.0 and not scalars["a"].requires_grad
    assert outer.drain() == {}


def test_the_storage_is_closed_when_the_block_raises():
    with pytest.raises(RuntimeError), EventStorage():
        raise RuntimeError
    assert current_storage() is None


@pytest.mark.parametrize("rpn", ["sampled", "sampled_boxpos", "focal_sigmoid", "focal_softmax"])
def test_a_train_step_returns_the_rpn_statistics_under_their_logged_names(rpn):
    torch.manual_seed(0)
    model = build_model(compose_config([f"rpn={rpn}", *TINY]), num_classes=3).train()
    attach_anchor_diagnostics(model.rpn)  # as the trainer does; nothing for the focal RPN
    step = TrainStep(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.0), device="cpu")
    out = step(*batch())
    expected = SAMPLED_NAMES + (["rpn/focal_normalizer"] if rpn.startswith("focal") else [])
    assert list(out.scalars) == expected and current_storage() is None
    assert all(v.dim() == 0 and v.dtype == torch.float32 for v in out.scalars.values())
    stats = {k.removeprefix("rpn/"): v.item() for k, v in out.scalars.items()}
    if rpn.startswith("sampled"):
        assert stats["trained_anchors_per_image"] == 256.0
    else:  # every labelled anchor
        assert stats["trained_anchors_per_image"] == stats["positive_anchors_per_image"] + stats[
            "negative_anchors_per_image"]  # fmt: skip


@pytest.mark.parametrize("rpn", ["sampled", "focal_softmax"])
def test_nothing_is_recorded_outside_a_storage(rpn):
    model = build_model(compose_config([f"rpn={rpn}", *TINY]), num_classes=3).train()
    attach_anchor_diagnostics(model.rpn)
    model(*batch())
    assert not hasattr(model.rpn, "stats")
    if rpn == "sampled":
        assert model.rpn.fg_bg_sampler.objectness is None  # the head's maps are not kept either


def test_the_sampled_rpn_is_observed_without_being_patched():
    for name, cls in (("sampled", RegionProposalNetwork), ("sampled_boxpos", BoxPositivesRPN)):
        rpn = build_model(compose_config([f"rpn={name}"]), num_classes=3).rpn
        attach_anchor_diagnostics(rpn)
        attach_anchor_diagnostics(rpn)  # once only
        assert type(rpn) is cls and rpn.compute_loss.__func__ is cls.compute_loss
        assert "compute_loss" not in vars(rpn) and "forward" not in vars(rpn)
        assert (rpn.fg_bg_sampler.batch_size_per_image, rpn.fg_bg_sampler.positive_fraction) == (256, 0.5)
        assert len(rpn.head._forward_hooks) == 1 and not rpn._forward_hooks
        copy.deepcopy(rpn)  # no recursion through the sampler's attribute lookup


def test_sampled_statistics_of_a_forward_pass_are_those_of_the_anchors_compute_loss_trains(monkeypatch):
    """The head's maps, flattened by the observer, are the logits torchvision's compute_loss receives."""
    torch.manual_seed(0)
    model = build_model(compose_config(["rpn=sampled", *TINY]), num_classes=3).train()
    with torch.no_grad():  # logits spread around EASY_LOGIT: easy negatives and hard ones
        model.rpn.head.cls_logits.weight.normal_(std=0.5)
        model.rpn.head.cls_logits.bias.fill_(EASY_LOGIT)
    attach_anchor_diagnostics(model.rpn)
    seen = {}
    compute_loss = RegionProposalNetwork.compute_loss

    def spy(self, objectness, pred_bbox_deltas, labels, regression_targets):  # the test's, not the code's
        seen.update(objectness=objectness.detach().flatten(), labels=torch.cat(labels))
        return compute_loss(self, objectness, pred_bbox_deltas, labels, regression_targets)

    monkeypatch.setattr(RegionProposalNetwork, "compute_loss", spy)
    with EventStorage() as events:
        model(*batch())
    stats = {k.removeprefix("rpn/"): v.item() for k, v in events.drain().items()}

    pos, neg = model.rpn.fg_bg_sampler.last
    trained = torch.cat(pos).bool() | torch.cat(neg).bool()
    logit, flat = seen["objectness"], seen["labels"]
    bce = F.binary_cross_entropy_with_logits(logit, flat.clamp(min=0), reduction="none")
    easy = trained & (flat == 0) & (logit < EASY_LOGIT)
    assert 0 < easy.sum() < (trained & (flat == 0)).sum() and trained.sum() == 512
    assert stats["easy_negative_loss_share"] == pytest.approx((bce[easy].sum() / bce[trained].sum()).item(), rel=1e-6)
    assert stats["positive_anchors_per_image"] == (flat == 1).sum().item() / 2
    assert stats["negative_anchors_per_image"] == (flat == 0).sum().item() / 2
    assert stats["trained_anchors_per_image"] == 256.0
