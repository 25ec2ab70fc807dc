"""Adversarial examples: the fast gradient sign method (FGSM) and projected gradient descent (PGD).

FGSM (Goodfellow, Shlens and Szegedy 2015, "Explaining and harnessing adversarial examples") takes one
signed-gradient step of size :math:`\\epsilon` in input space,

.. math::
    x_{adv} = \\Pi_{[lo, hi]}\\big(x + \\epsilon\\,\\mathrm{sign}(\\nabla_x \\ell(f(x), y))\\big),

and PGD (Madry et al. 2018, "Towards deep learning models resistant to adversarial attacks") iterates
such steps, projecting back onto the :math:`L_\\infty` ball of radius :math:`\\epsilon` around
:math:`x` and onto the valid data range after each one.

Both are used by ABSA (:mod:`hessianflow.training.absa`) to regularise large-batch training.

Conventions:

- ``eps`` and ``clamp`` are given in the model's *input space*. For data normalised per channel as
  :math:`(x - \\mu_c)/\\sigma_c`, an :math:`\\epsilon` given in ``[0, 1]`` pixel units becomes
  :math:`\\epsilon/\\sigma_c` (see :func:`pixel_eps`) and the valid range :math:`[0, 1]` becomes
  :math:`[-\\mu_c/\\sigma_c, (1-\\mu_c)/\\sigma_c]` (see :func:`normalized_bounds`). HessianFlow
  clamped the adversarial batch to the min/max of the clean *batch*, which depends on the batch and
  is not the data range; pass ``clamp`` explicitly instead.
- The gradient is taken in eval mode (BatchNorm uses its running statistics and does not update
  them, dropout is off); the train/eval flag of every submodule is restored afterwards.
- Only the gradient with respect to the input is computed (``torch.autograd.grad``), so the
  parameters' ``.grad`` are never touched and no graph outlives the call.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn

from .._checks import check_int
from .._modes import model_mode
from .._random import make_generator

__all__ = ["fgsm", "pgd", "pixel_eps", "normalized_bounds"]


def pixel_eps(eps: float, std: Sequence[float] | torch.Tensor) -> torch.Tensor:
    """Convert an L-infinity radius in pixel units into the normalised input space.

    For inputs normalised per channel as :math:`(x - \\mu_c)/\\sigma_c`, a perturbation of
    :math:`\\epsilon` pixel units is :math:`\\epsilon/\\sigma_c` in the model's input space.

    Args:
        eps: the radius in pixel units (for images in ``[0, 1]``, e.g. ``8/255``).
        std: the per-channel standard deviations used for normalisation, length ``C``.

    Returns:
        A float64 tensor of shape ``[C, 1, 1]`` (broadcastable against ``[B, C, H, W]``) to pass as
        ``eps`` to :func:`fgsm` / :func:`pgd`.

    Example:
        >>> from hessianflow.training.adversarial import pixel_eps
        >>> pixel_eps(8 / 255, std=(0.5, 0.25, 0.5)).flatten()  # 8/255 in pixel units, per channel
        tensor([0.0627, 0.1255, 0.0627], dtype=torch.float64)
    """
    std_t = torch.as_tensor(std, dtype=torch.float64).flatten()
    if std_t.numel() == 0 or not torch.isfinite(std_t).all() or (std_t <= 0).any():
        raise ValueError(f"std must be a non-empty sequence of positive finite numbers, got {std}")
    eps = float(eps)
    if not eps >= 0 or eps == float("inf"):
        raise ValueError(f"eps must be a finite number >= 0, got {eps}")
    return (eps / std_t).view(-1, 1, 1)


def normalized_bounds(
    mean: Sequence[float] | torch.Tensor,
    std: Sequence[float] | torch.Tensor,
    lo: float = 0.0,
    hi: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The valid data range ``[lo, hi]`` mapped through per-channel normalisation.

    Returns:
        ``((lo - mean)/std, (hi - mean)/std)`` as float64 tensors of shape ``[C, 1, 1]``, to pass as
        ``clamp`` to :func:`fgsm` / :func:`pgd`.

    Example:
        >>> from hessianflow.training.adversarial import normalized_bounds
        >>> lo, hi = normalized_bounds(mean=(0.5, 0.5, 0.5), std=(0.5, 0.25, 0.5))
        >>> lo.flatten(), hi.flatten()  # [0, 1] pixels, normalised per channel
        (tensor([-1., -2., -1.], dtype=torch.float64), tensor([1., 2., 1.], dtype=torch.float64))
    """
    mean_t = torch.as_tensor(mean, dtype=torch.float64).flatten()
    std_t = torch.as_tensor(std, dtype=torch.float64).flatten()
    if mean_t.shape != std_t.shape:
        raise ValueError(f"mean and std must have the same length, got {mean_t.numel()} and {std_t.numel()}")
    if std_t.numel() == 0 or (std_t <= 0).any():
        raise ValueError(f"std must be a non-empty sequence of positive numbers, got {std}")
    if not lo < hi:
        raise ValueError(f"need lo < hi, got lo={lo}, hi={hi}")
    return ((lo - mean_t) / std_t).view(-1, 1, 1), ((hi - mean_t) / std_t).view(-1, 1, 1)


