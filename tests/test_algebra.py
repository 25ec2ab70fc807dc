"""Operator algebra, the scipy bridge and the determinism check (hessianflow/algebra.py, linop.py's block),
against dense float64 matrices."""

import builtins
import sys

import numpy as np
import pytest
import torch
from dense_reference import func_hessian, ggn, mlp
from torch import nn

from hessianflow import GGNOperator, HessianOperator, lanczos, spectral_density, trace
from hessianflow.linalg.algebra import BlockDiagonalOperator, ComposedOperator, LinearCombination, symmetric_operator
from hessianflow.linalg.linop import DenseOperator, as_operator

DT = torch.float64


def _sym(n, seed):
    g = torch.Generator().manual_seed(seed)
    M = torch.randn(n, n, generator=g, dtype=DT)
    return M + M.T


def test_combinations_equal_the_dense_arithmetic():
    A, B = _sym(6, 0), _sym(6, 1)
    a, b = DenseOperator(A), DenseOperator(B)
    eye = torch.eye(6, dtype=DT)
    cases = {
        "A + B": (a + b, A + B),
        "A - B": (a - b, A - B),
        "3 * A": (3 * a, 3 * A),
        "A * 3": (a * 3, 3 * A),
        "A / 4": (a / 4, A / 4),
        "A + 0.5": (a + 0.5, A + 0.5 * eye),
        "0.5 + A": (0.5 + a, A + 0.5 * eye),
        "2 - A": (2 - a, 2 * eye - A),
        "A - 2": (a - 2, A - 2 * eye),
        "-A": (-a, -A),
        "2 (A - B) / 3 + 1": (2 * (a - b) / 3 + 1, 2 * (A - B) / 3 + eye),
        "tensor scalar": (torch.tensor(2.0) * a, 2 * A),
    }
    for name, (op, dense) in cases.items():
        assert isinstance(op, LinearCombination), name
        assert torch.allclose(op.to_dense(), dense, atol=1e-13, rtol=0), name
        v = torch.randn(6, dtype=DT)
        assert torch.allclose(op @ v, dense @ v, atol=1e-13, rtol=0), name
    # nested combinations are flattened: one product of each operator per product
    c = (a + b) - (a / 2) + 1
    assert len(c.terms) == 3 and c.shift == 1.0
    before = a.num_matvecs
    c.matvec(torch.ones(6, dtype=DT))
    assert a.num_matvecs - before == 2 and c.num_matvecs == 1


def test_combinations_are_taken_by_every_symmetric_solver():
    g = torch.Generator().manual_seed(3)
    Q = torch.linalg.qr(torch.randn(30, 30, generator=g, dtype=DT)).Q
    lam = torch.linspace(-1.0, 4.0, 30, dtype=DT)
    A = DenseOperator(Q @ torch.diag(lam) @ Q.T)
    shifted = 2 * A + 1.5  # eigenvalues 2 lam + 1.5
    top = lanczos(shifted, k=2, tol=1e-10, seed=0)
    assert torch.allclose(top.eigenvalues, (2 * lam + 1.5).flip(0)[:2], atol=1e-9)
    assert trace(shifted, num_matvecs=60, seed=0).estimate == pytest.approx(float((2 * lam + 1.5).sum()), rel=1e-12)
    dens = spectral_density(shifted, num_runs=2, num_steps=30, seed=0)
    assert dens.support()[1] == pytest.approx(float(2 * lam.max() + 1.5), rel=1e-9)


def test_damped_model_operators_combine():
    torch.manual_seed(0)
    model = mlp(3, 4, 2)
    x, y = torch.randn(10, 3, dtype=DT), torch.randn(10, 2, dtype=DT)
    H = HessianOperator(model, nn.MSELoss(), data=(x, y))
    G = GGNOperator(model, nn.MSELoss(), data=(x, y))
    Hd, Gd = func_hessian(model, nn.MSELoss(), x, y), ggn(model, nn.MSELoss(), x, y)
    n = H.size
    dense = (H - G + 1e-2).to_dense()
    assert torch.allclose(dense, Hd - Gd + 1e-2 * torch.eye(n, dtype=DT), atol=1e-12, rtol=0)


def test_mismatched_operators_are_refused():
    with pytest.raises(ValueError, match="sizes 3 and 4"):
        as_operator(torch.eye(3, dtype=DT)) + as_operator(torch.eye(4, dtype=DT))
    with pytest.raises(ValueError, match="dtypes"):
        as_operator(torch.eye(3, dtype=DT)) + as_operator(torch.eye(3, dtype=torch.float32))
    with pytest.raises(ValueError, match="finite"):
        as_operator(torch.eye(3, dtype=DT)) * float("nan")
    with pytest.raises(TypeError):
        as_operator(torch.eye(3, dtype=DT)) + "a"


