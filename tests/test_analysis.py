"""Per-layer curvature and the loss landscape, against dense float64 references and closed forms."""

import copy

import pytest
import torch
from dense_reference import func_hessian, small_cnn
from torch import nn

from hessianflow.curvature import GGNOperator, HessianOperator, exact_hessian
from hessianflow.curvature.analysis import LayerResult, layer_blocks, loss_landscape, per_layer
from hessianflow.linalg.eigen import lanczos

DT = torch.float64


def tiny_cnn(seed=0):
    model = small_cnn(seed, side=4, hidden=5)
    # non-trivial running statistics, so that eval mode differs from train mode
    model[1].running_mean.copy_(torch.tensor([0.1, -0.2, 0.05], dtype=DT))
    model[1].running_var.copy_(torch.tensor([0.8, 1.3, 0.6], dtype=DT))
    return model


def batch(n=20, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 2, 4, 4, generator=g, dtype=DT), torch.randint(0, 4, (n,), generator=g)


def block_slices(model):
    """Offsets of each layer block in the flat parameter vector (layer_blocks follows model order)."""
    out, off = {}, 0
    for name, params in layer_blocks(model):
        size = sum(p.numel() for p in params)
        out[name] = slice(off, off + size)
        off += size
    return out


CE = nn.CrossEntropyLoss()


# -- layer_blocks ------------------------------------------------------------------------------
def test_layer_blocks_names_order_shared_and_frozen():
    model = tiny_cnn()
    blocks = layer_blocks(model)
    assert [n for n, _ in blocks] == ["0", "1", "5", "7"]
    assert [len(ps) for _, ps in blocks] == [2, 2, 2, 2]
    # the blocks are the parameters in model order, each once
    flat = [p for _, ps in blocks for p in ps]
    assert [id(p) for p in flat] == [id(p) for p in model.parameters()]

    model[5].bias.requires_grad_(False)
    blocks = dict(layer_blocks(model))
    assert len(blocks["5"]) == 1 and blocks["5"][0] is model[5].weight

    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.enc = nn.Linear(3, 3)
            self.dec = nn.Linear(3, 3)
            self.dec.weight = self.enc.weight
            self.scale = nn.Parameter(torch.ones(1))

        def forward(self, x):
            return self.scale * self.dec(self.enc(x))

    names = [(n, len(ps)) for n, ps in layer_blocks(Tied())]
    assert names == [("(root)", 1), ("enc", 2), ("dec", 1)]
    with pytest.raises(ValueError, match="no parameter"):
        layer_blocks(nn.Sequential(nn.ReLU()))


# -- per_layer: exact blocks -------------------------------------------------------------------
def test_per_layer_exact_matches_dense_blocks_and_traces_add_up():
    model = tiny_cnn()
    x, y = batch()
    H = func_hessian(model.eval(), CE, x, y)  # [n, n], in eval mode as the operators default to
    results = per_layer(model, CE, data=(x, y), top_k=3, exact_threshold=10_000)
    slices = block_slices(model)
    assert [r.name for r in results] == list(slices)
    for r in results:
        Hb = H[slices[r.name], slices[r.name]]
        ref = torch.linalg.eigvalsh(Hb).flip(0)[: min(3, r.size)]
        assert r.exact and r.trace_stderr == 0.0 and r.all_converged
        assert r.size == Hb.shape[0] and r.num_matvecs == r.size
        torch.testing.assert_close(r.eigenvalues, ref, rtol=1e-9, atol=1e-12)
        assert r.eigenvalue == pytest.approx(float(ref[0]), rel=1e-9, abs=1e-12)
        assert r.trace == pytest.approx(float(Hb.trace()), rel=1e-9, abs=1e-12)
    # the block-diagonal part has the same diagonal as H: the traces add up to tr(H)
    total = sum(r.trace for r in results)
    assert total == pytest.approx(float(H.trace()), rel=1e-9)
    # interlacing: no block's top eigenvalue exceeds the whole Hessian's
    assert max(r.eigenvalue for r in results) <= float(torch.linalg.eigvalsh(H)[-1]) + 1e-10
    d = results[0].to_dict()
    assert d["exact"] is True and d["eigenvalue"] == results[0].eigenvalue
    assert d["param_names"] == ["0.weight", "0.bias"] and d["trace_stderr"] == 0.0


