"""Operator algebra, the scipy bridge and the determinism check behind
:class:`~hessianflow.linalg.linop.LinearOperator`'s ``+``, ``-``, ``*``, ``/``, ``@``,
:meth:`~hessianflow.linalg.linop.LinearOperator.to_scipy` and
:meth:`~hessianflow.linalg.linop.LinearOperator.check_deterministic`.

* :class:`LinearCombination`: :math:`\\sum_i c_i A_i + s I`. Sums, differences, scalar multiples and
  shifts of symmetric operators are symmetric, so the result is a
  :class:`~hessianflow.linalg.linop.LinearOperator` that every solver takes (``H + 1e-3`` is the damped Hessian
  :math:`H + 10^{-3} I`).
* :class:`ComposedOperator`: :math:`A B`. A product of two symmetric matrices is symmetric only when they
  commute, so ``A @ B`` is a *general* operator: deliberately not a ``LinearOperator``, which every
  symmetric solver (Lanczos, SLQ, the trace and diagonal estimators, CG, MINRES) refuses with one sentence
  instead of returning eigenvalues of a matrix that does not have real ones.
* :class:`BlockDiagonalOperator`: an operator with the blocks off its diagonal (of a partition of the
  coordinates) removed, e.g. the per-layer block-diagonal Hessian.
* :func:`to_scipy`: a ``scipy.sparse.linalg.LinearOperator`` whose products run in PyTorch (scipy is
  optional: a missing scipy is one sentence naming the extra).
* :func:`check_deterministic`: two products of one random vector, compared.

This module knows nothing of models.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import torch

from .._random import make_generator, randn
from .linop import LinearOperator, as_operator

__all__ = [
    "LinearCombination",
    "ComposedOperator",
    "BlockDiagonalOperator",
    "DeterminismCheck",
    "to_scipy",
    "check_deterministic",
    "symmetric_operator",
]


def _is_scalar(c) -> bool:
    if isinstance(c, bool):
        return False
    if isinstance(c, torch.Tensor):
        return c.numel() == 1 and not c.dtype.is_complex
    return isinstance(c, numbers.Real)


def _scalar(c) -> float:
    value = float(c.item() if isinstance(c, torch.Tensor) else c)
    if not math.isfinite(value):
        raise ValueError(f"operator algebra needs finite scalars, got {value}")
    return value


def _check_compatible(a, b, what: str) -> None:
    if a.size != b.size:
        raise ValueError(f"cannot {what} operators of sizes {a.size} and {b.size}")
    if a.dtype != b.dtype or a.device != b.device:
        raise ValueError(
            f"cannot {what} operators of dtypes/devices {a.dtype}/{a.device} and {b.dtype}/{b.device}: "
            "build both in the same dtype and on the same device"
        )


class LinearCombination(LinearOperator):
    """The symmetric operator :math:`\\sum_i c_i A_i + s I` of symmetric operators :math:`A_i`.

    Built by the operators' arithmetic (``A + B``, ``A - B``, ``c * A``, ``A / c``, ``A + c``, ``-A``);
    nested combinations are flattened into one. A product costs one product with each term (counted in
    each term's own ``num_matvecs`` too); the shift is free.

    Attributes:
        terms: the ``(coefficient, operator)`` pairs.
        shift: :math:`s`.

    Example:
        >>> import torch
        >>> from hessianflow.linalg.linop import DenseOperator
        >>> A = DenseOperator(torch.tensor([[2.0, 1.0], [1.0, 3.0]], dtype=torch.float64))
        >>> B = DenseOperator(torch.eye(2, dtype=torch.float64))
        >>> C = 2 * A - B / 4 + 0.5  # 2A - B/4 + 0.5 I
        >>> type(C).__name__, C.to_dense()
        ('LinearCombination', tensor([[4.2500, 2.0000],
                [2.0000, 6.2500]], dtype=torch.float64))
    """

    def __init__(self, terms, shift: float = 0.0):
        flat: list[tuple[float, LinearOperator]] = []
        shift = _scalar(shift)
        for c, op in terms:
            c = _scalar(c)
            if isinstance(op, LinearCombination):
                flat.extend((c * ci, oi) for ci, oi in op.terms)
                shift += c * op.shift
            else:
                flat.append((c, as_operator(op)))
        if not flat:
            raise ValueError("a linear combination needs at least one operator")
        first = flat[0][1]
        for _, op in flat[1:]:
            _check_compatible(first, op, "combine")
        super().__init__(first.size, first.dtype, first.device)
        self.terms = flat
        self.shift = shift
        self.deterministic = all(op.deterministic for _, op in flat)

    def _combine(self, outs, V):
        acc = None
        for (c, _), out in zip(self.terms, outs):
            acc = c * out if acc is None else acc.add_(out, alpha=c)
        return acc.add_(V, alpha=self.shift) if self.shift else acc

    def _matvec(self, v):
        return self._combine([op.matvec(v) for _, op in self.terms], v)

    def _matmat(self, V):
        return self._combine([op.matmat(V) for _, op in self.terms], V)

    def __repr__(self) -> str:
        parts = [f"{c:g} * {type(op).__name__}" for c, op in self.terms]
        if self.shift:
            parts.append(f"{self.shift:g} * I")
        return f"LinearCombination({' + '.join(parts)}, size={self.size})"


class ComposedOperator:
    """The product :math:`A B` of two operators: a general (non-symmetric) linear map.

    ``A @ B`` for operators builds one. It has the products (``@``, :meth:`matvec`, :meth:`matmat`,
    :meth:`to_dense`, :meth:`to_scipy`) but is not a :class:`~hessianflow.linalg.linop.LinearOperator`, so the
    symmetric solvers refuse it (see :func:`symmetric_operator` for the sentence). :math:`A B` is symmetric
    only where :math:`A` and :math:`B` commute (for :math:`\\operatorname{tr} A^2` use
    :func:`hessianflow.linalg.diagonal.frobenius_norm_sq`).

    Attributes:
        factors: the operators, applied right to left.
        symmetric: ``False``.

    Example:
        >>> import torch
        >>> from hessianflow.linalg.linop import DenseOperator
        >>> A = DenseOperator(torch.tensor([[1.0, 2.0], [2.0, 1.0]], dtype=torch.float64))
        >>> B = DenseOperator(torch.diag(torch.tensor([1.0, 3.0], dtype=torch.float64)))
        >>> AB = A @ B
        >>> AB @ torch.tensor([1.0, 1.0], dtype=torch.float64)  # A (B v)
        tensor([7., 5.], dtype=torch.float64)
        >>> from hessianflow import lanczos
        >>> lanczos(AB, k=1)
        Traceback (most recent call last):
        ...
        TypeError: expected a hessianflow LinearOperator or a dense symmetric torch.Tensor, got ComposedOperator
    """

    symmetric = False
    deterministic = True

    def __init__(self, *factors):
        flat = []
        for f in factors:
            if isinstance(f, ComposedOperator):
                flat.extend(f.factors)
            elif isinstance(f, LinearOperator):
                flat.append(f)
            else:
                raise TypeError(f"can only compose hessianflow operators, got {type(f).__name__}")
        for f in flat[1:]:
            _check_compatible(flat[0], f, "compose")
        self.factors = flat
        self.size, self.dtype, self.device = flat[0].size, flat[0].dtype, flat[0].device
        self.deterministic = all(f.deterministic for f in flat)
        self.num_matvecs = 0

    @property
    def shape(self) -> tuple[int, int]:
        return (self.size, self.size)

    def matvec(self, v: torch.Tensor) -> torch.Tensor:
        """:math:`A (B v)`."""
        for f in reversed(self.factors):
            v = f.matvec(v)
        self.num_matvecs += 1
        return v

    def matmat(self, V: torch.Tensor) -> torch.Tensor:
        """:math:`A (B V)` for ``V`` of shape ``[n, k]``."""
        for f in reversed(self.factors):
            V = f.matmat(V)
        self.num_matvecs += V.shape[1]
        return V

    def __matmul__(self, x):
        if isinstance(x, (LinearOperator, ComposedOperator)):
            return ComposedOperator(self, x)
        if isinstance(x, torch.Tensor) and x.dim() == 2:
            return self.matmat(x)
        return self.matvec(x)

    def __rmatmul__(self, x):
        if isinstance(x, LinearOperator):
            return ComposedOperator(x, self)
        return NotImplemented

    def to_dense(self) -> torch.Tensor:
        """The ``[n, n]`` matrix (``n`` products of each factor: small operators only)."""
        return self.matmat(torch.eye(self.size, dtype=self.dtype, device=self.device))

    def to_scipy(self):
        """A ``scipy.sparse.linalg.LinearOperator`` (see :func:`to_scipy`)."""
        return to_scipy(self)

    def __repr__(self) -> str:
        return f"ComposedOperator({' @ '.join(type(f).__name__ for f in self.factors)}, size={self.size})"


class BlockDiagonalOperator(LinearOperator):
    """:math:`\\operatorname{blockdiag}(A_{11}, \\dots, A_{BB})`: ``A`` with every block off the diagonal removed.

    .. math:: (A_{\\mathrm{bd}}\\, v)_b = \\sum_{i, j \\in b} A_{ij} v_j \\quad \\text{for each block } b,

    for a partition of the coordinates into blocks (index sets, not necessarily contiguous). One product
    is one :meth:`~hessianflow.linalg.linop.LinearOperator.matmat` of ``A`` with the ``B`` masked copies
    :math:`P_b v` (``B`` products, in one batched call where the operator batches), of which block ``b``
    of column ``b`` is kept. Symmetric when ``A`` is, and its eigenvalues are the union of the blocks'.

    Args:
        op: a :class:`~hessianflow.linalg.linop.LinearOperator` or a dense symmetric tensor.
        blocks: a list of index sets (1-D integer tensors or lists), disjoint, covering ``0..n-1``.
        names: optional names of the blocks (e.g. the layers').

    Example:
        >>> import torch
        >>> A = torch.tensor([[2.0, 1.0, 5.0], [1.0, 3.0, 0.5], [5.0, 0.5, 4.0]], dtype=torch.float64)
        >>> bd = BlockDiagonalOperator(A, [[0, 2], [1]])
        >>> bd.to_dense()
        tensor([[2., 0., 5.],
                [0., 3., 0.],
                [5., 0., 4.]], dtype=torch.float64)
    """

    def __init__(self, op, blocks, names=None):
        op = as_operator(op)
        super().__init__(op.size, op.dtype, op.device)
        idx = [torch.as_tensor(b, dtype=torch.long).reshape(-1) for b in blocks]
        owner = torch.full((op.size,), -1, dtype=torch.long)
        for i, b in enumerate(idx):
            if b.numel() and (int(b.min()) < 0 or int(b.max()) >= op.size):
                raise ValueError(f"block {i} has indices outside 0..{op.size - 1}")
            if bool((owner[b] >= 0).any()) or b.unique().numel() != b.numel():
                raise ValueError(f"block {i} overlaps another block: the blocks must be disjoint")
            owner[b] = i
        if bool((owner < 0).any()):
            raise ValueError(f"{int((owner < 0).sum())} coordinates belong to no block: the blocks must cover 0..n-1")
        self.op = op
        self.blocks = idx
        self.names = list(names) if names is not None else [str(i) for i in range(len(idx))]
        self.deterministic = op.deterministic
        self._owner = owner.to(op.device)
        self._nblocks = len(idx)

    def _masks(self) -> torch.Tensor:
        # [n, B] one-hot of each coordinate's block
        return torch.nn.functional.one_hot(self._owner, self._nblocks).to(self.dtype)

    def _matvec(self, v):
        M = self._masks()
        return (self.op.matmat(M * v[:, None]) * M).sum(dim=1)

    def _matmat(self, V):
        M = self._masks()
        k = V.shape[1]
        cols = (M[:, :, None] * V[:, None, :]).reshape(self.size, self._nblocks * k)  # [n, B k]
        out = self.op.matmat(cols).reshape(self.size, self._nblocks, k)
        return (out * M[:, :, None]).sum(dim=1)


def symmetric_operator(A, who: str) -> LinearOperator:
    """``A`` as a symmetric :class:`~hessianflow.linalg.linop.LinearOperator`, or one sentence saying why not.

    Example:
        >>> import torch
        >>> A = torch.eye(2, dtype=torch.float64)
        >>> symmetric_operator(A, "solve").size
        2
        >>> symmetric_operator(as_operator(A) @ as_operator(A), "solve")
        Traceback (most recent call last):
        ...
        TypeError: solve needs a symmetric operator, and A @ B is a general one (...): a product ...
    """
    if isinstance(A, ComposedOperator) or getattr(A, "symmetric", True) is False:
        raise TypeError(
            f"{who} needs a symmetric operator, and A @ B is a general one ({A!r}): a product of symmetric "
            "matrices is symmetric only when they commute"
        )
    return as_operator(A)


# -- scipy --------------------------------------------------------------------------------------------
def _require_scipy():
    try:
        import scipy.sparse.linalg as spla
    except ImportError as exc:
        raise ImportError("to_scipy() needs scipy: pip install 'hessianflow[scipy]' (or pip install scipy)") from exc
    return spla


def to_scipy(op):
    """A ``scipy.sparse.linalg.LinearOperator`` whose products run in PyTorch.

    NumPy vectors are converted to the operator's dtype and device, multiplied, and returned as NumPy
    arrays on the CPU, so scipy's solvers (``eigsh``, ``cg``, ``minres``, ``lsmr``, ...) run on a curvature
    operator unchanged. Products are counted in the operator's ``num_matvecs``. ``rmatvec`` is the
    product itself for a symmetric operator and refused for a :class:`ComposedOperator` (scipy would ask
    for :math:`B^\\top A^\\top`, which it builds from ``matvec`` of the reversed factors: given here).

    Args:
        op: a :class:`~hessianflow.linalg.linop.LinearOperator`, a dense symmetric tensor or a
            :class:`ComposedOperator`.

    Raises:
        ImportError: scipy is not installed (one sentence naming the extra).

    Example:
        >>> import numpy as np, torch
        >>> from scipy.sparse.linalg import eigsh
        >>> A = torch.diag(torch.arange(1.0, 21.0, dtype=torch.float64))
        >>> S = to_scipy(A)
        >>> S.shape, S.dtype
        ((20, 20), dtype('float64'))
        >>> np.round(eigsh(S, k=2, which="LA", return_eigenvectors=False), 8)
        array([19., 20.])
    """
    spla = _require_scipy()
    import numpy as np

    if not isinstance(op, ComposedOperator):
        op = as_operator(op)
    np_dtype = torch.empty((), dtype=op.dtype).numpy().dtype

    def mv(x):
        x = np.asarray(x)
        t = torch.from_numpy(np.ascontiguousarray(x.reshape(-1))).to(dtype=op.dtype, device=op.device)
        return op.matvec(t).detach().cpu().numpy().reshape(x.shape)

    def mm(X):
        t = torch.from_numpy(np.ascontiguousarray(np.asarray(X))).to(dtype=op.dtype, device=op.device)
        return op.matmat(t).detach().cpu().numpy()

    if isinstance(op, ComposedOperator):
        reverse = ComposedOperator(*reversed(op.factors))  # (A B)^T = B A for symmetric factors

        def rmv(x):
            return to_scipy(reverse).matvec(x)

    else:
        rmv = mv
    return spla.LinearOperator(op.shape, matvec=mv, matmat=mm, rmatvec=rmv, dtype=np_dtype)


# -- determinism --------------------------------------------------------------------------------------
@dataclass
class DeterminismCheck:
    """Two products of one random vector, compared.

    Attributes:
        relative_difference: :math:`\\|A v - (A v)'\\| / \\|A v\\|` (0 for a fixed matrix computed
            deterministically; about the float rounding for non-deterministic GPU kernels; order one with
            dropout or train-mode BatchNorm over a shuffled loader).
        max_abs_difference: the largest entry of :math:`|A v - (A v)'|`.
        identical: whether the two products are bit for bit equal.
        num_matvecs: products spent (2).

    Example:
        >>> import torch
        >>> r = check_deterministic(torch.eye(3, dtype=torch.float64), seed=0)
        >>> r.relative_difference, r.identical, r.to_dict()["num_matvecs"]
        (0.0, True, 2)
    """

    relative_difference: float
    max_abs_difference: float
    identical: bool
    num_matvecs: int

    def to_dict(self) -> dict:
        """JSON-ready plain Python values."""
        return {
            "relative_difference": float(self.relative_difference),
            "max_abs_difference": float(self.max_abs_difference),
            "identical": bool(self.identical),
            "num_matvecs": int(self.num_matvecs),
        }


def check_deterministic(op, seed=None) -> DeterminismCheck:
    """Multiply one random vector twice and report how far the two products differ.

    A curvature operator in train mode with dropout, or with BatchNorm batch statistics over a shuffled
    loader, is not a fixed matrix; GPU kernels with atomics differ at rounding level. No eigensolver can
    certify convergence on the first kind; this check measures which kind an operator is, in numbers.

    Args:
        op: a :class:`~hessianflow.linalg.linop.LinearOperator` (or a dense tensor, or a :class:`ComposedOperator`).
        seed: ``None``, an int or a ``torch.Generator`` for the Gaussian test vector.

    Returns:
        A :class:`DeterminismCheck`.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from hessianflow import HessianOperator
        >>> torch.manual_seed(0)
        <torch._C.Generator object at ...>
        >>> model = nn.Sequential(nn.Linear(3, 4), nn.Dropout(0.5), nn.Linear(4, 1)).double()
        >>> x, y = torch.randn(8, 3, dtype=torch.float64), torch.randn(8, 1, dtype=torch.float64)
        >>> HessianOperator(model, nn.MSELoss(), data=(x, y)).check_deterministic(seed=0).identical
        True
        >>> import warnings
        >>> with warnings.catch_warnings():
        ...     warnings.simplefilter("ignore")
        ...     H = HessianOperator(model, nn.MSELoss(), data=(x, y), train_mode=True, reuse_graph=False)
        >>> H.check_deterministic(seed=0).relative_difference > 0.01  # dropout: not a fixed matrix
        True
    """
    if not isinstance(op, ComposedOperator):
        op = as_operator(op)
    v = randn((op.size,), make_generator(seed), dtype=op.dtype, device=op.device)
    a = op.matvec(v)
    b = op.matvec(v)
    diff = (a - b).double()
    scale = float(torch.linalg.vector_norm(a.double()))
    dnorm = float(torch.linalg.vector_norm(diff))
    rel = dnorm / scale if scale > 0 else (0.0 if dnorm == 0 else math.inf)
    return DeterminismCheck(rel, float(diff.abs().max()) if diff.numel() else 0.0, bool(torch.equal(a, b)), 2)
