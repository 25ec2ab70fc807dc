"""The tests' shared references, built without hessianflow: dense float64 Hessians and GGNs, small
models, a PNG check and the optional-dependency guards. One home, so that every test file checks against
the same independent computation.

Dense Hessians, three independent ways:

* :func:`func_hessian` / :func:`func_hessian_of`: ``torch.func.hessian`` (``jacfwd(jacrev(f))``) of the
  loss as a function of the flat parameter vector, through ``functional_call``. The reference for models
  without LayerNorm (see below).
* :func:`hessian_rows`: row ``i`` is :math:`\\partial g_i / \\partial \\theta`, a backward pass of the
  gradient's ``i``-th entry (double backprop against the unit vectors, in chunks of rows).
* :func:`hessian_central_differences`: column ``i`` is :math:`(g(\\theta + h e_i) - g(\\theta - h e_i)) / 2h`,
  first derivatives only, through the model's default attention kernels (a fused kernel on the CPU),
  so it shares no second-order code with double backprop. Truncation error :math:`O(h^2 \\|\\nabla^3 L\\|)`,
  rounding :math:`O(\\epsilon \\|g\\| / h)`: with the default ``h = 1e-5`` in float64 the two references
  agreed to 3e-12 - 1.4e-10 of :math:`\\|H\\|_2` on the tests' models (``h = 1e-4``: 1.4e-10 and
  ``h = 1e-3``: 1.4e-8 on the MultiheadAttention model, the :math:`h^2` of truncation).

``torch.func.hessian`` is not a reference for the attention models: in torch 2.14.1 it is wrong on
LayerNorm cross-derivatives (3e-2 of :math:`\\|H\\|_2` on the nanoGPT model of test_transformers.py, which
keeps the measurement and the minimal case); those tests use the other two.

The GGN: :func:`dense_ggn` is :math:`J^\\top H_{out} J` with ``J`` by ``torch.func.jacrev`` and the loss's
Hessian in the outputs by ``torch.func.hessian``.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

DT = torch.float64
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


# -- optional dependencies ----------------------------------------------------------------------------
def need(module: str, extra: str):
    """Import ``module``; in CI (``$CI`` set) a missing package fails the test instead of skipping it."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as e:  # pragma: no cover - depends on the environment
        if os.environ.get("CI", "").lower() not in ("", "0", "false"):
            pytest.fail(f"{module} is required in CI (pip install -e '.[{extra}]'): {e}")
        pytest.skip(f"{module} is not installed (pip install -e '.[{extra}]')")


def need_transformers():
    """``transformers``, or a skip (a failure in CI)."""
    return need("transformers", "transformers")


def need_sklearn():
    """scikit-learn (the digits data), or a skip (a failure in CI)."""
    return need("sklearn.datasets", "data")


def _flat(tensors: Sequence[torch.Tensor | None], params: Sequence[torch.Tensor]) -> torch.Tensor:
    return torch.cat([(torch.zeros_like(p) if t is None else t).reshape(-1) for t, p in zip(tensors, params)])


def hessian_rows(loss_fn: Callable[[], torch.Tensor], params: Sequence[torch.Tensor], chunk: int = 64) -> torch.Tensor:
    """The dense Hessian ``[n, n]`` of ``loss_fn()`` w.r.t. ``params``, by double backprop, row by row.

    Row ``i`` is the gradient of :math:`g_i = e_i^\\top g`. The rows are taken ``chunk`` at a time
    (``is_grads_batched``: a vmap over the second backward only, which was measured 5-7x faster than a
    Python loop here and equal to it to 2e-16; the vmap stays outside the first-order gradient, where
    torch 2.14.1's vmap of LayerNorm's backward is wrong to differentiate, see test_transformers.py).
    The math attention kernel is selected with torch's own ``sdpa_kernel`` (the fused ones have no
    double backward); ``nn.MultiheadAttention``'s fast path is not taken as the parameters require grad.
    """
    with sdpa_kernel(SDPBackend.MATH):
        g = _flat(torch.autograd.grad(loss_fn(), params, create_graph=True, allow_unused=True), params)
        n = g.numel()
        if not g.requires_grad:  # a loss linear in every parameter
            return torch.zeros(n, n, dtype=g.dtype)
        eye = torch.eye(n, dtype=g.dtype)
        rows = []
        for start in range(0, n, chunk):
            E = eye[start : start + chunk]  # [c, n]
            r = torch.autograd.grad(
                g, params, grad_outputs=E, retain_graph=True, allow_unused=True, is_grads_batched=True
            )
            rows.append(
                torch.cat(
                    [
                        (torch.zeros(len(E), p.numel(), dtype=g.dtype) if t is None else t.reshape(len(E), -1))
                        for t, p in zip(r, params)
                    ],
                    dim=1,
                )
            )
    return torch.cat(rows).detach()