def test_per_layer_estimated_blocks_within_tolerance_and_standard_errors():
    model = tiny_cnn(seed=3)
    x, y = batch(seed=4)
    H = exact_hessian(model, CE, data=(x, y))
    slices = block_slices(model)
    results = per_layer(model, CE, data=(x, y), top_k=2, exact_threshold=0, trace_matvecs=24, tol=1e-8, seed=5)
    var = 0.0
    for r in results:
        Hb = H[slices[r.name], slices[r.name]]
        ref = torch.linalg.eigvalsh(Hb).flip(0)[:2]
        assert not r.exact and r.all_converged
        # residual tol 1e-8 bounds the eigenvalue error far below this
        torch.testing.assert_close(r.eigenvalues, ref, rtol=1e-7, atol=1e-9)
        exact_tr = float(Hb.trace())
        if r.size > 24:  # a genuine estimate (for n <= 24 the budget of 24 products gives the exact trace)
            assert r.trace_stderr > 0
            assert abs(r.trace - exact_tr) <= 4 * r.trace_stderr, (r.name, r.trace, exact_tr, r.trace_stderr)
        else:
            assert r.trace == pytest.approx(exact_tr, rel=1e-9)
        var += r.trace_stderr**2
    total = sum(r.trace for r in results)
    assert abs(total - float(H.trace())) <= 4 * var**0.5
    # same seed, same numbers
    kw = dict(data=(x, y), exact_threshold=0, trace_matvecs=24, seed=5, blocks=layer_blocks(model)[:1])
    first, again = per_layer(model, CE, **kw), per_layer(model, CE, **kw)
    other = per_layer(model, CE, **{**kw, "seed": 6})
    assert first[0].trace == again[0].trace and first[0].trace != other[0].trace


def test_per_layer_ggn_blocks_match_dense_ggn_and_are_psd():
    model = tiny_cnn(seed=2)
    x, y = batch(seed=2)
    G = GGNOperator(model, CE, data=(x, y)).to_dense()
    G = (G + G.T) / 2
    slices = block_slices(model)
    results = per_layer(model, CE, data=(x, y), top_k=2, operator="ggn")
    for r in results:
        ref = torch.linalg.eigvalsh(G[slices[r.name], slices[r.name]]).flip(0)[:2]
        torch.testing.assert_close(r.eigenvalues, ref, rtol=1e-9, atol=1e-12)
        assert float(r.eigenvalues.min()) >= -1e-12
        assert r.trace >= -1e-12


def test_per_layer_leaves_the_model_alone_and_loader_equals_batch():
    model = tiny_cnn()
    model.train()
    model[5].bias.requires_grad_(False)
    before = copy.deepcopy(model.state_dict())
    x, y = batch(n=24)
    whole = per_layer(model, CE, data=(x, y), exact_threshold=10_000)
    loader = [(x[:10], y[:10]), (x[10:], y[10:])]
    split = per_layer(model, CE, dataloader=loader, exact_threshold=10_000)
    for a, b in zip(whole, split):
        assert a.name == b.name
        assert a.eigenvalue == pytest.approx(b.eigenvalue, rel=1e-10)
        assert a.trace == pytest.approx(b.trace, rel=1e-10)
    assert model.training and all(m.training for m in model.modules())
    assert [p.requires_grad for p in model.parameters()] == [True, True, True, True, True, False, True, True]
    assert all(p.grad is None for p in model.parameters())
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    # the frozen bias is not part of block "5"
    assert dict((r.name, r.size) for r in whole)["5"] == 12 * 5


def test_per_layer_rejects_bad_arguments():
    model = tiny_cnn()
    x, y = batch()
    with pytest.raises(ValueError, match="operator"):
        per_layer(model, CE, data=(x, y), operator="magic")
    with pytest.raises(ValueError, match="top_k"):
        per_layer(model, CE, data=(x, y), top_k=0)
    with pytest.raises(ValueError, match="trace_matvecs"):
        per_layer(model, CE, data=(x, y), exact_threshold=0, trace_matvecs=3)
    with pytest.raises(ValueError, match="tol"):
        per_layer(model, CE, data=(x, y), tol=0.0)
    with pytest.raises(ValueError, match="blocks="):
        per_layer(model, CE, data=(x, y), params=["0"])
    with pytest.raises(ValueError, match="exactly one"):
        per_layer(model, CE)
    assert isinstance(per_layer(model, CE, data=(x, y), blocks=layer_blocks(model)[-1:])[0], LayerResult)


# -- loss_landscape ----------------------------------------------------------------------------
def test_landscape_is_exact_for_least_squares():
    """MSE of a linear model: L(w + a d) = mean((Xw - y + a Xd)^2) in closed form."""
    g = torch.Generator().manual_seed(0)
    X = torch.randn(30, 4, generator=g, dtype=DT)
    t = torch.randn(30, 1, generator=g, dtype=DT)
    model = nn.Linear(4, 1, bias=False).to(DT)
    d1 = torch.randn(4, generator=g, dtype=DT)
    d2 = torch.randn(4, generator=g, dtype=DT)
    alphas = torch.linspace(-2, 2, 5, dtype=DT)
    betas = torch.tensor([-1.0, 0.5, 3.0], dtype=DT)
    w = model.weight.detach().reshape(-1)
    r0 = X @ w - t[:, 0]
    curve = loss_landscape(model, nn.MSELoss(), (X, t), d1, alphas)
    ref = torch.stack([((r0 + a * (X @ d1)) ** 2).mean() for a in alphas])
    torch.testing.assert_close(curve, ref, rtol=1e-12, atol=0)
    grid = loss_landscape(model, nn.MSELoss(), (X, t), torch.stack([d1, d2], dim=1), alphas, betas)
    ref2 = torch.stack([torch.stack([((r0 + a * (X @ d1) + b * (X @ d2)) ** 2).mean() for b in betas]) for a in alphas])
    assert grid.shape == (5, 3) and grid.dtype == DT
    torch.testing.assert_close(grid, ref2, rtol=1e-12, atol=0)


