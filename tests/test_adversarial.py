"""FGSM and PGD: checked against the hand-derived input gradient of a linear softmax classifier."""

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from hessianflow.training.adversarial import fgsm, normalized_bounds, pgd, pixel_eps

DT = torch.float64


def _linear_problem(seed=0, n=16, d=7, c=4):
    g = torch.Generator().manual_seed(seed)
    model = nn.Linear(d, c).to(DT)
    with torch.no_grad():
        model.weight.copy_(torch.randn(c, d, generator=g, dtype=DT))
        model.bias.copy_(torch.randn(c, generator=g, dtype=DT))
    x = torch.randn(n, d, generator=g, dtype=DT)
    y = torch.randint(0, c, (n,), generator=g)
    return model, x, y


def _analytic_input_grad(model, x, y):
    # Mean cross-entropy of logits W x + b: dL/dx_i = W^T (softmax(W x_i + b) - onehot(y_i)) / n.
    W, b = model.weight.detach(), model.bias.detach()
    p = torch.softmax(x @ W.T + b, dim=1)
    onehot = F.one_hot(y, W.shape[0]).to(DT)
    return (p - onehot) @ W / x.shape[0]


class _ConvNet(nn.Module):
    """Conv + BatchNorm + dropout: exercises eval mode, per-channel eps and clamp."""

    def __init__(self, c=3, k=5):
        super().__init__()
        self.conv = nn.Conv2d(c, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.drop = nn.Dropout(0.5)
        self.fc = nn.Linear(4 * 6 * 6, k)

    def forward(self, x):
        h = torch.relu(self.bn(self.conv(x)))
        return self.fc(self.drop(h).flatten(1))


def _conv_problem(seed=0, n=8):
    torch.manual_seed(seed)
    model = _ConvNet().to(DT)
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.rand(n, 3, 6, 6, generator=g, dtype=DT)
    y = torch.randint(0, 5, (n,), generator=g)
    return model, x, y


def test_fgsm_matches_analytic_gradient_sign_of_linear_model():
    model, x, y = _linear_problem()
    eps = 0.05
    adv = fgsm(model, x, y, eps)
    delta = adv - x
    g = _analytic_input_grad(model, x, y)
    assert (g.abs() > 1e-12).all()  # no ties: the sign is well defined everywhere
    assert delta.abs().max() <= eps + 1e-12
    torch.testing.assert_close(delta, eps * g.sign(), rtol=0, atol=1e-12)
    # ... and it increases the loss, as a first-order step must for a small eps.
    assert F.cross_entropy(model(adv), y) > F.cross_entropy(model(x), y) + 1e-3


def test_fgsm_per_channel_eps_and_clamp():
    model, x, y = _conv_problem()
    std = [0.2, 0.5, 1.0]
    mean = [0.4, 0.5, 0.6]
    eps = pixel_eps(8 / 255, std)
    torch.testing.assert_close(eps.flatten(), torch.tensor([8 / 255 / s for s in std], dtype=DT))
    assert eps.shape == (3, 1, 1)

    # Unclamped: every coordinate moves by exactly its channel's eps (or 0 where the gradient is 0).
    xn = (x - torch.tensor(mean, dtype=DT).view(3, 1, 1)) / torch.tensor(std, dtype=DT).view(3, 1, 1)
    delta = fgsm(model, xn, y, eps) - xn
    for c in range(3):
        moved = delta[:, c].abs()
        assert moved.max() <= eps[c, 0, 0] + 1e-12
        nonzero = moved[moved > 0]
        torch.testing.assert_close(nonzero, torch.full_like(nonzero, eps[c, 0, 0].item()))
        assert nonzero.numel() > 0.5 * moved.numel()

    # Clamped to the normalised image of [0, 1], with a big eps so that the clamp is active.
    lo, hi = normalized_bounds(mean, std)
    torch.testing.assert_close(lo.flatten(), torch.tensor([-m / s for m, s in zip(mean, std)], dtype=DT))
    torch.testing.assert_close(hi.flatten(), torch.tensor([(1 - m) / s for m, s in zip(mean, std)], dtype=DT))
    adv = fgsm(model, xn, y, 10 * eps, clamp=(lo, hi))
    assert (adv >= lo - 1e-12).all() and (adv <= hi + 1e-12).all()
    # the clamp binds somewhere in each channel (so the check above has teeth) ...
    for c in range(3):
        assert ((adv[:, c] - lo[c]).abs() < 1e-12).any() or ((adv[:, c] - hi[c]).abs() < 1e-12).any()
    # ... and back in pixel space the result is a valid image within 80/255 of the original.
    pixels = adv * torch.tensor(std, dtype=DT).view(3, 1, 1) + torch.tensor(mean, dtype=DT).view(3, 1, 1)
    assert pixels.min() >= -1e-12 and pixels.max() <= 1 + 1e-12
    assert (pixels - x).abs().max() <= 80 / 255 + 1e-12


def test_fgsm_leaves_grads_modes_and_bn_stats_alone():
    model, x, y = _conv_problem()
    model.train()
    model.fc.eval()  # a mixed state must come back exactly
    known = torch.randn_like(model.conv.weight)
    model.conv.weight.grad = known.clone()
    assert model.fc.weight.grad is None
    bn_before = copy.deepcopy(model.bn.state_dict())
    modes_before = [m.training for m in model.modules()]
    xin = x.clone().requires_grad_(True)

    adv = fgsm(model, xin, y, 0.1)

    torch.testing.assert_close(model.conv.weight.grad, known, rtol=0, atol=0)
    assert model.fc.weight.grad is None and model.bn.weight.grad is None
    assert [m.training for m in model.modules()] == modes_before
    for k, v in model.bn.state_dict().items():
        torch.testing.assert_close(v, bn_before[k], rtol=0, atol=0)
    assert xin.requires_grad and xin.grad is None
    assert not adv.requires_grad and adv.grad_fn is None
    assert all(p.requires_grad for p in model.parameters())


def test_fgsm_uses_eval_mode():
    model, x, y = _conv_problem()
    model.train()
    adv_train_mode = fgsm(model, x, y, 0.1)
    ref = copy.deepcopy(model).eval()
    xr = x.clone().requires_grad_(True)
    (g_eval,) = torch.autograd.grad(F.cross_entropy(ref(xr), y), xr)
    torch.testing.assert_close(adv_train_mode, x + 0.1 * g_eval.sign(), rtol=0, atol=1e-12)
    # The batch-statistics (train-mode, dropout off) gradient has different signs: the test has teeth.
    ref.train()
    ref.drop.eval()
    xr = x.clone().requires_grad_(True)
    (g_train,) = torch.autograd.grad(F.cross_entropy(ref(xr), y), xr)
    assert (g_train.sign() != g_eval.sign()).any()


def test_fgsm_inside_no_grad_and_with_custom_criterion():
    model, x, y = _linear_problem()
    with torch.no_grad():
        adv = fgsm(model, x, y, 0.05, criterion=nn.CrossEntropyLoss(reduction="sum"))
    torch.testing.assert_close(adv - x, 0.05 * _analytic_input_grad(model, x, y).sign(), rtol=0, atol=1e-12)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"eps": -0.1},
        {"eps": float("nan")},
        {"eps": torch.ones(5, 1)},  # does not broadcast against [16, 7]
        {"eps": 0.1, "clamp": (1.0, 0.0)},
        {"eps": 0.1, "clamp": 0.5},
    ],
)
def test_fgsm_rejects_bad_arguments(kwargs):
    model, x, y = _linear_problem()
    with pytest.raises(ValueError):
        fgsm(model, x, y, **kwargs)