def hessian_central_differences(
    model: nn.Module, loss_of_outputs: Callable[[nn.Module], torch.Tensor], names: Sequence[str], h: float = 1e-5
) -> torch.Tensor:
    """The dense Hessian by central differences of the gradient, ``[n, n]``, symmetrised.

    Args:
        model: evaluated with its parameters replaced by ``torch.func.functional_call`` (not mutated).
        loss_of_outputs: ``fn(callable_model) -> scalar loss``; ``callable_model(*args, **kw)`` runs the
            model with the perturbed parameters.
        names: the parameters to differentiate w.r.t., in order.
        h: the step (float64: the total error is smallest near ``eps**(1/3) ~ 6e-6``).
    """
    base = {k: v.detach() for k, v in model.named_parameters()}
    flat = torch.cat([base[k].reshape(-1) for k in names])
    shapes = [base[k].shape for k in names]
    sizes = [base[k].numel() for k in names]

    def grad_at(x: torch.Tensor) -> torch.Tensor:
        ps = dict(base)
        pieces = [t.view(s).clone().requires_grad_(True) for t, s in zip(x.split(sizes), shapes)]
        ps.update(zip(names, pieces))
        loss = loss_of_outputs(lambda *a, **kw: torch.func.functional_call(model, ps, a, kw))
        return _flat(torch.autograd.grad(loss, pieces, allow_unused=True), pieces)

    cols = []
    for i in range(flat.numel()):
        e = torch.zeros_like(flat)
        e[i] = h
        cols.append((grad_at(flat + e) - grad_at(flat - e)) / (2 * h))
    H = torch.stack(cols, dim=1)
    return (H + H.T) / 2


def rel_err(a: torch.Tensor, b: torch.Tensor, scale: torch.Tensor | float) -> float:
    """``max |a - b|`` relative to ``scale`` (a norm of the reference)."""
    return float((a - b).abs().max() / scale)


# -- torch.func references ----------------------------------------------------------------------------
def _flat_params(model: nn.Module, names: Sequence[str] | None):
    named = dict(model.named_parameters())
    names = list(names or named)
    base = [named[n].detach() for n in names]
    return names, base, torch.cat([b.reshape(-1) for b in base])


