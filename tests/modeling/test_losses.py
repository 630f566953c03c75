import math

import pytest
import torch

from fl_rpn.modeling.losses import objectness_probability, sigmoid_focal_loss, softmax_focal_loss


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


def autograd_reference(logits, targets, alpha, gamma):
    """The focal loss written plainly, differentiated by autograd: what the closed-form backward must equal."""
    p = torch.sigmoid(logits)
    p_t = torch.where(targets, p, 1 - p)
    alpha_t = torch.where(targets, logits.new_tensor(alpha), logits.new_tensor(1 - alpha))  # not float32 scalars
    return -alpha_t * (1 - p_t) ** gamma * torch.log(p_t)


@pytest.mark.parametrize("alpha,gamma", [(0.25, 2.0), (0.5, 0.0), (0.75, 1.0), (0.3, 1.5), (0.25, 3.0)])
def test_closed_form_gradient_equals_autograd_of_the_definition(alpha, gamma):
    g = torch.Generator().manual_seed(1)
    logits = (torch.randn(400, generator=g, dtype=torch.float64) * 4).requires_grad_()
    targets = torch.rand(400, generator=g) < 0.3
    weights = torch.rand(400, generator=g, dtype=torch.float64)  # an arbitrary upstream gradient
    (sigmoid_focal_loss(logits, targets, alpha, gamma) * weights).sum().backward()
    ours = logits.grad.clone()
    logits.grad = None
    (autograd_reference(logits, targets, alpha, gamma) * weights).sum().backward()
    torch.testing.assert_close(ours, logits.grad, rtol=1e-10, atol=1e-12)
    valid = torch.rand(400, generator=g) < 0.8
    assert torch.autograd.gradcheck(
        lambda z: sigmoid_focal_loss(z, targets, alpha, gamma, valid=valid), (logits.detach().requires_grad_(),)
    )


def test_valid_mask_zeroes_loss_and_gradient_even_for_non_finite_logits():
    logits = torch.tensor([0.5, float("nan"), float("inf"), -2.0, float("-inf")], requires_grad=True)
    targets = torch.tensor([1, 0, 1, 0, 0])
    valid = torch.tensor([True, False, False, True, False])
    loss = sigmoid_focal_loss(logits, targets, valid=valid)
    loss.sum().backward()
    expected = torch.tensor([focal_closed_form(1 / (1 + math.exp(-0.5)), True, 0.25, 2.0), 0.0, 0.0,
                             focal_closed_form(1 / (1 + math.exp(2.0)), False, 0.25, 2.0), 0.0])  # fmt: skip
    torch.testing.assert_close(loss, expected)
    assert logits.grad[[1, 2, 4]].eq(0).all() and logits.grad[[0, 3]].ne(0).all()


def test_values_match_torchvision_sigmoid_focal_loss():
    from torchvision.ops import sigmoid_focal_loss as torchvision_focal

    g = torch.Generator().manual_seed(2)
    logits = torch.randn(10_000, generator=g) * 6
    targets = (torch.rand(10_000, generator=g) < 0.1).float()
    torch.testing.assert_close(sigmoid_focal_loss(logits, targets), torchvision_focal(logits, targets))


def test_log_one_plus_exp_is_within_1e7_of_log1p():
    """The accuracy claim in ``_SigmoidFocalLoss.forward``: in float32, ``log(1 + x)`` for ``x = exp(-|m|)`` is within
    1e-7 of ``log1p(x)``, and the loss matches a float64 ``log1p`` reference to float32 precision."""
    m = torch.linspace(-40, 40, 200_001)
    x = torch.exp(-m.abs())
    assert (torch.log(1 + x) - torch.log1p(x)).abs().max().item() < 1e-7
    m64 = m.double()
    reference = 0.75 * torch.sigmoid(m64) ** 2 * (m64.clamp(min=0) + torch.log1p(torch.exp(-m64.abs())))
    torch.testing.assert_close(sigmoid_focal_loss(m, torch.zeros_like(m), 0.25, 2.0).double(), reference,
                               rtol=1.3e-6, atol=1e-7)  # fmt: skip
