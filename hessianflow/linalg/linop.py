"""The one abstraction: a symmetric linear operator on flat vectors.

Every algorithm in :mod:`hessianflow` (power iteration, Lanczos, SLQ, Hutchinson) takes either a
:class:`LinearOperator` or a plain dense symmetric ``torch.Tensor``; :func:`as_operator` turns the
latter into the former. This is what lets the algorithms be tested against
``torch.linalg.eigvalsh`` on matrices with known spectra, independently of any model.
"""

from __future__ import annotations

import torch

__all__ = ["LinearOperator", "DenseOperator", "NonFiniteError", "as_operator", "check_vector"]


class NonFiniteError(ValueError):
    """A product (or a loss) came out NaN or infinite: a result built on it would be meaningless."""


class LinearOperator:
    """A symmetric linear map :math:`A: \\mathbb{R}^n \\to \\mathbb{R}^n`.

    Subclasses implement :meth:`_matvec` (and optionally :meth:`_matmat` where a batched product is
    faster than a loop). The public :meth:`matvec` / :meth:`matmat` validate shapes, count products in
    :attr:`num_matvecs` and refuse non-finite results, so every solver fails loudly instead of
    returning a NaN eigenvalue.

    Attributes:
        size: the dimension ``n``.
        dtype: the dtype of vectors the operator accepts and returns.
        device: the device of those vectors.
        num_matvecs: the number of matrix-vector products computed so far (a ``matmat`` with ``k``
            columns counts ``k``).
        deterministic: whether two products with the same vector give the same result. ``False`` for a
            curvature operator in train mode with dropout, or with BatchNorm batch statistics over a
            shuffled loader: it is not a fixed matrix, and the eigensolvers then never report
            convergence.

    Example:
        >>> import torch
        >>> class Scale(LinearOperator):
        ...     def __init__(self, n, c):
        ...         super().__init__(n, torch.float64, "cpu")
        ...         self.c = c
        ...     def _matvec(self, v):
        ...         return self.c * v
        >>> op = Scale(3, 2.0)
        >>> op.matvec(torch.ones(3, dtype=torch.float64))
        tensor([2., 2., 2.], dtype=torch.float64)
        >>> op.matmat(torch.eye(3, dtype=torch.float64)).diagonal(), op.num_matvecs
        (tensor([2., 2., 2.], dtype=torch.float64), 4)
    """

    size: int
    dtype: torch.dtype
    device: torch.device
    deterministic: bool = True
    #: whether one :meth:`matmat` of ``k`` columns is cheaper than ``k`` :meth:`matvec` calls: the block
    #: Lanczos then computes its pending vectors' products together (:func:`~hessianflow.linalg.eigen.lanczos`)
    prefers_matmat: bool = False

    def __init__(self, size: int, dtype: torch.dtype, device: torch.device | str):
        self.size = int(size)
        self.dtype = dtype
        self.device = torch.device(device)
        self.num_matvecs = 0

    @property
    def shape(self) -> tuple[int, int]:
        return (self.size, self.size)

    @property
    def local_size(self) -> int:
        """The length of the vectors this process passes: :attr:`size`, or this rank's slice when the
        operator's ``vector_space`` is sharded (:mod:`~hessianflow.linalg.sharded_vectors`)."""
        space = getattr(self, "vector_space", None)
        return self.size if space is None else space.local_size

    # -- to be implemented by subclasses -------------------------------------------------------
    def _matvec(self, v: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def _matmat(self, V: torch.Tensor) -> torch.Tensor:
        # [n, k] -> [n, k]; a loop is the fallback where no batched product exists.
        return torch.stack([self._matvec(V[:, j]) for j in range(V.shape[1])], dim=1)

    # -- public, validated ---------------------------------------------------------------------
    def matvec(self, v: torch.Tensor) -> torch.Tensor:
        """Return :math:`A v` for a flat vector ``v`` of length :attr:`size`."""
        v = check_vector(v, self.local_size, self.dtype, self.device)
        out = self._matvec(v)
        self.num_matvecs += 1
        _check_finite(out, "matrix-vector product")
        return out

    def matmat(self, V: torch.Tensor) -> torch.Tensor:
        """Return :math:`A V` for ``V`` of shape ``[n, k]``."""
        if not isinstance(V, torch.Tensor) or V.dim() != 2 or V.shape[0] != self.local_size:
            shape = tuple(V.shape) if isinstance(V, torch.Tensor) else type(V).__name__
            raise ValueError(f"matmat expects a tensor of shape [{self.local_size}, k], got {shape}")
        V = V.to(device=self.device, dtype=self.dtype)
        if V.shape[1] == 0:
            return V.clone()
        out = self._matmat(V)
        self.num_matvecs += V.shape[1]
        _check_finite(out, "matrix-matrix product")
        return out

    def __matmul__(self, x: torch.Tensor) -> torch.Tensor:
        if not isinstance(x, torch.Tensor) and hasattr(x, "matvec"):
            return self._compose(x)  # A @ B of operators: see the algebra block below
        if isinstance(x, torch.Tensor) and x.dim() == 2:
            return self.matmat(x)
        return self.matvec(x)

    def to_dense(self) -> torch.Tensor:
        """Materialise the operator as an ``[n, n]`` matrix (``n`` products: small operators only)."""
        return self.matmat(torch.eye(self.size, dtype=self.dtype, device=self.device))

    def __repr__(self) -> str:
        return f"{type(self).__name__}(size={self.size}, dtype={self.dtype}, device={self.device})"

    # -- algebra, scipy, determinism: thin methods over hessianflow.linalg.algebra (issue 22) -------------------
    # A + B, A - B, c * A, A / c, A + c (c I) stay symmetric LinearOperators; A @ B is a general
    # ComposedOperator that the symmetric solvers refuse.
    symmetric: bool = True

    def __add__(self, other):
        from .algebra import LinearCombination, _is_scalar

        if _is_scalar(other):
            return LinearCombination([(1.0, self)], shift=other)
        if isinstance(other, LinearOperator):
            return LinearCombination([(1.0, self), (1.0, other)])
        return NotImplemented

    __radd__ = __add__

    def __sub__(self, other):
        return self + (-1.0) * other if isinstance(other, LinearOperator) else self + (-other)

    def __rsub__(self, other):
        return (-1.0) * self + other

    def __mul__(self, c):
        from .algebra import LinearCombination, _is_scalar

        return LinearCombination([(c, self)]) if _is_scalar(c) else NotImplemented

    __rmul__ = __mul__

    def __truediv__(self, c):
        from .algebra import _is_scalar, _scalar

        return self * (1.0 / _scalar(c)) if _is_scalar(c) else NotImplemented

    def __neg__(self):
        return (-1.0) * self

    def _compose(self, other):
        from .algebra import ComposedOperator

        return ComposedOperator(self, other)

    def to_scipy(self):
        """A ``scipy.sparse.linalg.LinearOperator`` with products in PyTorch (:func:`.algebra.to_scipy`)."""
        from .algebra import to_scipy

        return to_scipy(self)

    def check_deterministic(self, seed=None):
        """Two products of one random vector compared (:func:`hessianflow.linalg.algebra.check_deterministic`)."""
        from .algebra import check_deterministic

        return check_deterministic(self, seed=seed)


class DenseOperator(LinearOperator):
    """A dense symmetric matrix viewed as a :class:`LinearOperator`.

    Example:
        >>> import torch
        >>> op = DenseOperator(torch.tensor([[2.0, 1.0], [1.0, 2.0]], dtype=torch.float64))
        >>> op.size, op @ torch.tensor([1.0, 1.0], dtype=torch.float64)
        (2, tensor([3., 3.], dtype=torch.float64))
        >>> DenseOperator(torch.tensor([[1.0, 2.0], [0.0, 1.0]]))
        Traceback (most recent call last):
        ...
        ValueError: the matrix is not symmetric (relative asymmetry 1.00e+00)
        >>> DenseOperator(torch.eye(2, dtype=torch.int64))  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        ValueError: the matrix has the integer dtype torch.int64: convert it first with .double() ...
    """

    def __init__(self, matrix: torch.Tensor, check_symmetric: bool = True):
        if not isinstance(matrix, torch.Tensor) or matrix.dim() != 2 or matrix.shape[0] != matrix.shape[1]:
            shape = tuple(matrix.shape) if isinstance(matrix, torch.Tensor) else type(matrix).__name__
            raise ValueError(f"expected a square matrix, got shape {shape}")
        _refuse_complex(matrix.dtype)
        if not matrix.is_floating_point():
            # Issue 21: an integer matrix used to become float32 silently (integers above 2**24 rounded).
            raise ValueError(
                f"the matrix has the integer dtype {matrix.dtype}: convert it first with .double() (exact for "
                "integers up to 2**53) or .float(); the algorithms compute in floating point"
            )
        if check_symmetric and matrix.numel():
            scale = matrix.abs().max().clamp_min(torch.finfo(matrix.dtype).tiny)
            asym = (matrix - matrix.T).abs().max() / scale
            # A few hundred ulps allows for matrices assembled in floating point (Q diag Q^T).
            if asym > 1e3 * torch.finfo(matrix.dtype).eps:
                raise ValueError(f"the matrix is not symmetric (relative asymmetry {asym.item():.2e})")
        super().__init__(matrix.shape[0], matrix.dtype, matrix.device)
        self.matrix = matrix

    def _matvec(self, v):
        return self.matrix @ v

    def _matmat(self, V):
        return self.matrix @ V

    def to_dense(self):
        return self.matrix.clone()


def as_operator(A) -> LinearOperator:
    """Return ``A`` as a :class:`LinearOperator` (a dense tensor is wrapped, an operator passes).

    Example:
        >>> import torch
        >>> op = as_operator(torch.eye(3))
        >>> type(op).__name__, op.size, as_operator(op) is op
        ('DenseOperator', 3, True)
    """
    if isinstance(A, LinearOperator):
        _refuse_complex(A.dtype)
        return A
    if isinstance(A, torch.Tensor):
        return DenseOperator(A)
    raise TypeError(f"expected a hessianflow LinearOperator or a dense symmetric torch.Tensor, got {type(A).__name__}")


def check_vector(v, size: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Validate a flat vector of length ``size`` and move it to ``dtype``/``device``."""
    if not isinstance(v, torch.Tensor):
        raise ValueError(f"expected a flat torch.Tensor of length {size}, got {type(v).__name__}")
    if v.dim() != 1 or v.shape[0] != size:
        raise ValueError(f"expected a flat vector of length {size}, got shape {tuple(v.shape)}")
    return v.to(device=device, dtype=dtype)


def _refuse_complex(dtype: torch.dtype) -> None:
    # Casting a complex matrix to a real dtype drops the imaginary part: [[1, 1j], [-1j, 1]] (eigenvalues
    # 0 and 2) would be solved as the identity. The algorithms are for real symmetric operators.
    if dtype.is_complex:
        raise ValueError(
            f"complex operators are not supported (got {dtype}): the algorithms are for real symmetric "
            "matrices; a Hermitian H = A + iB has the eigenvalues of the real symmetric [[A, -B], [B, A]], "
            "each twice"
        )


def _check_finite(out: torch.Tensor, what: str) -> None:
    if not torch.isfinite(out).all():
        raise NonFiniteError(
            f"the {what} returned non-finite values (NaN or Inf); check the model, the loss and the data"
        )