# -- helpers ---------------------------------------------------------------------------------------


def _check_inputs(inputs: torch.Tensor, targets: torch.Tensor) -> None:
    if not isinstance(inputs, torch.Tensor) or not inputs.is_floating_point():
        raise ValueError(
            "inputs must be a floating-point tensor, got "
            + (str(inputs.dtype) if isinstance(inputs, torch.Tensor) else type(inputs).__name__)
        )
    if not isinstance(targets, torch.Tensor):
        raise ValueError(f"targets must be a tensor, got {type(targets).__name__}")
    if inputs.dim() == 0 or targets.dim() == 0 or inputs.shape[0] != targets.shape[0]:
        raise ValueError(
            f"inputs and targets must share the batch dimension, got shapes {tuple(inputs.shape)} "
            f"and {tuple(targets.shape)}"
        )


def _as_radius(eps, like: torch.Tensor, name: str = "eps") -> torch.Tensor:
    """``eps`` (a float or a tensor broadcastable per channel) as a tensor on ``like``'s dtype/device."""
    t = torch.as_tensor(eps, dtype=torch.float64)
    if not torch.isfinite(t).all() or (t < 0).any():
        raise ValueError(f"{name} must be finite and >= 0, got {eps}")
    t = t.to(device=like.device, dtype=like.dtype)
    try:
        torch.broadcast_shapes(t.shape, like.shape)
    except RuntimeError as exc:
        raise ValueError(
            f"{name} of shape {tuple(t.shape)} does not broadcast against inputs of shape {tuple(like.shape)}"
        ) from exc
    return t


def _as_bounds(clamp, like: torch.Tensor):
    """``clamp=(lo, hi)`` as two tensors on ``like``'s dtype/device, or ``None``."""
    if clamp is None:
        return None
    try:
        lo, hi = clamp
    except (TypeError, ValueError) as exc:
        raise ValueError(f"clamp must be a pair (lo, hi), got {clamp!r}") from exc
    lo_t = torch.as_tensor(lo, dtype=torch.float64)
    hi_t = torch.as_tensor(hi, dtype=torch.float64)
    try:
        lo_t, hi_t = torch.broadcast_tensors(lo_t, hi_t)
        torch.broadcast_shapes(lo_t.shape, like.shape)
    except RuntimeError as exc:
        raise ValueError(
            f"clamp bounds of shapes {tuple(torch.as_tensor(lo).shape)} and "
            f"{tuple(torch.as_tensor(hi).shape)} do not broadcast against inputs of shape {tuple(like.shape)}"
        ) from exc
    if torch.isnan(lo_t).any() or torch.isnan(hi_t).any() or (lo_t > hi_t).any():
        raise ValueError("clamp bounds must satisfy lo <= hi (and not be NaN)")
    return lo_t.to(device=like.device, dtype=like.dtype), hi_t.to(device=like.device, dtype=like.dtype)


def _clamp(x: torch.Tensor, bounds) -> torch.Tensor:
    if bounds is None:
        return x
    return torch.minimum(torch.maximum(x, bounds[0]), bounds[1])


def _input_grad(model: nn.Module, x: torch.Tensor, targets: torch.Tensor, criterion) -> torch.Tensor:
    """The gradient of ``criterion(model(x), targets)`` w.r.t. ``x`` only (no parameter ``.grad``)."""
    x = x.detach().clone().requires_grad_(True)
    with torch.enable_grad():
        loss = criterion(model(x), targets)
        if loss.dim() != 0:
            # A criterion with reduction="none": its sum has the same input-gradient signs as the mean.
            loss = loss.sum()
        (grad,) = torch.autograd.grad(loss, x)
    return grad


# -- attacks ---------------------------------------------------------------------------------------


