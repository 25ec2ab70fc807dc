"""The historical HessianFlow API (Yao et al. 2018), kept working on top of the new core.

Old notebooks call these names with these arguments. Known bugs of the original are fixed: the models'
``.grad`` and train/eval mode are left as they were, the last (smaller) batch of a data loader is
weighted correctly, ``cuda=True`` on a machine without a GPU falls back to the CPU with a warning, and a
run that did not converge warns instead of returning a silent guess.
"""

from __future__ import annotations

import warnings

import torch

__all__ = [
    "group_product",
    "group_add",
    "normalization",
    "get_params_grad",
    "hessian_vector_product",
    "get_eigen",
    "get_eigen_full_dataset",
]


def group_product(xs, ys) -> torch.Tensor:
    """The inner product of two lists of tensors, :math:`\\sum_i \\langle x_i, y_i \\rangle`.

    Example:
        >>> import torch
        >>> group_product([torch.ones(2), torch.ones(3)], [torch.full((2,), 2.0), torch.ones(3)])
        tensor(7.)
    """
    xs, ys = list(xs), list(ys)
    if len(xs) != len(ys):
        raise ValueError(f"group_product got lists of {len(xs)} and {len(ys)} tensors")
    return sum(torch.sum(x * y) for x, y in zip(xs, ys))


def group_add(params, update, alpha: float = 1.0):
    """``params[i] += alpha * update[i]`` in place, for every ``i``; returns ``params`` (HessianFlow's).

    As in HessianFlow (``params[i].data.add_(update[i] * alpha)``), the tensors of ``params`` are updated
    in place, outside autograd, so old code that perturbs a model's weights through it keeps working.

    Example:
        >>> import torch
        >>> params = [torch.zeros(2)]
        >>> group_add(params, [torch.ones(2)], alpha=0.5)
        [tensor([0.5000, 0.5000])]
    """
    if len(params) != len(update):
        raise ValueError(f"group_add got lists of {len(params)} and {len(update)} tensors")
    with torch.no_grad():
        for p, u in zip(params, update):
            p.add_(u.to(p.device, p.dtype), alpha=alpha)
    return params


def normalization(v) -> list[torch.Tensor]:
    """The list of tensors scaled to unit total Euclidean norm (a zero vector is returned unchanged).

    Example:
        >>> import torch
        >>> normalization([torch.tensor([3.0, 0.0]), torch.tensor([4.0])])
        [tensor([0.6000, 0.0000]), tensor([0.8000])]
    """
    v = list(v)
    norm = torch.sqrt(group_product(v, v))
    if norm == 0:
        return [vi.clone() for vi in v]
    return [vi / norm for vi in v]


def get_params_grad(model):
    """The parameters with ``requires_grad`` and their current gradients (zeros where ``.grad`` is None).

    Example:
        >>> from torch import nn
        >>> params, grads = get_params_grad(nn.Linear(3, 1))  # no backward pass yet: zero gradients
        >>> [tuple(p.shape) for p in params], [float(g.abs().sum()) for g in grads]
        ([(1, 3), (1,)], [0.0, 0.0])
    """
    params, grads = [], []
    for p in model.parameters():
        if not p.requires_grad:
            continue
        params.append(p)
        grads.append(torch.zeros_like(p) if p.grad is None else p.grad.detach().clone())
    return params, grads


def hessian_vector_product(gradsH, params, v) -> list[torch.Tensor]:
    """:math:`Hv` from gradients built with ``create_graph=True`` (the graph is retained for reuse).

    Example:
        The Hessian of :math:`\\tfrac12 w^\\top A w` is :math:`A`:

        >>> import torch
        >>> w = torch.tensor([1.0, 2.0], requires_grad=True)
        >>> A = torch.tensor([[2.0, 1.0], [1.0, 3.0]])
        >>> gradsH = torch.autograd.grad(0.5 * w @ A @ w, [w], create_graph=True)
        >>> hessian_vector_product(gradsH, [w], [torch.tensor([1.0, 0.0])])
        [tensor([2., 1.])]
    """
    from .curvature.hvp import double_backprop_hvp

    gradsH, params, v = list(gradsH), list(params), list(v)
    if not (len(gradsH) == len(params) == len(v)):
        raise ValueError(f"got {len(gradsH)} gradients, {len(params)} parameters and {len(v)} vector pieces")
    for p, vi in zip(params, v):
        if vi.shape != p.shape:
            raise ValueError(f"a vector piece of shape {tuple(vi.shape)} does not match a parameter {tuple(p.shape)}")
    return double_backprop_hvp(gradsH, params, v, retain_graph=True)


