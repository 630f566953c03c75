"""Image + box transforms (torchvision.transforms.v2). No resizing: the model's
GeneralizedRCNNTransform resizes and normalises."""

from __future__ import annotations

import torch
from torchvision.transforms import v2


def build_transforms(train: bool, hflip_prob: float = 0.5) -> v2.Compose:
    """uint8 image -> float32 [0, 1]; when training, a random horizontal flip.

    Expects ``(image, target)`` with ``target['boxes']`` a ``tv_tensors.BoundingBoxes``, so the
    flip moves the boxes with the image. SanitizeBoundingBoxes removes boxes (and their
    ``labels``) that a transform has made smaller than 1 px.
    """
    steps: list = [v2.ToImage()]
    if train:
        steps.append(v2.RandomHorizontalFlip(p=hflip_prob))
    steps.append(v2.ToDtype(torch.float32, scale=True))
    if train:
        steps.append(v2.SanitizeBoundingBoxes())
    return v2.Compose(steps)
