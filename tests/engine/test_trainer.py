"""The trainer on tiny synthetic data, in process: resume, TensorBoard and logged diagnostics, gradient clipping,
per-group learning rates, the learning curve."""

import json

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch.utils.tensorboard import SummaryWriter

from fl_rpn.config import compose_config
from fl_rpn.engine.checkpoint import load_checkpoint
from fl_rpn.engine.optim import build_optimizer
from fl_rpn.engine.trainer import train
from fl_rpn.events import current_storage
from fl_rpn.modeling.model import build_model

from ..conftest import FAST, TINY
from .conftest import train_with


@pytest.mark.parametrize("rpn", ["sampled", "focal_sigmoid", "focal_softmax_npos_ema"])
def test_interrupted_and_resumed_run_matches_an_uninterrupted_one(compose_cfg, tmp_path, cache, rpn):
    overrides = [*TINY, f"rpn={rpn}", "eval.evaluators=[]", "schedule.checkpoint_every=2"]
    straight = compose_cfg(*overrides, "schedule.max_iters=4", f"output_dir={tmp_path / 'a'}")
    train(straight)
    first = compose_cfg(*overrides, "schedule.max_iters=2", f"output_dir={tmp_path / 'b'}")
    train(first)
    resumed = compose_cfg(*overrides, "schedule.max_iters=4", "resume=true", f"output_dir={tmp_path / 'b'}")
    train(resumed)
    a = load_checkpoint(tmp_path / "a" / "last.pt")["model"]
    b = load_checkpoint(tmp_path / "b" / "last.pt")["model"]
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6, msg=k)
    if rpn == "focal_softmax_npos_ema":  # the N_pos average went on from the checkpoint's, logged beside the count
        assert a["rpn.npos_ema_steps"].item() == b["rpn.npos_ema_steps"].item() == 4
        history = json.loads((tmp_path / "b" / "history.json").read_text())
        assert all(h["rpn/npos_ema"] > 0 and h["rpn/focal_normalizer"] >= 1 for h in history)


PROMISED_TAGS = {
    "train/lr", "train/loss", "train/loss_objectness", "train/loss_rpn_box_reg", "train/loss_classifier",
    "train/loss_box_reg", "rpn/positive_anchors_per_image", "rpn/negative_anchors_per_image",
    "rpn/trained_anchors_per_image", "rpn/focal_normalizer", "rpn/easy_negative_loss_share",
}  # fmt: skip


def scalars(tb_dir, tag):
    events = EventAccumulator(str(tb_dir))
    events.Reload()
    return {e.step: e.value for e in events.Scalars(tag)}, set(events.Tags()["scalars"])


def test_tensorboard_after_resume_keeps_the_checkpoint_step_and_has_the_promised_tags(tmp_path, cache):
    train(compose_config([*FAST, f"output_dir={tmp_path}"]))
    with SummaryWriter(str(tmp_path / "tb")) as stale:  # logged after last.pt by a run that was then killed
        stale.add_scalar("train/loss", 999.0, 3)
    train(compose_config([*FAST, "schedule.max_iters=4", "resume=true", f"output_dir={tmp_path}"]))
    loss, tags = scalars(tmp_path / "tb", "train/loss")
    history = json.loads((tmp_path / "history.json").read_text())
    assert loss == pytest.approx({h["iteration"]: h["loss"] for h in history}) and sorted(loss) == [1, 2, 3, 4]
    assert PROMISED_TAGS <= tags


def test_logged_rpn_diagnostics_are_means_over_the_logging_window(tmp_path, cache):
    steps: list[dict[str, float]] = []

    def record(module, args, output):
        if module.training:
            steps.append({k.removeprefix("rpn/"): v.item() for k, v in current_storage().scalars().items()})

    cfg = compose_config([*FAST, "schedule.max_iters=4", "schedule.log_every=2", f"output_dir={tmp_path}"])
    metrics = train_with(cfg, lambda state: state.model.rpn.register_forward_hook(record))
    history = json.loads((tmp_path / "history.json").read_text())
    assert [h["iteration"] for h in history] == [2, 4] and len(steps) == 4
    moved = False
    for entry, window in zip(history, (steps[:2], steps[2:])):
        for key in window[0]:
            mean = sum(step[key] for step in window) / 2
            assert entry[f"rpn/{key}"] == pytest.approx(mean, rel=1e-6), key
            moved |= mean != pytest.approx(window[-1][key])
    assert moved  # the window is not a single repeated value: the mean differs from the last step somewhere
    assert metrics["train/rpn/positive_anchors_per_image"] == history[-1]["rpn/positive_anchors_per_image"]
    logged, _ = scalars(tmp_path / "tb", "rpn/positive_anchors_per_image")
    assert logged == pytest.approx({h["iteration"]: h["rpn/positive_anchors_per_image"] for h in history})


