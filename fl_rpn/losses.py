"""Focal losses for objectness, as pure functions (no modules, no config).

Shapes: ``N`` anchors (all images of a batch concatenated).

``FL(p_t) = -alpha_t * (1 - p_t) ** gamma * log(p_t)`` (Lin et al., RetinaNet), where ``p_t`` is the
predicted probability of the anchor's true class and ``alpha_t`` is ``alpha`` for object anchors and
``1 - alpha`` for background anchors.

The two forms are the same function of different parameters: with logits ``(z_bg, z_obj)`` the softmax
object probability is ``sigmoid(z_obj - z_bg)``, so ``softmax_focal_loss([z_bg, z_obj])`` equals
``sigmoid_focal_loss(z_obj - z_bg)``. What differs is training: the difference of two independently
initialised and updated logits moves with twice the effective learning rate (and starts with twice
the variance) of a single logit.
"""

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["sigmoid_focal_loss", "softmax_focal_loss", "objectness_probability"]


def sigmoid_focal_loss(logits: Tensor, targets: Tensor, alpha: float = 0.25, gamma: float = 2.0) -> Tensor:
    """Per-anchor sigmoid focal loss, no reduction (the values of ``torchvision.ops.sigmoid_focal_loss``).

    With ``m = -z`` for object anchors and ``m = z`` for background ones (``m`` is minus the logit of
    ``p_t``): ``-log p_t = softplus(m)`` and ``1 - p_t = sigmoid(m)``. This takes about half the passes
    over the anchors of torchvision's form, and does not round ``1 - p_t`` through ``1 - (1 - p)``.

    Args:
        logits: ``[N]`` object logit per anchor.
        targets: ``[N]`` 1 for object, 0 for background (bool or any float or integer dtype).

    Returns:
        ``[N]`` loss per anchor.
    """
    positive = targets.to(torch.bool)
    m = logits * torch.where(positive, -1.0, 1.0).to(logits.dtype)
    alpha_t = torch.where(positive, alpha, 1.0 - alpha).to(logits.dtype)
    return alpha_t * torch.sigmoid(m).pow(gamma) * F.softplus(m)


def softmax_focal_loss(logits: Tensor, targets: Tensor, alpha: float = 0.25, gamma: float = 2.0) -> Tensor:
    """Per-anchor two-class softmax focal loss, finite for logits of +-50.

    Computed as the sigmoid focal loss of ``z_obj - z_bg``, which is exact: ``log_softmax(z)[obj] =
    logsigmoid(z_obj - z_bg)``, so this is the ``log_softmax`` form without its slow ``[N, 2]`` passes.

    Args:
        logits: ``[N, 2]``; column 0 is background, column 1 is object.
        targets: ``[N]`` 1 for object, 0 for background.

    Returns:
        ``[N]`` loss per anchor.
    """
    if logits.dim() != 2 or logits.shape[1] != 2:
        raise ValueError(f"softmax_focal_loss expects logits of shape [N, 2], got {tuple(logits.shape)}")
    z_background, z_object = logits.unbind(1)
    return sigmoid_focal_loss(z_object - z_background, targets, alpha, gamma)


def objectness_probability(logits: Tensor) -> Tensor:
    """Object probability from ``[N]`` / ``[N, 1]`` sigmoid logits or ``[N, 2]`` softmax logits; returns ``[N]``."""
    if logits.dim() == 2 and logits.shape[1] == 2:
        return torch.sigmoid(logits[:, 1] - logits[:, 0])
    return torch.sigmoid(logits.reshape(-1))
