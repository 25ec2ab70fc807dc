"""Stochastic Lanczos quadrature against exact spectra and moments."""

from __future__ import annotations

import json
import math

import pytest
import torch

from hessianflow.linalg.density import DensityResult, spectral_density

try:
    from spectra import CountingOperator, spectrum, sym_matrix
except ImportError:  # tests/ imported as a package
    from tests.spectra import CountingOperator, spectrum, sym_matrix


def test_weights_are_a_probability_vector_per_run():
    lam = spectrum("indefinite", 150)
    res = spectral_density(sym_matrix(lam, seed=0), num_runs=6, num_steps=40, seed=0)
    assert res.nodes.shape == res.weights.shape == (6, 40)
    assert bool((res.weights >= 0).all())
    assert torch.allclose(res.weights.sum(dim=1), torch.ones(6, dtype=torch.float64), atol=1e-12)
    lo, hi = res.support()
    # Ritz values lie inside the spectrum, and 40 steps resolve the extreme outliers
    assert lam.min() - 1e-12 <= lo and hi <= lam.max() + 1e-12
    assert lo == pytest.approx(-20.0, abs=1e-8) and hi == pytest.approx(25.0, abs=1e-8)


@pytest.mark.parametrize(
    "name,num_runs,rel_se", [("flat", 40, 0.02), ("indefinite", 200, 0.12), ("geometric", 200, 0.12)]
)
def test_moments_match_traces_of_powers(name, num_runs, rel_se):
    # Each run's rule is exact for polynomials of degree <= 2m - 1, so each run's moment is an
    # unbiased estimate of tr(A^p)/n: v^T A^p v with E[v v^T] = I/n. The mean of independent runs is
    # then within a few standard errors (the sample std over runs / sqrt(runs)) of tr(A^p)/n.
    # 4 standard errors: a normal mean misses that by chance with probability 6e-5 (fixed seed).
    # Outlier-dominated spectra need more runs: a run sees an outlier with weight (v.u)^2 ~ chi2_1/n,
    # so a moment carried by one eigenvalue has relative standard error sqrt(2 / runs) = 0.1 here.
    lam = spectrum(name, 200)
    res = spectral_density(sym_matrix(lam, seed=1), num_runs=num_runs, num_steps=20, seed=0)
    for p in range(1, 5):
        exact = float((lam**p).mean())
        se = res.moment_stderr(p)
        assert abs(res.moments(p) - exact) <= 4 * se, (p, res.moments(p), exact, se)
        # and the check is not vacuous: the error bar is a small fraction of the moment's size
        assert se <= rel_se * float((lam.abs() ** p).mean()), (p, se)
    assert res.moments(0) == pytest.approx(1.0, abs=1e-12)
    assert res.trace_estimate() == pytest.approx(200 * res.moments(1))


def test_moments_wrong_matrix_is_detected():
    # The same check against the moments of a matrix 5% smaller must fail for every p.
    lam = spectrum("flat", 200)
    res = spectral_density(sym_matrix(1.05 * lam, seed=1), num_runs=40, num_steps=20, seed=0)
    for p in range(1, 5):
        assert abs(res.moments(p) - float((lam**p).mean())) > 4 * res.moment_stderr(p)


@pytest.mark.parametrize("n", [1, 2, 5, 30])
def test_enough_steps_give_the_exact_eigenvalues(n):
    lam = torch.linspace(-3.0, 4.0, n, dtype=torch.float64) if n > 1 else torch.tensor([2.5], dtype=torch.float64)
    A = sym_matrix(lam, seed=n)
    res = spectral_density(A, num_runs=3, num_steps=n + 10, seed=0)
    assert res.nodes.shape == (3, n)  # m = min(num_steps, n)
    for r in range(3):
        # every eigenvalue is a node (to rounding) and every node is an eigenvalue
        d = (res.nodes[r][:, None] - lam[None, :]).abs()
        assert float(d.min(dim=1).values.max()) <= 1e-10
        assert float(d.min(dim=0).values.max()) <= 1e-10
        # with m = n the rule is exact for every polynomial: moments are v^T A^p v exactly, and the
        # weights are the squared components of v on the eigenvectors, so all are positive
        assert bool((res.weights[r] > 0).all())


def test_repeated_eigenvalues_stop_early_and_pad():
    # 3 distinct eigenvalues: the Krylov space of any start vector has dimension 3, Lanczos breaks
    # down after 3 products per run and the rule is exact; the rows are padded with zero weights.
    lam = torch.tensor([1.0] * 10 + [2.0] * 5 + [-4.0] * 5, dtype=torch.float64)
    op = CountingOperator(sym_matrix(lam, seed=3))
    res = spectral_density(op, num_runs=4, num_steps=15, seed=0)
    assert res.num_matvecs == op.products == 4 * 3
    assert res.nodes.shape == (4, 15)
    for r in range(4):
        live = res.weights[r] > 0
        assert int(live.sum()) == 3
        assert sorted(res.nodes[r][live].tolist()) == pytest.approx([-4.0, 1.0, 2.0], abs=1e-12)
    assert torch.allclose(res.weights.sum(dim=1), torch.ones(4, dtype=torch.float64), atol=1e-12)
    # exact rule: moments are v^T A^p v for each run; their mean estimates tr(A^p)/n
    assert res.moments(1) == pytest.approx(float(lam.mean()), abs=0.6)


