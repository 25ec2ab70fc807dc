"""hf.diagonal and hf.linalg.diagonal.frobenius_norm_sq against dense float64 matrices with chosen spectra:
exact cases to 1e-12, stochastic estimates within a few standard errors over fixed seeds, the standard errors' own
calibration (a biased standard deviation fails it), and a model's Hessian and GGN."""

import math

import pytest
import torch
from dense_reference import func_hessian, ggn, mlp
from torch import nn

from hessianflow import GGNOperator, HessianOperator
from hessianflow.linalg.diagonal import DiagonalResult, diagonal, frobenius_norm_sq
from hessianflow.linalg.linop import DenseOperator

DT = torch.float64


def _matrix(lam, seed=0):
    g = torch.Generator().manual_seed(seed)
    n = lam.numel()
    Q = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=DT)).Q
    A = Q @ torch.diag(lam) @ Q.T
    return (A + A.T) / 2


N = 120
SPECTRA = {
    "flat": torch.linspace(1.0, 2.0, N, dtype=DT),
    "decaying 1/i^2": 1.0 / torch.arange(1, N + 1, dtype=DT) ** 2,
    "indefinite": torch.linspace(-1.0, 1.0, N, dtype=DT),
}


@pytest.mark.parametrize("method", ["auto", "hutchinson", "xdiag", "exact"])
def test_exact_when_the_budget_reaches_n(method):
    A = _matrix(SPECTRA["indefinite"], seed=1)
    r = diagonal(A, num_matvecs=N, method=method, seed=0)
    assert r.method in ("exact", "auto(exact)") and r.num_matvecs == N
    assert float((r.estimate - A.diagonal()).abs().max()) <= 1e-12 * float(A.abs().max())
    assert torch.equal(r.stderr, torch.zeros(N, dtype=DT))
    f = frobenius_norm_sq(A, num_matvecs=N)
    assert f.method == "exact" and f.estimate == pytest.approx(float((A**2).sum()), rel=1e-12)


@pytest.mark.parametrize("name", list(SPECTRA))
@pytest.mark.parametrize("method", ["hutchinson", "xdiag", "auto"])
def test_within_standard_errors(name, method):
    A = _matrix(SPECTRA[name], seed=2)
    d = A.diagonal()
    worst = []
    for seed in range(5):
        r = diagonal(A, num_matvecs=40, method=method, seed=seed)
        assert r.num_matvecs == 40 and bool((r.stderr > 0).all())
        z = (r.estimate - d).abs() / r.stderr
        # entrywise: a z-score above 4 in 120 entries is rare for an honest error bar (Hutchinson's ~1e-4
        # per entry; XDiag's under-covers a little, see diagonal()), and the typical entry is within 2
        assert float((z > 4).double().mean()) <= 0.03, (seed, float(z.max()))
        assert float(z.median()) < 1.5
        worst.append(float((r.estimate - d).abs().max()))
    # and the error is that of the method: XDiag on a decaying spectrum is far better than Hutchinson
    if name == "decaying 1/i^2" and method != "hutchinson":
        hutch = [float((diagonal(A, 40, "hutchinson", seed=s).estimate - d).abs().max()) for s in range(5)]
        assert max(worst) < 0.1 * min(hutch)


def test_hutchinson_stderr_is_calibrated_with_the_unbiased_variance():
    """The mean of stderr^2 over seeds equals Var(z_i (Az)_i)/m = sum_{j != i} a_ij^2 / m, entry by entry.

    With m = 3 a biased (1/m) variance would come out 2/3 of it: the test fails for that."""
    A = _matrix(SPECTRA["indefinite"], seed=3)
    m = 3
    var = (A**2).sum(dim=1) - A.diagonal() ** 2  # Rademacher: Var of one sample, per entry
    se2 = torch.stack([diagonal(A, m, "hutchinson", seed=s).stderr ** 2 for s in range(400)]).mean(dim=0)
    ratio = float((se2 / (var / m)).mean())  # averaged over 120 entries and 400 seeds
    assert ratio == pytest.approx(1.0, abs=0.05)  # biased: 0.667


