"""Curvature operators against dense float64 references: torch.func.hessian and closed forms."""

import copy

import pytest
import torch
from dense_reference import ViewNet, func_hessian, ggn, mlp, small_cnn, warm_batchnorm
from torch import nn

from hessianflow.curvature import GGNOperator, HessianOperator, exact_hessian, resolve_params
from hessianflow.curvature.hvp import flatten, unflatten
from hessianflow.linalg.linop import NonFiniteError

DT = torch.float64
RTOL = 1e-10


def assert_close(a, b, rtol=RTOL):
    scale = b.abs().max().clamp_min(1e-300)
    err = (a - b).abs().max() / scale
    assert err <= rtol, f"relative error {err:.3e} > {rtol:.1e}"


def classification_batch(n=24, d=6, c=4, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g, dtype=DT), torch.randint(0, c, (n,), generator=g)


@pytest.fixture
def cnn_and_batch():
    model = warm_batchnorm(small_cnn(), (16, 2, 6, 6), scale=2.0, shift=0.5)
    g = torch.Generator().manual_seed(3)
    return model, torch.randn(10, 2, 6, 6, generator=g, dtype=DT), torch.randint(0, 4, (10,), generator=g)


@pytest.mark.parametrize("backend", ["double_backprop", "forward_over_reverse"])
@pytest.mark.parametrize("reuse", [True, False])
def test_mlp_hessian_matches_torch_func(backend, reuse):
    model, crit = mlp(6, 8, 5, 4), nn.CrossEntropyLoss()
    x, y = classification_batch()
    ref = func_hessian(model, crit, x, y)
    H = HessianOperator(model, crit, data=(x, y), backend=backend, reuse_graph=reuse, batched_matmat=True)
    assert H.size == ref.shape[0] and H.dtype == DT
    V = torch.randn(H.size, 5, dtype=DT, generator=torch.Generator().manual_seed(0))
    assert_close(torch.stack([H @ V[:, j] for j in range(5)], 1), ref @ V)
    assert_close(H.matmat(V), ref @ V)
    assert H._batched_ok  # the batched path really ran (no fallback)
    assert H.num_matvecs == 10
    loop = HessianOperator(model, crit, data=(x, y), backend=backend, reuse_graph=reuse, batched_matmat=False)
    assert_close(loop.matmat(V), ref @ V)
    assert_close(exact_hessian(model, crit, data=(x, y)), ref)


def test_cnn_with_batchnorm_eval_mode(cnn_and_batch):
    model, x, y = cnn_and_batch
    crit = nn.CrossEntropyLoss()
    ref = func_hessian(model, crit, x, y)  # model is in eval mode: running statistics
    model.train()  # the operator must switch to eval by default, and switch back
    running = model[1].running_mean.clone()
    H = HessianOperator(model, crit, data=(x, y))
    dense = H.to_dense()
    assert_close(dense, ref)
    assert model.training and model[1].training
    assert torch.equal(model[1].running_mean, running)
    # train mode is a different function (batch statistics): the option must really change it
    Ht = HessianOperator(model, crit, data=(x, y), train_mode=True).to_dense()
    assert (Ht - ref).abs().max() > 1e-6 * ref.abs().max()
    # Reference for train mode: central differences of the autograd gradient on a copy. (torch.func.hessian
    # is no reference here: on torch 2.14 its jacfwd(jacrev) of this train-mode BatchNorm gave products
    # H v off by up to 0.26 from the finite differences, while both of our backends agree with them to 1e-8.)
    twin = copy.deepcopy(model).train()
    ps = list(twin.parameters())

    def grad_at(flat):
        with torch.no_grad():
            for p, q in zip(ps, unflatten(flat, ps)):
                p.copy_(q)
        return flatten(torch.autograd.grad(crit(twin(x), y), ps))

    base = flatten([p.detach().clone() for p in ps])
    V = torch.randn(len(base), 3, dtype=DT, generator=torch.Generator().manual_seed(4))
    h = 1e-5
    fd = torch.stack([(grad_at(base + h * V[:, j]) - grad_at(base - h * V[:, j])) / (2 * h) for j in range(3)], 1)
    assert_close(Ht @ V, fd, 1e-7)  # central differences: O(h^2) truncation, O(eps/h) rounding
    assert model.training and torch.equal(model[1].running_mean, running)  # statistics not updated
    Hf = HessianOperator(model, crit, data=(x, y), train_mode=True, backend="forward_over_reverse")
    assert_close(Hf.matmat(V), Ht @ V)


