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
from torch import Tensor

__all__ = ["sigmoid_focal_loss", "softmax_focal_loss", "objectness_probability"]


class _SigmoidFocalLoss(torch.autograd.Function):
    """The per-anchor sigmoid focal loss with its gradient written out: a few passes over the anchors each way.

    With ``m`` minus the logit of ``p_t`` and ``p = sigmoid(m) = 1 - p_t``: ``loss = w * p^gamma * softplus(m)``
    and ``d loss / d m = w * p^gamma * (gamma * (1 - p) * softplus(m) + p)``, where ``w`` is ``alpha_t`` (0 for
    anchors outside ``valid``). Autograd through the same expression would save each of its ``[N]``
    intermediates for the backward; this saves five.
    """

    @staticmethod
    def forward(ctx, logits: Tensor, positive: Tensor, valid: Tensor | None, alpha: float, gamma: float) -> Tensor:
        m = torch.where(positive, -logits, logits)
        # alpha_t without a 0-d tensor made from a Python number (on CUDA, a blocking host-to-device copy)
        weight = torch.full_like(logits, 1.0 - alpha).masked_fill_(positive, alpha)
        if valid is not None:  # ignored anchors: weight 0, and m = 0 so a non-finite logit cannot leak in as NaN
            m = torch.where(valid, m, 0.0)
            weight = torch.where(valid, weight, 0.0)
        p = torch.sigmoid(m)
        # softplus(m) = -log p_t, stable for any m. log(1 + x) differs from log1p(x) by less than 1e-7 absolute
        # (tests/test_losses.py), and only for easy anchors whose loss is p^gamma-small anyway.
        nll = m.clamp(min=0) + torch.log(1 + torch.exp(-m.abs()))
        modulator = p.pow(gamma)
        ctx.save_for_backward(positive, weight, p, nll, modulator)
        ctx.gamma = gamma
        return weight * modulator * nll

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: Tensor):
        positive, weight, p, nll, modulator = ctx.saved_tensors
        grad_m = grad * weight * modulator * ((1 - p) * nll * ctx.gamma + p)
        return torch.where(positive, -grad_m, grad_m), None, None, None, None


def sigmoid_focal_loss(
    logits: Tensor, targets: Tensor, alpha: float = 0.25, gamma: float = 2.0, valid: Tensor | None = None
) -> Tensor:
    """Per-anchor sigmoid focal loss, no reduction (the values of ``torchvision.ops.sigmoid_focal_loss``).

    With ``m = -z`` for object anchors and ``m = z`` for background ones (``m`` is minus the logit of
    ``p_t``): ``-log p_t = softplus(m)`` and ``1 - p_t = sigmoid(m)``; the gradient is computed in closed
    form (``_SigmoidFocalLoss``) rather than by autograd over a dozen intermediate tensors.

    Args:
        logits: ``[N]`` object logit per anchor.
        targets: ``[N]`` 1 for object, 0 for background (bool or any float or integer dtype).
        valid: ``[N]`` bool, optional: anchors outside it get loss 0 and gradient 0, whatever their logit.

    Returns:
        ``[N]`` loss per anchor.
    """
    return _SigmoidFocalLoss.apply(logits, targets.to(torch.bool), valid, alpha, gamma)


def softmax_focal_loss(
    logits: Tensor, targets: Tensor, alpha: float = 0.25, gamma: float = 2.0, valid: Tensor | None = None
) -> Tensor:
    """Per-anchor two-class softmax focal loss, finite for logits of +-50.

    Computed as the sigmoid focal loss of ``z_obj - z_bg``, which is exact: ``log_softmax(z)[obj] =
    logsigmoid(z_obj - z_bg)``, so this is the ``log_softmax`` form without its slow ``[N, 2]`` passes.

    Args:
        logits: ``[N, 2]``; column 0 is background, column 1 is object.
        targets: ``[N]`` 1 for object, 0 for background.
        valid: ``[N]`` bool, optional: anchors outside it get loss 0 and gradient 0.

    Returns:
        ``[N]`` loss per anchor.
    """
    if logits.dim() != 2 or logits.shape[1] != 2:
        raise ValueError(f"softmax_focal_loss expects logits of shape [N, 2], got {tuple(logits.shape)}")
    z_background, z_object = logits.unbind(1)
    return sigmoid_focal_loss(z_object - z_background, targets, alpha, gamma, valid)


def objectness_probability(logits: Tensor) -> Tensor:
    """Object probability from ``[N]`` / ``[N, 1]`` sigmoid logits or ``[N, 2]`` softmax logits; returns ``[N]``."""
    if logits.dim() == 2 and logits.shape[1] == 2:
        return torch.sigmoid(logits[:, 1] - logits[:, 0])
    return torch.sigmoid(logits.reshape(-1))
