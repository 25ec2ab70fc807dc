"""The sampled (Monte Carlo) Fisher, ``GGNOperator(..., mc_samples=M, seed=)``, in float64.

Closed forms for the mean (logistic regression: :math:`X^\\top \\operatorname{diag}(p(1-p)) X / n`; softmax
regression; linear MSE: :math:`2 X^\\top X / (nC)` per output) and the exact mean squared error of the
estimator, :math:`\\mathbb{E}\\|F_M - G\\|_F^2 = V / M` with

.. math:: V = \\sum_t \\mathbb{E}_{\\tilde y}\\, \\| c_t J_t^\\top (g g^\\top - H_t) J_t \\|_F^2

computed by enumerating the outcomes (categorical, Bernoulli) or in closed form (Gaussian:
:math:`4 c_t^2 (\\operatorname{tr}(K_t)^2 + \\operatorname{tr}(K_t^2))`, :math:`K_t = J_t J_t^\\top`). The
measured mean squared error over seeds must be V/M within sampling (so it falls like 1/M, the error like
1/sqrt(M)), and the mean over seeds must be the GGN within its own standard error: a factor 2 or a missing
1/n puts the mean off by far more than that.
"""

import itertools
import math

import pytest
import torch
from dense_reference import need
from torch import nn

from hessianflow import GGNOperator
from hessianflow.curvature.losses import causal_lm_loss

DT = torch.float64
N, D = 6, 3