def test_least_squares_closed_form():
    # L = mean_i (w.x_i + b - y_i)^2: H = 2/n [X 1]^T [X 1]
    g = torch.Generator().manual_seed(5)
    X = torch.randn(30, 4, generator=g, dtype=DT)
    y = torch.randn(30, 1, generator=g, dtype=DT)
    model = nn.Linear(4, 1).to(DT)
    Xa = torch.cat([X, torch.ones(30, 1, dtype=DT)], 1)
    expected = 2 * Xa.T @ Xa / 30
    assert_close(HessianOperator(model, nn.MSELoss(), data=(X, y)).to_dense(), expected, 1e-12)


def test_logistic_regression_closed_form():
    g = torch.Generator().manual_seed(6)
    X = torch.randn(40, 3, generator=g, dtype=DT)
    y = (torch.rand(40, 1, generator=g, dtype=DT) > 0.5).to(DT)
    model = nn.Linear(3, 1, bias=False).to(DT)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[0.7, -1.2, 0.4]], dtype=DT))
    p = torch.sigmoid(X @ model.weight.T).squeeze(1)
    expected = X.T @ torch.diag(p * (1 - p)) @ X / 40
    assert_close(HessianOperator(model, nn.BCEWithLogitsLoss(), data=(X, y)).to_dense(), expected, 1e-12)


def test_softmax_regression_closed_form():
    # H = 1/n sum_i (diag(p_i) - p_i p_i^T) kron x_i x_i^T, for W flattened row-major ([c, d])
    g = torch.Generator().manual_seed(7)
    n, d, c = 25, 3, 4
    X = torch.randn(n, d, generator=g, dtype=DT)
    y = torch.randint(0, c, (n,), generator=g)
    model = nn.Linear(d, c, bias=False).to(DT)
    P = torch.softmax(model(X), 1).detach()
    expected = (
        sum(torch.kron(torch.diag(P[i]) - torch.outer(P[i], P[i]), torch.outer(X[i], X[i])) for i in range(n)) / n
    )
    assert_close(HessianOperator(model, nn.CrossEntropyLoss(), data=(X, y)).to_dense(), expected, 1e-12)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_dataloader_unequal_batches_equals_whole_data(reduction):
    model = mlp(6, 8, 5, 4)
    crit = nn.CrossEntropyLoss(reduction=reduction)
    x, y = classification_batch(n=23)
    ref = func_hessian(model, crit, x, y)  # the loss over all 23 samples at once
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=5)  # 5,5,5,5,3
    H = HessianOperator(model, crit, dataloader=loader)
    assert_close(H.to_dense(), ref)
    assert H.num_samples == 23
    # equal-weight averaging of batch Hessians (hessian-eigenthings) is measurably different here
    batch_mean = sum(func_hessian(model, crit, xb, yb) for xb, yb in loader) / len(loader)
    if reduction == "mean":
        assert (batch_mean - ref).abs().max() > 1e-4 * ref.abs().max()
    # the first N batches only
    H2 = HessianOperator(model, crit, dataloader=loader, num_batches=2)
    assert_close(H2.to_dense(), func_hessian(model, crit, x[:10], y[:10]))


def test_parameter_subset_is_the_dense_block():
    model, crit = mlp(6, 8, 5, 4), nn.CrossEntropyLoss()
    x, y = classification_batch()
    ref = func_hessian(model, crit, x, y)
    names = [n for n, _ in model.named_parameters()]
    sizes = [p.numel() for p in model.parameters()]
    offsets = [sum(sizes[:i]) for i in range(len(sizes) + 1)]
    # by names, by module and by tensors: layer "2" (weight, bias) and the last bias
    for spec in (["2", "4.bias"], [model[2], model[4].bias], ["2.weight", "2.bias", "4.bias"]):
        H = HessianOperator(model, crit, data=(x, y), params=spec)
        assert H.param_names == ["2.weight", "2.bias", "4.bias"]
        idx = torch.cat([torch.arange(offsets[names.index(n)], offsets[names.index(n) + 1]) for n in H.param_names])
        assert_close(H.to_dense(), ref[idx][:, idx])


def test_ggn_equals_dense_jt_h_j():
    model, crit = mlp(6, 8, 5, 4), nn.CrossEntropyLoss()
    x, y = classification_batch()
    expected = ggn(model, crit, x, y)
    G = GGNOperator(model, crit, data=(x, y))
    assert_close(G.to_dense(), expected)
    V = torch.randn(G.size, 3, dtype=DT, generator=torch.Generator().manual_seed(2))
    assert_close(G.matmat(V), expected @ V)
    assert torch.linalg.eigvalsh(expected).min() > -1e-12  # PSD, as the GGN of a convex loss must be
    # and it is not the Hessian
    assert (expected - func_hessian(model, crit, x, y)).abs().max() > 1e-3


