"""Dense float64 Hessians built without hessianflow, two independent ways, for the attention tests.

Shared by tests/test_attention.py, test_transformers.py and test_transformer_example.py.

* :func:`hessian_rows`: row ``i`` is :math:`\\partial g_i / \\partial \\theta`, a backward pass of the
  gradient's ``i``-th entry (double backprop against the unit vectors, in chunks of rows).
* :func:`hessian_central_differences`: column ``i`` is :math:`(g(\\theta + h e_i) - g(\\theta - h e_i)) / 2h`,
  first derivatives only, through the model's default attention kernels (a fused kernel on the CPU),
  so it shares no second-order code with double backprop. Truncation error :math:`O(h^2 \\|\\nabla^3 L\\|)`,
  rounding :math:`O(\\epsilon \\|g\\| / h)`: with the default ``h = 1e-5`` in float64 the two references
  agreed to 3e-12 - 1.4e-10 of :math:`\\|H\\|_2` on the tests' models (``h = 1e-4``: 1.4e-10 and
  ``h = 1e-3``: 1.4e-8 on the MultiheadAttention model, the :math:`h^2` of truncation).

``torch.func.hessian`` is deliberately not used as a reference: in torch 2.14.1 it is wrong on LayerNorm
cross-derivatives (3e-2 of :math:`\\|H\\|_2` on the nanoGPT model of test_transformers.py, which keeps
the measurement and the minimal case).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence

import pytest
import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel


def need_transformers():
    """Import ``transformers``; in CI a missing package fails the test instead of skipping it."""
    try:
        import transformers
    except ImportError as e:  # pragma: no cover - depends on the environment
        if os.environ.get("CI"):
            pytest.fail(f"transformers is required in CI (pip install -e '.[transformers]'): {e}")
        pytest.skip("transformers is not installed (pip install -e '.[transformers]')")
    return transformers


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