def test_landscape_does_not_touch_the_model_and_centre_is_the_loss():
    model = tiny_cnn()
    model.train()
    x, y = batch()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ptrs = [p.data_ptr() for p in model.parameters()]
    n = sum(p.numel() for p in model.parameters())
    d = torch.randn(n, generator=torch.Generator().manual_seed(0), dtype=DT)
    out = loss_landscape(model, CE, (x, y), d, [-0.5, 0.0, 0.5])
    assert model.training and all(m.training for m in model.modules())
    assert [p.data_ptr() for p in model.parameters()] == ptrs
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k  # parameters and BatchNorm running statistics
    assert all(p.grad is None for p in model.parameters())
    model.eval()
    with torch.no_grad():
        centre = float(CE(model(x), y))
    assert float(out[1]) == pytest.approx(centre, rel=1e-13)
    assert float(out[0]) != pytest.approx(centre, rel=1e-3)  # the direction does move the loss


def test_landscape_curvature_along_top_eigenvectors_is_the_eigenvalue():
    """Central second differences along unit eigenvectors v1, v2 give lambda_1, lambda_2; the mixed
    difference gives v1^T H v2 = 0."""
    model = tiny_cnn(seed=1)
    x, y = batch(seed=1)
    op = HessianOperator(model, CE, data=(x, y))
    eig = lanczos(op, k=2, tol=1e-10, seed=0)
    lam1, lam2 = (float(v) for v in eig.eigenvalues)
    assert lam1 > lam2 > 0
    h = 1e-3
    curve = loss_landscape(model, CE, (x, y), eig.eigenvectors[:, 0], [-h, 0.0, h])
    second = float(curve[0] - 2 * curve[1] + curve[2]) / h**2
    assert second == pytest.approx(lam1, rel=1e-4)
    grid = loss_landscape(model, CE, (x, y), eig.eigenvectors, [-h, 0.0, h], [-h, 0.0, h])
    assert float(grid[1, 1]) == float(curve[1])
    torch.testing.assert_close(grid[:, 1], curve, rtol=1e-14, atol=0)
    second2 = float(grid[1, 0] - 2 * grid[1, 1] + grid[1, 2]) / h**2
    assert second2 == pytest.approx(lam2, rel=1e-4)
    mixed = float(grid[2, 2] - grid[2, 0] - grid[0, 2] + grid[0, 0]) / (4 * h**2)
    assert abs(mixed) <= 1e-4 * lam1


def test_landscape_loader_equals_batch_and_rejects_bad_input():
    model = tiny_cnn()
    x, y = batch(n=24)
    n = sum(p.numel() for p in model.parameters())
    d = torch.randn(n, generator=torch.Generator().manual_seed(1), dtype=DT)
    whole = loss_landscape(model, CE, (x, y), d, [-1.0, 0.3])
    split = loss_landscape(model, CE, dataloader=[(x[:7], y[:7]), (x[7:], y[7:])], directions=d, alphas=[-1.0, 0.3])
    torch.testing.assert_close(split, whole, rtol=1e-13, atol=0)
    first = loss_landscape(model, CE, dataloader=[(x[:7], y[:7]), (x[7:], y[7:])], directions=d, alphas=[0.3],
                           num_batches=1)  # fmt: skip
    assert float(first[0]) == pytest.approx(float(loss_landscape(model, CE, (x[:7], y[:7]), d, [0.3])[0]), rel=1e-13)
    # directions on a subset of the parameters
    sub = model[7].weight.numel() + model[7].bias.numel()
    e = torch.zeros(sub, dtype=DT)
    e[0] = 1.0
    full = torch.zeros(n, dtype=DT)
    full[n - sub] = 1.0
    a = loss_landscape(model, CE, (x, y), e, [0.7], params=["7"])
    b = loss_landscape(model, CE, (x, y), full, [0.7])
    assert float(a[0]) == pytest.approx(float(b[0]), rel=1e-13)
    with pytest.raises(ValueError, match="length"):
        loss_landscape(model, CE, (x, y), d[:-1], [0.0])
    with pytest.raises(ValueError, match="one direction"):
        loss_landscape(model, CE, (x, y), torch.stack([d, d], 1), [0.0])
    with pytest.raises(ValueError, match="two directions"):
        loss_landscape(model, CE, (x, y), d, [0.0], [0.0])
    with pytest.raises(ValueError, match="alphas"):
        loss_landscape(model, CE, (x, y), d, [])
    with pytest.raises(ValueError, match="NaN"):
        loss_landscape(model, CE, (x, y), d, [float("nan")])
    with pytest.raises(ValueError, match="exactly one"):
        loss_landscape(model, CE, directions=d, alphas=[0.0])