def test_fgsm_rejects_integer_inputs_and_batch_mismatch():
    model, x, y = _linear_problem()
    with pytest.raises(ValueError, match="floating-point"):
        fgsm(model, x.long(), y, 0.1)
    with pytest.raises(ValueError, match="batch"):
        fgsm(model, x, y[:-1], 0.1)


def test_pixel_eps_and_bounds_reject_bad_input():
    with pytest.raises(ValueError):
        pixel_eps(0.1, [0.2, 0.0])
    with pytest.raises(ValueError):
        pixel_eps(-0.1, [0.2])
    with pytest.raises(ValueError):
        normalized_bounds([0.5, 0.5], [0.2])


def test_pgd_stays_in_ball_and_clamp_and_beats_clean_loss():
    model, x, y = _conv_problem()
    model.train()
    modes_before = [m.training for m in model.modules()]
    bn_before = copy.deepcopy(model.bn.state_dict())
    eps = torch.tensor([0.03, 0.05, 0.08], dtype=DT).view(3, 1, 1)
    clamp = (0.0, 1.0)
    adv = pgd(model, x, y, eps, steps=10, clamp=clamp, seed=0)
    assert ((adv - x).abs() <= eps + 1e-12).all()
    assert adv.min() >= 0 and adv.max() <= 1
    model.eval()
    with torch.no_grad():
        clean, attacked = F.cross_entropy(model(x), y), F.cross_entropy(model(adv), y)
        fgsm_loss = F.cross_entropy(model(fgsm(model, x, y, eps, clamp=clamp)), y)
    model.train()
    assert attacked > clean + 1e-3
    # Ten projected steps do at least as well as one FGSM step here (fixed seed; not a theorem).
    assert attacked >= fgsm_loss - 1e-9
    assert [m.training for m in model.modules()] == modes_before
    for k, v in model.bn.state_dict().items():
        torch.testing.assert_close(v, bn_before[k], rtol=0, atol=0)
    assert all(p.grad is None for p in model.parameters())


def test_pgd_one_step_without_random_start_is_fgsm():
    model, x, y = _linear_problem()
    a = pgd(model, x, y, 0.05, steps=1, step_size=0.05, random_start=False)
    torch.testing.assert_close(a, fgsm(model, x, y, 0.05), rtol=0, atol=0)


def test_pgd_seed_reproducible_and_projection_when_input_outside_range():
    model, x, y = _linear_problem()
    a = pgd(model, x, y, 0.1, steps=3, seed=5)
    b = pgd(model, x, y, 0.1, steps=3, seed=5)
    c = pgd(model, x, y, 0.1, steps=3, seed=6, step_size=0.001)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert not torch.equal(a, c)
    # Inputs outside the data range: the data range wins (as in fgsm, whose clamp comes last).
    adv = pgd(model, x, y, 0.1, steps=3, clamp=(-0.5, 0.5), seed=0)
    assert adv.min() >= -0.5 and adv.max() <= 0.5
    inside = x.abs() <= 0.4
    assert ((adv - x).abs()[inside] <= 0.1 + 1e-12).all()


def test_pgd_rejects_bad_steps():
    model, x, y = _linear_problem()
    with pytest.raises(ValueError, match="steps"):
        pgd(model, x, y, 0.1, steps=0)