@pytest.mark.parametrize("kind", ["hessian", "ggn"])
def test_release_then_reuse_rebuilds_the_graph_at_the_current_weights(kind):
    """``release()`` frees the reused first-order graph; the next product rebuilds it, from the weights as
    they are then (a product through the released graph would use freed or stale tensors)."""
    model, crit = mlp(6, 8, 5, 4), nn.CrossEntropyLoss()
    x, y = classification_batch()
    Op, reference = {"hessian": (HessianOperator, func_hessian), "ggn": (GGNOperator, ggn)}[kind]
    op = Op(model, crit, data=(x, y))
    assert op.reuse_graph
    g = torch.Generator().manual_seed(8)
    v, V = torch.randn(op.size, generator=g, dtype=DT), torch.randn(op.size, 3, generator=g, dtype=DT)
    before = reference(model, crit, x, y)
    assert_close(op.matvec(v), before @ v)
    op.release()
    assert_close(op.matvec(v), before @ v)
    op.release()
    assert_close(op.matmat(V), before @ V)  # the batched product after a release too
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1.5)
    op.release()
    after = reference(model, crit, x, y)
    assert (after - before).abs().max() > 0.1 * before.abs().max()  # the new weights' curvature differs
    assert_close(op.matvec(v), after @ v)
    assert_close(op.matmat(V), after @ V)  # and the rebuilt graph is reused


def test_library_leaves_model_state_alone():
    model, crit = mlp(6, 8, 5, 4), nn.CrossEntropyLoss()
    x, y = classification_batch()
    model[0].weight.requires_grad_(False)
    sentinel = torch.full_like(model[2].weight, 7.0)
    model[2].weight.grad = sentinel.clone()
    before = [p.detach().clone() for p in model.parameters()]
    model.train()
    H = HessianOperator(model, crit, data=(x, y), params=["0.weight", "2.weight"])
    H @ torch.ones(H.size, dtype=DT)
    H.matmat(torch.ones(H.size, 2, dtype=DT))
    assert model.training
    assert model[0].weight.requires_grad is False  # restored after being switched on for the product
    assert torch.equal(model[2].weight.grad, sentinel)  # .grad untouched
    assert model[4].weight.grad is None
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_parameters_without_gradient_give_zeros():
    class Partly(nn.Module):
        def __init__(self):
            super().__init__()
            self.used = nn.Linear(3, 2)
            self.unused = nn.Linear(3, 2)
            self.linear_only = nn.Parameter(torch.zeros(2))  # a bias on the logits

        def forward(self, x):
            return torch.tanh(self.used(x)) + self.linear_only

    model = Partly().to(DT)
    x, y = classification_batch(n=8, d=3, c=2)
    H = HessianOperator(model, nn.CrossEntropyLoss(), data=(x, y))
    dense = H.to_dense()
    ref = func_hessian(model, nn.CrossEntropyLoss(), x, y)
    assert_close(dense, ref)
    sizes = {n: p.numel() for n, p in model.named_parameters()}
    names = list(sizes)
    start = sum(sizes[n] for n in names[: names.index("unused.weight")])
    assert torch.count_nonzero(dense[start : start + 8]) == 0  # the unused layer's rows: zeros
    lin = sum(sizes[n] for n in names[: names.index("linear_only")])
    # the logit bias still has curvature through the softmax: zeros must be confined to the unused layer
    assert dense[lin : lin + 2].abs().sum() > 0


