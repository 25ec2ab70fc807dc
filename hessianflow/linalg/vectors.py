"""The vectors the solvers work with, through one small protocol.

Lanczos, power iteration, the trace estimators and stochastic Lanczos quadrature never assume that a
vector is one flat tensor on one device: they ask the operator's vector space (:func:`space_of`) for
zeros, random vectors, dot products, norms, and a block's inner products with a vector
(:math:`Q^\\top x`, the one reduction of full reorthogonalisation). Linear combinations (``x - Q c``,
``a * x + y``) are local arithmetic on the stored pieces. The default, :class:`FlatVectors`, is a flat
``[n]`` tensor (a block ``[n, k]``) and reproduces the solvers' arithmetic exactly; a sharded model's
space keeps this rank's slice and all-reduces the
scalars of its dot products and inner products (its block QR a Cholesky QR of the all-reduced Gram
matrix), and nothing else changes.

An operator chooses its space with a ``vector_space`` attribute; without one it gets
:class:`FlatVectors` in the solvers' working dtype.
"""

from __future__ import annotations

import math

import torch

from .._random import rademacher, randn

__all__ = ["VectorSpace", "FlatVectors", "space_of", "safe_norm"]


def safe_norm(x: torch.Tensor, dim=None) -> torch.Tensor:
    """``torch.linalg.vector_norm`` without underflow: it squares the entries, so entries below ~1e-154
    (a Hessian at a tiny scale; found by the property tests at 1e-206) would give norm 0 and pass any
    residual test. Rescaled by the largest entry only then (a norm below 1e-150, or an overflow)."""
    n = torch.linalg.vector_norm(x, dim=dim)
    if x.numel() and bool(((n < 1e-150) | torch.isinf(n)).any()):
        m = float(x.abs().max())
        if m > 0.0 and math.isfinite(m):
            return torch.linalg.vector_norm(x / m, dim=dim) * m
    return n


class VectorSpace:
    """The protocol (the methods the solvers call); :class:`FlatVectors` is the reference implementation.

    Attributes:
        size: the global dimension :math:`n` (what the results report).
        local_size: the length of the stored piece of one vector (``size`` unless sharded).
        dtype, device: of the stored pieces.
    """

    size: int
    local_size: int
    dtype: torch.dtype
    device: torch.device

    def zeros(self, k: int | None = None) -> torch.Tensor:  # pragma: no cover - protocol
        """A zero vector (``k=None``) or a zero block of ``k`` vectors."""
        raise NotImplementedError

    def empty(self, k: int) -> torch.Tensor:  # pragma: no cover - protocol
        """Uninitialised storage for a block of ``k`` vectors."""
        raise NotImplementedError

    def random(self, generator: torch.Generator) -> torch.Tensor:  # pragma: no cover - protocol
        """A standard normal vector drawn from ``generator`` (the same global vector on every rank)."""
        raise NotImplementedError

    def rademacher(self, generator: torch.Generator, k: int | None = None, by_vector: bool = True) -> torch.Tensor:
        """A random sign vector (``k=None``) or a block of ``k`` of them, drawn vector by vector (the
        block then does not depend on how many are drawn at once) or as one ``[n, k]`` matrix."""
        raise NotImplementedError  # pragma: no cover - protocol

    def randn(self, generator: torch.Generator, k: int) -> torch.Tensor:  # pragma: no cover - protocol
        """A block of ``k`` standard normal vectors, drawn as one ``[n, k]`` matrix."""
        raise NotImplementedError

    def dot(self, x: torch.Tensor, y: torch.Tensor) -> float:  # pragma: no cover - protocol
        raise NotImplementedError

    def qr(self, Y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # pragma: no cover - protocol
        """A thin QR of a block: ``Q`` with orthonormal columns (a block) and ``R`` ``[k, k]``."""
        raise NotImplementedError

    def column_norms(self, X: torch.Tensor) -> torch.Tensor:  # pragma: no cover - protocol
        """``[k]``: the norms of a block's columns."""
        raise NotImplementedError

    def column_dots(self, X: torch.Tensor, Y: torch.Tensor) -> torch.Tensor:  # pragma: no cover - protocol
        """``[k]``: the dot products of the columns of two blocks."""
        raise NotImplementedError

    def norm(self, x: torch.Tensor) -> float:  # pragma: no cover - protocol
        raise NotImplementedError

    def inner(self, Q: torch.Tensor, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - protocol
        """:math:`Q^\\top x`, ``[k]``: the block's inner products with a vector."""
        raise NotImplementedError

    def eye(self) -> torch.Tensor:  # pragma: no cover - protocol
        """The ``n`` unit vectors as a block (for exact answers on small operators only)."""
        raise NotImplementedError


class FlatVectors(VectorSpace):
    """Vectors as flat ``[n]`` tensors on one device, blocks as ``[n, k]`` matrices (the default).

    Example:
        >>> import torch
        >>> V = FlatVectors(3, torch.float64, "cpu")
        >>> x = torch.tensor([3.0, 4.0, 0.0], dtype=torch.float64)
        >>> V.norm(x), V.dot(x, x), V.inner(torch.eye(3, dtype=torch.float64)[:, :2], x).tolist()
        (5.0, 25.0, [3.0, 4.0])
    """

    def __init__(self, size: int, dtype: torch.dtype, device):
        self.size = self.local_size = int(size)
        self.dtype = dtype
        self.device = torch.device(device)

    def zeros(self, k: int | None = None) -> torch.Tensor:
        shape = (self.local_size,) if k is None else (self.local_size, k)
        return torch.zeros(shape, dtype=self.dtype, device=self.device)

    def empty(self, k: int) -> torch.Tensor:
        return torch.empty(self.local_size, k, dtype=self.dtype, device=self.device)

    def random(self, generator: torch.Generator) -> torch.Tensor:
        return randn((self.size,), generator, dtype=self.dtype, device=self.device)

    def rademacher(self, generator: torch.Generator, k: int | None = None, by_vector: bool = True) -> torch.Tensor:
        if k is None:
            return rademacher((self.size,), generator, dtype=self.dtype, device=self.device)
        if not by_vector:
            return rademacher((self.size, k), generator, dtype=self.dtype, device=self.device)
        return rademacher((k, self.size), generator, dtype=self.dtype, device=self.device).T

    def randn(self, generator: torch.Generator, k: int) -> torch.Tensor:
        return randn((self.size, k), generator, dtype=self.dtype, device=self.device)

    def dot(self, x: torch.Tensor, y: torch.Tensor) -> float:
        return float(x @ y)

    def qr(self, Y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.linalg.qr(Y)

    def column_norms(self, X: torch.Tensor) -> torch.Tensor:
        return torch.linalg.vector_norm(X, dim=0)

    def column_dots(self, X: torch.Tensor, Y: torch.Tensor) -> torch.Tensor:
        return (X * Y).sum(dim=0)

    def norm(self, x: torch.Tensor) -> float:
        return float(safe_norm(x))

    def inner(self, Q: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return Q.T @ x

    def eye(self) -> torch.Tensor:
        return torch.eye(self.size, dtype=self.dtype, device=self.device)


def space_of(op, dtype: torch.dtype) -> VectorSpace:
    """The operator's vector space (its ``vector_space``), or :class:`FlatVectors` of its size in ``dtype``
    on its device (the solvers' working dtype: see :func:`hessianflow.linalg.eigen.lanczos`)."""
    space = getattr(op, "vector_space", None)
    return space if space is not None else FlatVectors(op.size, dtype, op.device)
