"""hf.solve against torch.linalg.solve in float64: chosen spectra (positive definite, indefinite, singular
plus damping, singular and inconsistent), small models' GGN and Hessian against their dense matrices, and
the honesty of the verdict (status, reason, warning)."""

import os
import re
import subprocess
import sys
import warnings

import pytest
import torch
from dense_reference import func_hessian, ggn, mlp
from torch import nn

from hessianflow import ConvergenceWarning, GGNOperator, HessianOperator
from hessianflow.linalg.linop import DenseOperator, LinearOperator
from hessianflow.linalg.solve import SolveResult, solve

DT = torch.float64
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _matrix(lam, seed=0):
    g = torch.Generator().manual_seed(seed)
    n = lam.numel()
    Q = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=DT)).Q
    A = Q @ torch.diag(lam) @ Q.T
    return (A + A.T) / 2, Q


def _rhs(n, seed=1):
    return torch.randn(n, generator=torch.Generator().manual_seed(seed), dtype=DT)


def _rel(x, ref):
    return float(torch.linalg.vector_norm(x - ref) / torch.linalg.vector_norm(ref))


SPECTRA = {
    "pd, condition 1e4": torch.logspace(-4, 0, 60, dtype=DT),
    "pd, clustered": torch.cat([torch.full((30,), 1.0, dtype=DT), torch.full((30,), 100.0, dtype=DT)]),
    "indefinite": torch.linspace(-3.0, 5.0, 60, dtype=DT),
    "indefinite, tiny eigenvalues": torch.cat(
        [torch.linspace(-2, -1e-3, 30, dtype=DT), torch.linspace(1e-3, 2, 30, dtype=DT)]
    ),
}


@pytest.mark.parametrize("name", list(SPECTRA))
@pytest.mark.parametrize("method", ["cg", "minres"])
def test_against_torch_linalg_solve(name, method):
    lam = SPECTRA[name]
    A, _ = _matrix(lam)
    b = _rhs(60)
    ref = torch.linalg.solve(A, b)
    if method == "cg" and bool((lam < 0).any()):
        with pytest.warns(ConvergenceWarning, match="non-positive curvature"):
            r = solve(A, b, method="cg", tol=1e-10)
        assert not r.converged and r.status == "indefinite" and "minres" in r.reason
        return
    r = solve(A, b, method=method, tol=1e-11, max_iter=2000)
    assert r.converged and r.status == "converged" and r.reason == ""
    true_res = float(torch.linalg.vector_norm(b - A @ r.x) / torch.linalg.vector_norm(b))
    assert r.residual == pytest.approx(true_res, rel=1e-6, abs=1e-18)
    assert r.residual <= 1e-11
    cond = float(lam.abs().max() / lam.abs().min())
    assert _rel(r.x, ref) <= 10 * cond * 1e-11  # forward error <= condition number x residual
    assert r.num_matvecs >= r.iterations + 1  # the final residual check is a product


@pytest.mark.parametrize("method", ["cg", "minres"])
def test_singular_with_damping(method):
    lam = torch.cat([torch.zeros(20, dtype=DT), torch.linspace(0.1, 4.0, 40, dtype=DT)])  # PSD, rank 40
    A, _ = _matrix(lam, seed=2)
    b = _rhs(60, seed=3)
    r = solve(A, b, damping=1e-2, method=method, tol=1e-11)
    ref = torch.linalg.solve(A + 1e-2 * torch.eye(60, dtype=DT), b)
    assert r.converged and _rel(r.x, ref) < 1e-8 and r.damping == 1e-2


def test_indefinite_shift_by_minres():
    lam = torch.linspace(-3.0, 5.0, 60, dtype=DT)
    A, _ = _matrix(lam, seed=4)
    b = _rhs(60, seed=5)
    r = solve(A, b, damping=-0.05, tol=1e-11)  # a shift between eigenvalues
    ref = torch.linalg.solve(A - 0.05 * torch.eye(60, dtype=DT), b)
    assert r.converged and _rel(r.x, ref) < 1e-8


def test_singular_inconsistent_is_a_least_squares_solution():
    lam = torch.cat([torch.zeros(5, dtype=DT), torch.linspace(1.0, 3.0, 25, dtype=DT)])
    A, Q = _matrix(lam, seed=6)
    b = _rhs(30, seed=7)  # has a component in the null space
    with pytest.warns(ConvergenceWarning, match="least-squares"):
        r = solve(A, b, tol=1e-8)
    assert not r.converged and r.status == "least_squares"
    # a least-squares solution: its component in the range of A is the minimum-norm one's (unique); MINRES
    # is not guaranteed the minimum-norm solution itself (that is MINRES-QLP, Choi, Paige & Saunders 2011)
    x_ls = torch.linalg.pinv(A) @ b
    rng = Q[:, 5:]
    assert _rel(rng.T @ r.x, rng.T @ x_ls) < 1e-6
    floor = float(torch.linalg.vector_norm(Q[:, :5].T @ b) / torch.linalg.vector_norm(b))
    assert r.residual == pytest.approx(floor, rel=1e-6)  # the residual that no x can go below
    assert f"{r.residual:.2e}" in r.reason