def test_bad_inputs_are_clear_errors():
    model, crit = mlp(6, 8, 5, 4), nn.CrossEntropyLoss()
    x, y = classification_batch()
    with pytest.raises(ValueError, match="exactly one"):
        HessianOperator(model, crit)
    with pytest.raises(ValueError, match="exactly one"):
        HessianOperator(model, crit, data=(x, y), dataloader=[(x, y)])
    H = HessianOperator(model, crit, data=(x, y))
    with pytest.raises(ValueError, match=f"length {H.size}"):
        H @ torch.ones(H.size + 1, dtype=DT)
    with pytest.raises(ValueError, match="shape"):
        H.matmat(torch.ones(3, 2, dtype=DT))
    with pytest.raises(ValueError, match="neither a parameter nor a module"):
        HessianOperator(model, crit, data=(x, y), params=["nope"])
    with pytest.raises(ValueError, match="backend"):
        HessianOperator(model, crit, data=(x, y), backend="magic")
    with pytest.raises(ValueError, match="reduction"):
        HessianOperator(model, nn.CrossEntropyLoss(reduction="none"), data=(x, y))
    bad = x.clone()
    bad[0, 0] = float("nan")
    with pytest.raises(NonFiniteError):
        HessianOperator(model, crit, data=(bad, y)) @ torch.ones(H.size, dtype=DT)
    with pytest.raises(ValueError, match="no samples"):
        HessianOperator(model, crit, dataloader=[]) @ torch.ones(H.size, dtype=DT)


def test_float32_model_and_inputs_cast():
    model = mlp(6, 8, 5, 4).float()
    x, y = classification_batch()
    H = HessianOperator(model, nn.CrossEntropyLoss(), data=(x, y))  # float64 inputs into a float32 model
    assert H.dtype == torch.float32
    ref = func_hessian(mlp(6, 8, 5, 4), nn.CrossEntropyLoss(), x, y)
    assert_close(H.to_dense().double(), ref, 1e-5)


def test_resolve_params_default_skips_frozen():
    model = mlp(6, 8, 5, 4)
    model[4].bias.requires_grad_(False)
    params, names = resolve_params(model)
    assert "4.bias" not in names and len(params) == 5


def test_ddp_style_wrapper_is_looked_through():
    model, crit = mlp(6, 8, 5, 4), nn.CrossEntropyLoss()
    x, y = classification_batch()
    wrapped = nn.DataParallel(model)  # on the CPU DataParallel just holds the module
    assert_close(HessianOperator(wrapped, crit, data=(x, y)).to_dense(), func_hessian(model, crit, x, y))


@pytest.mark.parametrize("affine", [True, False])
def test_eval_batchnorm_runs_as_its_affine_map_and_is_restored(affine):
    # the fold: BatchNorm1d (2-D inputs) and an affine=False BatchNorm2d, against torch.func.hessian of
    # the unmodified model, and the modules' own forward is back afterwards
    torch.manual_seed(4)
    model = nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1), nn.BatchNorm2d(3, affine=affine), nn.Tanh(), nn.Flatten(),
        nn.Linear(3 * 4 * 4, 5), nn.BatchNorm1d(5), nn.Tanh(), nn.Linear(5, 3),
    ).to(DT)  # fmt: skip
    warm_batchnorm(model, (16, 2, 4, 4), scale=1.5, shift=0.3)
    g = torch.Generator().manual_seed(5)
    x, y = torch.randn(9, 2, 4, 4, generator=g, dtype=DT), torch.randint(0, 3, (9,), generator=g)
    crit = nn.CrossEntropyLoss()
    ref = func_hessian(model, crit, x, y)
    seen = []
    hook = model[1].register_forward_hook(lambda m, i, o: seen.append("forward" in m.__dict__))
    H = HessianOperator(model, crit, data=(x, y))
    assert_close(H.to_dense(), ref)
    assert seen == [True]  # the graph (built once) went through the affine map
    hook.remove()
    assert "forward" not in model[1].__dict__ and "forward" not in model[5].__dict__
    with torch.no_grad():
        torch.testing.assert_close(model(x), torch.func.functional_call(model, dict(model.named_parameters()), (x,)))
    # train mode and forward-over-reverse use the module's own forward
    seen.clear()
    model[1].register_forward_hook(lambda m, i, o: seen.append("forward" in m.__dict__))
    HessianOperator(model, crit, data=(x, y), train_mode=True).matvec(torch.ones(H.size, dtype=DT))
    assert seen == [False]


