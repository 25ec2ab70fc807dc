"""lanczos' block start for k >= 2 (issue 13): repeated eigenvalues found in one run, against eigvalsh."""

from __future__ import annotations

import pytest
import torch

from hessianflow.linalg import eigen
from hessianflow.linalg.eigen import lanczos

try:
    from spectra import CountingOperator, sym_matrix
except ImportError:  # tests/ imported as a package
    from tests.spectra import CountingOperator, sym_matrix

DT = torch.float64


def _no_separate_run(*args, **kwargs):
    raise AssertionError("the separate multiplicity run was used")


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_double_eigenvalue_found_in_one_run(monkeypatch, seed):
    # A double top eigenvalue: the block of two start vectors holds both copies, so the separate run on the
    # complement is not needed (it would raise here; the block is given the room and patience to finish).
    monkeypatch.setattr(eigen, "_check_multiplicity", _no_separate_run)
    monkeypatch.setattr(eigen, "_BLOCK_PATIENCE", 10**6)
    lam = torch.cat([torch.tensor([6.0, 6.0, 4.0], dtype=DT), torch.linspace(-1, 3, 97, dtype=DT)])
    A = sym_matrix(lam, seed=20 + seed)
    ref = torch.linalg.eigvalsh(A).flip(0)
    for v0 in (None, torch.randn(100, dtype=DT, generator=torch.Generator().manual_seed(seed))):
        res = lanczos(A, k=3, seed=seed, v0=v0, max_basis=300)
        assert res.all_converged
        torch.testing.assert_close(res.eigenvalues, ref[:3], rtol=1e-6, atol=0)


@pytest.mark.parametrize("which", ["LA", "SA"])
def test_triple_eigenvalue_adds_a_start_vector(monkeypatch, which):
    # Three copies at the end of the spectrum and k = 4: two start vectors see two copies among the first
    # k - 1 values, so a third Gaussian vector must join (the third copy); the next value comes fourth.
    monkeypatch.setattr(eigen, "_check_multiplicity", _no_separate_run)
    monkeypatch.setattr(eigen, "_BLOCK_PATIENCE", 10**6)
    sign = 1.0 if which == "LA" else -1.0
    lam = sign * torch.cat([torch.tensor([5.0, 5.0, 5.0, 4.0], dtype=DT), torch.linspace(0, 3, 76, dtype=DT)])
    A = sym_matrix(lam, seed=3)
    op = CountingOperator(A)
    res = lanczos(op, k=4, which=which, seed=0, max_basis=300)
    assert res.all_converged
    expected = sign * torch.tensor([5.0, 5.0, 5.0, 4.0], dtype=DT)
    torch.testing.assert_close(res.eigenvalues, expected, rtol=0, atol=1e-6 * 5)
    assert res.num_matvecs == op.products


def test_further_copy_rule_looks_only_at_the_first_k_minus_1_values():
    t = torch.tensor
    # two copies among the first k - 1 with two start vectors: a third copy could be missing
    assert eigen._needs_another_chain(t([5.0, 5.0, 4.0], dtype=DT), 2, 1e-6, 5.0, "LA")
    # the two copies at positions k - 1 and k: a third copy would come (k + 1)-th, not wanted
    assert not eigen._needs_another_chain(t([6.0, 5.0, 5.0], dtype=DT), 2, 1e-6, 6.0, "LA")
    # three start vectors and two copies: every copy is in the space
    assert not eigen._needs_another_chain(t([5.0, 5.0, 4.0], dtype=DT), 3, 1e-6, 5.0, "LA")
    # largest magnitude: 5 and -5 are two values of equal magnitude, treated as possible copies
    assert eigen._needs_another_chain(t([5.0, -5.0, 4.0], dtype=DT), 2, 1e-6, 5.0, "LM")


def test_default_budget_falls_back_to_the_separate_run_and_stays_right():
    # With the default basis and patience a slow complement is certified by the separate run; the answer
    # is the same either way, and a repeated value is never reported once.
    lam = torch.cat([torch.tensor([5.0, 5.0, 5.0, 4.0], dtype=DT), torch.linspace(0, 3, 76, dtype=DT)])
    A = sym_matrix(lam, seed=3)
    for seed in range(3):
        res = lanczos(A, k=4, seed=seed)
        assert res.all_converged
        torch.testing.assert_close(res.eigenvalues, torch.tensor([5.0, 5.0, 5.0, 4.0], dtype=DT), rtol=0, atol=5e-6)
