import math

import pytest
import torch

from fl_rpn.losses import objectness_probability, sigmoid_focal_loss, softmax_focal_loss


def focal_closed_form(p_object: float, is_object: bool, alpha: float, gamma: float) -> float:
    p_t = p_object if is_object else 1 - p_object
    alpha_t = alpha if is_object else 1 - alpha
    return -alpha_t * (1 - p_t) ** gamma * math.log(p_t)


@pytest.mark.parametrize("alpha,gamma", [(0.25, 2.0), (0.5, 0.0), (0.75, 1.0), (0.25, 3.0)])
def test_both_forms_match_closed_form(alpha, gamma):
    d = torch.tensor([0.0, math.log(3.0), -2.0, 4.0, 0.0], dtype=torch.float64)
    targets = torch.tensor([1, 1, 0, 0, 0])
    expected = torch.tensor(
        [focal_closed_form(1 / (1 + math.exp(-x)), bool(t), alpha, gamma) for x, t in zip(d.tolist(), targets)],
        dtype=torch.float64,
    )
    torch.testing.assert_close(sigmoid_focal_loss(d, targets, alpha, gamma), expected)
    two_logits = torch.stack([torch.zeros_like(d), d], dim=1)
    torch.testing.assert_close(softmax_focal_loss(two_logits, targets, alpha, gamma), expected)


def test_hand_values():
    # logit 0 -> p = 0.5: object 0.25 * 0.5^2 * ln 2, background 0.75 * 0.5^2 * ln 2
    loss = sigmoid_focal_loss(torch.zeros(2), torch.tensor([1, 0]))
    torch.testing.assert_close(loss, torch.tensor([0.0625 * math.log(2), 0.1875 * math.log(2)]))
    # softmax logits (0, ln 3): p_object = 0.75 -> 0.25 * 0.25^2 * -ln 0.75
    loss = softmax_focal_loss(torch.tensor([[0.0, math.log(3.0)]]), torch.tensor([1]))
    torch.testing.assert_close(loss, torch.tensor([0.25 * 0.0625 * -math.log(0.75)]))


def test_softmax_is_sigmoid_of_logit_difference_values_and_gradients():
    logits = torch.randn(1000, 2, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, 2, (1000,))
    soft = softmax_focal_loss(logits, targets)
    diff = (logits[:, 1] - logits[:, 0]).detach().requires_grad_()
    sig = sigmoid_focal_loss(diff, targets)
    torch.testing.assert_close(soft, sig)
    soft.sum().backward()
    sig.sum().backward()
    torch.testing.assert_close(logits.grad[:, 1], diff.grad)
    torch.testing.assert_close(logits.grad[:, 0], -diff.grad)


def test_gamma_zero_is_alpha_weighted_cross_entropy():
    logits = torch.randn(50, dtype=torch.float64)
    targets = torch.randint(0, 2, (50,)).double()
    bce = torch.nn.functional.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    torch.testing.assert_close(sigmoid_focal_loss(logits, targets, alpha=0.5, gamma=0.0), 0.5 * bce)


def test_extreme_logits_stay_finite():
    logits = torch.tensor([[50.0, -50.0], [-50.0, 50.0], [50.0, -50.0]], requires_grad=True)
    loss = softmax_focal_loss(logits, torch.tensor([1, 0, 0]))
    loss.sum().backward()
    assert torch.isfinite(loss).all() and torch.isfinite(logits.grad).all()
    # a confidently wrong anchor: p_t = sigmoid(-100), -log p_t = 100, (1 - p_t)^2 = 1
    torch.testing.assert_close(loss[0], torch.tensor(0.25 * 100.0))
    assert loss[2] == 0.0


def test_shape_errors_and_probability():
    with pytest.raises(ValueError, match=r"\[N, 2\]"):
        softmax_focal_loss(torch.zeros(4, 1), torch.zeros(4))
    torch.testing.assert_close(objectness_probability(torch.tensor([[0.0, math.log(3.0)]])), torch.tensor([0.75]))
    torch.testing.assert_close(objectness_probability(torch.tensor([[0.0]])), torch.tensor([0.5]))


def test_softmax_form_equals_the_log_softmax_definition():
    logits = torch.randn(500, 2, dtype=torch.float64) * 20
    logits[:3] = torch.tensor([[50.0, -50.0], [-50.0, 50.0], [0.0, 0.0]], dtype=torch.float64)
    targets = torch.randint(0, 2, (500,))
    log_p_t = torch.log_softmax(logits, dim=1).gather(1, targets[:, None]).squeeze(1)
    alpha_t = torch.where(targets == 1, 0.25, 0.75).double()
    reference = -alpha_t * (1 - log_p_t.exp()) ** 2 * log_p_t
    torch.testing.assert_close(softmax_focal_loss(logits, targets), reference)