@pytest.mark.parametrize("make", ["hessian", "hessian_fresh", "fwd_over_rev", "ggn", "loader", "sum"])
def test_gradient_is_the_loss_gradient(make, cnn_and_batch):
    model, x, y = cnn_and_batch
    reduction = "sum" if make == "sum" else "mean"
    crit = nn.CrossEntropyLoss(reduction=reduction)
    model.train()
    ref_model = copy.deepcopy(model).eval()
    ref = flatten(torch.autograd.grad(crit(ref_model(x), y), list(ref_model.parameters())))
    if make == "loader":
        H = HessianOperator(model, crit, dataloader=[(x[:4], y[:4]), (x[4:8], y[4:8]), (x[8:], y[8:])])
    elif make == "ggn":
        H = GGNOperator(model, crit, data=(x, y))
    else:
        kw = {"hessian_fresh": {"reuse_graph": False}, "fwd_over_rev": {"backend": "forward_over_reverse"}}
        H = HessianOperator(model, crit, data=(x, y), **kw.get(make, {}))
    g = H.gradient()
    assert g.shape == (H.size,) and not g.requires_grad and H.num_matvecs == 0
    assert_close(g, ref, rtol=1e-12)
    assert model.training  # mode restored
    # on one reused batch the gradient comes off the graph the products then reuse
    v = torch.randn(H.size, dtype=DT, generator=torch.Generator().manual_seed(0))
    expected = (GGNOperator if make == "ggn" else HessianOperator)(ref_model, crit, data=(x, y)) @ v
    assert_close(H @ v, expected)
    assert_close(H.gradient(), ref, rtol=1e-12)
    assert all(p.grad is None for p in model.parameters())


def test_image_batches_go_channels_last_with_a_fallback_for_view_models():
    g = torch.Generator().manual_seed(6)
    x, y = torch.randn(7, 2, 4, 4, generator=g, dtype=DT), torch.randint(0, 3, (7,), generator=g)
    crit = nn.CrossEntropyLoss()
    torch.manual_seed(0)
    net = ViewNet(4).to(DT)
    with pytest.raises(RuntimeError):  # what the fallback is for
        net(x.contiguous(memory_format=torch.channels_last))
    for make in (HessianOperator, GGNOperator):
        op = make(net, crit, data=(x, y))
        assert op._nhwc
        dense = op.to_dense()
        assert not op._nhwc  # fell back to NCHW on the first forward, and stays there
        if make is HessianOperator:
            assert_close(dense, func_hessian(net, crit, x, y))
    seen = []
    cnn = small_cnn().eval()
    cnn[0].register_forward_pre_hook(lambda m, a: seen.append(a[0].is_contiguous(memory_format=torch.channels_last)))
    H = HessianOperator(cnn, crit, data=(torch.randn(5, 2, 6, 6, dtype=DT), torch.randint(0, 4, (5,))))
    H.matvec(torch.ones(H.size, dtype=DT))
    assert seen == [True] and H._nhwc


def _conv_zoo(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(2, 4, 3, stride=2, padding=1),  # strided
        nn.Tanh(),
        nn.Conv2d(4, 4, 3, padding=2, dilation=2, groups=2, bias=False),  # dilated, grouped, no bias
        nn.Softplus(),
        nn.Conv2d(4, 3, 1),  # 1x1
        nn.Tanh(),
        nn.Conv2d(3, 3, 3, padding="same"),  # string padding: the module's own forward
        nn.Tanh(),
        nn.Conv2d(3, 2, 3, padding=1, padding_mode="reflect"),  # reflect: the module's own forward
        nn.Flatten(),
        nn.Linear(2 * 4 * 4, 3),
    ).to(DT)


@pytest.mark.parametrize("train_mode", [False, True])
def test_convolutions_with_the_explicit_double_backward(train_mode):
    model, crit = _conv_zoo(), nn.CrossEntropyLoss()
    g = torch.Generator().manual_seed(7)
    x, y = torch.randn(6, 2, 7, 7, generator=g, dtype=DT), torch.randint(0, 3, (6,), generator=g)
    patched = []
    for m in model:
        if isinstance(m, nn.Conv2d):
            m.register_forward_pre_hook(lambda mod, a, p=patched: p.append("forward" in mod.__dict__))
    ref = func_hessian(model, crit, x, y)
    patched.clear()
    H = HessianOperator(model, crit, data=(x, y), train_mode=train_mode)
    dense = H.to_dense()
    assert patched == [True, True, True, False, False]  # the graph was built once, through the new path
    assert_close(dense, ref)
    assert not any("forward" in m.__dict__ for m in model)
    # the GGN goes through the same convolutions (J^T u, then its derivative in u)
    assert_close(GGNOperator(model, crit, data=(x, y)).to_dense(), ggn(model, crit, x, y))
    # several vectors at once (vmap over the explicit backward) and a loader of unequal batches
    V = torch.randn(H.size, 3, dtype=DT, generator=g)
    assert_close(HessianOperator(model, crit, data=(x, y), batched_matmat=True).matmat(V), ref @ V)
    loader = [(x[:4], y[:4]), (x[4:], y[4:])]
    assert_close(HessianOperator(model, crit, dataloader=loader).matmat(V), ref @ V)
