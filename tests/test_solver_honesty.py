"""The solvers' honesty (issue 13): integral arguments of any type, complex input refused, no convergence
claimed below the products' noise or for an operator that is not a fixed matrix, and the default
criterion bounding each eigenvalue's relative error by ``tol``."""

from __future__ import annotations

import copy
import warnings

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import hessianflow as hf
from hessianflow._checks import check_int
from hessianflow.curvature import HessianOperator
from hessianflow.linalg.density import spectral_density
from hessianflow.linalg.eigen import ConvergenceWarning, lanczos, power_iteration
from hessianflow.linalg.linop import LinearOperator
from hessianflow.linalg.trace import hutchinson_trace, hutchpp_trace, trace, xtrace
from hessianflow.training.models import get_model
from hessianflow.training.tracking import EigenTracker, top_eigenvalue

try:
    from spectra import spectrum, sym_matrix
except ImportError:  # tests/ imported as a package
    from tests.spectra import spectrum, sym_matrix

DT = torch.float64


# -- integers of any integral type -------------------------------------------------------------------
def test_integral_arguments_of_any_type_everywhere():
    A = sym_matrix(spectrum("outliers", 60), seed=1)
    i64, i32 = np.int64, np.int32
    ref = lanczos(A, k=2, seed=0)
    got = lanczos(A, k=i64(2), max_iter=i64(200), max_basis=i32(20), seed=0)
    torch.testing.assert_close(got.eigenvalues, ref.eigenvalues, rtol=1e-12, atol=0)
    assert power_iteration(A, k=i64(1), max_iter=i32(500), tol=1e-8, seed=0).eigenvalues.tolist() == pytest.approx(
        [20.0], rel=1e-6
    )
    exact = float(A.diagonal().sum())
    for fn in (hutchinson_trace, hutchpp_trace, xtrace, trace):
        assert fn(A, num_matvecs=i64(60), seed=0).estimate == pytest.approx(fn(A, num_matvecs=60, seed=0).estimate)
    assert hutchinson_trace(A, num_matvecs=i64(60), batch_size=i32(6), min_samples=i64(2), seed=0).estimate == (
        pytest.approx(hutchinson_trace(A, num_matvecs=60, batch_size=6, seed=0).estimate)
    )
    assert hutchinson_trace(A, num_matvecs=i64(600), seed=0).estimate == pytest.approx(exact, rel=0.05)
    d = spectral_density(A, num_runs=i64(2), num_steps=i32(20), seed=0)
    assert d.moments(i64(1)) == pytest.approx(d.moments(1))
    assert float(d.density(torch.tensor([0.0]), sigma=np.float64(0.5))) >= 0.0
    # bool is not an integer, floats are not either (one message, the argument's name first)
    for bad in (True, 2.0, "2"):
        with pytest.raises(ValueError, match="k must be an integer >= 1"):
            lanczos(A, k=bad)
    with pytest.raises(ValueError, match="num_steps must be an integer >= 1"):
        spectral_density(A, num_steps=np.float64(3))
    assert check_int("x", np.uint8(3), minimum=0) == 3 and type(check_int("x", np.int64(3), minimum=0)) is int


def test_tracker_takes_integral_types():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    x, y = torch.randn(32, 4, dtype=DT), torch.randint(0, 3, (32,))
    crit = nn.CrossEntropyLoss()
    a = top_eigenvalue(model, crit, data=(x, y), method="lanczos", k=np.int64(2), max_iter=np.int32(80))
    b = top_eigenvalue(model, nn.CrossEntropyLoss(), data=(x, y), method="lanczos", k=2, max_iter=80)
    torch.testing.assert_close(a.eigenvalues, b.eigenvalues, rtol=1e-12, atol=0)
    tr = EigenTracker(nn.CrossEntropyLoss(), data=(x, y), top_k=np.int64(2), max_iter=np.int64(50))
    assert tr.top_k == 2 and type(tr.top_k) is int