def _data(family, seed=0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(N, D, generator=g, dtype=DT)
    if family == "bernoulli":
        return X, (torch.rand(N, 1, generator=g, dtype=DT) < 0.5).to(DT), nn.BCEWithLogitsLoss(), 1
    if family == "categorical":
        return X, torch.randint(0, 3, (N,), generator=g), nn.CrossEntropyLoss(), 3
    return X, torch.randn(N, 2, generator=g, dtype=DT), nn.MSELoss(), 2


def _model(out, seed=1):
    torch.manual_seed(seed)
    return nn.Linear(D, out, bias=False).double()


def _jacobians(model, X):
    """``[n, C, P]``: the output Jacobian of each sample (the weight flattened row-major)."""
    w = model.weight.detach()
    J = torch.func.jacrev(lambda w_: X @ w_.T)(w)  # [n, C, C, D]
    return J.reshape(X.shape[0], w.shape[0], -1)


def _outcomes(family, f):
    """``[(probability, g)]``: the score outcomes of one position with output ``f`` (categorical, Bernoulli)."""
    if family == "categorical":
        p = torch.softmax(f, 0)
        return [(float(p[c]), p - torch.eye(len(p), dtype=DT)[c]) for c in range(len(p))]
    s = torch.sigmoid(f)
    outs = []
    for ys in itertools.product((0.0, 1.0), repeat=len(f)):
        y = torch.tensor(ys, dtype=DT)
        outs.append((float(torch.prod(torch.where(y == 1, s, 1 - s))), s - y))
    return outs


def _exact_and_variance(family, model, X, crit):
    """``(G, V)``: the exact GGN and the sampled Fisher's per-draw mean squared error (module docstring)."""
    J = _jacobians(model, X)
    F = (X @ model.weight.detach().T).detach()
    c = 1.0 / N if family == "categorical" else 1.0 / F.numel()
    if crit.reduction == "sum":
        c = 1.0
    P = J.shape[2]
    G, V = torch.zeros(P, P, dtype=DT), 0.0
    for t in range(N):
        Jt = J[t]
        if family == "gaussian":
            K = Jt @ Jt.T
            G += c * 2 * Jt.T @ Jt
            V += 4 * c**2 * (float(torch.trace(K)) ** 2 + float(torch.trace(K @ K)))
            continue
        outs = _outcomes(family, F[t])
        H = sum(pr * torch.outer(g, g) for pr, g in outs)
        G += c * Jt.T @ H @ Jt
        V += sum(pr * float(((c * Jt.T @ (torch.outer(g, g) - H) @ Jt) ** 2).sum()) for pr, g in outs)
    return G, V


def _closed_form(family, model, X):
    """The GGN from its textbook formula (not from the Jacobians above)."""
    F = X @ model.weight.detach().T
    if family == "bernoulli":  # logistic regression
        p = torch.sigmoid(F[:, 0])
        return X.T @ torch.diag(p * (1 - p)) @ X / N
    if family == "gaussian":  # 2 X^T X / (n C) for each of the C outputs
        return torch.block_diag(*[2 * X.T @ X / F.numel()] * F.shape[1])
    p = torch.softmax(F, 1)  # softmax regression: sum_i (diag(p_i) - p_i p_i^T) kron x_i x_i^T / n
    return sum(torch.kron(torch.diag(p[i]) - torch.outer(p[i], p[i]), torch.outer(X[i], X[i])) for i in range(N)) / N


@pytest.mark.parametrize("family", ["bernoulli", "categorical", "gaussian"])
def test_mean_is_the_ggn_and_error_falls_like_one_over_sqrt_m(family):
    X, y, crit, C = _data(family)
    model = _model(C)
    G, V = _exact_and_variance(family, model, X, crit)
    assert torch.allclose(G, _closed_form(family, model, X), rtol=1e-12, atol=1e-14)
    assert torch.allclose(GGNOperator(model, crit, data=(X, y)).to_dense(), G, rtol=1e-12, atol=1e-14)
    S = 48
    for M in (1, 16, 256):
        Fs = torch.stack([GGNOperator(model, crit, data=(X, y), mc_samples=M, seed=s).to_dense() for s in range(S)])
        mse = float(((Fs - G) ** 2).sum(dim=(1, 2)).mean())
        assert 0.6 < mse / (V / M) < 1.6, (M, mse, V / M)  # the error is sqrt(V/M): like 1/sqrt(M)
        bias = float(((Fs.mean(0) - G) ** 2).sum())
        assert bias < 6 * V / (M * S), (M, bias, V / (M * S))  # unbiased (a factor 2 gives ~1e4 times this)
        assert bool((torch.linalg.eigvalsh(Fs) > -1e-12).all())  # positive semi-definite draws


def test_wrong_scalings_would_fail():
    """The bounds above catch a factor 2 and a missing 1/n: what their means would be is far outside."""
    X, y, crit, C = _data("bernoulli")
    model = _model(C)
    G, V = _exact_and_variance("bernoulli", model, X, crit)
    for wrong in (2 * G, N * G, G / 2):
        assert float(((wrong - G) ** 2).sum()) > 100 * 6 * V / (256 * 48)


@pytest.mark.parametrize("family", ["bernoulli", "categorical", "gaussian"])
def test_same_seed_same_matrix_other_seed_other_matrix(family):
    X, y, crit, C = _data(family)
    model = _model(C)
    op = GGNOperator(model, crit, data=(X, y), mc_samples=3, seed=7)
    A, B = op.to_dense(), op.to_dense()
    assert torch.equal(A, B)
    assert torch.equal(A, GGNOperator(model, crit, data=(X, y), mc_samples=3, seed=7).to_dense())
    other = GGNOperator(model, crit, data=(X, y), mc_samples=3, seed=8).to_dense()
    assert float((other - A).norm()) > 1e-3 * float(A.norm())
    assert torch.allclose(A, A.T, atol=1e-15)


@pytest.mark.parametrize("family", ["bernoulli", "categorical", "gaussian"])
def test_splits_draw_the_same_targets(family):
    """Micro-batches and a loader's batches of the same samples in the same order: the same matrix as the
    whole batch (the draws are sample-major), weighted by the units as the exact GGN is."""
    X, y, crit, C = _data(family)
    model = _model(C)
    whole = GGNOperator(model, crit, data=(X, y), mc_samples=4, seed=3).to_dense()
    micro = GGNOperator(model, crit, data=(X, y), mc_samples=4, seed=3, micro_batch_size=4).to_dense()
    loader = [(X[:2], y[:2]), (X[2:], y[2:])]
    split = GGNOperator(model, crit, dataloader=loader, mc_samples=4, seed=3).to_dense()
    assert torch.allclose(micro, whole, rtol=1e-12, atol=1e-15)
    assert torch.allclose(split, whole, rtol=1e-12, atol=1e-15)


def test_ignored_targets_weighted_like_the_exact_ggn():
    """Cross-entropy with ignored targets over a loader of unequal counted targets: with many draws the
    sampled Fisher is the exact GGN (mean over the counted targets), and a split draws the same."""
    X, y, crit, C = _data("categorical")
    y = y.clone()
    y[[0, 1, 4]] = -100
    model = _model(C)
    loader = [(X[:3], y[:3]), (X[3:], y[3:])]
    exact = GGNOperator(model, crit, dataloader=loader).to_dense()
    mc = GGNOperator(model, crit, dataloader=loader, mc_samples=20000, seed=0).to_dense()
    whole = GGNOperator(model, crit, data=(X, y), mc_samples=20000, seed=0).to_dense()
    assert torch.allclose(mc, whole, rtol=1e-12, atol=1e-15)
    assert float((mc - exact).norm() / exact.norm()) < 0.03  # ~1/sqrt(20000) relative, measured 0.006


def test_sequence_model_positions():
    """A causal LM's loss (extra output dimensions, shifted labels): the draws per position converge to the
    exact GGN, and splitting the batch into micro-batches draws the same targets."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(5, 3), nn.Linear(3, 5)).double()
    wrapped = _LogitsOnly(model)
    ids = torch.randint(0, 5, (4, 6))
    batch = {"input_ids": ids, "labels": ids.clone()}
    exact = GGNOperator(wrapped, loss_fn=causal_lm_loss, data=batch).to_dense()
    mc = GGNOperator(wrapped, loss_fn=causal_lm_loss, data=batch, mc_samples=20000, seed=1).to_dense()
    micro = GGNOperator(wrapped, loss_fn=causal_lm_loss, data=batch, mc_samples=20000, seed=1, micro_batch_size=3)
    assert float((mc - exact).norm() / exact.norm()) < 0.03
    assert torch.allclose(micro.to_dense(), mc, rtol=1e-11, atol=1e-14)


class _LogitsOnly(nn.Module):
    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, input_ids, labels=None):
        return type("Out", (), {"logits": self.net(input_ids)})()


@pytest.mark.parametrize(
    "crit",
    [nn.L1Loss(), nn.CrossEntropyLoss(label_smoothing=0.1), nn.BCEWithLogitsLoss(pos_weight=torch.ones(1))],
    ids=["l1", "label_smoothing", "pos_weight"],
)
def test_unsupported_loss_refused_in_one_sentence(crit):
    X, y, _, _ = _data("bernoulli")
    y = y.long()[:, 0] if isinstance(crit, nn.CrossEntropyLoss) else y
    model = _model(1 if not isinstance(crit, nn.CrossEntropyLoss) else 3)
    with pytest.raises(ValueError) as err:
        GGNOperator(model, crit, data=(X, y), mc_samples=2).to_dense()
    msg = str(err.value)
    assert msg.count(". ") == 0 and ("predictive distribution" in msg or "plain softmax" in msg), msg


def test_options_checked():
    X, y, crit, C = _data("gaussian")
    with pytest.raises(ValueError, match="mc_samples"):
        GGNOperator(_model(C), crit, data=(X, y), mc_samples=0)
    with pytest.raises(ValueError, match="seed"):
        GGNOperator(_model(C), crit, data=(X, y), mc_samples=1, seed=1.5)
    with pytest.raises(ValueError, match="analytic_cross_entropy"):
        GGNOperator(_model(C), crit, data=(X, y), mc_samples=1, analytic_cross_entropy=True)
    with pytest.raises(ValueError, match="shaped like the output"):
        GGNOperator(_model(C), crit, data=(X, y[:, :1]), mc_samples=1).to_dense()


def test_shuffled_loader_is_not_a_fixed_matrix():
    X, y, crit, C = _data("gaussian")
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(X, y), batch_size=2, shuffle=True)
    with pytest.warns(RuntimeWarning, match="shuffled"):
        op = GGNOperator(_model(C), crit, dataloader=loader, mc_samples=1)
    assert op.deterministic is False
    assert GGNOperator(_model(C), crit, dataloader=loader).deterministic is True  # the exact GGN does not care


@pytest.mark.parametrize("family", ["bernoulli", "categorical", "gaussian"])
def test_curvlinops_mc_fisher_is_the_same_estimator(family):
    """curvlinops' ``FisherMCLinearOperator`` (one outer product per position over the class or last
    dimension, variance 1/2 for MSE, 1/(N C) for a mean MSE/BCE) on the shared case: its draws have the
    same mean (the GGN) and the same mean squared error V/M as hessianflow's, and with many draws the two
    matrices agree within a few standard errors."""
    cl = need("curvlinops", "test")
    X, y, crit, C = _data(family)
    model = _model(C)
    G, V = _exact_and_variance(family, model, X, crit)
    params = [model.weight]
    P = model.weight.numel()
    M, S = 16, 48
    Fs = torch.stack(
        [
            cl.FisherMCLinearOperator(model, crit, params, [(X, y)], seed=s, mc_samples=M, check_deterministic=False)
            @ torch.eye(P, dtype=DT)
            for s in range(S)
        ]
    )
    mse = float(((Fs - G) ** 2).sum(dim=(1, 2)).mean())
    assert 0.6 < mse / (V / M) < 1.6, (mse, V / M)
    assert float(((Fs.mean(0) - G) ** 2).sum()) < 6 * V / (M * S)
    big = 4000
    ours = GGNOperator(model, crit, data=(X, y), mc_samples=big, seed=0).to_dense()
    theirs = cl.FisherMCLinearOperator(
        model, crit, params, [(X, y)], seed=0, mc_samples=big, check_deterministic=False
    ) @ torch.eye(P, dtype=DT)
    assert float(((ours - theirs) ** 2).sum()) < 5 * 2 * V / big  # two independent errors of V/big each
    assert math.isfinite(float(theirs.sum()))


def test_one_dimensional_outputs():
    """A model with outputs ``[n]`` (no event dimension): each element its own position; MSE's sampled
    Fisher converges to 2 X^T X / n, and splits draw the same targets."""
    X, _, _, _ = _data("gaussian")
    y = torch.randn(N, dtype=DT)
    model = nn.Sequential(nn.Linear(D, 1, bias=False), nn.Flatten(0)).double()
    exact = 2 * X.T @ X / N
    mc = GGNOperator(model, nn.MSELoss(), data=(X, y), mc_samples=40000, seed=0).to_dense()
    assert float((mc - exact).norm() / exact.norm()) < 0.03
    few = GGNOperator(model, nn.MSELoss(), data=(X, y), mc_samples=3, seed=2).to_dense()
    micro = GGNOperator(model, nn.MSELoss(), data=(X, y), mc_samples=3, seed=2, micro_batch_size=4).to_dense()
    assert torch.allclose(few, micro, rtol=1e-12, atol=1e-15)


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed not built")
def test_one_rank_process_group_draws_as_one_process(tmp_path):
    """distributed=True in a real one-rank gloo group: the rank-mixed seed of rank 0 is the seed, and the
    products summed over the (one) rank are the same matrix as without a group."""
    import torch.distributed as dist

    X, y, crit, C = _data("categorical")
    model = _model(C)
    loader = [(X[:4], y[:4]), (X[4:], y[4:])]
    plain = GGNOperator(model, crit, dataloader=loader, mc_samples=5, seed=4).to_dense()
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        op = GGNOperator(model, crit, dataloader=loader, mc_samples=5, seed=4, distributed=True)
        assert op.distributed
        ranked = op.to_dense()
    finally:
        dist.destroy_process_group()
    assert torch.allclose(ranked, plain, rtol=1e-12, atol=1e-15)
