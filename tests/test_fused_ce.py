"""The fused, chunked softmax cross-entropy curvature (hessianflow.curvature.fused_ce) in float64: against the
explicit per-row Jacobian ``diag(p) - p p^T``, and through the operators (``fused_cross_entropy=``) against the
analytic GGN path, the eager Hessian and dense references, with ignore_index and counted-token weighting."""

import pytest
import torch
import torch.nn.functional as F
from dense_reference import DT, ggn, hessian_rows, mlp
from objective_cases import TinyLM, tokens
from torch import nn

from hessianflow import EmpiricalFisherOperator, GGNOperator, HessianOperator
from hessianflow.curvature.fused_ce import FusedSoftmaxCE, _rows, fused_cross_entropy, softmax_ce_hvp
from hessianflow.curvature.losses import causal_lm_loss


def _rel(a, b):
    return float((a - b).norm() / b.norm())


def _explicit(logits, u, weight):
    """Row by row with the softmax Jacobian formed: ``[rows, V]`` logits, ``[rows, V]`` u, ``[rows]`` weight."""
    rows = []
    for z, v, w in zip(logits, u, weight):
        p = torch.softmax(z, 0)
        rows.append(w * (torch.diag(p) - torch.outer(p, p)) @ v)
    return torch.stack(rows)


@pytest.mark.parametrize("chunk_rows", [None, 1, 3, 7])
def test_kernel_equals_the_explicit_jacobian_product(chunk_rows):
    g = torch.Generator().manual_seed(0)
    logits = 3 * torch.randn(10, 6, generator=g, dtype=DT)
    u = torch.randn(2, 10, 6, generator=g, dtype=DT)  # k = 2 vectors at once
    weight = torch.rand(10, generator=g, dtype=DT)
    weight[[2, 5]] = 0  # ignored positions
    out = softmax_ce_hvp(logits, u, weight, chunk_rows=chunk_rows)
    for j in range(2):
        ref = _explicit(logits, u[j], weight)
        assert _rel(out[j], ref) < 1e-14
        assert torch.all(out[j][[2, 5]] == 0)
        assert _rel(softmax_ce_hvp(logits, u[j], weight, chunk_rows=chunk_rows), ref) < 1e-14


def test_kernel_with_classes_along_dim_1_and_in_place():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(3, 5, 4, generator=g, dtype=DT)  # [N, C, d]: classes along dim 1
    u = torch.randn(3, 5, 4, generator=g, dtype=DT)
    ref = _explicit(
        logits.movedim(1, -1).reshape(-1, 5), u.movedim(1, -1).reshape(-1, 5), torch.full((12,), 0.5, dtype=DT)
    )
    out = softmax_ce_hvp(logits, u, 0.5, dim=1, chunk_rows=5)
    assert _rel(out.movedim(1, -1).reshape(-1, 5), ref) < 1e-14
    # written over u's own storage (the GGN's J v) when asked
    last = torch.randn(12, 5, generator=g, dtype=DT)
    uu = torch.randn(12, 5, generator=g, dtype=DT)
    expected = _explicit(last, uu, torch.ones(12, dtype=DT))
    kernel = FusedSoftmaxCE(chunk_rows=4)
    res = kernel.apply(last, 1.0, -1, uu, out=uu)
    assert res is uu and _rel(uu, expected) < 1e-14


def test_fused_cross_entropy_derivatives_equal_torch_s():
    g = torch.Generator().manual_seed(2)
    z = torch.randn(4, 6, 3, generator=g, dtype=DT, requires_grad=True)
    t = torch.randint(0, 6, (4, 3), generator=g)
    t[0, 1] = t[2, 2] = -100
    u = torch.randn(4, 6, 3, generator=g, dtype=DT)
    for reduction in ("mean", "sum"):
        res = []
        for f in (fused_cross_entropy, F.cross_entropy):
            loss = f(z, t, reduction=reduction)
            (gz,) = torch.autograd.grad(loss, z, create_graph=True)
            res.append((loss.detach(), gz.detach(), torch.autograd.grad(gz, z, u)[0]))
        for a, b in zip(*res):
            assert _rel(a, b) < 1e-14


def _counting(op, kernel):
    """Count the calls of the operator's fused kernel (so a test fails if the option were ignored)."""
    calls = []

    def counted(*args):
        calls.append(1)
        return _rows(*args)

    kernel.kernel = counted
    return calls


def _lm_case(seed=0, n=3):
    g = torch.Generator().manual_seed(seed)
    return TinyLM(vocab=7, seed=seed), tokens(g, n, ignore=0.3)