def fgsm(
    model: nn.Module,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    eps,
    criterion=None,
    clamp=None,
) -> torch.Tensor:
    """Fast gradient sign method (Goodfellow et al. 2015).

    .. math::
        x_{adv} = \\Pi_{[lo, hi]}\\big(x + \\epsilon\\,\\mathrm{sign}(\\nabla_x \\ell(f(x), y))\\big)

    The gradient is computed in eval mode (so BatchNorm's running statistics are neither used from the
    batch nor updated, as in HessianFlow's ABSA); every submodule's train/eval flag is restored. The
    parameters' ``.grad`` are left exactly as they were.

    Args:
        model: the network; ``model(inputs)`` returns logits (or whatever ``criterion`` expects).
        inputs: a floating-point batch ``[B, ...]``, in the model's input space.
        targets: the labels ``[B]`` (or what ``criterion`` expects).
        eps: the L-infinity radius in input space: a float or a tensor broadcastable against
            ``inputs`` (e.g. ``[C, 1, 1]`` per channel; see :func:`pixel_eps`).
        criterion: the loss to increase; default ``nn.CrossEntropyLoss()``.
        clamp: ``(lo, hi)``, the valid data range in input space (floats or tensors broadcastable
            per channel; see :func:`normalized_bounds`); ``None`` for no clamping.

    Returns:
        The adversarial inputs, detached, with the dtype, shape and device of ``inputs``.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from hessianflow.training.adversarial import fgsm
        >>> _ = torch.manual_seed(0)
        >>> model = nn.Linear(4, 3)
        >>> x, y = torch.rand(2, 4), torch.tensor([0, 2])
        >>> adv = fgsm(model, x, y, 0.1, clamp=(0.0, 1.0))
        >>> bool((adv - x).abs().max() <= 0.1 + 1e-7), bool(adv.min() >= 0 and adv.max() <= 1)
        (True, True)
        >>> loss = nn.functional.cross_entropy
        >>> bool(loss(model(adv), y) > loss(model(x), y))  # one signed-gradient step up the loss
        True
    """
    _check_inputs(inputs, targets)
    radius = _as_radius(eps, inputs)
    bounds = _as_bounds(clamp, inputs)
    criterion = nn.CrossEntropyLoss() if criterion is None else criterion
    x0 = inputs.detach()
    with model_mode(model, False):
        grad = _input_grad(model, x0, targets, criterion)
    return _clamp(x0 + radius * grad.sign(), bounds).detach()


def pgd(
    model: nn.Module,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    eps,
    steps: int = 10,
    step_size=None,
    random_start: bool = True,
    criterion=None,
    clamp=None,
    seed=None,
) -> torch.Tensor:
    """Projected gradient descent in the L-infinity ball (Madry et al. 2018).

    .. math::
        x^{t+1} = \\Pi_{B_\\infty(x, \\epsilon) \\cap [lo, hi]}
            \\big(x^t + \\alpha\\,\\mathrm{sign}(\\nabla_x \\ell(f(x^t), y))\\big),

    starting from :math:`x^0 = x` or, with ``random_start``, from a uniform draw in the ball (projected
    onto the data range). The default step size :math:`\\alpha = 2.5\\,\\epsilon/\\text{steps}` is the
    rule of thumb of Madry et al. (2018)'s group (the default of their ``robustness`` library): the
    iterates can travel :math:`2.5\\epsilon`, enough to reach the boundary of the ball from anywhere in
    it. Evaluated in eval mode like :func:`fgsm`; the parameters' ``.grad`` are untouched.

    Args:
        model, inputs, targets, eps, criterion, clamp: as in :func:`fgsm`.
        steps: the number of signed-gradient steps (>= 1).
        step_size: :math:`\\alpha`, a float or tensor broadcastable like ``eps``; default
            ``2.5 * eps / steps``.
        random_start: start from a uniform point in the ball (Madry et al. 2018) instead of ``inputs``.
        seed: ``None``, an int or a ``torch.Generator`` for the random start (drawn on the CPU, so the
            same seed gives the same start on every device).

    Returns:
        The adversarial inputs, detached, within ``eps`` of ``inputs`` and within ``clamp``.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from hessianflow.training.adversarial import pgd
        >>> _ = torch.manual_seed(0)
        >>> model = nn.Linear(4, 3)
        >>> x, y = torch.rand(2, 4), torch.tensor([0, 2])
        >>> adv = pgd(model, x, y, 0.1, steps=5, seed=0)
        >>> bool((adv - x).abs().max() <= 0.1 + 1e-7)  # inside the L-infinity ball
        True
        >>> loss = nn.functional.cross_entropy
        >>> bool(loss(model(adv), y) > loss(model(x), y)), torch.equal(adv, pgd(model, x, y, 0.1, steps=5, seed=0))
        (True, True)
    """
    _check_inputs(inputs, targets)
    steps = check_int("steps", steps, minimum=1)
    radius = _as_radius(eps, inputs)
    alpha = 2.5 * radius / steps if step_size is None else _as_radius(step_size, inputs, "step_size")
    bounds = _as_bounds(clamp, inputs)
    criterion = nn.CrossEntropyLoss() if criterion is None else criterion
    x0 = inputs.detach()
    lower, upper = x0 - radius, x0 + radius
    if bounds is not None:
        lower, upper = torch.maximum(lower, bounds[0]), torch.minimum(upper, bounds[1])
        # The ball and the data range do not meet where an input lies outside the data range
        # already; there the data range wins, as in fgsm (the adversarial input must be valid data).
        lower = torch.minimum(lower, bounds[1])
        upper = torch.maximum(upper, bounds[0])

    x = x0
    if random_start:
        g = make_generator(seed)
        u = torch.rand(x0.shape, generator=g, dtype=torch.float64).to(device=x0.device, dtype=x0.dtype)
        x = x0 + (2 * u - 1) * radius
    x = torch.minimum(torch.maximum(x, lower), upper)
    with model_mode(model, False):
        for _ in range(steps):
            grad = _input_grad(model, x, targets, criterion)
            x = torch.minimum(torch.maximum(x + alpha * grad.sign(), lower), upper)
    return x.detach()