def _split(flat: torch.Tensor, like: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    return [t.view_as(b) for t, b in zip(flat.split([b.numel() for b in like]), like)]


def func_hessian_of(model: nn.Module, loss_of_call: Callable, names: Sequence[str] | None = None) -> torch.Tensor:
    """``torch.func.hessian`` of ``loss_of_call(call)`` w.r.t. the flat parameters ``names`` (default: all,
    in ``named_parameters`` order), where ``call(*args, **kwargs)`` runs the model with those parameters
    (the others and the buffers as they are; tied weights stay tied). The model's mode is used as it is."""
    names, base, theta = _flat_params(model, names)

    def f(flat):
        ps = dict(zip(names, _split(flat, base)))
        return loss_of_call(lambda *a, **k: torch.func.functional_call(model, ps, a, k))

    return torch.func.hessian(f)(theta)


def func_hessian(model: nn.Module, criterion, x, y, names: Sequence[str] | None = None) -> torch.Tensor:
    """The dense Hessian ``[n, n]`` of ``criterion(model(x), y)`` by ``torch.func.hessian``."""
    return func_hessian_of(model, lambda call: criterion(call(x), y), names)


def dense_ggn(model: nn.Module, output_of_call: Callable, loss_of_output: Callable, names=None) -> torch.Tensor:
    """:math:`J^\\top H_{out} J`: ``J`` the Jacobian of ``output_of_call(call)`` in the flat parameters
    (``torch.func.jacrev``), ``H_out`` the Hessian of ``loss_of_output`` in the outputs (``torch.func.hessian``)."""
    names, base, theta = _flat_params(model, names)

    def out(flat):
        ps = dict(zip(names, _split(flat, base)))
        return output_of_call(lambda *a, **k: torch.func.functional_call(model, ps, a, k))

    o = out(theta).detach()
    J = torch.func.jacrev(out)(theta).reshape(o.numel(), -1)
    H_out = torch.func.hessian(lambda flat_o: loss_of_output(flat_o.view_as(o)))(o.reshape(-1))
    return J.T @ H_out @ J


def ggn(model: nn.Module, criterion, x, y, names: Sequence[str] | None = None) -> torch.Tensor:
    """The dense GGN ``[n, n]`` of ``criterion(model(x), y)`` (see :func:`dense_ggn`)."""
    return dense_ggn(model, lambda call: call(x), lambda o: criterion(o, y), names)


# -- small float64 models -----------------------------------------------------------------------------
def mlp(*sizes: int, seed: int = 0) -> nn.Sequential:
    """``Linear(sizes[0], sizes[1]), Tanh, Linear(...), Softplus, Linear(...), Tanh, ...`` in float64, its
    weights drawn after ``torch.manual_seed(seed)`` (two smooth activations: no kinks in the Hessian)."""
    torch.manual_seed(seed)  # before the first Linear draws its weights
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        if i:
            layers.append(nn.Tanh() if i % 2 else nn.Softplus())
        layers.append(nn.Linear(a, b))
    return nn.Sequential(*layers).to(DT)


def small_cnn(seed: int = 0, side: int = 6, hidden: int | None = None, classes: int = 4) -> nn.Sequential:
    """``Conv2d(2, 3, 3), BatchNorm2d, Tanh, AvgPool2d(2), Flatten, Linear`` on ``[2, side, side]`` inputs,
    float64; with ``hidden``, a ``Linear, Softplus, Linear`` head. BatchNorm's running statistics are the
    initial ones: set them (or run train-mode passes) where eval mode must differ from train mode."""
    torch.manual_seed(seed)
    layers = [nn.Conv2d(2, 3, 3, padding=1), nn.BatchNorm2d(3), nn.Tanh(), nn.AvgPool2d(2), nn.Flatten()]
    flat = 3 * (side // 2) ** 2
    if hidden is None:
        layers.append(nn.Linear(flat, classes))
    else:
        layers += [nn.Linear(flat, hidden), nn.Softplus(), nn.Linear(hidden, classes)]
    return nn.Sequential(*layers).to(DT)


class ViewNet(nn.Module):
    """Conv2d then ``.view`` flattening, which raises on a channels-last activation (the operators' channels-last
    fallback); inputs ``[n, 2, side, side]``, 3 classes."""

    def __init__(self, side: int):
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 3, padding=1)
        self.fc = nn.Linear(3 * side * side, 3)

    def forward(self, x):
        h = torch.tanh(self.conv(x))
        return self.fc(h.view(h.size(0), -1))


def warm_batchnorm(model: nn.Module, shape: tuple[int, ...], scale: float, shift: float, passes: int = 3):
    """Give BatchNorm non-trivial running statistics (``passes`` train-mode forwards of ``scale * N(0, 1)
    + shift`` inputs of ``shape``, no gradients), so that eval mode differs from train mode; eval mode after."""
    model.train()
    with torch.no_grad():
        for _ in range(passes):
            model(torch.randn(*shape, dtype=DT) * scale + shift)
    return model.eval()


# -- figures ------------------------------------------------------------------------------------------
def check_png(path, min_side: int = 250, white: tuple[float, float] = (0.3, 0.995)):
    """A PNG by its signature, of a sensible size, and not blank: varied pixels, more than 20 colours,
    and a fraction of near-white pixels in ``white`` (neither an empty page nor a page of ink)."""
    import matplotlib.image as mpimg

    with open(path, "rb") as fh:
        assert fh.read(8) == PNG_SIGNATURE, path
    img = mpimg.imread(path)
    assert img.ndim == 3 and img.shape[2] in (3, 4)
    h, w = img.shape[:2]
    assert min_side <= h <= 4000 and min_side <= w <= 4000, img.shape
    rgb = img[..., :3]
    assert rgb.std() > 0.05, "the image is (nearly) uniform"
    colours = np.unique((rgb.reshape(-1, 3) * 255).round().astype(np.uint8), axis=0)
    assert len(colours) > 20, f"only {len(colours)} distinct colours"
    assert white[0] < float((rgb.min(axis=2) > 0.9).mean()) < white[1]
    return img