def test_closed_form_density_of_a_2x2_matrix():
    # diag(1, 3): a normalised Rademacher start has components (+-1/sqrt2, +-1/sqrt2), so every run
    # gives nodes {1, 3} with weights {1/2, 1/2}: the density is an equal mixture of two Gaussians.
    A = torch.diag(torch.tensor([1.0, 3.0], dtype=torch.float64))
    res = spectral_density(A, num_runs=5, num_steps=10, seed=0)
    assert torch.allclose(res.nodes, torch.tensor([[1.0, 3.0]] * 5, dtype=torch.float64), atol=1e-14)
    assert torch.allclose(res.weights, torch.full((5, 2), 0.5, dtype=torch.float64), atol=1e-14)
    grid = torch.linspace(-1.0, 5.0, 13, dtype=torch.float64)
    sigma = 0.3
    # the reference: torch.distributions' normal density (an implementation independent of density())
    normal = torch.distributions.Normal(torch.tensor([1.0, 3.0], dtype=torch.float64), sigma)
    expected = normal.log_prob(grid[:, None]).exp().mean(dim=1)
    assert torch.allclose(res.density(grid, sigma=sigma), expected, rtol=1e-12, atol=1e-300)
    # and it is not flat: the peaks sit at the eigenvalues, the density at 1 is 1/(2 sigma sqrt(2 pi)) + tiny
    assert float(res.density([1.0], sigma=sigma)[0]) == pytest.approx(0.5 / (sigma * 2.5066282746310002), rel=1e-6)
    assert res.default_sigma() == pytest.approx(0.02)  # 1% of the node range


def test_density_integrates_to_one_and_peaks_at_the_bulk():
    lam = spectrum("outliers", 200)
    res = spectral_density(sym_matrix(lam, seed=2), num_runs=5, num_steps=50, seed=1)
    lo, hi = res.support()
    sigma = res.default_sigma()
    assert sigma == pytest.approx(0.01 * (hi - lo))
    grid = torch.linspace(lo - 6 * sigma, hi + 6 * sigma, 4001, dtype=torch.float64)
    dens = res.density(grid)
    assert float(torch.trapezoid(dens, grid)) == pytest.approx(1.0, abs=1e-3)
    # 192 of 200 eigenvalues in [0, 1]: about 96% of the mass there (smoothing leaks a little)
    inside = (grid >= -3 * sigma) & (grid <= 1 + 3 * sigma)
    assert float(torch.trapezoid(dens * inside, grid)) == pytest.approx(0.96, abs=0.03)
    # shape follows the grid's shape
    assert res.density(grid.reshape(4001, 1)).shape == (4001, 1)


def test_seed_reproduces_and_operator_count():
    lam = spectrum("indefinite", 80)
    op = CountingOperator(sym_matrix(lam, seed=0))
    a = spectral_density(op, num_runs=3, num_steps=25, seed=7)
    assert a.num_matvecs == op.products == 3 * 25
    b = spectral_density(op, num_runs=3, num_steps=25, seed=7)
    c = spectral_density(op, num_runs=3, num_steps=25, seed=8)
    assert torch.equal(a.nodes, b.nodes) and torch.equal(a.weights, b.weights)
    assert not torch.equal(a.weights, c.weights)


def test_float32_operator():
    lam = spectrum("outliers", 100)
    res = spectral_density(sym_matrix(lam, seed=0).float(), num_runs=10, num_steps=30, seed=0)
    assert res.nodes.dtype == torch.float64
    assert torch.allclose(res.weights.sum(dim=1), torch.ones(10, dtype=torch.float64), atol=1e-6)
    assert res.support()[1] == pytest.approx(20.0, rel=1e-5)
    assert abs(res.moments(1) - float(lam.mean())) <= 4 * res.moment_stderr(1)


def test_to_dict_is_json_ready():
    res = spectral_density(sym_matrix(spectrum("outliers", 30), seed=0), num_runs=2, num_steps=5, seed=0)
    d = json.loads(json.dumps(res.to_dict()))
    assert d["num_matvecs"] == 10 and d["size"] == 30
    assert torch.allclose(torch.tensor(d["weights"], dtype=torch.float64), res.weights)
    back = DensityResult(torch.tensor(d["nodes"]), torch.tensor(d["weights"]), d["num_matvecs"], d["size"])
    assert back.moments(2) == pytest.approx(res.moments(2))


@pytest.mark.parametrize("kwargs", [{"num_runs": 0}, {"num_steps": 0}, {"num_runs": 2.0}, {"num_steps": -3}])
def test_bad_arguments(kwargs):
    with pytest.raises(ValueError):
        spectral_density(torch.eye(4, dtype=torch.float64), **kwargs)


def test_bad_density_arguments():
    res = spectral_density(torch.eye(4, dtype=torch.float64), num_runs=2, num_steps=3, seed=0)
    for sigma in (0.0, -1.0, float("nan")):
        with pytest.raises(ValueError):
            res.density(torch.zeros(3), sigma=sigma)
    with pytest.raises(ValueError):
        res.moments(-1)
    # the identity: one node at 1, and a readable default width
    assert res.support() == (pytest.approx(1.0), pytest.approx(1.0))
    assert res.default_sigma() == pytest.approx(0.01)
    assert math.isnan(spectral_density(torch.eye(3), num_runs=1, num_steps=2, seed=0).moment_stderr(1))
