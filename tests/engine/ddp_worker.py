"""One rank of the DDP tests (``tests/engine/test_distributed.py``), run as a script by ``launch_ddp``
(``tests/engine/conftest.py``): ``python tests/engine/ddp_worker.py SPEC``, with torchrun's environment variables
set by hand.

``kind: train`` runs the real app (``fl_rpn.cli.train.main``) with the spec's overrides and records the weights after
every optimizer step and the gradients of the first (``StepRecorder``); the sampler takes the first positives and
negatives by index (``first_k_sample``, see test_distributed.py for why). ``kind: normalizer`` computes the focal
RPN loss of every ``NORMALIZER_CASES`` case with N_pos all-reduced. Either writes ``<record>.<rank>.pt``.

Only absolute imports: this file runs as a script, outside the ``tests`` package.
"""

import json
import os
import sys

import torch
from torch.optim.optimizer import register_optimizer_step_post_hook
from torchvision.models.detection._utils import BalancedPositiveNegativeSampler


def first_k_sample(self, matched_idxs):
    """``BalancedPositiveNegativeSampler.__call__`` without randomness: the first positives and negatives by index."""
    pos_masks, neg_masks = [], []
    for matched in matched_idxs:
        positive, negative = torch.where(matched >= 1)[0], torch.where(matched == 0)[0]
        num_pos = min(int(self.batch_size_per_image * self.positive_fraction), positive.numel())
        num_neg = min(self.batch_size_per_image - num_pos, negative.numel())
        pos_mask = torch.zeros_like(matched, dtype=torch.uint8)
        neg_mask = torch.zeros_like(matched, dtype=torch.uint8)
        pos_mask[positive[:num_pos]] = 1
        neg_mask[negative[:num_neg]] = 1
        pos_masks.append(pos_mask)
        neg_masks.append(neg_mask)
    return pos_masks, neg_masks


class StepRecorder:
    """Global optimizer hook: the flat weights after every step and the flat gradients of the first."""

    def __init__(self) -> None:
        self.weights: list[torch.Tensor] = []
        self.first_grads: torch.Tensor | None = None
        self.handle = register_optimizer_step_post_hook(self)

    def __call__(self, optimizer, args, kwargs) -> None:
        params = [p for group in optimizer.param_groups for p in group["params"]]
        self.weights.append(torch.cat([p.detach().flatten() for p in params]).clone())
        if self.first_grads is None:
            self.first_grads = torch.cat([p.grad.flatten() for p in params]).clone()


# -- the worker: one rank ----------------------------------------------------------------------------------------
def worker(spec: dict) -> None:
    rank = int(os.environ["RANK"])
    BalancedPositiveNegativeSampler.__call__ = first_k_sample
    recorder = StepRecorder()
    if rank == spec.get("nan_on_rank"):  # a non-finite loss on this rank only, at the first iteration
        from fl_rpn.modeling.rpn import FocalLossRPN

        compute_loss = FocalLossRPN.compute_loss
        calls = []

        def nan_once(self, *args):
            loss_objectness, loss_box = compute_loss(self, *args)
            calls.append(1)
            return (loss_objectness * float("nan") if len(calls) == 1 else loss_objectness), loss_box

        FocalLossRPN.compute_loss = nan_once
    from fl_rpn.cli.train import main

    sys.argv = ["fl-rpn-train", *spec["overrides"], *spec.get("rank_overrides", {}).get(str(rank), [])]
    try:
        main()
    finally:
        torch.save({"weights": recorder.weights, "first_grads": recorder.first_grads}, f"{spec['record']}.{rank}.pt")


# positives per rank of a 2-rank global batch: more than ranks, fewer than ranks, none
NORMALIZER_CASES = {"both_ranks": (3, 2), "fewer_than_ranks": (1, 0), "none": (0, 0)}


def normalizer_inputs(num_pos: int, seed: int, form: str, n: int = 60):
    """``compute_loss`` inputs of one image with ``num_pos`` positives, 10 ignored anchors, the rest background."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.zeros(n)
    labels[:num_pos] = 1.0
    labels[-10:] = -1.0
    objectness = torch.randn(n, 2 if form == "softmax" else 1, generator=g, dtype=torch.float64)
    objectness[:, -1] -= 2.0  # object logit down: about half the negatives are easy (p < 0.1)
    return objectness, torch.randn(n, 4, generator=g, dtype=torch.float64), labels, torch.randn(n, 4, generator=g)


def loss_only_rpn(form: str, npos_ema: float | None = None):
    from torchvision.models.detection.anchor_utils import AnchorGenerator
    from torchvision.models.detection.rpn import RPNHead

    from fl_rpn import FocalLossRPN, TwoLogitRPNHead

    head = (TwoLogitRPNHead if form == "softmax" else RPNHead)(4, 3)
    anchors = AnchorGenerator(((16,),), ((0.5, 1.0, 2.0),))
    return FocalLossRPN(anchors, head, 0.7, 0.3, {"training": 10}, {"training": 10}, 0.7, form=form, npos_ema=npos_ema)


def boxpos_rpn():
    """``BoxPositivesRPN`` whose sample (64 anchors per image, half positive) takes every positive of the cases."""
    from torchvision.models.detection.anchor_utils import AnchorGenerator
    from torchvision.models.detection.rpn import RPNHead

    from fl_rpn.modeling.rpn import BoxPositivesRPN

    anchors = AnchorGenerator(((16,),), ((0.5, 1.0, 2.0),))
    return BoxPositivesRPN(anchors, RPNHead(4, 3), 0.7, 0.3, 64, 0.5, {"training": 10}, {"training": 10}, 0.7)


def normalizer_worker(spec: dict) -> None:
    """Each rank computes the focal RPN loss on its image of every case, with N_pos all-reduced."""
    import torch.distributed as dist

    from fl_rpn.events import EventStorage

    dist.init_process_group("gloo")
    rank, out = dist.get_rank(), {}
    for form in ("sigmoid", "softmax", "softmax_npos_ema"):  # the last: the cases as three steps of one average
        rpn = loss_only_rpn(form.removesuffix("_npos_ema"), npos_ema=0.9 if "npos_ema" in form else None)
        for case, counts in NORMALIZER_CASES.items():
            objectness, deltas, labels, targets = normalizer_inputs(counts[rank], rank, form.removesuffix("_npos_ema"))
            with EventStorage() as events:
                out[form, case] = torch.stack(rpn.compute_loss(objectness, deltas, [labels], [targets.double()]))
            out[form, case, "stats"] = {k.removeprefix("rpn/"): float(v) for k, v in events.drain().items()}
    boxpos = boxpos_rpn()  # the sampled RPN with the box loss / 2 N_pos: its N_pos is global too
    for case, counts in NORMALIZER_CASES.items():
        objectness, deltas, labels, targets = normalizer_inputs(counts[rank], rank, "sigmoid")
        out["boxpos", case] = boxpos.compute_loss(objectness, deltas, [labels], [targets.double()])[1]
    dist.destroy_process_group()
    torch.save(out, f"{spec['record']}.{rank}.pt")


if __name__ == "__main__":
    spec = json.loads(sys.argv[1])
    normalizer_worker(spec) if spec.get("kind") == "normalizer" else worker(spec)