def test_max_iter_is_honest():
    A, _ = _matrix(torch.logspace(-6, 0, 80, dtype=DT))
    b = _rhs(80)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        r = solve(A, b, method="cg", max_iter=5)
    assert not r.converged and r.status == "max_iter" and r.iterations == 5
    msgs = [str(w.message) for w in caught if issubclass(w.category, ConvergenceWarning)]
    assert len(msgs) == 1 and r.reason in msgs[0]
    assert f"{r.residual:.2e}" in r.reason and r.residual > 1e-3
    assert r.to_dict()["status"] == "max_iter" and "x" not in r.to_dict() and len(r.to_dict(include_x=True)["x"]) == 80


def test_noise_stagnates_with_the_accuracy_reached():
    class Noisy(DenseOperator):
        def _matvec(self, v):
            g = torch.Generator().manual_seed(self.num_matvecs)
            return self.matrix @ v + 1e-7 * torch.linalg.vector_norm(v) * torch.randn(v.shape, generator=g, dtype=DT)

    A, _ = _matrix(torch.linspace(1.0, 10.0, 40, dtype=DT))
    with pytest.warns(ConvergenceWarning, match="rounding or noise"):
        r = solve(Noisy(A), _rhs(40), tol=1e-12, method="cg")
    assert r.status == "stagnated" and 1e-9 < r.residual < 1e-5
    assert r.num_matvecs < 200  # it stops; the budget (400) is not burnt on noise


def test_x0_zero_rhs_and_refusals():
    A, _ = _matrix(torch.linspace(1.0, 2.0, 10, dtype=DT))
    b = _rhs(10)
    ref = torch.linalg.solve(A, b)
    warm = solve(A, b, x0=ref, tol=1e-10)
    assert warm.converged and warm.iterations == 0 and warm.num_matvecs == 1
    z = solve(A, torch.zeros(10, dtype=DT))
    assert z.converged and z.num_matvecs == 0 and torch.equal(z.x, torch.zeros(10, dtype=DT))
    with pytest.raises(ValueError, match="method"):
        solve(A, b, method="lsqr")
    with pytest.raises(ValueError, match="flat vector of length 10"):
        solve(A, torch.ones(9, dtype=DT))
    op = DenseOperator(A)
    with pytest.raises(TypeError, match="A @ B is a general one"):
        solve(op @ op, b)


def test_model_ggn_and_hessian_against_dense():
    torch.manual_seed(0)
    model = mlp(4, 6, 3)
    x, y = torch.randn(12, 4, dtype=DT), torch.randint(0, 3, (12,))
    crit = nn.CrossEntropyLoss()
    G = GGNOperator(model, crit, data=(x, y))
    H = HessianOperator(model, crit, data=(x, y))
    Gd, Hd = ggn(model, crit, x, y), func_hessian(model, crit, x, y)
    n = G.size
    b = _rhs(n, seed=11)
    eye = torch.eye(n, dtype=DT)
    rg = solve(G, b, damping=1e-3, method="cg", tol=1e-10)
    assert rg.converged and _rel(rg.x, torch.linalg.solve(Gd + 1e-3 * eye, b)) < 1e-6
    assert bool((torch.linalg.eigvalsh(Hd) < -1e-6).any())  # the Hessian is indefinite here
    rh = solve(H, b, damping=1e-3, method="minres", tol=1e-10)
    assert rh.converged and _rel(rh.x, torch.linalg.solve(Hd + 1e-3 * eye, b)) < 1e-6


def test_float32_operator_reaches_float32_accuracy():
    A, _ = _matrix(torch.linspace(1.0, 50.0, 50, dtype=DT))
    b = _rhs(50)
    r = solve(A.float(), b.float(), tol=1e-5)
    assert r.x.dtype == torch.float32 and r.converged
    assert _rel(r.x.double(), torch.linalg.solve(A, b)) < 1e-4


def test_the_influence_example_against_a_dense_solve():
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "examples", "influence.py")],
        capture_output=True, text=True, timeout=300, env=env,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    m = re.search(r"max \|influence - dense\| / max \|dense\| = (\S+)", out)
    assert m is not None, out
    assert float(m.group(1)) < 1e-6
    top = re.findall(r"^\s*(\d+)\s+(\S+)\s+(\S+)\s*$", out, flags=re.M)
    assert len(top) >= 5
    for _, score, dense in top:
        assert float(score) == pytest.approx(float(dense), rel=1e-5, abs=1e-9)


def test_solve_result_fields():
    r = solve(torch.eye(3, dtype=DT), torch.ones(3, dtype=DT))
    assert isinstance(r, SolveResult) and r.method == "minres" and r.tol == 1e-6
    assert isinstance(LinearOperator, type)
