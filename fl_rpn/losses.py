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
from torchvision.ops import sigmoid_focal_loss as _torchvision_sigmoid_focal_loss

__all__ = ["sigmoid_focal_loss", "softmax_focal_loss", "objectness_probability"]


def sigmoid_focal_loss(logits: Tensor, targets: Tensor, alpha: float = 0.25, gamma: float = 2.0) -> Tensor:
    """Per-anchor sigmoid focal loss (torchvision's implementation, no reduction).

    Args:
        logits: ``[N]`` object logit per anchor.
        targets: ``[N]`` 1 for object, 0 for background (any float or integer dtype).

    Returns:
        ``[N]`` loss per anchor.
    """
    return _torchvision_sigmoid_focal_loss(logits, targets.to(logits.dtype), alpha=alpha, gamma=gamma)


def softmax_focal_loss(logits: Tensor, targets: Tensor, alpha: float = 0.25, gamma: float = 2.0) -> Tensor:
    """Per-anchor two-class softmax focal loss, computed in log space so logits of +-50 stay finite.

    Args:
        logits: ``[N, 2]``; column 0 is background, column 1 is object.
        targets: ``[N]`` 1 for object, 0 for background.

    Returns:
        ``[N]`` loss per anchor.
    """
    if logits.dim() != 2 or logits.shape[1] != 2:
        raise ValueError(f"softmax_focal_loss expects logits of shape [N, 2], got {tuple(logits.shape)}")
    targets = targets.long()
    log_p_t = F.log_softmax(logits, dim=1).gather(1, targets[:, None]).squeeze(1)
    p_t = log_p_t.exp()
    is_object = targets.to(logits.dtype)
    alpha_t = alpha * is_object + (1 - alpha) * (1 - is_object)
    return -alpha_t * (1 - p_t).pow(gamma) * log_p_t


def objectness_probability(logits: Tensor) -> Tensor:
    """Object probability from ``[N]`` / ``[N, 1]`` sigmoid logits or ``[N, 2]`` softmax logits; returns ``[N]``."""
    if logits.dim() == 2 and logits.shape[1] == 2:
        return torch.sigmoid(logits[:, 1] - logits[:, 0])
    return torch.sigmoid(logits.reshape(-1))
