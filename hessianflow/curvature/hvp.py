"""Hessian-vector product primitives, and the one place where flat vectors meet parameter lists.

Two independent implementations are provided and cross-checked in the tests:

* **double backprop** (Pearlmutter 1994): with the gradient :math:`g(\\theta)` built with
  ``create_graph=True``, :math:`Hv = \\nabla_\\theta (g^\\top v)`. The first-order graph can be kept
  and reused across many products, which is what makes an iterative eigensolver cheap: each further
  product is one backward pass through the gradient graph, no new forward pass.
* **forward-over-reverse** (``torch.func.jvp`` of ``torch.func.grad``): :math:`Hv` as the directional
  derivative of the gradient; batched over several vectors with ``torch.func.vmap``.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import torch

__all__ = [
    "flatten",
    "unflatten",
    "double_backprop_hvp",
    "double_backprop_hmm",
    "forward_over_reverse_hvp",
]


def flatten(tensors: Sequence[torch.Tensor | None], like: Sequence[torch.Tensor] | None = None) -> torch.Tensor:
    """Concatenate tensors into one flat vector; a ``None`` entry becomes zeros shaped like ``like[i]``.

    A trailing ``k`` batch dimension is not supported here; see :func:`flatten_batched`.

    Example:
        >>> import torch
        >>> from hessianflow.curvature.hvp import flatten
        >>> flatten([torch.ones(2, 2), None], like=[None, torch.empty(1)])
        tensor([1., 1., 1., 1., 0.])
    """
    parts = []
    for i, t in enumerate(tensors):
        if t is None:
            if like is None:
                raise ValueError("flatten got None without a reference tensor to take the shape from")
            parts.append(torch.zeros(like[i].numel(), dtype=like[i].dtype, device=like[i].device))
        else:
            parts.append(t.reshape(-1))
    if not parts:
        raise ValueError("nothing to flatten: the parameter list is empty")
    return torch.cat(parts)


def flatten_batched(tensors: Sequence[torch.Tensor], k: int) -> torch.Tensor:
    """``[k, *shape_i]`` tensors -> one ``[n, k]`` matrix (column j is the flattened j-th slice)."""
    return torch.cat([t.reshape(k, -1) for t in tensors], dim=1).T


def unflatten(vec: torch.Tensor, like: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Split a flat vector ``[n]`` (or a matrix ``[n, k]``, giving ``[k, *shape]`` pieces) like ``like``.

    Example:
        >>> import torch
        >>> from hessianflow.curvature.hvp import unflatten
        >>> unflatten(torch.arange(5.0), [torch.empty(2, 2), torch.empty(1)])
        [tensor([[0., 1.],
                [2., 3.]]), tensor([4.])]
    """
    n = sum(p.numel() for p in like)
    if vec.shape[0] != n:
        raise ValueError(f"expected a vector of length {n} (the number of parameters), got {vec.shape[0]}")
    out, offset = [], 0
    for p in like:
        piece = vec[offset : offset + p.numel()]
        offset += p.numel()
        if vec.dim() == 1:
            out.append(piece.view_as(p))
        else:  # [numel, k] -> [k, *p.shape]
            out.append(piece.T.reshape(vec.shape[1], *p.shape))
    return out


def _grad_graph(grads: Sequence[torch.Tensor | None]) -> list[int]:
    """Indices of gradients that depend on the parameters (the rest have a zero Hessian row block)."""
    return [i for i, g in enumerate(grads) if g is not None and g.requires_grad]


