"""The softmax cross-entropy's curvature product, fused and chunked over rows, for LM-scale vocabularies.

Per position :math:`t` (a row of the logits along the class dimension), with :math:`p_t` the softmax of
the logits and :math:`c_t` the position's weight (0 where the target is ``ignore_index``,
:math:`1/\\#\\mathrm{counted}` for a mean, 1 for a sum):

.. math:: H_t u_t = c_t \\left(p_t \\odot u_t - p_t\\,(p_t^\\top u_t)\\right)
          = c_t\\, p_t \\odot \\left(u_t - p_t^\\top u_t\\right)

the output Hessian of the GGN (Schraudolph 2002) and the loss part of the Hessian. Today's analytic path
(:func:`~hessianflow.curvature.products._softmax_ce_product`) keeps the softmax ``p`` (one logits-sized
tensor) for the products and makes another per product; here ``p`` is recomputed from the logits
``chunk_rows`` rows at a time and the result written over ``u``'s storage, so the extra memory is
``O(chunk_rows x vocab)`` whatever the number of tokens. With ``compiled=True`` each chunk is one
``torch.compile`` kernel (inductor fuses the softmax, the row sums and the output: no chunk-sized
temporaries), cross-checked like every compiled graph (:class:`~hessianflow.curvature.compiled.CheckedCompile`);
Triton, where inductor uses it (CUDA), is how that kernel runs on a GPU. The softmax Jacobian
:math:`\\operatorname{diag}(p) - p p^\\top` is never formed.

:func:`fused_cross_entropy` is ``F.cross_entropy`` with this kernel as its double backward, for the
Hessian's products (``HessianOperator(..., fused_cross_entropy=True)``).

Memory and time against the analytic path: benchmarks/README.md, "Issue 24".
"""

from __future__ import annotations

import torch

from .products import checked_class_dim

__all__ = ["DEFAULT_CHUNK_ELEMENTS", "softmax_ce_hvp", "FusedSoftmaxCE", "fused_cross_entropy"]

#: rows per chunk: as many as make ``2**22`` logits (16 MiB in float32, 32 MiB in float64): large enough
#: that a chunk's kernel launch and Python loop are negligible, small beside an LM's logits
DEFAULT_CHUNK_ELEMENTS = 2**22


def _work_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def _rows(logits, u, weight):
    """``weight * (diag(p) - p p^T) u`` for ``[r, V]`` logits, ``[k, r, V]`` vectors, ``[r]`` weights."""
    work = _work_dtype(logits.dtype)
    p = torch.softmax(logits.to(work), dim=-1)  # [r, V]
    uw = u.to(work)
    s = torch.linalg.vecdot(uw, p).unsqueeze(-1)  # [k, r, 1], without a [k, r, V] product
    return (uw - s).mul_(p).mul_(weight.to(work)[:, None]).to(u.dtype)  # one chunk-sized temporary