# -- complex input ---------------------------------------------------------------------------------
def test_complex_input_is_refused_not_silently_made_real():
    H = torch.tensor([[1, 1j], [-1j, 1]], dtype=torch.complex128)  # eigenvalues 0 and 2
    for call in (
        lambda: lanczos(H, k=2),
        lambda: power_iteration(H, k=1),
        lambda: trace(H, num_matvecs=4),
        lambda: spectral_density(H, num_steps=2),
        lambda: hf.linalg.linop.DenseOperator(H),
    ):
        with pytest.raises(ValueError, match="complex"):
            call()

    class ComplexOp(LinearOperator):
        def _matvec(self, v):
            return H @ v

    with pytest.raises(ValueError, match="complex"):
        lanczos(ComplexOp(2, torch.complex128, "cpu"), k=1)
    # the real symmetric equivalent named in the message has the right eigenvalues, each twice
    A, B = H.real, H.imag
    R = torch.cat([torch.cat([A, -B], 1), torch.cat([B, A], 1)], 0)
    assert lanczos(R, k=4).eigenvalues.tolist() == pytest.approx([2.0, 2.0, 0.0, 0.0], abs=1e-12)


# -- the default criterion -------------------------------------------------------------------------
@pytest.mark.parametrize("name,which,k", [("outliers", "LA", 3), ("indefinite", "SA", 3), ("geometric", "LA", 5)])
def test_default_criterion_bounds_each_eigenvalue_relative_error(name, which, k):
    lam = spectrum(name, 300)
    A = sym_matrix(lam, seed=7)
    ref = torch.sort(lam, descending=which == "LA").values[:k]
    scale = float(lam.abs().max())
    for tol in (1e-4, 1e-8):
        res = lanczos(A, k=k, which=which, tol=tol, seed=1)
        same = lanczos(A, k=k, which=which, tol=tol, seed=1, criterion="eigenvalue")
        assert res.num_matvecs == same.num_matvecs and torch.equal(res.eigenvalues, same.eigenvalues)
        assert res.all_converged
        err = (res.eigenvalues - ref).abs()
        assert bool((err <= tol * torch.clamp(ref.abs(), min=tol * scale)).all()), err / ref.abs()
    # and it is cheaper than the residual rule at the same tol, which certifies ~tol^2 (issue 13)
    res = lanczos(A, k=k, which=which, tol=1e-6, seed=1)
    resid = lanczos(A, k=k, which=which, tol=1e-6, seed=1, criterion="residual")
    assert res.num_matvecs < resid.num_matvecs


# -- the products' noise ---------------------------------------------------------------------------
class NoisyOperator(LinearOperator):
    """A dense symmetric matrix whose products carry a relative error ``level`` (not symmetric)."""

    def __init__(self, A, level, seed=0):
        super().__init__(A.shape[0], A.dtype, A.device)
        self.A, self.level = A, level
        self.g = torch.Generator().manual_seed(seed)
        self.norm = float(torch.linalg.matrix_norm(A, 2))

    def _matvec(self, v):
        noise = torch.randn(self.size, generator=self.g, dtype=self.dtype)
        return self.A @ v + self.level * self.norm * float(v.norm()) * noise / noise.norm()


def test_no_convergence_claimed_below_the_products_noise():
    lam = spectrum("outliers", 200)  # top 20, gap 4
    A = sym_matrix(lam, seed=3)
    noisy = NoisyOperator(A, 1e-5)
    with pytest.warns(ConvergenceWarning, match="noise limits the eigenvalues to about"):
        res = lanczos(noisy, k=1, tol=1e-8, seed=0, max_iter=60)
    assert not res.all_converged
    assert abs(float(res.eigenvalues[0]) - 20.0) > 1e-8 * 20.0  # it really is not that accurate
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ok = lanczos(NoisyOperator(A, 1e-5, seed=1), k=1, tol=1e-3, seed=0)
    assert ok.all_converged and abs(float(ok.eigenvalues[0]) - 20.0) <= 1e-3 * 20.0
    # power iteration: in float32 its relative change stalls at 0 (a pass of its own test at any tol),
    # but no float32 product certifies 1e-9
    lam = torch.cat([torch.tensor([20.0], dtype=DT), torch.linspace(0, 1, 99, dtype=DT)])
    F = sym_matrix(lam, seed=3).float()
    with pytest.warns(ConvergenceWarning, match="noise"):
        p = power_iteration(F, k=1, tol=1e-9, max_iter=300, seed=0)
    assert not p.all_converged and abs(float(p.eigenvalues[0]) - 20.0) <= 1e-4 * 20
    assert power_iteration(F, k=1, tol=1e-3, max_iter=300, seed=0).all_converged
    # exact float64 products: nothing changes
    assert lanczos(A, k=1, tol=1e-12, seed=0).all_converged


