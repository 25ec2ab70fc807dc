"""Property tests (hypothesis): random symmetric matrices with random, often degenerate, spectra."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from hessianflow.linalg.density import spectral_density
from hessianflow.linalg.eigen import ConvergenceWarning, lanczos, power_iteration
from hessianflow.linalg.linop import DenseOperator
from hessianflow.linalg.trace import _xtrace_from_sketch, hutchinson_trace, hutchpp_trace, trace, xtrace

try:
    from spectra import eig_order, sym_matrix
except ImportError:  # tests/ imported as a package
    from tests.spectra import eig_order, sym_matrix

SETTINGS = settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def spectra(draw, min_n=1, max_n=40):
    """Random spectra: continuous values, or values from a small pool (repeated eigenvalues)."""
    n = draw(st.integers(min_n, max_n))
    value = st.floats(-10.0, 10.0, allow_nan=False, allow_infinity=False)
    pool = draw(st.lists(value, min_size=1, max_size=4))
    element = st.one_of(value, st.sampled_from(pool)) if draw(st.booleans()) else value
    lam = draw(st.lists(element, min_size=n, max_size=n))
    return torch.tensor(lam, dtype=torch.float64)


def quiet(fn, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        return fn(*args, **kwargs)


@SETTINGS
@given(lam=spectra(), k=st.integers(1, 4), which=st.sampled_from(["LA", "SA", "LM"]), seed=st.integers(0, 2**16))
def test_lanczos_values_within_tolerance_or_not_converged(lam, k, which, seed):
    n = lam.numel()
    k = min(k, n)
    A = sym_matrix(lam, seed=seed)
    tol = 1e-6
    res = quiet(lanczos, A, k=k, which=which, seed=seed)
    scale = float(lam.abs().max())
    ref = eig_order(lam, which)[:k]
    got = res.eigenvalues
    if which == "LM":  # ties in magnitude (3 and -3) make the sign order ambiguous
        ref, got = ref.abs(), got.abs()
    # A converged pair is within its residual of an eigenvalue (Weyl); in the wanted position up to
    # the multiplicity check's resolution (tol * scale) and a cluster narrower than tol * scale:
    # 3 tol * scale in all.
    bound = 3 * tol * scale + 1e-12 * max(scale, 1.0)
    ok = (got - ref).abs() <= bound
    assert bool((ok | ~res.converged).all()), (got, ref, res.converged, res.residuals)
    # honest residuals and orthonormal vectors, converged or not
    Y = res.eigenvectors
    true_res = torch.linalg.vector_norm(A @ Y - Y * res.eigenvalues, dim=0)
    assert bool(((true_res - res.residuals).abs() <= 1e-3 * res.residuals + 1e-10 * max(scale, 1.0)).all())
    assert torch.allclose(Y.T @ Y, torch.eye(k, dtype=torch.float64), atol=1e-8)
    # with the default budget (>= 150 products) and n <= 40 every case here converges
    assert res.all_converged


@SETTINGS
@given(lam=spectra(max_n=30), seed=st.integers(0, 2**16), sign=st.sampled_from([-1.0, 1.0]))
def test_power_iteration_dominant_value(lam, seed, sign):
    # A dominant eigenvalue at least 1.5x every other in magnitude: the ratio r <= 2/3 bounds the
    # error at the stop by tol * r^2 / (1 - r^2) < tol (see power_iteration's docstring).
    top = sign * (1.5 * float(lam.abs().max()) + 1.0)
    full = torch.cat([lam, torch.tensor([top], dtype=torch.float64)])
    A = sym_matrix(full, seed=seed)
    res = quiet(power_iteration, A, k=1, tol=1e-8, max_iter=2000, seed=seed)
    assert res.converged.item()
    assert abs(res.eigenvalues.item() - top) <= 1e-6 * abs(top)


@SETTINGS
@given(lam=spectra(), k=st.integers(1, 4), which=st.sampled_from(["LA", "SA"]), seed=st.integers(0, 2**16))
def test_lanczos_eigenvalue_criterion_meets_its_accuracy_or_says_not(lam, k, which, seed):
    # criterion="eigenvalue" (a Kato-Temple bound with an estimated gap): every pair reported converged
    # is within tol relative of the eigenvalue in its place (the floor tol * max|lambda| near zero; plus
    # the multiplicity check's resolution, tol * scale, where eigenvalues tie)
    k = min(k, lam.numel())
    A = sym_matrix(lam, seed=seed)
    tol = 1e-6
    res = quiet(lanczos, A, k=k, which=which, seed=seed, tol=tol, criterion="eigenvalue")
    scale = float(lam.abs().max())
    ref = eig_order(lam, which)[:k]
    bound = tol * torch.clamp(ref.abs(), min=tol * scale) + 2 * tol * scale + 1e-12 * max(scale, 1.0)
    ok = (res.eigenvalues - ref).abs() <= bound
    assert bool((ok | ~res.converged).all()), (res.eigenvalues, ref, res.converged, res.residuals)
    assert res.all_converged


@SETTINGS
@given(lam=spectra(max_n=30), k=st.integers(1, 3), seed=st.integers(0, 2**16))
def test_power_iteration_converged_pairs_are_eigenpairs(lam, k, seed):
    # Any spectrum: a converged pair has the residual it reports, so it is within that residual of
    # an eigenvalue, and no value exceeds the largest magnitude.
    k = min(k, lam.numel())
    A = sym_matrix(lam, seed=seed)
    res = quiet(power_iteration, A, k=k, tol=1e-6, max_iter=300, seed=seed)
    scale = max(float(lam.abs().max()), 1e-300)
    Y = res.eigenvectors
    # the reference residual at unit scale: vector_norm squares its entries, which underflow below ~1e-154
    true_res = torch.linalg.vector_norm((A / scale) @ Y - Y * (res.eigenvalues / scale), dim=0) * scale
    assert torch.allclose(true_res, res.residuals, rtol=1e-6, atol=1e-12 * scale)
    for theta, r, c in zip(res.eigenvalues.tolist(), res.residuals.tolist(), res.converged.tolist()):
        assert abs(theta) <= scale * (1 + 1e-12)
        if c:
            assert r <= 2 * math.sqrt(1e-6) * scale + 1e-15
            assert float((lam - theta).abs().min()) <= r + 1e-12 * scale


@SETTINGS
@given(lam=spectra(), steps=st.integers(1, 50), runs=st.integers(1, 4), seed=st.integers(0, 2**16))
def test_slq_weights_and_nodes(lam, steps, runs, seed):
    n = lam.numel()
    A = sym_matrix(lam, seed=seed)
    res = spectral_density(A, num_runs=runs, num_steps=steps, seed=seed)
    scale = max(float(lam.abs().max()), 1.0)
    assert res.nodes.shape == (runs, min(steps, n))
    assert bool((res.weights >= 0).all())
    assert torch.allclose(res.weights.sum(dim=1), torch.ones(runs, dtype=torch.float64), atol=1e-12)
    # Ritz values interlace: inside [min, max] of the spectrum
    assert float(res.nodes.min()) >= float(lam.min()) - 1e-10 * scale
    assert float(res.nodes.max()) <= float(lam.max()) + 1e-10 * scale
    if steps >= n:  # the rule is exact: its nodes with weight are eigenvalues
        live = res.weights > 1e-12
        d = (res.nodes[live][:, None] - lam[None, :]).abs().min(dim=1).values
        assert float(d.max()) <= 1e-8 * scale


TRACE_METHODS = [hutchinson_trace, hutchpp_trace, xtrace, trace]


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(lam=spectra(min_n=30, max_n=60), seed=st.integers(0, 2**16))
def test_trace_estimates_lie_within_their_error_bars(lam, seed):
    # For each method, over 20 seeds, the exact trace lies within 3 reported standard errors in at
    # least 16 runs. (3 standard errors hold ~99.7% of the time for a normal estimate. Adversarial
    # spectra make the samples skewed: with 24 products hypothesis found a rank-9 0/1 spectrum where
    # Hutch++'s 8 Hutchinson samples of a rank-1 remainder, chi-square-like, covered 15 of 20; with 48
    # products the rule held over 150 examples.)
    A = sym_matrix(lam, seed=seed)
    exact = float(lam.sum())
    slack = 1e-9 * max(float(lam.abs().sum()), 1.0)
    for fn in TRACE_METHODS:
        results = [fn(A, num_matvecs=48, seed=seed * 100 + s) for s in range(20)]
        inside = sum(abs(r.estimate - exact) <= 3 * r.stderr + slack for r in results)
        assert inside >= 16, (fn.__name__, inside)


@SETTINGS
@given(
    lam=spectra(min_n=4, max_n=15),
    s=st.integers(2, 5),
    improved=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_xtrace_algebra_matches_explicit_construction(lam, s, improved, seed):
    n = lam.numel()
    s = min(s, n - 1)
    A = sym_matrix(lam, seed=seed)
    g = torch.Generator().manual_seed(seed)
    Om = torch.randn(n, s, generator=g, dtype=torch.float64)
    if improved:
        Om = Om * math.sqrt(n) / Om.norm(dim=0)
    Y = A @ Om
    # skip numerically rank-deficient sketches (repeated or zero eigenvalues): the identity needs R
    # invertible, and the production code handles those cases by regularisation instead
    sv = torch.linalg.svdvals(Y)
    assume(float(sv.min()) > 1e-6 * float(sv.max()))
    ests, _ = _xtrace_from_sketch(DenseOperator(A), Om, Y, improved)
    for i in range(s):
        keep = [j for j in range(s) if j != i]
        Q = torch.linalg.qr(Y[:, keep]).Q
        u = Om[:, i] - Q @ (Q.T @ Om[:, i])
        hutch = u @ A @ u
        if improved:
            hutch = hutch * (n - len(keep)) / (u @ u)
        ref = float(torch.trace(Q.T @ A @ Q) + hutch)
        assert ests[i].item() == pytest.approx(ref, abs=1e-7 * max(float(lam.abs().sum()), 1.0))