def test_resume_from_a_checkpoint_path_continues_from_its_iteration(tmp_path, cache, caplog):
    train(compose_config([*FAST, f"output_dir={tmp_path / 'first'}"]))
    source = tmp_path / "first" / "last.pt"
    with caplog.at_level("INFO", logger="fl_rpn.engine"):
        train(compose_config([*FAST, "schedule.max_iters=4", f"resume={source}", f"output_dir={tmp_path / 'next'}"]))
    assert f"resumed from {source} at iteration 2" in caplog.text
    resumed = load_checkpoint(tmp_path / "next" / "last.pt")
    assert resumed["iteration"] == 4 and [h["iteration"] for h in resumed["history"]] == [1, 2, 3, 4]
    assert load_checkpoint(source)["iteration"] == 2  # the source is read, not written
    train(compose_config([*FAST, "schedule.max_iters=4", f"output_dir={tmp_path / 'straight'}"]))
    straight = load_checkpoint(tmp_path / "straight" / "last.pt")["model"]
    for k, v in straight.items():
        torch.testing.assert_close(resumed["model"][k], v, rtol=0, atol=1e-6, msg=k)


def grad_norms_at_each_step(tmp_path, *overrides):
    """The total L2 norm of the gradients that each optimizer step uses."""
    norms = []

    def record(optimizer, args, kwargs):
        grads = [p.grad.flatten() for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        norms.append(torch.linalg.vector_norm(torch.cat(grads)).item())

    cfg = compose_config([*FAST, *overrides, f"output_dir={tmp_path}"])
    train_with(cfg, lambda state: state.optimizer.register_step_pre_hook(record))
    return norms


def test_clip_grad_norm_caps_the_gradient_norm_of_every_step(tmp_path, cache):
    """With one objectness logit per anchor the clipped norm is the plain L2 norm of all gradients."""
    unclipped = grad_norms_at_each_step(tmp_path / "a", "rpn=focal_sigmoid")
    clipped = grad_norms_at_each_step(tmp_path / "b", "rpn=focal_sigmoid", "clip_grad_norm=0.05")
    assert len(unclipped) == len(clipped) == 2 and min(unclipped) > 0.5
    assert clipped == pytest.approx([0.05, 0.05], rel=1e-4)


def softmax_twin(sigmoid_model, softmax_model):
    """Give ``softmax_model`` the weights of ``sigmoid_model``, with ``z_bg = 0`` and ``z_obj`` the sigmoid logit."""
    state = softmax_model.state_dict()
    for k, v in sigmoid_model.state_dict().items():
        if "rpn.head.cls_logits" in k:
            state[k] = torch.zeros_like(state[k])
            state[k][1::2] = v  # anchor-major channels: a0:bg, a0:obj, a1:bg, ...
        else:
            state[k] = v
    softmax_model.load_state_dict(state)
    return softmax_model


def losses_and_norms(model, cfg, clip, steps=5, max_norm=0.5):
    """``steps`` SGD steps (the run's optimizer, lr 0.02, momentum, weight decay) on one fixed batch, clipped."""
    g = torch.Generator().manual_seed(0)
    images = [torch.rand(3, 96, 128, generator=g, dtype=torch.float64) for _ in range(2)]
    targets = [
        {"boxes": torch.tensor([[10.0, 20.0, 60.0, 80.0], [50.0, 5.0, 120.0, 40.0]], dtype=torch.float64),
         "labels": torch.tensor([1, 2])},
        {"boxes": torch.tensor([[30.0, 30.0, 70.0, 90.0]], dtype=torch.float64), "labels": torch.tensor([1])},
    ]  # fmt: skip
    optimizer = build_optimizer(model, cfg.optim, cfg.rpn.cls_lr_mult, global_batch=16)
    losses, norms = [], []
    model.train()
    for step in range(steps):
        torch.manual_seed(step)  # the same RoI sample in both arms
        loss = sum(model(images, targets).values())
        optimizer.zero_grad()
        loss.backward()
        norms.append(float(clip(model, max_norm)))
        optimizer.step()
        losses.append(loss.item())
    return losses, norms


@pytest.mark.parametrize("clip", ["fl_rpn", "torch"])
def test_with_clipping_softmax_and_its_lr2_sigmoid_control_take_the_same_steps(clip):
    """Softmax and sigmoid x 2 start from the same function (z_obj - z_bg = the sigmoid logit) and, clipped, stay
    the same: ``clip_grad_norm_`` counts the objectness gradient once per logit difference. torch's plain
    clip_grad_norm_ counts it twice in the softmax form and the arms drift apart."""
    from fl_rpn.engine.optim import clip_grad_norm_

    clip_fn = clip_grad_norm_ if clip == "fl_rpn" else lambda m, n: torch.nn.utils.clip_grad_norm_(m.parameters(), n)
    size = ["model.detector.min_size=96", "model.detector.max_size=128"]
    runs = {}
    for rpn in ("focal_sigmoid_lr2", "focal_softmax"):
        cfg = compose_config([f"rpn={rpn}", *size])
        torch.manual_seed(0)
        runs[rpn] = (cfg, build_model(cfg, num_classes=2).double())
    softmax_twin(runs["focal_sigmoid_lr2"][1], runs["focal_softmax"][1])
    sigmoid_losses, sigmoid_norms = losses_and_norms(*reversed(runs["focal_sigmoid_lr2"]), clip_fn)
    softmax_losses, softmax_norms = losses_and_norms(*reversed(runs["focal_softmax"]), clip_fn)
    assert min(sigmoid_norms) > 0.5  # clipping is active at every step
    assert softmax_losses[0] == pytest.approx(sigmoid_losses[0], rel=1e-12)  # the same function at the start
    if clip == "fl_rpn":
        assert softmax_norms == pytest.approx(sigmoid_norms, rel=1e-9)
        assert softmax_losses == pytest.approx(sigmoid_losses, rel=1e-9)
    else:
        assert softmax_norms[0] > sigmoid_norms[0] * (1 + 1e-6)
        assert abs(softmax_losses[-1] - sigmoid_losses[-1]) > 1e-6 * sigmoid_losses[-1]


def test_cls_lr_mult_keeps_the_objectness_layers_lr_times_weight_decay():
    cfg = compose_config(["rpn=focal_sigmoid_lr2"])
    model = build_model(cfg, num_classes=3)
    base, cls = build_optimizer(model, cfg.optim, cfg.rpn.cls_lr_mult, global_batch=16).param_groups
    assert (base["lr"], base["weight_decay"]) == (pytest.approx(0.02), pytest.approx(1e-4))
    assert (cls["lr"], cls["weight_decay"]) == (pytest.approx(0.04), pytest.approx(5e-5))
    assert {id(p) for p in cls["params"]} == {id(p) for p in model.rpn.head.cls_logits.parameters()}


def test_the_learning_curve_holds_every_evaluation_across_a_resume(tmp_path, cache):
    curve_run = [*TINY, "eval.evaluators=[proposal_recall]", "schedule.eval_every=1", f"output_dir={tmp_path}"]
    train(compose_config([*curve_run, "schedule.max_iters=2"]))
    (tmp_path / "eval_history.json").unlink()  # the checkpoint's copy of the curve is what a resume continues
    metrics = train(compose_config([*curve_run, "schedule.max_iters=4", "resume=true"]))
    curve = json.loads((tmp_path / "eval_history.json").read_text())
    assert [e["iteration"] for e in curve] == [1, 2, 3, 4]
    assert curve[-1]["proposal/AR@100"] == metrics["proposal/AR@100"]
    assert load_checkpoint(tmp_path / "last.pt")["hooks"]["evaluation"]["curve"][:2] == curve[:2]
    logged, _ = scalars(tmp_path / "tb", "proposal/AR@100")
    assert logged == pytest.approx({e["iteration"]: e["proposal/AR@100"] for e in curve})
