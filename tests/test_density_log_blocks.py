"""Log-scale densities, re-evaluation without products, and per-block densities with the Jensen-Shannon
heterogeneity (Zhang et al. 2024), against dense ``eigvalsh`` on matrices with chosen spectra and on a
small model's Hessian."""

import math

import pytest
import torch
from dense_reference import func_hessian, mlp
from spectra import sym_matrix
from torch import nn

from hessianflow import HessianOperator
from hessianflow.curvature.compare import parameter_blocks
from hessianflow.linalg.density import DensityResult, block_densities, js_divergence, spectral_density
from hessianflow.linalg.linop import LinearOperator

DT = torch.float64


class Counting(LinearOperator):
    """Wraps a dense matrix and counts its own products (apart from the base class's counter)."""

    def __init__(self, A):
        super().__init__(A.shape[0], A.dtype, A.device)
        self.A, self.calls = A, 0

    def _matvec(self, v):
        self.calls += 1
        return self.A @ v


def _trapz(y, x):
    return float(torch.trapezoid(y, x))


def test_log_density_of_a_spectrum_spanning_decades():
    """Eigenvalues uniform in log over 5 decades (1e-3..1e2): the SLQ log density is flat at 1/(5 ln 10)
    where Lanczos has nodes enough, matches the exact density's, and integrates to 1 over ln x. With
    fewer steps the lower decades' mass is still right, their shape is not (the limit the docstring names)."""
    lam = torch.logspace(-3, 2, 300, dtype=DT)
    A = sym_matrix(lam, seed=1)
    exact = DensityResult.from_eigenvalues(lam)
    x = torch.logspace(-9, 3, 3000, dtype=DT)
    eps = 1e-8
    t = torch.log(x + eps)
    ref = exact.log_density(x, sigma=0.5, eps=eps)
    height = 1 / (5 * math.log(10))
    mid = (x > 10**-2.5) & (x < 10**1.5)
    assert float((ref[mid] / height - 1).abs().max()) < 0.02  # the exact one is flat
    res = spectral_density(A, num_runs=20, num_steps=150, seed=0)
    psi = res.log_density(x, sigma=0.5, eps=eps)
    assert abs(_trapz(psi, t) - 1) < 1e-6 and abs(_trapz(ref, t) - 1) < 1e-6
    assert float((psi[mid] / height - 1).abs().max()) < 0.15  # measured 0.083
    few = spectral_density(A, num_runs=20, num_steps=60, seed=0).log_density(x, sigma=0.5, eps=eps)
    low = x < 0.1
    assert abs(_trapz(few[low], t[low]) - _trapz(ref[low], t[low])) < 0.02  # 2 of 5 decades: 0.40 (measured 0.4035)
    assert float((few[mid] / height - 1).abs().max()) > 0.5  # but not their shape (measured 1.74)
    # as a density of |lambda| (wrt="lambda") it integrates to 1 over x, and it is psi / (x + eps)
    dens = res.log_density(x, sigma=0.5, eps=eps, wrt="lambda")
    assert abs(_trapz(dens, x) - 1) < 1e-3
    assert torch.allclose(dens * (x + eps), psi, rtol=1e-12)
    # a linear-scale kernel of 1% of the range is wider than the four lower decades together
    assert res.default_sigma() > 0.9


def test_negative_and_zero_nodes():
    """An indefinite spectrum with a null space: side= splits the mass by sign, the zeros pile up at ln eps."""
    lam = torch.cat(
        [-torch.logspace(-1, 1, 20, dtype=DT), torch.zeros(10, dtype=DT), torch.logspace(-2, 2, 30, dtype=DT)]
    )
    exact = DensityResult.from_eigenvalues(lam)
    eps = 1e-6
    x = torch.logspace(-10, 3, 4000, dtype=DT)
    t = torch.log(x + eps)
    mass = {
        side: _trapz(exact.log_density(x, sigma=0.2, eps=eps, side=side), t)
        for side in ("both", "positive", "negative")
    }
    # the null space's sixth of the mass sits at ln eps: half of its bump inside any grid of x > 0
    assert abs(mass["both"] - (1 - 5 / 60)) < 1e-4  # the grid starts at x = 1e-10, not 0
    assert abs(mass["positive"] - 30 / 60) < 1e-6 and abs(mass["negative"] - 20 / 60) < 1e-6
    psi = exact.log_density(x, sigma=0.2, eps=eps)
    near_eps = t < math.log(eps) + 1.0
    assert abs(_trapz(psi[near_eps], t[near_eps]) - 5 / 60) < 1e-3
    with pytest.raises(ValueError, match="> 0"):
        exact.log_density(torch.tensor([0.0, 1.0]))
    with pytest.raises(ValueError, match="side"):
        exact.log_density(x, side="left")


def test_re_evaluation_spends_no_product():
    A = Counting(sym_matrix(torch.linspace(-1, 3, 40, dtype=DT), seed=2))
    res = spectral_density(A, num_runs=3, num_steps=15, seed=0)
    spent = A.calls
    assert spent == res.num_matvecs == 45
    for sigma in (0.01, 0.3):
        res.density(torch.linspace(-2, 4, 50), sigma=sigma)
        res.log_density(torch.logspace(-3, 1, 50), sigma=sigma, side="positive")
    blocks = block_densities(A, [list(range(20)), list(range(20, 40))], num_runs=2, num_steps=10, seed=0)
    spent = A.calls
    assert blocks.num_matvecs == 40
    for scale in ("linear", "log"):
        blocks.heterogeneity(scale=scale, sigma=0.2)
    blocks.to_dict()
    assert A.calls == spent


def _block_diag(*spectra, seed=0):
    return torch.block_diag(*[sym_matrix(s, seed=seed + i) for i, s in enumerate(spectra)])