def _check_cuda(cuda: bool) -> None:
    if cuda and not torch.cuda.is_available():
        warnings.warn("cuda=True but no GPU is available: computing on the CPU", RuntimeWarning, stacklevel=3)


def _eigen(op, maxIter, tol):
    from .curvature.hvp import unflatten
    from .linalg.eigen import power_iteration

    # HessianFlow's start: torch.randn per parameter from the global generator (torch.manual_seed
    # reproduces it), on the CPU, then moved to the operator's device
    v0 = torch.cat([torch.randn(p.size()).reshape(-1) for p in op.params]).to(op.device, op.dtype)
    res = power_iteration(op, k=1, max_iter=maxIter, tol=tol, v0=v0)
    vec = unflatten(res.eigenvectors[:, 0], op.params)
    return float(res.eigenvalues[0]), [t.clone() for t in vec]


def get_eigen(model, inputs, targets, criterion, cuda: bool = True, maxIter: int = 50, tol: float = 1e-3):
    """The dominant Hessian eigenvalue on one batch, by power iteration (HessianFlow's signature).

    Returns:
        ``(eigenvalue, eigenvector)``: a float and a list of tensors shaped like the parameters.

    Example:
        Least squares without bias: ``MSELoss`` over ``X = diag(1, 2)`` has Hessian ``diag(1, 4)``:

        >>> import torch
        >>> from torch import nn
        >>> _ = torch.manual_seed(0)  # HessianFlow's start vector comes from the global generator
        >>> net = nn.Linear(2, 1, bias=False)
        >>> X, y = torch.tensor([[1.0, 0.0], [0.0, 2.0]]), torch.zeros(2, 1)
        >>> eigenvalue, eigenvector = get_eigen(net, X, y, nn.MSELoss(), cuda=False)
        >>> round(eigenvalue, 1), eigenvector[0].abs().round(decimals=1)
        (4.0, tensor([[0., 1.]]))
    """
    from .curvature import HessianOperator

    _check_cuda(cuda)
    return _eigen(HessianOperator(model, criterion, data=(inputs, targets)), maxIter, tol)


def get_eigen_full_dataset(
    model, dataloader, criterion=None, cuda: bool = True, maxIter: int = 50, tol: float = 1e-3, **loss_forms
):
    """The dominant Hessian eigenvalue of the loss over a whole data loader (HessianFlow's signature).

    Unlike the original, the last, smaller batch is kept and weighted by its size. ``loss_forms``
    (``loss_fn=``, ``reduction=``, ``batch_weight=``) are those of
    :class:`~hessianflow.curvature.HessianOperator`, for batches other than ``(inputs, targets)``.

    Example:
        The least-squares problem of :func:`get_eigen`, one sample a batch:

        >>> import torch
        >>> from torch import nn
        >>> from torch.utils.data import DataLoader, TensorDataset
        >>> _ = torch.manual_seed(0)
        >>> net = nn.Linear(2, 1, bias=False)
        >>> data = TensorDataset(torch.tensor([[1.0, 0.0], [0.0, 2.0]]), torch.zeros(2, 1))
        >>> eigenvalue, _ = get_eigen_full_dataset(net, DataLoader(data, batch_size=1), nn.MSELoss(), cuda=False)
        >>> round(eigenvalue, 1)
        4.0
    """
    from .curvature import HessianOperator

    unknown = set(loss_forms) - {"loss_fn", "reduction", "batch_weight"}
    if unknown:
        raise TypeError(f"get_eigen_full_dataset got unexpected keyword arguments {sorted(unknown)}")
    _check_cuda(cuda)
    return _eigen(HessianOperator(model, criterion, dataloader=dataloader, **loss_forms), maxIter, tol)
