"""Vectors split over ``torch.distributed`` ranks: each rank stores its slice, no rank the whole vector.

The layout is a list of *segments* of the global flat vector, ``(start, length)``, whose concatenation
is this rank's slice (for an FSDP2-sharded model: each parameter's rows that this rank owns, parameter
after parameter). Dot products, norms and a block's inner products are local products plus one
all-reduce of their scalars; a block's QR is a Cholesky QR of the all-reduced Gram matrix, done twice
(CholeskyQR2, Fukaya et al. 2014: orthogonal to rounding while the block's condition number is below
about :math:`u^{-1/2}`).

Random vectors are the *same global vectors* as :class:`~hessianflow.linalg.vectors.FlatVectors` draws
from the same generator: the global sequence is drawn in blocks of :data:`BLOCK` numbers (the CPU
generator's normal and integer streams do not depend on how a draw is split, when every block but the last
holds a multiple of 16 numbers and the last at least 16: checked in ``tests/test_sharded_vectors.py``), and
each rank keeps only the numbers of its segments. So a sharded run takes the same Krylov steps as the
unsharded one with the same seed, to rounding, at :math:`O(n)` time and :math:`O(\\text{BLOCK})` memory
per draw.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.distributed as dist

from .vectors import VectorSpace

__all__ = ["ShardedVectors", "BLOCK"]

#: how many numbers of a global random vector are drawn at a time (a multiple of 16)
BLOCK = 1 << 16


class ShardedVectors(VectorSpace):
    """This rank's slices of vectors of length ``size``, laid out as ``segments`` of the global vector.

    Args:
        size: the global dimension :math:`n`.
        segments: ``(start, length)`` of the global vector, in the order this rank stores them.
        dtype, device: of the stored slices.
        group: the process group the vectors are split over (``None``: the default group).
        collective_device: where the all-reduced scalars live (the device under NCCL, the CPU under gloo).

    Example (one process, one segment: the flat space's numbers):
        >>> import torch
        >>> V = ShardedVectors(3, [(0, 3)], torch.float64, "cpu")
        >>> x = torch.tensor([3.0, 4.0, 0.0], dtype=torch.float64)
        >>> V.norm(x), V.dot(x, x)
        (5.0, 25.0)
    """

    def __init__(
        self,
        size: int,
        segments: Sequence[tuple[int, int]],
        dtype: torch.dtype,
        device,
        group=None,
        collective_device=None,
    ):
        self.size = int(size)
        self.segments = [(int(a), int(n)) for a, n in segments if n > 0]
        self.local_size = sum(n for _, n in self.segments)
        self.dtype = dtype
        self.device = torch.device(device)
        self.group = group
        self._where = torch.device(collective_device) if collective_device is not None else torch.device("cpu")
        self._on = dist.is_available() and dist.is_initialized()

    # -- the one reduction ---------------------------------------------------------------------------
    def _sum(self, t: torch.Tensor, op=None) -> torch.Tensor:
        """``t`` summed (or ``op``-reduced) over the ranks, in float64 (exact for the integers it carries)."""
        out = t.detach().to(device=self._where, dtype=torch.float64).clone()
        if self._on:
            dist.all_reduce(out, op=op or dist.ReduceOp.SUM, group=self.group)
        return out.to(self.device)

    # -- storage -----------------------------------------------------------------------------------------
    def zeros(self, k: int | None = None) -> torch.Tensor:
        shape = (self.local_size,) if k is None else (self.local_size, k)
        return torch.zeros(shape, dtype=self.dtype, device=self.device)

    def empty(self, k: int) -> torch.Tensor:
        return torch.empty(self.local_size, k, dtype=self.dtype, device=self.device)

    def eye(self) -> torch.Tensor:
        """This rank's rows of the ``[n, n]`` identity (for exact answers on small operators only)."""
        rows = (
            torch.cat([torch.arange(a, a + n) for a, n in self.segments])
            if self.segments
            else torch.empty(0, dtype=torch.long)
        )
        out = torch.zeros(self.local_size, self.size, dtype=self.dtype, device=self.device)
        out[torch.arange(self.local_size), rows.to(self.device)] = 1
        return out

    # -- random vectors: this rank's part of the flat space's global draw -----------------------------
    def _draw(self, draw: Callable[[int], torch.Tensor], length: int, width: int = 1) -> torch.Tensor:
        """This rank's rows of a global ``[length, width]`` stream drawn ``draw(count)`` numbers at a time."""
        out = torch.empty(self.local_size, width, dtype=torch.float64)
        rows = max(16, (BLOCK // width) // 16 * 16)  # a block of whole rows, a multiple of 16 numbers
        segs, pos, seg_i, local = self.segments, 0, 0, 0
        while pos < length:
            take = min(rows, length - pos)
            if 0 < (length - pos - take) * width < 16:  # no last block of under 16 numbers
                take = length - pos
            block = draw(take * width).view(take, width)
            while seg_i < len(segs):  # copy the segments' parts inside [pos, pos + take)
                start, n = segs[seg_i]
                lo, hi = max(start, pos), min(start + n, pos + take)
                if lo >= hi:
                    if start >= pos + take:
                        break
                    seg_i += 1
                    continue
                out[local + (lo - start) : local + (hi - start)] = block[lo - pos : hi - pos]
                if hi == start + n:
                    local += n
                    seg_i += 1
                else:
                    break
            pos += take
        return out

    def _out(self, x: torch.Tensor, k: int | None) -> torch.Tensor:
        x = x if k is not None else x[:, 0]
        return x.to(device=self.device, dtype=self.dtype)

    def random(self, generator: torch.Generator) -> torch.Tensor:
        return self._out(
            self._draw(lambda m: torch.randn(m, generator=generator, dtype=torch.float64), self.size), None
        )

    def randn(self, generator: torch.Generator, k: int) -> torch.Tensor:
        block = self._draw(lambda m: torch.randn(m, generator=generator, dtype=torch.float64), self.size, k)
        return self._out(block, k)

    def rademacher(self, generator: torch.Generator, k: int | None = None, by_vector: bool = True) -> torch.Tensor:
        def signs(m):
            return (2 * torch.randint(0, 2, (m,), generator=generator, dtype=torch.int64) - 1).double()

        if k is None:
            return self._out(self._draw(signs, self.size), None)
        if not by_vector:
            return self._out(self._draw(signs, self.size, k), k)
        cols = [self._draw(signs, self.size)[:, 0] for _ in range(k)]
        return self._out(torch.stack(cols, dim=1), k)

    # -- reductions: local products, one all-reduce ---------------------------------------------------
    def dot(self, x: torch.Tensor, y: torch.Tensor) -> float:
        return float(self._sum((x.double() * y.double()).sum()))

    def norm(self, x: torch.Tensor) -> float:
        # scaled by the global largest entry, so that neither a tiny nor a huge vector under/overflows
        m = float(self._sum(x.detach().abs().max() if x.numel() else x.new_zeros(()), op=dist.ReduceOp.MAX))
        if m == 0.0 or m != m or m == float("inf"):
            return m
        return m * float(self._sum(((x.double() / m) ** 2).sum())) ** 0.5

    def inner(self, Q: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return self._sum(Q.T.double() @ x.double()).to(self.dtype)

    def column_dots(self, X: torch.Tensor, Y: torch.Tensor) -> torch.Tensor:
        return self._sum((X.double() * Y.double()).sum(dim=0)).to(self.dtype)

    def column_norms(self, X: torch.Tensor) -> torch.Tensor:
        return self.column_dots(X, X).clamp_min(0).sqrt()

    def qr(self, Y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """CholeskyQR2: ``Q = Y R^{-1}`` with ``R`` from the all-reduced Gram matrix, twice."""
        Q, R = self._cholesky_qr(Y)
        Q, R2 = self._cholesky_qr(Q)
        return Q, R2 @ R

    def _cholesky_qr(self, Y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        G = self._sum(Y.T.double() @ Y.double())  # [k, k], the same on every rank
        L, info = torch.linalg.cholesky_ex(G)
        if int(info) != 0:
            raise ValueError(
                f"the block's columns are linearly dependent (Gram matrix not positive definite at column "
                f"{int(info)}): a sharded block QR needs independent columns"
            )
        R = L.T
        Q = torch.linalg.solve_triangular(R, Y.double(), upper=True, left=False)
        return Q.to(Y.dtype), R.to(Y.dtype)
