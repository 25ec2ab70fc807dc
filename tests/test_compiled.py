"""``compile=True`` (hessianflow.curvature.compiled): compiled products equal the eager ones and dense float64
references, repeated products compile nothing new, and a failure or a wrong compiled result falls back to
the eager product loudly (pytorch#190855: a compiled ``torch.func.hessian`` was silently wrong).

The tests that run inductor are marked slow (tens of seconds of compiling on two shared cores); the
refusals and the graph-break fallback (dynamo fails before inductor runs) are fast.
"""

import warnings

import pytest
import torch
from dense_reference import DT, ggn, hessian_rows, mlp, small_cnn, warm_batchnorm
from torch import nn
from torch._dynamo.utils import counters

from hessianflow import EmpiricalFisherOperator, GGNOperator, HessianOperator
from hessianflow.curvature.compiled import CheckedCompile, CompileStatus


def _rel(a, b):
    return float((a - b).norm() / b.norm())


def _mlp_case():
    torch.manual_seed(1)
    return mlp(5, 6, 3), nn.CrossEntropyLoss(), torch.randn(12, 5, dtype=DT), torch.randint(0, 3, (12,))


def _cnn_case():
    model = warm_batchnorm(small_cnn(seed=2, side=4, classes=3), (8, 2, 4, 4), scale=2.0, shift=0.5)
    torch.manual_seed(3)
    return model, nn.CrossEntropyLoss(), torch.randn(6, 2, 4, 4, dtype=DT), torch.randint(0, 3, (6,))


def _mse_case():
    torch.manual_seed(4)
    return mlp(4, 5, 2), nn.MSELoss(), torch.randn(10, 4, dtype=DT), torch.randn(10, 2, dtype=DT)


CASES = {"mlp_ce": _mlp_case, "cnn_bn_eval": _cnn_case, "mlp_mse_mean": _mse_case}


def _dense_hessian(model, crit, x, y):
    params = list(model.parameters())
    return hessian_rows(lambda: crit(model(x), y), params)


def _check_operator(cls, case, dense_of):
    model, crit, x, y = CASES[case]()
    eager = cls(model, crit, data=(x, y))
    comp = cls(model, crit, data=(x, y), compile=True)
    g = torch.Generator().manual_seed(0)
    v = torch.randn(eager.size, generator=g, dtype=DT)
    assert _rel(comp @ v, eager @ v) < 1e-12
    V = torch.randn(eager.size, 3, generator=g, dtype=DT)
    MV = comp.matmat(V)  # one vmapped compiled graph for k = 3 ...
    singles = torch.stack([comp @ V[:, j] for j in range(3)], dim=1)
    assert _rel(MV, singles) < 1e-12  # ... equal to three single compiled products
    dense = dense_of(model, crit, x, y)
    assert _rel(comp.to_dense(), dense) < 1e-12  # the independent reference
    st = comp.compile_status
    assert st.state == "compiled" and st.reason is None
    assert st.graphs == st.checks == 3  # k = 1, k = 3 and k = n (to_dense), each checked once
    assert st.max_check_error < 1e-12
    # repeated products with new vectors: no recompilation
    before = counters["stats"]["unique_graphs"]
    for _ in range(4):
        comp @ torch.randn(eager.size, generator=g, dtype=DT)
    assert counters["stats"]["unique_graphs"] == before and comp.compile_status.graphs == 3


@pytest.mark.slow
@pytest.mark.parametrize("case", sorted(CASES))
def test_compiled_hessian_equals_eager_and_dense(case):
    _check_operator(HessianOperator, case, _dense_hessian)


@pytest.mark.slow
@pytest.mark.parametrize("case", sorted(CASES))
def test_compiled_ggn_equals_eager_and_dense(case):
    _check_operator(GGNOperator, case, ggn)


@pytest.mark.slow
def test_compiled_fisher_equals_eager_and_closed_form():
    model, crit, x, y = _mlp_case()
    comp = EmpiricalFisherOperator(model, crit, data=(x, y), compile=True)
    eager = EmpiricalFisherOperator(model, crit, data=(x, y))
    F = comp.to_dense()
    assert _rel(F, eager.to_dense()) < 1e-12
    per_sample = torch.stack(
        [
            torch.cat(
                [
                    t.reshape(-1)
                    for t in torch.autograd.grad(crit(model(x[i : i + 1]), y[i : i + 1]), model.parameters())
                ]
            )
            for i in range(len(x))
        ]
    )
    assert _rel(F, per_sample.T @ per_sample / len(x)) < 1e-12
    assert comp.compile_status.state == "compiled" and comp.compile_status.checks == 1


@pytest.mark.slow
def test_compiled_loader_compiles_each_batch_shape_once():
    model, crit, x, y = _mlp_case()
    loader = [(x[:8], y[:8]), (x[8:], y[8:])]  # two shapes: two graphs, both checked
    comp = HessianOperator(model, crit, dataloader=loader, compile=True)
    dense = _dense_hessian(model, crit, x, y)
    v = torch.randn(comp.size, generator=torch.Generator().manual_seed(5), dtype=DT)
    assert _rel(comp @ v, dense @ v) < 1e-12
    assert comp @ v is not None and comp.compile_status.graphs == 2 == comp.compile_status.checks


@pytest.mark.slow
def test_a_wrong_compiled_result_falls_back_with_a_warning():
    checked = CheckedCompile(lambda x: x * 2.0, lambda x: x * 3.0, "a test product")
    x = torch.arange(4.0, dtype=DT)
    with pytest.warns(RuntimeWarning, match=r"a test product: compile=True fell back .* differs from the eager"):
        out = checked(x)
    assert torch.equal(out, x * 3.0)
    assert checked.status.state == "fallback" and checked.status.max_check_error == pytest.approx(1 / 3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # said once; eager from now on
        assert torch.equal(checked(x + 1), (x + 1) * 3.0)


def test_a_graph_break_falls_back_with_a_warning():
    def breaks(x):
        print("", end="")  # a graph break: fullgraph=True makes it an error, never a partly eager run
        return x + 1

    checked = CheckedCompile(breaks, lambda x: x + 1, "a test product")
    with pytest.warns(RuntimeWarning, match="compile=True fell back to the eager product for good: compiling failed"):
        out = checked(torch.ones(2, dtype=DT))
    assert torch.equal(out, torch.full((2,), 2.0, dtype=DT))
    st = checked.status
    assert st.state == "fallback" and st.graphs == 0 and st.reason.startswith("compiling failed")


def test_compile_refusals_and_default():
    model, crit, x, y = _mlp_case()
    with pytest.raises(ValueError, match="finite_difference"):
        HessianOperator(model, crit, data=(x, y), backend="finite_difference", compile=True)
    with pytest.raises(ValueError, match="per_sample='loop'"):
        EmpiricalFisherOperator(model, crit, data=(x, y), per_sample="loop", compile=True)
    assert HessianOperator(model, crit, data=(x, y)).compile_status is None
    assert CompileStatus().to_dict()["state"] == "pending"