def test_ggn_fused_equals_the_analytic_path_and_dense():
    torch.manual_seed(5)
    model, crit = mlp(4, 5, 3), nn.CrossEntropyLoss(ignore_index=1)
    x, y = torch.randn(9, 4, dtype=DT), torch.randint(0, 3, (9,))
    dense = ggn(model, crit, x, y)
    for fused in (True,):
        G = GGNOperator(model, crit, data=(x, y), fused_cross_entropy=fused)
        assert _rel(G.to_dense(), dense) < 1e-12
    # a causal LM with ignored labels (its mean over counted tokens), one batch and a loader of two
    model, batch = _lm_case()
    analytic = GGNOperator(model, loss_fn=causal_lm_loss, data=batch)
    fused = GGNOperator(model, loss_fn=causal_lm_loss, data=batch, fused_cross_entropy=True)
    calls = _counting(fused, fused.product.fused)
    assert _rel(fused.to_dense(), analytic.to_dense()) < 1e-12 and calls
    loader = [_lm_case(1, 2)[1], _lm_case(2, 4)[1]]
    counted = dict(batch_weight=lambda b: int((b["labels"][:, 1:] != -100).sum()))
    a = GGNOperator(model, loss_fn=causal_lm_loss, dataloader=loader, **counted).to_dense()
    f = GGNOperator(model, loss_fn=causal_lm_loss, dataloader=loader, fused_cross_entropy=True, **counted).to_dense()
    assert _rel(f, a) < 1e-12


def test_hessian_fused_equals_dense_and_the_eager_product():
    torch.manual_seed(6)
    model, crit = mlp(4, 5, 3), nn.CrossEntropyLoss(ignore_index=2, reduction="sum")
    x, y = torch.randn(9, 4, dtype=DT), torch.randint(0, 3, (9,))
    dense = hessian_rows(lambda: crit(model(x), y), list(model.parameters()))
    H = HessianOperator(model, crit, data=(x, y), fused_cross_entropy=True)
    assert _rel(H.to_dense(), dense) < 1e-12
    model, batch = _lm_case(3)
    eager = HessianOperator(model, loss_fn=causal_lm_loss, data=batch).to_dense()
    H = HessianOperator(model, loss_fn=causal_lm_loss, data=batch, fused_cross_entropy=True)
    calls = _counting(H, H._fused_ce.args[0])
    assert _rel(H.to_dense(), eager) < 1e-12 and calls


def test_fused_refusals():
    torch.manual_seed(7)
    model, crit = mlp(4, 5, 3), nn.CrossEntropyLoss()
    data = (torch.randn(5, 4, dtype=DT), torch.randint(0, 3, (5,)))
    with pytest.raises(ValueError, match="False, True or 'compiled'"):
        GGNOperator(model, crit, data=data, fused_cross_entropy="yes")
    with pytest.raises(ValueError, match="compile=True compiles the whole product"):
        GGNOperator(model, crit, data=data, fused_cross_entropy=True, compile=True)
    with pytest.raises(ValueError, match="not to EmpiricalFisher"):
        EmpiricalFisherOperator(model, crit, data=data, fused_cross_entropy=True)
    with pytest.raises(ValueError, match="not to ForwardOverReverse"):
        HessianOperator(model, crit, data=data, backend="forward_over_reverse", fused_cross_entropy=True)
    with pytest.raises(ValueError, match="chunk_rows"):
        FusedSoftmaxCE(chunk_rows=0)


@pytest.mark.slow
def test_compiled_kernel_equals_the_eager_one():
    g = torch.Generator().manual_seed(8)
    logits = 3 * torch.randn(10, 6, generator=g, dtype=DT)
    u = torch.randn(1, 10, 6, generator=g, dtype=DT)
    weight = torch.rand(10, generator=g, dtype=DT)
    kernel = FusedSoftmaxCE(chunk_rows=4, compiled=True)  # chunks of 4, 4, 2: two graphs
    out = kernel.apply(logits, weight, -1, u)
    assert _rel(out[0], _explicit(logits, u[0], weight)) < 1e-14
    st = kernel.status
    assert st.state == "compiled" and st.graphs == st.checks == 2 and st.max_check_error < 1e-14
    model, batch = _lm_case(4)
    a = GGNOperator(model, loss_fn=causal_lm_loss, data=batch).to_dense()
    c = GGNOperator(model, loss_fn=causal_lm_loss, data=batch, fused_cross_entropy="compiled")
    assert _rel(c.to_dense(), a) < 1e-12 and c.compile_status.state == "compiled"