def test_frobenius_norm_sq_within_standard_errors_and_calibrated():
    for name, lam in SPECTRA.items():
        A = _matrix(lam, seed=4)
        exact = float((lam**2).sum())
        for seed in range(5):
            r = frobenius_norm_sq(DenseOperator(A), num_matvecs=30, seed=seed)
            assert r.method == "hutchinson" and r.num_matvecs == 30 and len(r.samples) == 30
            assert abs(r.estimate - exact) <= 4 * r.stderr, (name, seed)
    # the standard error against the closed-form variance of ||Az||^2 = z^T A^2 z with Rademacher z:
    # 2 (||A^2||_F^2 - sum_i (A^2)_ii^2)
    A = _matrix(SPECTRA["indefinite"], seed=5)
    A2 = A @ A
    var = 2 * (float((A2**2).sum()) - float((A2.diagonal() ** 2).sum()))
    se2 = sum(frobenius_norm_sq(A, num_matvecs=4, seed=s).stderr ** 2 for s in range(400)) / 400
    assert se2 / (var / 4) == pytest.approx(1.0, abs=0.15)


def test_low_rank_is_exact_by_xdiag():
    g = torch.Generator().manual_seed(6)
    U = torch.randn(150, 6, generator=g, dtype=DT)
    A = U @ torch.diag(torch.tensor([5.0, -3.0, 2.0, 1.0, -0.5, 0.1], dtype=DT)) @ U.T
    r = diagonal(A, num_matvecs=20, method="xdiag", seed=0)
    assert float((r.estimate - A.diagonal()).abs().max()) <= 1e-10 * float(A.abs().max())
    assert float(r.stderr.max()) <= 1e-9 * float(A.abs().max())


def test_seed_reproducible_and_auto_chooses():
    A = _matrix(SPECTRA["flat"], seed=7)
    a, b = diagonal(A, 30, seed=11), diagonal(A, 30, seed=11)
    assert torch.equal(a.estimate, b.estimate) and a.method == "auto(hutchinson)"
    assert diagonal(_matrix(SPECTRA["decaying 1/i^2"]), 30, seed=0).method == "auto(xdiag)"
    with pytest.raises(ValueError, match="method"):
        diagonal(A, 30, method="diag++")
    with pytest.raises(ValueError, match="num_matvecs"):
        diagonal(A, 3, method="xdiag")
    op = DenseOperator(A)
    with pytest.raises(TypeError, match="general one"):
        diagonal(op @ op, 10)
    d = diagonal(A, 10, method="hutchinson", seed=0).to_dict()
    assert len(d["estimate"]) == N and len(d["stderr"]) == N and d["method"] == "hutchinson"
    assert isinstance(diagonal(A, N), DiagonalResult)


def test_model_hessian_and_ggn_diagonals():
    torch.manual_seed(0)
    model = mlp(4, 5, 3)
    x, y = torch.randn(16, 4, dtype=DT), torch.randint(0, 3, (16,))
    crit = nn.CrossEntropyLoss()
    H, G = HessianOperator(model, crit, data=(x, y)), GGNOperator(model, crit, data=(x, y))
    Hd, Gd = func_hessian(model, crit, x, y), ggn(model, crit, x, y)
    n = H.size
    assert float((diagonal(H, n).estimate - Hd.diagonal()).abs().max()) <= 1e-12 * float(Hd.abs().max())
    assert float((diagonal(G, n).estimate - Gd.diagonal()).abs().max()) <= 1e-12 * float(Gd.abs().max())
    r = diagonal(H, num_matvecs=20, method="hutchinson", seed=0)
    z = (r.estimate - Hd.diagonal()).abs() / r.stderr.clamp_min(1e-300)
    assert float((z > 4).double().mean()) <= 0.05
    f = frobenius_norm_sq(H, num_matvecs=20, seed=0)
    assert abs(f.estimate - float((Hd**2).sum())) <= 4 * f.stderr
    assert math.isfinite(f.stderr) and f.stderr > 0
