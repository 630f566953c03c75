"""The CUDA path: a training step of every RPN form in fp32 / bf16 / fp16, the trainer on CUDA, the focal loss on
CPU and CUDA, and DDP with one process on NCCL.

Marked ``cuda`` (``pytest -m cuda``) and skipped without a GPU. ``FL_RPN_TEST_DEVICE=cpu`` runs the same bodies on
the CPU (fp16 and NCCL replaced by their CPU stand-ins) to check them before a GPU is at hand.
"""

import math
import os

import pytest
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from fl_rpn.config import compose_config
from fl_rpn.engine.checkpoint import load_checkpoint
from fl_rpn.engine.step import TrainStep
from fl_rpn.engine.trainer import train
from fl_rpn.events import EventStorage
from fl_rpn.modeling.model import build_model
from fl_rpn.modeling.rpn import FocalLossRPN

from ..conftest import TINY_RECALL, free_port

DEVICE = torch.device(os.environ.get("FL_RPN_TEST_DEVICE", "cuda"))
pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(DEVICE.type == "cuda" and not torch.cuda.is_available(), reason="needs CUDA"),
]
FORMS = ["sampled", "focal_sigmoid", "focal_softmax", "focal_sigmoid_lr2"]
AMPS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
RUN = [*TINY_RECALL, "num_workers=1", "schedule.max_iters=3", "schedule.checkpoint_every=100"]


def batch(device, n=2, size=(96, 128), seed=0):
    g = torch.Generator().manual_seed(seed)
    images = [torch.rand(3, *size, generator=g).to(device) for _ in range(n)]
    boxes = torch.tensor([[10.0, 12.0, 50.0, 60.0], [40.0, 30.0, 110.0, 90.0]])
    targets = [{"boxes": boxes.to(device), "labels": torch.tensor([1, 2], device=device)} for _ in range(n)]
    return images, targets


@pytest.mark.parametrize("amp", list(AMPS))
@pytest.mark.parametrize("rpn", FORMS)
def test_a_train_step_of_every_rpn_form(rpn, amp):
    cfg = compose_config([f"rpn={rpn}", "model.detector.min_size=96", "model.detector.max_size=128"])
    torch.manual_seed(0)
    model = build_model(cfg, num_classes=3).to(DEVICE).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    scaler = torch.amp.GradScaler(DEVICE.type, enabled=amp == "fp16")
    step = TrainStep(model=model, optimizer=optimizer, device=DEVICE, scaler=scaler, amp_dtype=AMPS[amp])
    images, targets = batch(DEVICE)
    for _ in range(2):
        out = step(images, targets)
        stats = {k.removeprefix("rpn/"): v for k, v in out.scalars.items()}
        losses = out.losses
        assert all(v.dtype == torch.float32 and v.device.type == DEVICE.type for v in losses.values()), losses
        assert math.isfinite(losses["loss"].item()) and not out.skipped, losses
    assert all(torch.isfinite(p).all() for p in model.parameters())
    if rpn != "sampled":
        assert stats["focal_normalizer"].dtype == torch.float32
        assert stats["positive_anchors_per_image"].item() > 0


@pytest.mark.parametrize("amp", ["null", "bf16", "fp16"])
def test_the_trainer_on_cuda(tmp_path, amp):
    """The trainer's own CUDA path: pinned batches, non_blocking copies, autocast, GradScaler, evaluation."""
    if amp == "fp16" and DEVICE.type != "cuda":
        pytest.skip("amp=fp16 is CUDA-only")
    cfg = compose_config([*RUN, f"device={DEVICE}", f"amp={amp}", "channels_last=true",
                          f"cache_dir={tmp_path / 'cache'}", f"output_dir={tmp_path / 'run'}"])  # fmt: skip
    metrics = train(cfg)
    ckpt = load_checkpoint(tmp_path / "run" / "last.pt")
    assert ckpt["iteration"] == 3 and metrics["train/skipped_steps"] == 0
    assert all(math.isfinite(h["loss"]) for h in ckpt["history"])
    assert 0 <= metrics["proposal/AR@100"] <= 1
    assert bool(ckpt["scaler"]) == (amp == "fp16")


def test_the_focal_loss_is_the_same_on_cpu_and_cuda():
    """``FocalLossRPN.compute_loss`` and its gradients on 200k anchors, CPU vs CUDA, to 1e-5 relative."""
    from torchvision.models.detection.anchor_utils import AnchorGenerator
    from torchvision.models.detection.rpn import RPNHead

    g = torch.Generator().manual_seed(0)
    r, n = 200_000, 2
    logits = torch.randn(r, 2, generator=g) * 3
    deltas = torch.randn(r, 4, generator=g)
    u = torch.rand(r, generator=g)
    labels = torch.where(u < 0.002, 1.0, torch.where(u < 0.7, 0.0, -1.0)).split(r // n)
    targets = torch.randn(r, 4, generator=g).split(r // n)
    results = {}
    for device in (torch.device("cpu"), DEVICE):
        for form, c in (("sigmoid", 1), ("softmax", 2)):
            head = RPNHead(4, 3) if c == 1 else None
            rpn = FocalLossRPN(AnchorGenerator(((16,),), ((0.5, 1.0, 2.0),)), head or _two_logit_head(), 0.7, 0.3,
                               {"training": 100, "testing": 100}, {"training": 50, "testing": 50}, 0.7,
                               form=form).to(device)  # fmt: skip
            z = logits[:, :c].clone().to(device).requires_grad_()
            d = deltas.clone().to(device).requires_grad_()
            obj, box = rpn.compute_loss(z, d, [t.to(device) for t in labels], [t.to(device) for t in targets])
            (obj + box).backward()
            results[device.type, form] = [t.detach().cpu().double() for t in (obj, box, z.grad, d.grad)]
    for form in ("sigmoid", "softmax"):
        for a, b in zip(results["cpu", form], results[DEVICE.type, form]):
            torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-9)


def _two_logit_head():
    from fl_rpn.modeling.rpn import TwoLogitRPNHead

    return TwoLogitRPNHead(4, 3)


def test_ddp_with_one_process_on_nccl():
    """DDP's gradient all-reduce and FL-RPN's normaliser all-reduce on NCCL (gloo on the CPU), one process."""
    backend = "nccl" if DEVICE.type == "cuda" else "gloo"
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    try:
        cfg = compose_config(["rpn=focal_softmax", "model.detector.min_size=96", "model.detector.max_size=128"])
        torch.manual_seed(0)
        model = build_model(cfg, num_classes=3).to(DEVICE).train()
        ddp = DistributedDataParallel(model, device_ids=[DEVICE.index or 0] if DEVICE.type == "cuda" else None)
        images, targets = batch(DEVICE)
        with EventStorage() as events:
            losses = ddp(images, targets)
        stats = {k.removeprefix("rpn/"): v for k, v in events.drain().items()}
        sum(losses.values()).backward()
        assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters() if p.requires_grad)
        count = stats["positive_anchors_per_image"].clone() * 2
        dist.all_reduce(count)  # a collective on the RPN's device tensors
        assert count.item() == stats["positive_anchors_per_image"].item() * 2
    finally:
        dist.destroy_process_group()
