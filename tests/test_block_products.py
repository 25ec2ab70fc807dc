"""Block products (issue 24): ``matmat`` of k columns as one batched pass equals k single products to 1e-12 in
float64 for every operator and backend, and ``batched_matmat="measure"`` times both ways once and keeps the
faster, its results equal either way."""

import pytest
import torch
from dense_reference import DT, mlp, small_cnn, warm_batchnorm
from torch import nn

from hessianflow import EmpiricalFisherOperator, GGNOperator, HessianOperator


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
