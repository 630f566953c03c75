"""Inference over a loader: detections and RPN proposals in original-image coordinates, fed to evaluators."""

from collections.abc import Iterable

import torch
from torch import nn
from torchvision.models.detection.transform import resize_boxes
from tqdm import tqdm

from ..data.build import shutdown_workers
from ..evaluation import Evaluator
from .distributed import SINGLE_PROCESS, DistInfo


class ProposalCapture:
    """Records the RPN's proposals of the last forward, rescaled to the original image sizes.

    ``with ProposalCapture(model) as capture: outputs = model(images)``; then ``capture.proposals`` is a
    list of ``[P_n, 4]`` tensors (best first), one per image.
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.proposals: list[torch.Tensor] = []
        self._resized_sizes: list[tuple[int, int]] = []

    def __enter__(self) -> "ProposalCapture":
        self._hooks = [
            self.model.transform.register_forward_hook(self._on_transform),
            self.model.rpn.register_forward_hook(self._on_rpn),
        ]
        return self

    def __exit__(self, *exc) -> None:
        for h in self._hooks:
            h.remove()

    def _on_transform(self, module, args, output) -> None:
        self._resized_sizes = list(output[0].image_sizes)

    def _on_rpn(self, module, args, output) -> None:
        self.proposals = [p.detach() for p in output[0]]

    def rescaled(self, original_sizes: list[tuple[int, int]]) -> list[torch.Tensor]:
        return [
            resize_boxes(p, resized, original)
            for p, resized, original in zip(self.proposals, self._resized_sizes, original_sizes)
        ]


@torch.inference_mode()
def predict(model: nn.Module, images: list[torch.Tensor]) -> list[dict[str, torch.Tensor]]:
    """Detections (``boxes`` [D, 4], ``scores`` [D], ``labels`` [D]) and ``proposals`` [P, 4] per image, on the CPU."""
    with ProposalCapture(model) as capture:
        outputs = model(images)
    proposals = capture.rescaled([tuple(img.shape[-2:]) for img in images])
    return [{**{k: v.cpu() for k, v in o.items()}, "proposals": p.cpu()} for o, p in zip(outputs, proposals)]


def evaluate(
    model: nn.Module,
    loader: Iterable,
    evaluators: list[Evaluator],
    device: torch.device,
    dist_info: DistInfo = SINGLE_PROCESS,
    progress: bool = True,
) -> dict[str, float]:
    """Run ``model`` over ``loader`` (``(images, targets)`` batches) and return every evaluator's metrics.

    In a distributed run each rank evaluates its shard and rank 0 computes the metrics (others get ``{}``).
    """
    was_training = model.training
    model.eval()
    for ev in evaluators:
        ev.reset()
    batches = iter(loader)
    try:
        for images, targets in tqdm(batches, desc="eval", total=len(loader) if hasattr(loader, "__len__") else None,
                                    disable=not (progress and dist_info.is_main), leave=False):  # fmt: skip
            outputs = predict(model, [img.to(device, non_blocking=img.is_pinned()) for img in images])
            for ev in evaluators:
                ev.update(targets, outputs)
    finally:
        shutdown_workers(batches)  # also after an error (a bad image in a worker), or its workers outlive us
    model.train(was_training)
    metrics: dict[str, float] = {}
    for ev in evaluators:
        ev.gather()
        if dist_info.is_main:
            metrics.update(ev.compute())
    return metrics


def select_device(name: str) -> torch.device:
    """``auto`` (CUDA when available), ``cpu``, ``cuda`` or ``cuda:N`` (config key ``device``)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device={name} but CUDA is not available; use device=cpu or device=auto")
    return torch.device(name)


def run_evaluation(cfg, model: nn.Module, val_set, device: torch.device, dist_info: DistInfo) -> dict[str, float]:
    """The configured evaluators (``cfg.eval.evaluators``, each with its options ``cfg.eval.<name>``) over
    ``val_set``; the metrics on rank 0, ``{}`` on other ranks."""
    from ..data import build_loader
    from ..evaluation import build_evaluators, evaluator_options

    evaluators = build_evaluators(list(cfg.eval.evaluators), val_set.meta, evaluator_options(cfg.eval))
    loader = build_loader(
        val_set, cfg.eval.batch_size, cfg.num_workers, seed=cfg.seed, distributed=dist_info.enabled,
        pin_memory=device.type == "cuda",
    )  # fmt: skip
    return evaluate(model, loader, evaluators, device, dist_info)