def _reference(spectra, scale="linear", sigma=None):
    """The heterogeneity of the exact block spectra (eigvalsh of each block), same grid rules."""
    from hessianflow.linalg.density import BlockDensityResult

    exact = BlockDensityResult(
        names=None, densities=[DensityResult.from_eigenvalues(s) for s in spectra], num_matvecs=0
    )
    return exact.heterogeneity(scale=scale, sigma=sigma)


def test_identical_blocks_have_zero_heterogeneity():
    s = torch.linspace(0.5, 3.0, 30, dtype=DT)
    A = _block_diag(s, s, s)  # different eigenvectors, the same spectrum
    blocks = [range(0, 30), range(30, 60), range(60, 90)]
    res = block_densities(A, [list(b) for b in blocks], num_runs=30, num_steps=30, seed=0)
    js, mean = res.heterogeneity(sigma=0.1)
    assert _reference([s, s, s], sigma=0.1)[1] == 0.0
    assert mean < 0.015, js  # the random weights only: measured 0.0045
    # block spectra from eigvalsh of the blocks the operator sees
    for d, b in zip(res.densities, blocks):
        exact = torch.linalg.eigvalsh(A[list(b)][:, list(b)])
        assert torch.allclose(d.nodes[0].sort().values, exact, atol=1e-10)


def test_disjoint_blocks_reach_ln2_and_overlap_is_in_between():
    a = torch.linspace(1.0, 2.0, 25, dtype=DT)
    b = torch.linspace(10.0, 12.0, 25, dtype=DT)
    c = torch.linspace(1.5, 2.5, 25, dtype=DT)  # half over a
    A = _block_diag(a, b, c, seed=3)
    idx = [list(range(0, 25)), list(range(25, 50)), list(range(50, 75))]
    res = block_densities(A, idx, names=["a", "b", "c"], num_runs=30, num_steps=25, seed=1)
    js, mean = res.heterogeneity(sigma=0.1)
    ref_js, ref_mean = _reference([a, b, c], sigma=0.1)
    assert abs(float(js[0, 1]) - math.log(2)) < 1e-6 and abs(float(js[1, 2]) - math.log(2)) < 1e-6
    assert 0.2 < float(ref_js[0, 2]) < 0.6
    assert abs(float(js[0, 2]) - float(ref_js[0, 2])) < 0.05, (js, ref_js)  # measured 0.245 vs 0.265
    assert abs(mean - ref_mean) < 0.02
    # on the log scale too (the disjoint pairs stay disjoint)
    js_log, _ = res.heterogeneity(scale="log", sigma=0.02)
    assert abs(float(js_log[0, 1]) - math.log(2)) < 1e-6
    d = res.to_dict()
    assert d["names"] == ["a", "b", "c"] and d["sizes"] == [25, 25, 25] and len(d["js"]) == 3


def test_js_divergence_closed_forms():
    assert js_divergence(torch.tensor([0.5, 0.5]), torch.tensor([0.5, 0.5])) == 0.0
    p, q = torch.tensor([1.0, 0.0]), torch.tensor([0.5, 0.5])
    # JS = 1/2 KL(p||m) + 1/2 KL(q||m), m = (3/4, 1/4)
    expected = 0.5 * math.log(1 / 0.75) + 0.5 * (0.5 * math.log(0.5 / 0.75) + 0.5 * math.log(0.5 / 0.25))
    assert abs(js_divergence(p, q) - expected) < 1e-15
    scipy = pytest.importorskip("scipy.spatial.distance")
    assert abs(js_divergence(p, q) - scipy.jensenshannon(p.numpy(), q.numpy()) ** 2) < 1e-12


def test_small_model_parameter_blocks_against_dense_hessian():
    """An MLP's Hessian per parameter tensor: SLQ on each block (steps >= its size: its exact eigenvalues)
    against eigvalsh of the dense float64 Hessian's diagonal blocks, and the heterogeneity against theirs."""
    torch.manual_seed(0)
    model = mlp(3, 4, 2, seed=0)
    x, y = torch.randn(16, 3, dtype=DT), torch.randint(0, 2, (16,))
    H = HessianOperator(model, nn.CrossEntropyLoss(), data=(x, y))
    blocks, names = parameter_blocks(H)
    assert names == ["0.weight", "0.bias", "2.weight", "2.bias"]
    dense = func_hessian(model, nn.CrossEntropyLoss(), x, y)
    res = block_densities(H, blocks, names=names, num_runs=40, num_steps=12, seed=0)
    exact = []
    for d, b in zip(res.densities, blocks):
        lam = torch.linalg.eigvalsh(dense[b][:, b])
        exact.append(lam)
        nodes = d.nodes[0][d.weights[0] > 0].sort().values
        # each run's rule holds the block's eigenvalues (all of them, unless its start vector missed some)
        assert torch.allclose(nodes, lam[(lam[:, None] - nodes).abs().argmin(0)], atol=1e-8)
        assert abs(d.moments(1) - float(lam.mean())) < 4 * d.moment_stderr(1) + 1e-12
    sigma = 0.02 * float(torch.cat(exact).max() - torch.cat(exact).min())
    _, mean = res.heterogeneity(sigma=sigma)
    _, ref_mean = _reference(exact, sigma=sigma)
    assert abs(mean - ref_mean) < 0.05, (mean, ref_mean)
    assert res.num_matvecs == sum(d.num_matvecs for d in res.densities) <= 40 * sum(min(12, len(b)) for b in blocks)
    by_layer, layer_names = parameter_blocks(H, by="layer")
    assert layer_names == ["0", "2"] and [len(b) for b in by_layer] == [16, 10]