class FusedSoftmaxCE:
    """The chunked (and optionally compiled) kernel of one operator; :func:`softmax_ce_hvp` is its function form.

    Args:
        chunk_rows: rows per chunk; ``None``: :data:`DEFAULT_CHUNK_ELEMENTS` divided by the vocabulary.
        compiled: each chunk through ``torch.compile`` (checked against the eager kernel on every new graph;
            a failure falls back to eager with a warning, :attr:`status` says which).

    Example (one position, :math:`p = (1/2, 1/2)`, weight 2, two vectors at once, chunks of one row):
        >>> import torch
        >>> kernel = FusedSoftmaxCE(chunk_rows=1)
        >>> u = torch.tensor([[[1.0, 0.0]], [[1.0, 1.0]]], dtype=torch.float64)  # [k=2, 1, V=2]
        >>> kernel.apply(torch.zeros(1, 2, dtype=torch.float64), 2.0, -1, u)
        tensor([[[ 0.5000, -0.5000]],
        <BLANKLINE>
                [[ 0.0000,  0.0000]]], dtype=torch.float64)
    """

    def __init__(self, chunk_rows: int | None = None, compiled: bool = False):
        if chunk_rows is not None and (not isinstance(chunk_rows, int) or chunk_rows < 1):
            raise ValueError(f"chunk_rows must be a positive int or None, got {chunk_rows!r}")
        self.chunk_rows = chunk_rows
        self.kernel = _rows
        self.status = None
        if compiled:
            from .compiled import CheckedCompile

            self.kernel = CheckedCompile(_rows, _rows, "the fused cross-entropy kernel")
            self.status = self.kernel.status

    def prepare(self, logits: torch.Tensor, ce):
        """``(logits, weight, dim)`` for :meth:`apply` from a
        :class:`~hessianflow.curvature.losses.CrossEntropyTargets`: no softmax is kept, only the logits the
        graph holds anyway and a weight per position."""
        dim = checked_class_dim(logits, ce)
        weight = (ce.targets != ce.ignore_index).to(_work_dtype(logits.dtype))
        if ce.reduction == "mean":
            weight = weight / weight.sum()
        return logits.detach(), weight, dim

    def apply(self, logits: torch.Tensor, weight, dim: int, u: torch.Tensor, out: torch.Tensor | None = None):
        """The product for ``u`` shaped like ``logits`` (or ``[k, *logits.shape]``), into ``out`` (may be ``u``)."""
        if dim >= 0:
            dim -= logits.dim()
        batched = u.dim() == logits.dim() + 1
        if tuple(u.shape[int(batched) :]) != tuple(logits.shape):
            raise ValueError(f"u of shape {tuple(u.shape)} does not fit logits of shape {tuple(logits.shape)}")
        V = logits.shape[dim]
        L = logits.movedim(dim, -1).reshape(-1, V)  # [rows, V] (a view when the classes are last)
        U = u.movedim(dim, -1).reshape(u.shape[0] if batched else 1, -1, V)  # [k, rows, V]
        if isinstance(weight, torch.Tensor) and weight.dim():
            W = weight.reshape(-1)  # [rows]: the positions in the order of the rows of L
        else:
            W = torch.full((L.shape[0],), float(weight), dtype=_work_dtype(logits.dtype), device=logits.device)
        if W.numel() != L.shape[0]:
            raise ValueError(f"{W.numel()} weights for {L.shape[0]} positions")
        res = out if out is not None else torch.empty_like(u)
        try:  # the result straight into res's storage when the classes are its last, contiguous dim
            R = res.movedim(dim, -1).view(U.shape)
        except RuntimeError:
            R = None
        target = R if R is not None else torch.empty_like(U)
        step = self.chunk_rows or max(1, DEFAULT_CHUNK_ELEMENTS // V)
        for a in range(0, L.shape[0], step):
            target[:, a : a + step] = self.kernel(L[a : a + step], U[:, a : a + step], W[a : a + step])
        if R is None:
            res.movedim(dim, -1).copy_(target.reshape(res.movedim(dim, -1).shape))
        return res


def softmax_ce_hvp(
    logits: torch.Tensor,
    u: torch.Tensor,
    weight: torch.Tensor | float = 1.0,
    *,
    dim: int = -1,
    chunk_rows: int | None = None,
    compiled: bool = False,
) -> torch.Tensor:
    """``weight * (diag(p) - p p^T) u`` per row along ``dim``, ``p = softmax(logits)``, chunked over rows.

    Args:
        logits: ``[..., V, ...]`` with the classes along ``dim``.
        u: shaped like ``logits``, or ``[k, *logits.shape]`` for ``k`` vectors at once.
        weight: one number, or one per position (``logits``' shape without ``dim``).
        dim: the class dimension of ``logits``.
        chunk_rows: rows per chunk (``None``: :data:`DEFAULT_CHUNK_ELEMENTS` over the vocabulary).
        compiled: through ``torch.compile`` (see :class:`FusedSoftmaxCE`).

    Example (two classes: :math:`\\operatorname{diag}(p) - p p^\\top = p_1 p_2 [[1, -1], [-1, 1]]`):
        >>> import torch
        >>> logits = torch.tensor([[0.0, 0.0]], dtype=torch.float64)  # p = (1/2, 1/2)
        >>> softmax_ce_hvp(logits, torch.tensor([[1.0, 0.0]], dtype=torch.float64))
        tensor([[ 0.2500, -0.2500]], dtype=torch.float64)
    """
    return FusedSoftmaxCE(chunk_rows, compiled).apply(logits.detach(), weight, dim, u)


def _class_dim(logits: torch.Tensor) -> int:
    return 1 if logits.dim() >= 2 else 0  # F.cross_entropy's: [N, C, d1, ...] or an unbatched [C]


def _position_weight(logits, targets, ignore_index: int, reduction: str) -> torch.Tensor:
    w = (targets != ignore_index).to(_work_dtype(logits.dtype))
    return w / w.sum() if reduction == "mean" else w


class _CrossEntropy(torch.autograd.Function):
    """``F.cross_entropy`` whose backward is :class:`_CrossEntropyGrad` (so its double backward is the kernel)."""

    @staticmethod
    def forward(ctx, logits, targets, ignore_index, reduction, kernel):
        ctx.save_for_backward(logits, targets)
        ctx.conf = (ignore_index, reduction, kernel)
        return torch.nn.functional.cross_entropy(logits, targets, ignore_index=ignore_index, reduction=reduction)

    @staticmethod
    def backward(ctx, g):
        logits, targets = ctx.saved_tensors
        return _CrossEntropyGrad.apply(logits, targets, g, *ctx.conf), None, None, None, None


class _CrossEntropyGrad(torch.autograd.Function):
    """``g * w_t * (softmax(logits_t) - onehot(target_t))`` per position; its backward in ``logits`` is
    ``g * w_t * (diag(p) - p p^T) u_t``, the fused kernel (no log-softmax graph is built)."""

    @staticmethod
    def forward(ctx, logits, targets, g, ignore_index, reduction, kernel):
        ctx.save_for_backward(logits, targets, g)
        ctx.conf = (ignore_index, reduction, kernel)
        dim = _class_dim(logits)
        w = _position_weight(logits, targets, ignore_index, reduction) * g
        grad = torch.softmax(logits.to(w.dtype), dim=dim)
        idx = targets.masked_fill(targets == ignore_index, 0).unsqueeze(dim)
        grad.scatter_add_(dim, idx, torch.full(idx.shape, -1.0, dtype=grad.dtype, device=grad.device))
        return grad.mul_(w.unsqueeze(dim)).to(logits.dtype)

    @staticmethod
    def backward(ctx, u):
        logits, targets, g = ctx.saved_tensors
        ignore_index, reduction, kernel = ctx.conf
        dim = _class_dim(logits)
        w = _position_weight(logits, targets, ignore_index, reduction)
        d_logits = d_g = None
        if ctx.needs_input_grad[0]:
            d_logits = kernel.apply(logits.detach(), w * g.detach(), dim, u.detach() if not u.requires_grad else u)
        if ctx.needs_input_grad[2]:  # the loss's gradient times u, per unit of g
            d_g = (_CrossEntropyGrad.apply(logits, targets, torch.ones_like(g), *ctx.conf) * u).sum()
        return d_logits, None, d_g, None, None, None


def fused_cross_entropy(logits, targets, ignore_index: int = -100, reduction: str = "mean", kernel=None):
    """``F.cross_entropy(logits, targets)`` (class-index targets, no class weights or label smoothing) whose
    second derivative in the logits is :class:`FusedSoftmaxCE`'s kernel: a double backward through it keeps
    the logits and their gradient, not log-softmax's graph.

    Example (the Hessian of the mean over two positions of :math:`p = (1/2, 1/2)` is
    :math:`\\frac12 \\cdot \\frac14 [[1, -1], [-1, 1]]` per position):
        >>> import torch
        >>> z = torch.zeros(2, 2, dtype=torch.float64, requires_grad=True)
        >>> (g,) = torch.autograd.grad(fused_cross_entropy(z, torch.tensor([0, 1])), z, create_graph=True)
        >>> torch.autograd.grad(g, z, torch.tensor([[1.0, 0.0], [0.0, 0.0]], dtype=torch.float64))[0]
        tensor([[ 0.1250, -0.1250],
                [ 0.0000,  0.0000]], dtype=torch.float64)
    """
    if reduction not in ("mean", "sum"):
        raise ValueError(f"fused_cross_entropy's reduction must be 'mean' or 'sum', got {reduction!r}")
    return _CrossEntropy.apply(logits, targets, ignore_index, reduction, kernel or FusedSoftmaxCE())


class FusedCrossEntropyMode(torch.overrides.TorchFunctionMode):
    """Inside it, a plain ``F.cross_entropy`` call (class-index targets, no ``weight``, no label smoothing,
    ``reduction`` mean or sum) is :func:`fused_cross_entropy`; other calls go through unchanged.

    Args:
        kernel: the :class:`FusedSoftmaxCE` to use.

    Example:
        >>> import torch
        >>> import torch.nn.functional as F
        >>> z = torch.zeros(1, 2, requires_grad=True)
        >>> with FusedCrossEntropyMode(FusedSoftmaxCE()):
        ...     loss = F.cross_entropy(z, torch.tensor([0]))
        >>> type(loss.grad_fn).__name__
        '_CrossEntropyBackward'
    """

    def __init__(self, kernel: FusedSoftmaxCE):
        super().__init__()
        self.kernel = kernel

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.nn.functional.cross_entropy and len(args) == 2:
            logits, targets = args
            plain = (
                kwargs.get("weight") is None
                and not kwargs.get("label_smoothing", 0.0)
                and kwargs.get("size_average") is None
                and kwargs.get("reduce") is None
                and kwargs.get("reduction", "mean") in ("mean", "sum")
                and isinstance(targets, torch.Tensor)
                and not targets.is_floating_point()
                and logits.dim() >= 1
            )
            if plain:
                return fused_cross_entropy(
                    logits, targets, kwargs.get("ignore_index", -100), kwargs.get("reduction", "mean"), self.kernel
                )
        return func(*args, **kwargs)
