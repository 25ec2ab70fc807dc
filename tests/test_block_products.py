"""Block products (issue 24): ``matmat`` of k columns as one batched pass equals k single products to 1e-12 in
float64 for every operator and backend; ``batched_matmat="measure"`` times both ways once and keeps the
faster, its results equal either way; the block Lanczos computes its pending vectors' products in one
``matmat`` where the operator prefers it, with the same eigenvalues."""

import pytest
import torch
from dense_reference import DT, mlp, small_cnn, warm_batchnorm
from torch import nn

from hessianflow import EmpiricalFisherOperator, GGNOperator, HessianOperator
from hessianflow.linalg.eigen import lanczos
from hessianflow.linalg.linop import LinearOperator

try:
    from spectra import sym_matrix
except ImportError:  # tests/ imported as a package
    from tests.spectra import sym_matrix


def _rel(a, b):
    return float((a - b).norm() / b.norm())


def _data(cnn: bool):
    if cnn:
        model = warm_batchnorm(small_cnn(seed=2, side=4, classes=3), (8, 2, 4, 4), scale=2.0, shift=0.5)
        torch.manual_seed(3)
        return model, (torch.randn(6, 2, 4, 4, dtype=DT), torch.randint(0, 3, (6,)))
    torch.manual_seed(1)
    return mlp(5, 6, 3), (torch.randn(12, 5, dtype=DT), torch.randint(0, 3, (12,)))


MAKERS = {
    "hessian_double_backprop": lambda m, d, **kw: HessianOperator(m, nn.CrossEntropyLoss(), data=d, **kw),
    "hessian_forward_over_reverse": lambda m, d, **kw: HessianOperator(
        m, nn.CrossEntropyLoss(), data=d, backend="forward_over_reverse", **kw
    ),
    "ggn": lambda m, d, **kw: GGNOperator(m, nn.CrossEntropyLoss(), data=d, **kw),
    "fisher": lambda m, d, **kw: EmpiricalFisherOperator(m, nn.CrossEntropyLoss(), data=d, **kw),
}


@pytest.mark.parametrize("cnn", [False, True], ids=["mlp", "cnn_bn_eval"])
@pytest.mark.parametrize("kind", sorted(MAKERS))
def test_batched_matmat_equals_k_single_products(kind, cnn):
    model, data = _data(cnn)
    op = MAKERS[kind](model, data, batched_matmat=True)
    g = torch.Generator().manual_seed(0)
    for k in (2, 4):
        V = torch.randn(op.size, k, generator=g, dtype=DT)
        singles = torch.stack([op @ V[:, j] for j in range(k)], dim=1)
        assert op._batched_ok  # it did run batched (no fallback to the loop)
        assert _rel(op.matmat(V), singles) < 1e-12


def test_measure_times_both_ways_once_and_keeps_the_faster():
    model, data = _data(False)
    op = MAKERS["hessian_double_backprop"](model, data, batched_matmat="measure")
    ref = MAKERS["hessian_double_backprop"](model, data).to_dense()
    g = torch.Generator().manual_seed(4)
    for call in range(3):
        V = torch.randn(op.size, 2, generator=g, dtype=DT)
        assert _rel(op.matmat(V), ref @ V) < 1e-12
        t = op.matmat_timing
        if call == 0:
            assert set(t) == {"batched"} and t["batched"] > 0
    assert set(t) == {"batched", "loop", "choice"}
    assert t["choice"] == ("batched" if t["batched"] < t["loop"] else "loop")
    assert op._batched_ok == (t["choice"] == "batched")
    assert MAKERS["ggn"](model, data).matmat_timing is None  # only when asked


def test_measure_refusals():
    model, data = _data(False)
    with pytest.raises(ValueError, match="None, True, False or 'measure'"):
        MAKERS["ggn"](model, data, batched_matmat="fast")


class _BlockDense(LinearOperator):
    """A dense symmetric matrix that prefers block products, recording the width of each matmat."""

    prefers_matmat = True

    def __init__(self, A):
        super().__init__(A.shape[0], A.dtype, "cpu")
        self.A, self.widths = A, []

    def _matvec(self, v):
        return self.A @ v

    def _matmat(self, V):
        self.widths.append(V.shape[1])
        return self.A @ V


@pytest.mark.parametrize("seed", [0, 1])
def test_block_lanczos_computes_its_pending_products_together(seed):
    lam = torch.cat([torch.tensor([6.0, 6.0, 4.0, 3.5], dtype=DT), torch.linspace(-1, 3, 76, dtype=DT)])
    A = sym_matrix(lam, seed=10 + seed)
    ref = torch.linalg.eigvalsh(A).flip(0)[:3]
    block = _BlockDense(A)
    res = lanczos(block, k=3, seed=seed, tol=1e-8)
    plain = lanczos(A, k=3, seed=seed, tol=1e-8)
    assert res.all_converged and plain.all_converged
    torch.testing.assert_close(res.eigenvalues, ref, rtol=1e-8, atol=0)
    assert block.widths and min(block.widths) >= 2  # the block start's two chains, one matmat per pair of steps
    # the same Krylov spaces: the same products, but for the block's last products left unused when the run
    # stops (at most width - 1) and a step more or less from rounding (measured: 77 against 74 for seed 0)
    assert plain.num_matvecs - 1 <= res.num_matvecs <= plain.num_matvecs + max(block.widths)


def test_block_lanczos_through_a_batched_hessian_operator():
    model, data = _data(False)
    H = MAKERS["hessian_double_backprop"](model, data, batched_matmat=True)
    assert H.prefers_matmat and not MAKERS["hessian_double_backprop"](model, data).prefers_matmat
    ref = torch.linalg.eigvalsh(H.to_dense()).flip(0)[:2]
    res = lanczos(H, k=2, seed=0, tol=1e-8)
    assert res.all_converged
    torch.testing.assert_close(res.eigenvalues, ref, rtol=1e-7, atol=0)
