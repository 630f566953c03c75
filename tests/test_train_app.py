"""The Hydra apps end to end on tiny synthetic data: train -> checkpoint -> resume -> eval -> predict."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch.utils.tensorboard import SummaryWriter
from torchvision.io import decode_image

from fl_rpn.config import compose_config
from fl_rpn.engine import trainer
from fl_rpn.engine.checkpoint import load_checkpoint, model_from_checkpoint
from fl_rpn.engine.evaluate import predict
from fl_rpn.engine.optim import build_optimizer
from fl_rpn.engine.trainer import train
from fl_rpn.events import current_storage
from fl_rpn.model import build_model
from fl_rpn.predict import predict_images

TINY = [
    "dataset.train.num_images=6", "dataset.val.num_images=3",
    "dataset.train.image_size=[96,128]", "dataset.val.image_size=[96,128]",
    "model.detector.min_size=96", "model.detector.max_size=128",
    "batch_size=2", "num_workers=0", "eval.batch_size=2",
    "schedule.max_iters=2", "schedule.warmup_iters=1", "schedule.steps=[]",
    "schedule.log_every=1", "schedule.checkpoint_every=1",
]  # fmt: skip


def run_app(module, *overrides, cache_dir, check=True):
    env = {**os.environ, "FL_RPN_CACHE": str(cache_dir), "HYDRA_FULL_ERROR": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", module, *overrides], capture_output=True, text=True, env=env, timeout=600
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"{module} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def test_train_resume_eval_predict_through_the_apps(tmp_path):
    run_dir, cache = tmp_path / "run", tmp_path / "cache"
    run_app("fl_rpn.train", *TINY, f"hydra.run.dir={run_dir}", cache_dir=cache)
    ckpt = load_checkpoint(run_dir / "last.pt")
    assert ckpt["iteration"] == 2 and ckpt["meta"]["class_names"]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    for key in ("bbox/AP", "bbox/AP50", "bbox/APl", "proposal/AR@100", "proposal/AR@1000", "train/loss"):
        assert key in metrics
    assert metrics["train/iterations"] == 2
    assert metrics["provenance"]["rpn"] == "focal_softmax" and metrics["provenance"]["seed"] == 0
    assert (run_dir / ".hydra" / "config.yaml").is_file() and list((run_dir / "tb").iterdir())
    resolved = (run_dir / "config_resolved.yaml").read_text()
    assert "${" not in resolved and f"output_dir: {run_dir}" in resolved and f"cache_dir: {cache}" in resolved
    assert "${" in (run_dir / ".hydra" / "config.yaml").read_text()  # Hydra keeps the interpolations

    # resume the same run directory to 4 iterations: it continues from 2
    run_app("fl_rpn.train", *TINY, "schedule.max_iters=4", "resume=true", f"hydra.run.dir={run_dir}", cache_dir=cache)
    assert load_checkpoint(run_dir / "last.pt")["iteration"] == 4
    history = json.loads((run_dir / "history.json").read_text())
    assert [h["iteration"] for h in history] == [1, 2, 3, 4]  # the first segment's scalars come from last.pt

    eval_dir = tmp_path / "eval"
    run_app(
        "fl_rpn.eval", f"checkpoint={run_dir / 'last.pt'}", *TINY[:4], "eval.evaluators=[coco,proposal_recall,voc07]",
        "num_workers=0", f"hydra.run.dir={eval_dir}", cache_dir=cache,
    )  # fmt: skip
    evaluated = json.loads((eval_dir / "metrics.json").read_text())
    assert evaluated["iteration"] == 4 and "voc07/mAP" in evaluated and "voc07/AP/circle" in evaluated

    images = sorted((cache).rglob("*.png"))[:2]
    out = tmp_path / "pred"
    run_app(
        "fl_rpn.predict", f"checkpoint={run_dir / 'last.pt'}", f"inputs=[{images[0]},{images[1]}]",
        f"out_dir={out}", "score_thresh=0.0", "proposals_topk=5", f"hydra.run.dir={tmp_path / 'p'}", cache_dir=cache,
    )  # fmt: skip
    assert sorted(p.name for p in out.iterdir()) == sorted(f"{p.stem}.png" for p in images)


def test_unknown_override_is_rejected_by_hydra(tmp_path):
    proc = run_app("fl_rpn.train", "rpn.gama=3", f"hydra.run.dir={tmp_path}", cache_dir=tmp_path, check=False)
    assert proc.returncode != 0
    assert "Could not override 'rpn.gama'" in proc.stderr and "Key 'gama' is not in struct" in proc.stderr
    assert not (tmp_path / "last.pt").exists()


@pytest.mark.parametrize("rpn", ["sampled", "focal_sigmoid"])
def test_interrupted_and_resumed_run_matches_an_uninterrupted_one(compose_cfg, tmp_path, monkeypatch, rpn):
    monkeypatch.setenv("FL_RPN_CACHE", str(tmp_path / "cache"))
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


FAST = [*TINY, "eval.evaluators=[]"]
PROMISED_TAGS = {
    "train/lr", "train/loss", "train/loss_objectness", "train/loss_rpn_box_reg", "train/loss_classifier",
    "train/loss_box_reg", "rpn/positive_anchors_per_image", "rpn/negative_anchors_per_image",
    "rpn/trained_anchors_per_image", "rpn/focal_normalizer", "rpn/easy_negative_loss_share",
}  # fmt: skip


def scalars(tb_dir, tag):
    events = EventAccumulator(str(tb_dir))
    events.Reload()
    return {e.step: e.value for e in events.Scalars(tag)}, set(events.Tags()["scalars"])


def test_tensorboard_after_resume_keeps_the_checkpoint_step_and_has_the_promised_tags(tmp_path, monkeypatch):
    monkeypatch.setenv("FL_RPN_CACHE", str(tmp_path / "cache"))
    train(compose_config([*FAST, f"output_dir={tmp_path}"]))
    with SummaryWriter(str(tmp_path / "tb")) as stale:  # logged after last.pt by a run that was then killed
        stale.add_scalar("train/loss", 999.0, 3)
    train(compose_config([*FAST, "schedule.max_iters=4", "resume=true", f"output_dir={tmp_path}"]))
    loss, tags = scalars(tmp_path / "tb", "train/loss")
    history = json.loads((tmp_path / "history.json").read_text())
    assert loss == pytest.approx({h["iteration"]: h["loss"] for h in history}) and sorted(loss) == [1, 2, 3, 4]
    assert PROMISED_TAGS <= tags


def test_logged_rpn_diagnostics_are_means_over_the_logging_window(tmp_path, monkeypatch):
    monkeypatch.setenv("FL_RPN_CACHE", str(tmp_path / "cache"))
    steps: list[dict[str, float]] = []

    def build(cfg, num_classes, **kwargs):
        model = build_model(cfg, num_classes, **kwargs)

        def record(module, args, output):
            if module.training:
                steps.append({k.removeprefix("rpn/"): v.item() for k, v in current_storage().scalars().items()})

        model.rpn.register_forward_hook(record)
        return model

    monkeypatch.setattr(trainer, "build_model", build)
    cfg = compose_config([*FAST, "schedule.max_iters=4", "schedule.log_every=2", f"output_dir={tmp_path}"])
    metrics = train(cfg)
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


def test_resume_from_a_checkpoint_path_continues_from_its_iteration(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("FL_RPN_CACHE", str(tmp_path / "cache"))
    train(compose_config([*FAST, f"output_dir={tmp_path / 'first'}"]))
    source = tmp_path / "first" / "last.pt"
    with caplog.at_level("INFO", logger="fl_rpn.engine.trainer"):
        train(compose_config([*FAST, "schedule.max_iters=4", f"resume={source}", f"output_dir={tmp_path / 'next'}"]))
    assert f"resumed from {source} at iteration 2" in caplog.text
    resumed = load_checkpoint(tmp_path / "next" / "last.pt")
    assert resumed["iteration"] == 4 and [h["iteration"] for h in resumed["history"]] == [1, 2, 3, 4]
    assert load_checkpoint(source)["iteration"] == 2  # the source is read, not written
    train(compose_config([*FAST, "schedule.max_iters=4", f"output_dir={tmp_path / 'straight'}"]))
    straight = load_checkpoint(tmp_path / "straight" / "last.pt")["model"]
    for k, v in straight.items():
        torch.testing.assert_close(resumed["model"][k], v, rtol=0, atol=1e-6, msg=k)


def grad_norms_at_each_step(monkeypatch, tmp_path, *overrides):
    """The total L2 norm of the gradients that each optimizer step uses."""
    norms = []

    def record(optimizer, args, kwargs):
        grads = [p.grad.flatten() for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        norms.append(torch.linalg.vector_norm(torch.cat(grads)).item())

    def build_and_watch(*args, **kwargs):
        optimizer = build_optimizer(*args, **kwargs)
        optimizer.register_step_pre_hook(record)
        return optimizer

    monkeypatch.setattr(trainer, "build_optimizer", build_and_watch)
    train(compose_config([*FAST, *overrides, f"output_dir={tmp_path}"]))
    return norms


def test_clip_grad_norm_caps_the_gradient_norm_of_every_step(tmp_path, monkeypatch):
    """With one objectness logit per anchor the clipped norm is the plain L2 norm of all gradients."""
    monkeypatch.setenv("FL_RPN_CACHE", str(tmp_path / "cache"))
    unclipped = grad_norms_at_each_step(monkeypatch, tmp_path / "a", "rpn=focal_sigmoid")
    clipped = grad_norms_at_each_step(monkeypatch, tmp_path / "b", "rpn=focal_sigmoid", "clip_grad_norm=0.05")
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


def test_eval_records_the_checkpoints_seed_and_schedule_not_its_own_defaults(tmp_path, monkeypatch):
    from fl_rpn.eval import evaluate_checkpoint

    monkeypatch.setenv("FL_RPN_CACHE", str(tmp_path / "cache"))
    overrides = [*FAST, "seed=3", "rpn=focal_sigmoid", "schedule.max_iters=1", f"output_dir={tmp_path / 'run'}"]
    train(compose_config(overrides))
    cfg = compose_config(
        [f"checkpoint={tmp_path / 'run' / 'last.pt'}", *TINY[:4], "eval.evaluators=[]", "num_workers=0",
         f"output_dir={tmp_path / 'eval'}"], config_name="eval",
    )  # fmt: skip
    assert (cfg.seed, cfg.schedule.max_iters, cfg.rpn.name) == (0, 600, "focal_softmax")  # eval.yaml's defaults
    evaluate_checkpoint(cfg)
    recorded = json.loads((tmp_path / "eval" / "metrics.json").read_text())["provenance"]
    assert recorded["seed"] == 3 and recorded["rpn"] == "focal_sigmoid" and recorded["model"] == "tiny_fpn"
    assert recorded["schedule"] == "cpu_demo: 1 iterations x 2 images" and recorded["train_world_size"] == 1
    assert recorded["dataset"] == "synthetic" and recorded["train_dataset"] == "synthetic"


def test_cls_lr_mult_keeps_the_objectness_layers_lr_times_weight_decay():
    cfg = compose_config(["rpn=focal_sigmoid_lr2"])
    model = build_model(cfg, num_classes=3)
    base, cls = build_optimizer(model, cfg.optim, cfg.rpn.cls_lr_mult, global_batch=16).param_groups
    assert (base["lr"], base["weight_decay"]) == (pytest.approx(0.02), pytest.approx(1e-4))
    assert (cls["lr"], cls["weight_decay"]) == (pytest.approx(0.04), pytest.approx(5e-5))
    assert {id(p) for p in cls["params"]} == {id(p) for p in model.rpn.head.cls_logits.parameters()}


def test_predict_reads_bmp_keeps_same_stem_inputs_apart_and_draws_proposals(tmp_path, monkeypatch):
    monkeypatch.setenv("FL_RPN_CACHE", str(tmp_path / "cache"))
    train(compose_config([*FAST, "schedule.max_iters=1", f"output_dir={tmp_path / 'run'}"]))
    checkpoint = tmp_path / "run" / "last.pt"
    png, other = sorted((tmp_path / "cache").rglob("*.png"))[:2]
    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    (tmp_path / "a" / "x.png").write_bytes(png.read_bytes())
    Image.open(other).convert("RGB").save(tmp_path / "b" / "x.bmp")  # torchvision.io does not decode BMP

    def run(out, topk):
        overrides = [f"checkpoint={checkpoint}", f"inputs=[{tmp_path / 'a'},{tmp_path / 'b'}]", f"out_dir={out}",
                     "score_thresh=1.1", f"proposals_topk={topk}"]  # fmt: skip
        written = predict_images(compose_config(overrides, config_name="predict"))
        return {p.name: decode_image(str(p)) for p in written}

    plain = run(tmp_path / "plain", 0)
    assert sorted(plain) == ["x-0.png", "x-1.png"]  # same stem, different folders: both kept
    assert torch.equal(plain["x-1.png"], torch.from_numpy(np.array(Image.open(other).convert("RGB"))).permute(2, 0, 1))

    drawn = run(tmp_path / "drawn", 5)
    model, _ = model_from_checkpoint(checkpoint)
    for name, source in (("x-0.png", plain["x-0.png"]), ("x-1.png", plain["x-1.png"])):
        changed = (drawn[name] != source).any(0)
        assert changed.sum() > 20 and (drawn[name][:, changed] == 128).all()  # only grey proposal outlines
        (output,) = predict(model, [source.float() / 255])
        for x1, y1, _, _ in output["proposals"][:5].long().tolist():  # every box's corner is outlined
            assert (drawn[name][:, y1, x1] == 128).all()


def test_drawings_use_a_colour_per_class_and_labels_that_scale_with_the_image():
    from fl_rpn.predict import PALETTE, draw_boxes, drawing_sizes

    assert drawing_sizes(torch.zeros(3, 96, 128)) == (1, 10)
    assert drawing_sizes(torch.zeros(3, 640, 960)) == (2, 16) and drawing_sizes(torch.zeros(3, 1280, 1280)) == (4, 32)
    rgb = [tuple(int(c[i : i + 2], 16) for i in (1, 3, 5)) for c in PALETTE[:2]]
    for side in (320, 1280):
        image = torch.full((3, side, side), 255, dtype=torch.uint8)
        boxes = torch.tensor([[0.2, 0.3, 0.45, 0.8], [0.55, 0.3, 0.9, 0.8]]) * side
        drawn = draw_boxes(image, boxes, torch.tensor([1, 2]), ["circle 0.91", "square 0.50"])
        width, font_size = drawing_sizes(image)
        for (x1, y1, _, y2), colour in zip(boxes.long().tolist(), rgb):
            assert tuple(drawn[:, (y1 + y2) // 2, x1].tolist()) == colour  # the left edge, in the class colour
            # the filled label hangs from the box's top-left corner: about font_size rows of the class colour
            column = (drawn[:, y1 : y1 + 3 * font_size, x1 + width + 1] == torch.tensor(colour)[:, None]).all(0)
            assert 0.7 * font_size <= column.sum() <= 2 * font_size, (side, int(column.sum()))


def test_predict_reports_unreadable_inputs_goes_on_and_draws_the_ground_truth(tmp_path, monkeypatch):
    from fl_rpn.data import build_dataset
    from fl_rpn.predict import PALETTE

    monkeypatch.setenv("FL_RPN_CACHE", str(tmp_path / "cache"))
    train(compose_config([*FAST, "schedule.max_iters=1", f"output_dir={tmp_path / 'run'}"]))
    val = build_dataset(compose_config(TINY).dataset.val, train=False)
    first, second = val.records[0], val.records[1]
    assert len(first.boxes) > 0
    (tmp_path / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    (tmp_path / "empty.jpg").write_bytes(b"")
    inputs = [first.file, tmp_path / "bad.png", second.file, tmp_path / "empty.jpg"]
    overrides = [f"checkpoint={tmp_path / 'run' / 'last.pt'}", f"inputs=[{','.join(map(str, inputs))}]",
                 f"out_dir={tmp_path / 'out'}", "score_thresh=1.1", "ground_truth=true", *TINY[:4]]  # fmt: skip
    with pytest.raises(ValueError, match=r"^inputs: 2 of 4 images could not be read \(the other 2 were drawn") as e:
        predict_images(compose_config(overrides, config_name="predict"))
    assert "bad.png" in str(e.value) and "empty.jpg" in str(e.value)
    written = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert written == sorted([f"{first.file.stem}.png", f"{second.file.stem}.png"])  # the ones after a bad one too
    drawing = decode_image(str(tmp_path / "out" / f"{first.file.stem}.png"))
    original = decode_image(str(first.file))
    height, width = original.shape[1:]
    assert tuple(drawing.shape) == (3, height, 2 * width + 8)  # ground truth | gap | predictions
    assert torch.equal(drawing[:, :, width + 8 :], original)  # score_thresh 1.1: no detection drawn on the right
    left = drawing[:, :, :width]
    x1, y1, x2, y2 = first.boxes[0].astype(int).tolist()
    hex_colour = PALETTE[int(first.labels[0]) - 1]
    colour = [int(hex_colour[i : i + 2], 16) for i in (1, 3, 5)]
    assert left[:, (y1 + y2) // 2, x1].tolist() == colour  # the ground-truth box in its class colour


def test_the_learning_curve_holds_every_evaluation_across_a_resume(tmp_path, monkeypatch):
    monkeypatch.setenv("FL_RPN_CACHE", str(tmp_path / "cache"))
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
