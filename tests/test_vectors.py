"""The solvers' vector protocol (hessianflow.linalg.vectors, issue 19 item 3).

The default flat space reproduces the solvers' numbers bit for bit (checked against the commit before the
protocol when it was introduced; here: the default and an explicit FlatVectors give identical results).
Two other spaces show that every reduction goes through the protocol:

* a space whose dot products are computed as the sum of two halves' local dot products (a two-"rank"
  sharded vector: local dots plus one all-reduce) gives the flat results to rounding, and is used;
* a *weighted* inner product :math:`\\langle x, y \\rangle_W = x^\\top W y`: an operator
  :math:`A = W^{-1} S` (S symmetric) is self-adjoint in it, with the eigenvalues of
  :math:`W^{-1/2} S W^{-1/2}`. Lanczos and power iteration find them only if every dot product, norm and
  orthogonalisation of theirs uses the space: one plain ``x @ y`` would give wrong eigenvalues.
"""

from __future__ import annotations

import torch

import hessianflow as hf
from hessianflow.linalg.linop import DenseOperator, LinearOperator
from hessianflow.linalg.trace import hutchinson_trace
from hessianflow.linalg.vectors import FlatVectors, safe_norm

DT = torch.float64


def spectrum_matrix(n=30, seed=0, values=None):
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=DT))
    lam = torch.linspace(-1.0, 4.0, n, dtype=DT) if values is None else values
    return Q @ torch.diag(lam) @ Q.T


class Halves(FlatVectors):
    """Dot products as the sum of the two halves' local ones (a two-shard vector), counted."""

    def __init__(self, n):
        super().__init__(n, DT, "cpu")
        self.h, self.reductions = n // 2, 0

    def _sum(self, local):
        self.reductions += 1
        return local(slice(0, self.h)) + local(slice(self.h, None))

    def dot(self, x, y):
        return float(self._sum(lambda s: x[s] @ y[s]))

    def norm(self, x):
        return float(self._sum(lambda s: safe_norm(x[s]) ** 2) ** 0.5)

    def inner(self, Q, x):
        return self._sum(lambda s: Q[s].T @ x[s])

    def column_dots(self, X, Y):
        return self._sum(lambda s: (X[s] * Y[s]).sum(dim=0))

    def column_norms(self, X):
        return self.column_dots(X, X).sqrt()

    def qr(self, Y):
        """Cholesky QR: the Gram matrix from local products and one sum, then a local triangular solve."""
        R = torch.linalg.cholesky(self.inner(Y, Y)).T  # upper, positive diagonal
        return torch.linalg.solve_triangular(R, Y, upper=True, left=False), R


class Weighted(FlatVectors):
    """The inner product x^T W y, W = diag(w) > 0."""

    def __init__(self, w):
        super().__init__(w.numel(), DT, "cpu")
        self.w = w

    def dot(self, x, y):
        return float(x @ (self.w * y))

    def norm(self, x):
        return float(safe_norm(self.w.sqrt() * x))

    def inner(self, Q, x):
        return Q.T @ (self.w * x)

    def column_dots(self, X, Y):
        return (X * self.w[:, None] * Y).sum(dim=0)


class InSpace(LinearOperator):
    """``M`` as an operator whose vectors live in ``space``."""

    def __init__(self, M, space):
        super().__init__(M.shape[0], DT, "cpu")
        self.M, self.vector_space = M, space

    def _matvec(self, v):
        return self.M @ v


def test_the_default_space_is_the_flat_one():
    A = spectrum_matrix()
    flat = InSpace(A, FlatVectors(30, DT, "cpu"))
    for run in (lambda op: hf.lanczos(op, k=3, seed=1).eigenvalues,
                lambda op: hf.trace(op, num_matvecs=21, seed=2, method="hutch++").estimate,
                lambda op: hf.trace(op, num_matvecs=21, seed=2, method="xtrace").estimate,
                lambda op: hf.power_iteration(op, k=2, seed=1, max_iter=40).eigenvalues,
                lambda op: hutchinson_trace(op, num_matvecs=12, seed=2).estimate,
                lambda op: hf.spectral_density(op, num_runs=2, num_steps=8, seed=3).nodes):  # fmt: skip
        assert torch.equal(torch.as_tensor(run(DenseOperator(A))), torch.as_tensor(run(flat)))


def test_a_two_shard_space_gives_the_flat_results():
    A = spectrum_matrix()
    space = Halves(30)
    op = InSpace(A, space)
    ref = torch.linalg.eigvalsh(A).flip(0)[:3]
    res = hf.lanczos(op, k=3, seed=1)
    assert torch.allclose(res.eigenvalues, ref, rtol=1e-10, atol=1e-12) and res.all_converged
    assert torch.allclose(res.eigenvalues, hf.lanczos(A, k=3, seed=1).eigenvalues, rtol=1e-12)
    before = space.reductions
    t_flat = hutchinson_trace(A, num_matvecs=12, seed=2).estimate
    assert abs(hutchinson_trace(op, num_matvecs=12, seed=2).estimate - t_flat) < 1e-12 * abs(t_flat)
    for method in ("hutch++", "xtrace", "auto"):  # the block estimators: QR and inner products too
        flat = hf.trace(A, num_matvecs=21, seed=4, method=method)
        got = hf.trace(op, num_matvecs=21, seed=4, method=method)
        assert abs(got.estimate - flat.estimate) < 1e-10 * abs(flat.estimate), method
        assert abs(got.stderr - flat.stderr) < 1e-8 * flat.stderr + 1e-14, method
    d_flat = hf.spectral_density(A, num_runs=2, num_steps=8, seed=3).nodes
    assert torch.allclose(hf.spectral_density(op, num_runs=2, num_steps=8, seed=3).nodes, d_flat, rtol=1e-10)
    assert space.reductions > before > 0  # every solver went through the space


def test_every_reduction_of_lanczos_and_power_iteration_goes_through_the_space():
    n = 24
    g = torch.Generator().manual_seed(5)
    w = 0.2 + 3 * torch.rand(n, generator=g, dtype=DT)  # far from 1: a plain dot product is visibly wrong
    S = spectrum_matrix(
        n, seed=6, values=torch.cat([torch.tensor([9.0, 7.0, 6.0]), torch.linspace(-1, 2, n - 3)]).to(DT)
    )
    A = S / w[:, None]  # W^{-1} S: self-adjoint in <x, y>_W
    ref = torch.linalg.eigvalsh(S / (w.sqrt()[:, None] * w.sqrt()[None, :])).flip(0)
    op = InSpace(A, Weighted(w))
    res = hf.lanczos(op, k=3, seed=0, criterion="residual", tol=1e-10)
    assert res.all_converged
    assert torch.allclose(res.eigenvalues, ref[:3], rtol=1e-9), (res.eigenvalues, ref[:3])
    V = res.eigenvectors  # W-orthonormal eigenvectors of A
    assert torch.allclose(V.T @ (w[:, None] * V), torch.eye(3, dtype=DT), atol=1e-9)
    assert torch.allclose(A @ V, V * res.eigenvalues, atol=1e-7)
    top = hf.power_iteration(op, k=1, seed=0, max_iter=500, tol=1e-12)
    assert abs(float(top.eigenvalues[0]) - float(ref[0])) < 1e-8 * float(ref[0])
    # the same operator through the flat space is not self-adjoint: plain dot products get other numbers
    flat = hf.lanczos(InSpace(A, FlatVectors(n, DT, "cpu")), k=3, seed=0, max_iter=60)
    assert not torch.allclose(flat.eigenvalues, ref[:3], rtol=1e-6)
