"""hf.solve, hf.diagonal and frobenius_norm_sq through the vector protocol (issue 22, item 5), with the spaces
of tests/test_vectors.py.

* A two-shard space (local dot products summed) gives the flat solution to rounding, and is used.
* Under a weighted inner product :math:`\\langle x, y \\rangle_W = x^\\top W y`, :math:`A = W^{-1} S` is
  self-adjoint (positive definite for S so): CG and MINRES solve :math:`(A + \\delta I) x = b` only if every
  dot product and norm of theirs goes through the space; the same operator through the flat space is not
  symmetric, and CG gets a wrong answer.
"""

from __future__ import annotations

import torch
from test_vectors import Halves, InSpace, Weighted, spectrum_matrix

import hessianflow as hf
from hessianflow.linalg.vectors import FlatVectors

DT = torch.float64


def test_two_shard_space_gives_the_flat_solution():
    n = 30
    A = spectrum_matrix(n, seed=1)  # indefinite: eigenvalues -1..4
    b = torch.linspace(-1, 1, n, dtype=DT)
    space = Halves(n)
    op = InSpace(A, space)
    for method, damping in (("minres", 0.3), ("cg", 1.5)):  # cg: damped positive definite
        flat = hf.solve(A, b, damping=damping, method=method, tol=1e-10)
        got = hf.solve(op, b, damping=damping, method=method, tol=1e-10)
        exact = torch.linalg.solve(A + damping * torch.eye(n, dtype=DT), b)
        assert got.converged and flat.converged
        assert torch.allclose(got.x, exact, rtol=1e-8, atol=1e-9)
        assert torch.allclose(got.x, flat.x, rtol=1e-9, atol=1e-11)
        assert abs(got.iterations - flat.iterations) <= 1  # rounding of the summed halves
    assert space.reductions > 0


def test_weighted_inner_product_every_reduction_through_the_space():
    n = 24
    g = torch.Generator().manual_seed(5)
    w = 0.2 + 3 * torch.rand(n, generator=g, dtype=DT)
    b = torch.randn(n, generator=g, dtype=DT)
    spd = spectrum_matrix(n, seed=7, values=torch.linspace(0.5, 6.0, n, dtype=DT))
    indefinite = spectrum_matrix(n, seed=8, values=torch.linspace(-3.0, 5.0, n, dtype=DT) + 0.01)
    for S, method in ((spd, "cg"), (spd, "minres"), (indefinite, "minres")):
        A = S / w[:, None]  # W^{-1} S
        exact = torch.linalg.solve(A + 0.2 * torch.eye(n, dtype=DT), b)
        res = hf.solve(InSpace(A, Weighted(w)), b, damping=0.2, method=method, tol=1e-10)
        assert res.converged, (method, res.reason)
        assert torch.allclose(res.x, exact, rtol=1e-7, atol=1e-8), method
    # through the flat space the same operator is not symmetric: CG's answer is wrong
    A = spd / w[:, None]
    exact = torch.linalg.solve(A + 0.2 * torch.eye(n, dtype=DT), b)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        flat = hf.solve(InSpace(A, FlatVectors(n, DT, "cpu")), b, damping=0.2, method="cg", tol=1e-10, max_iter=60)
    assert not torch.allclose(flat.x, exact, rtol=1e-4)


def test_diagonal_and_frobenius_through_a_two_shard_space():
    """hf.diagonal (Hutchinson, XDiag, auto) and frobenius_norm_sq: the two-shard space's draws, QR and
    column dots give the flat estimates and standard errors; the exact diagonal refuses a sharded space."""
    from hessianflow.linalg.diagonal import frobenius_norm_sq

    n = 40
    g = torch.Generator().manual_seed(3)
    U = torch.randn(n, 3, generator=g, dtype=DT)
    for A in (spectrum_matrix(n, seed=2), U @ U.T + 0.01 * torch.eye(n, dtype=DT)):  # flat and decaying
        space = Halves(n)
        op = InSpace(A, space)
        for method in ("hutchinson", "xdiag", "auto"):
            flat = hf.diagonal(A, num_matvecs=16, method=method, seed=1)
            got = hf.diagonal(op, num_matvecs=16, method=method, seed=1)
            assert got.method == flat.method
            assert torch.allclose(got.estimate, flat.estimate, rtol=1e-9, atol=1e-11), method
            assert torch.allclose(got.stderr, flat.stderr, rtol=1e-7, atol=1e-11), method
        fro, fro_flat = frobenius_norm_sq(op, num_matvecs=12, seed=2), frobenius_norm_sq(A, num_matvecs=12, seed=2)
        assert abs(fro.estimate - fro_flat.estimate) < 1e-12 * fro_flat.estimate
        assert space.reductions > 0  # XDiag's QR and the norms went through the space
    exact = hf.diagonal(InSpace(A, Halves(n)), num_matvecs=n)  # local_size == size: the flat unit vectors
    assert torch.allclose(exact.estimate, A.diagonal(), atol=1e-12)


class _Sharded(Halves):
    """Claims to hold half of each vector (what a rank of a two-rank run would)."""

    def __init__(self, n):
        super().__init__(n)
        self.local_size = n // 2


def test_exact_diagonal_refuses_a_sharded_space():
    import pytest

    n = 10
    op = InSpace(torch.eye(n, dtype=DT), _Sharded(n))
    with pytest.raises(ValueError, match="unit vectors"):
        hf.diagonal(op, num_matvecs=n)