def double_backprop_hvp(
    grads: Sequence[torch.Tensor | None],
    params: Sequence[torch.Tensor],
    vecs: Sequence[torch.Tensor],
    retain_graph: bool = True,
) -> list[torch.Tensor]:
    """Hessian-vector product by double backprop: :math:`\\nabla_\\theta (g^\\top v)`.

    Args:
        grads: first-order gradients of the loss w.r.t. ``params``, built with ``create_graph=True``
            (``None`` for a parameter the loss does not depend on).
        params: the parameters (leaves of the graph).
        vecs: the vector, split like ``params``.
        retain_graph: keep the gradient graph for further products (the point of reusing it).

    Returns:
        :math:`Hv`, split like ``params``; a parameter that gets no second-order contribution gets zeros,
        never ``None``.

    Example (:math:`f(w) = \\sum_i w_i^3`, :math:`H = \\operatorname{diag}(6 w)`):
        >>> import torch
        >>> from hessianflow.curvature.hvp import double_backprop_hvp
        >>> w = torch.tensor([1.0, 2.0], requires_grad=True)
        >>> (g,) = torch.autograd.grad((w**3).sum(), w, create_graph=True)
        >>> double_backprop_hvp([g], [w], [torch.ones(2)])
        [tensor([ 6., 12.])]
    """
    if len(vecs) != len(params) or len(grads) != len(params):
        raise ValueError(f"got {len(grads)} gradients and {len(vecs)} vector pieces for {len(params)} parameters")
    return _double_backprop(grads, params, vecs, retain_graph, batched=False)


def double_backprop_hmm(
    grads: Sequence[torch.Tensor | None],
    params: Sequence[torch.Tensor],
    mats: Sequence[torch.Tensor],
    retain_graph: bool = True,
) -> list[torch.Tensor]:
    """Several Hessian-vector products at once, ``mats[i]`` of shape ``[k, *params[i].shape]``.

    Uses ``torch.autograd.grad(..., is_grads_batched=True)`` (a vmap over the backward pass), which runs
    the ``k`` products as batched kernels. Raises ``RuntimeError`` where an operation in the graph has no
    batching rule; :class:`~hessianflow.curvature.HessianOperator` then falls back to a loop.
    """
    return _double_backprop(grads, params, mats, retain_graph, batched=True)


def _double_backprop(grads, params, pieces, retain_graph: bool, batched: bool) -> list[torch.Tensor]:
    live = _grad_graph(grads)
    out = [torch.zeros_like(t) for t in pieces]  # [k, *shape] when batched
    if not live:
        return out
    hv = torch.autograd.grad(
        [grads[i] for i in live],
        params,
        grad_outputs=[pieces[i] for i in live],
        retain_graph=retain_graph,
        allow_unused=True,
        is_grads_batched=batched,
    )
    return [h.detach() if h is not None else o for h, o in zip(hv, out)]


_JIT_DEPRECATION = r"`torch\.jit\.script` is deprecated"


def forward_over_reverse_hvp(loss_fn, params: Sequence[torch.Tensor], vecs: Sequence[torch.Tensor]):
    """Hessian-vector product as the forward-mode derivative of the reverse-mode gradient.

    Args:
        loss_fn: a function of a tuple of parameter tensors returning the scalar loss (pure: it must
            not read the parameters from anywhere else, e.g. built with ``torch.func.functional_call``).
        params: the point (detached tensors).
        vecs: the direction, split like ``params``.

    Returns:
        :math:`Hv`, split like ``params``.

    Example (:math:`f(w) = \\sum_i w_i^3`, :math:`H = \\operatorname{diag}(6 w)`):
        >>> import torch
        >>> from hessianflow.curvature.hvp import forward_over_reverse_hvp
        >>> forward_over_reverse_hvp(lambda ps: (ps[0] ** 3).sum(), [torch.tensor([1.0, 2.0])], [torch.ones(2)])
        [tensor([ 6., 12.])]
    """
    primals = tuple(p.detach() for p in params)
    tangents = tuple(v.to(dtype=p.dtype) for v, p in zip(vecs, primals))
    with warnings.catch_warnings():
        # torch's first jvp imports torch._decomp.decompositions_for_jvp, which scripts 9 functions with
        # torch.jit.script: 18 deprecation warnings about torch's own code (torch 2.14). Only those.
        warnings.filterwarnings("ignore", message=_JIT_DEPRECATION, category=FutureWarning)
        _, hv = torch.func.jvp(torch.func.grad(loss_fn), (primals,), (tangents,))
    return list(hv)