def test_composition_is_general_and_refused_by_symmetric_solvers():
    A, B = _sym(5, 0), _sym(5, 1)
    a, b = DenseOperator(A), DenseOperator(B)
    ab = a @ b
    assert isinstance(ab, ComposedOperator) and ab.symmetric is False
    assert torch.allclose(ab.to_dense(), A @ B, atol=1e-12)
    abc = ab @ a  # chains flatten
    assert len(abc.factors) == 3 and torch.allclose(abc.to_dense(), A @ B @ A, atol=1e-11)
    v = torch.randn(5, dtype=DT)
    assert torch.allclose(ab @ v, A @ (B @ v), atol=1e-12)
    for solver in (lambda op: lanczos(op, k=1), lambda op: trace(op, num_matvecs=4)):
        with pytest.raises(TypeError, match="ComposedOperator"):
            solver(ab)
    with pytest.raises(TypeError, match="needs a symmetric operator, and A @ B is a general one"):
        symmetric_operator(ab, "solve")


def test_to_scipy_products_and_solvers():
    spla = pytest.importorskip("scipy.sparse.linalg")
    A = _sym(8, 2) + 20 * torch.eye(8, dtype=DT)  # positive definite
    op = DenseOperator(A)
    S = op.to_scipy()
    x = np.random.default_rng(0).standard_normal(8)
    assert np.allclose(S.matvec(x), A.numpy() @ x, atol=1e-12)
    X = np.random.default_rng(1).standard_normal((8, 3))
    assert np.allclose(S.matmat(X), A.numpy() @ X, atol=1e-12)
    assert np.allclose(S.rmatvec(x), A.numpy() @ x, atol=1e-12)
    sol, info = spla.cg(S, x, rtol=1e-12, atol=0.0)
    assert info == 0 and np.allclose(sol, np.linalg.solve(A.numpy(), x), atol=1e-9)
    lam = spla.eigsh(S, k=1, which="LA", return_eigenvectors=False)
    assert lam[0] == pytest.approx(float(torch.linalg.eigvalsh(A)[-1]), rel=1e-10)
    # a float32 operator gives float32 NumPy arrays, and a composition its transpose as rmatvec
    assert DenseOperator(A.float()).to_scipy().dtype == np.float32
    B = _sym(8, 5)
    C = (op @ DenseOperator(B)).to_scipy()
    assert np.allclose(C.matvec(x), A.numpy() @ B.numpy() @ x, atol=1e-10)
    assert np.allclose(C.rmatvec(x), B.numpy() @ A.numpy() @ x, atol=1e-10)


def test_to_scipy_without_scipy_says_which_extra(monkeypatch):
    real_import = builtins.__import__

    def no_scipy(name, *args, **kwargs):
        if name.startswith("scipy"):
            raise ImportError("No module named 'scipy'")
        return real_import(name, *args, **kwargs)

    for mod in [m for m in sys.modules if m.startswith("scipy")]:
        monkeypatch.delitem(sys.modules, mod)
    monkeypatch.setattr(builtins, "__import__", no_scipy)
    with pytest.raises(ImportError, match=r"pip install 'hessianflow\[scipy\]'"):
        as_operator(torch.eye(2, dtype=DT)).to_scipy()


def test_block_diagonal_operator():
    A = _sym(7, 4)
    blocks = [[0, 3, 4], [1, 2], [5, 6]]
    op = BlockDiagonalOperator(A, blocks)
    mask = torch.zeros(7, 7, dtype=torch.bool)
    for b in blocks:
        mask[np.ix_(b, b)] = True
    assert torch.allclose(op.to_dense(), torch.where(mask, A, 0.0), atol=1e-14)
    V = torch.randn(7, 2, dtype=DT)
    assert torch.allclose(op.matmat(V), torch.where(mask, A, 0.0) @ V, atol=1e-12)
    with pytest.raises(ValueError, match="disjoint"):
        BlockDiagonalOperator(A, [[0, 1], [1, 2, 3, 4, 5, 6]])
    with pytest.raises(ValueError, match="belong to no block"):
        BlockDiagonalOperator(A, [[0, 1]])


def test_check_deterministic_in_numbers():
    r = as_operator(_sym(5, 0)).check_deterministic(seed=0)
    assert r.relative_difference == 0.0 and r.identical and r.num_matvecs == 2

    class Noisy(DenseOperator):
        def _matvec(self, v):
            return self.matrix @ v + 1e-3 * torch.randn_like(v)

    noisy = Noisy(torch.eye(50, dtype=DT)).check_deterministic(seed=0)
    # two independent perturbations of size 1e-3 * sqrt(50) on a product of norm ~sqrt(50): ~1.4e-3 relative
    assert 5e-4 < noisy.relative_difference < 5e-3 and not noisy.identical
    assert sorted(noisy.to_dict()) == ["identical", "max_abs_difference", "num_matvecs", "relative_difference"]
