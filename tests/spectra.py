"""Test matrices with chosen spectra, and an operator that counts its own products.

Shared by tests/test_eigen.py, test_density.py, test_trace.py and test_properties.py.
"""

from __future__ import annotations

import torch

from hessianflow.linalg.linop import LinearOperator


def random_orthogonal(n: int, seed: int) -> torch.Tensor:
    """A Haar-random orthogonal ``[n, n]`` float64 matrix (QR of a Gaussian, signs fixed)."""
    g = torch.Generator().manual_seed(seed)
    Q, R = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    return Q * torch.sign(torch.diagonal(R))


def sym_matrix(eigenvalues, seed: int = 0) -> torch.Tensor:
    """``Q diag(λ) Qᵀ`` in float64 with a random orthogonal ``Q``, symmetrised exactly."""
    lam = torch.as_tensor(eigenvalues, dtype=torch.float64)
    Q = random_orthogonal(lam.numel(), seed)
    A = (Q * lam) @ Q.T
    return 0.5 * (A + A.T)


# Spectra used across the tests. Gaps are chosen so that default Lanczos budgets suffice; the hard
# cases (clusters, degeneracy, tiny gaps) are tested with explicit budgets.
def spectrum(name: str, n: int) -> torch.Tensor:
    ar = torch.arange(n, dtype=torch.float64)
    if name == "geometric":  # a few dominant eigenvalues, a decaying tail (Hessian-like, PSD)
        return 10.0 * 0.8**ar
    if name == "outliers":  # a bulk in [0, 1] and 8 outliers, as in neural network Hessians
        bulk = torch.linspace(0.0, 1.0, n - 8, dtype=torch.float64)
        return torch.cat([bulk, torch.tensor([3.0, 4.0, 5.5, 7.0, 9.0, 12.0, 16.0, 20.0], dtype=torch.float64)])
    if name == "indefinite":  # outliers on both sides
        bulk = torch.linspace(-1.0, 1.0, n - 8, dtype=torch.float64)
        return torch.cat(
            [bulk, torch.tensor([-20.0, -12.0, -6.0, -3.0, 4.0, 8.0, 15.0, 25.0], dtype=torch.float64)]
        )
    if name == "negative":  # negative semi-definite: the mirror image of "outliers"
        return -spectrum("outliers", n)
    if name == "rank_deficient":  # rank 10, the rest exactly 0
        lam = torch.zeros(n, dtype=torch.float64)
        lam[:10] = torch.tensor([9.0, 7.0, 5.0, 4.0, 3.0, 2.5, 2.0, -1.0, -2.0, -4.0], dtype=torch.float64)
        return lam
    if name == "flat":  # no decay: all eigenvalues in [1, 2]
        g = torch.Generator().manual_seed(n)
        return 1.0 + torch.rand(n, generator=g, dtype=torch.float64)
    if name == "decaying":  # PSD, polynomial decay 1/i^2
        return 1.0 / (ar + 1.0) ** 2
    raise KeyError(name)


class CountingOperator(LinearOperator):
    """A dense symmetric operator that counts the products it computes itself.

    The count is kept independently of :attr:`LinearOperator.num_matvecs`, so a test can check that
    the ``num_matvecs`` an algorithm reports is the number of products it really asked for.
    """

    def __init__(self, matrix: torch.Tensor):
        super().__init__(matrix.shape[0], matrix.dtype, matrix.device)
        self.matrix = matrix
        self.products = 0
        self.matmat_calls = 0
        self.matvec_calls = 0

    def _matvec(self, v):
        self.products += 1
        self.matvec_calls += 1
        return self.matrix @ v

    def _matmat(self, V):
        self.products += V.shape[1]
        self.matmat_calls += 1
        return self.matrix @ V


def eig_order(lam: torch.Tensor, which: str) -> torch.Tensor:
    """Eigenvalues sorted as ``which`` asks (reference for EigenResult.eigenvalues)."""
    lam = torch.as_tensor(lam, dtype=torch.float64)
    if which == "LA":
        return torch.sort(lam, descending=True).values
    if which == "SA":
        return torch.sort(lam).values
    return lam[torch.argsort(lam.abs(), descending=True, stable=True)]