def _c1_float32_and_float64(batch=16, size=16):
    torch.manual_seed(0)
    m32 = get_model("c1", input_size=size)
    x = torch.randn(batch, 3, size, size)
    y = torch.randint(0, 10, (batch,))
    m32.train()
    with torch.no_grad():
        m32(torch.randn(64, 3, size, size))  # BatchNorm statistics
    m32.eval()
    return m32, copy.deepcopy(m32).double(), x, y


def test_float32_model_reports_the_accuracy_its_products_allow():
    # issue 13: C1 in float32 reported converged at tol=1e-6 while 1.1e-5 off its float64 value
    m32, m64, x, y = _c1_float32_and_float64()
    crit = nn.CrossEntropyLoss()
    ref = lanczos(HessianOperator(m64, crit, data=(x.double(), y)), k=1, tol=1e-12, seed=0)
    assert ref.all_converged
    lam = float(ref.eigenvalues[0])
    with pytest.warns(ConvergenceWarning, match="noise limits the eigenvalues to about"):
        tight = lanczos(HessianOperator(m32, crit, data=(x, y)), k=1, tol=1e-6, seed=0)
    assert not tight.all_converged
    loose = lanczos(HessianOperator(m32, crit, data=(x, y)), k=1, tol=1e-3, seed=0)
    assert loose.all_converged and abs(float(loose.eigenvalues[0]) - lam) <= 1e-3 * abs(lam)


# -- operators that are not a fixed matrix ---------------------------------------------------------
def _dropout_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 16), nn.Tanh(), nn.Dropout(0.3), nn.Linear(16, 3)).double()


def test_train_mode_dropout_warns_and_never_converges():
    model = _dropout_model()
    x, y = torch.randn(40, 5, dtype=DT), torch.randint(0, 3, (40,))
    with pytest.warns(RuntimeWarning, match="dropout.*not a fixed matrix"):
        H = HessianOperator(model, nn.CrossEntropyLoss(), data=(x, y), train_mode=True, reuse_graph=False)
    assert not H.deterministic
    v = torch.randn(H.size, dtype=DT)
    assert not torch.allclose(H @ v, H @ v)  # what the flag is about
    with pytest.warns(ConvergenceWarning, match="not deterministic"):
        res = lanczos(H, k=1, tol=1e-2, seed=0, max_iter=30)
    assert not res.converged.any()
    with pytest.warns(ConvergenceWarning, match="not deterministic"):
        assert not power_iteration(H, k=1, tol=1e-2, seed=0, max_iter=30).converged.any()
    # the reused graph fixes one mask: a fixed matrix (with a warning saying which), and eval mode is quiet
    with pytest.warns(RuntimeWarning, match="one random mask"):
        R = HessianOperator(model, nn.CrossEntropyLoss(), data=(x, y), train_mode=True)
    assert R.deterministic and torch.equal(R @ v, R @ v)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        E = HessianOperator(model, nn.CrossEntropyLoss(), data=(x, y))
        assert lanczos(E, k=1, seed=0).all_converged


def test_train_mode_batchnorm_over_a_shuffled_loader_never_converges():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Linear(8, 3)).double()
    data = TensorDataset(torch.randn(64, 5, dtype=DT), torch.randint(0, 3, (64,)))
    shuffled = DataLoader(data, batch_size=16, shuffle=True, generator=torch.Generator().manual_seed(0))
    with pytest.warns(RuntimeWarning, match="BatchNorm.*shuffled"):
        H = HessianOperator(model, nn.CrossEntropyLoss(), dataloader=shuffled, train_mode=True)
    assert not H.deterministic
    v = torch.randn(H.size, dtype=DT)
    assert not torch.allclose(H @ v, H @ v, rtol=1e-6, atol=0)
    with pytest.warns(ConvergenceWarning, match="not deterministic"):
        res = lanczos(H, k=1, tol=1e-2, seed=0, max_iter=40)
    assert not res.converged.any()
    # the same loader in order, or eval mode: a fixed matrix, no warning, converged
    ordered = DataLoader(data, batch_size=16, shuffle=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for op in (
            HessianOperator(model, nn.CrossEntropyLoss(), dataloader=ordered, train_mode=True),
            HessianOperator(model, nn.CrossEntropyLoss(), dataloader=shuffled),
        ):
            assert op.deterministic and lanczos(op, k=1, tol=1e-6, seed=0).all_converged
