"""The speed paths (hessianflow.curvature.fast_paths) on and off: the same products against dense float64 references,
and off really means no module patched and inputs in their own memory format."""

import copy

import pytest
import torch
from dense_reference import ViewNet, func_hessian
from dense_reference import ggn as func_ggn
from torch import nn

from hessianflow.curvature import GGNOperator, HessianOperator, fast_paths
from hessianflow.curvature.hvp import flatten, unflatten
from hessianflow.linalg.linop import NonFiniteError

DT = torch.float64
RTOL = 1e-10

SWITCHES = ["on", "operator_off", "global_off", "env_off"]


def assert_close(a, b, rtol=RTOL):
    err = (a - b).abs().max() / b.abs().max().clamp_min(1e-300)
    assert err <= rtol, f"relative error {err:.3e} > {rtol:.1e}"


def cnn(seed=0):
    """Conv2d + BatchNorm (eval mode: both are patched when the paths are on) + a pooled linear head."""
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1),
        nn.BatchNorm2d(3),
        nn.Tanh(),
        nn.Conv2d(3, 3, 3, stride=2, padding=1, bias=False),
        nn.BatchNorm2d(3),
        nn.Softplus(),
        nn.Flatten(),
        nn.Linear(3 * 3 * 3, 4),
    ).to(DT)
    with torch.no_grad():  # running statistics that are not the identity, so the folded affine map matters
        for m in model:
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
    return model.eval()


def batch(n=6, c=2, hw=5, classes=4, seed=3):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, c, hw, hw, generator=g, dtype=DT), torch.randint(0, classes, (n,), generator=g)


def spy(model):
    """Record, at every forward of a Conv2d or BatchNorm, whether it runs an instance-level ``forward``, and
    whether the model's input arrives channels-last."""
    seen = {"patched": [], "channels_last": []}
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.BatchNorm2d)):
            m.register_forward_pre_hook(lambda mod, a: seen["patched"].append("forward" in mod.__dict__))
    model.register_forward_pre_hook(
        lambda mod, a: seen["channels_last"].append(
            a[0].dim() == 4 and a[0].is_contiguous(memory_format=torch.channels_last)
        )
    )
    return seen


def product_under(switch, monkeypatch, make, compute):
    """``compute(make(fast_paths=...))`` with the switch set as named."""
    if switch == "env_off":
        monkeypatch.setenv(fast_paths.ENV, "0")
    if switch == "global_off":
        with fast_paths.enabled(False):
            return compute(make(True))
    return compute(make(switch != "operator_off"))


@pytest.mark.parametrize("switch", SWITCHES)
def test_eval_cnn_hessian_and_ggn_both_ways(switch, monkeypatch):
    model, crit = cnn(), nn.CrossEntropyLoss()
    x, y = batch()
    ref_h, ref_g = func_hessian(model, crit, x, y), func_ggn(model, crit, x, y)
    seen = spy(model)
    H = product_under(
        switch,
        monkeypatch,
        lambda on: HessianOperator(model, crit, data=(x, y), fast_paths=on),
        lambda op: op.to_dense(),
    )
    assert_close(H, ref_h)
    on = switch == "on"
    # the graph was built once (reused): two convolutions and two BatchNorms, patched exactly when on
    assert seen["patched"] == [on] * 4
    assert seen["channels_last"] == [on]
    seen["patched"].clear()
    seen["channels_last"].clear()
    G = product_under(
        switch, monkeypatch, lambda on: GGNOperator(model, crit, data=(x, y), fast_paths=on), lambda op: op.to_dense()
    )
    assert_close(G, ref_g)
    assert seen["patched"] == [on] * 4 and seen["channels_last"] == [on]
    assert not any("forward" in m.__dict__ for m in model.modules())


def fd_products(model, criterion, x, y, V, h=1e-5):
    """``H V`` by central differences of the autograd gradient (torch.func.hessian is no reference for
    train-mode BatchNorm in torch 2.14: see tests/test_operators.py), parameters swapped by functional_call."""
    named = {k: v.detach() for k, v in model.named_parameters()}
    names = list(named)
    base = [named[n] for n in names]

    def grad_at(flat):
        ps = [t.clone().requires_grad_(True) for t in unflatten(flat, base)]
        out = torch.func.functional_call(model, dict(zip(names, ps)), (x,))
        return flatten(torch.autograd.grad(criterion(out, y), ps))

    theta = flatten(base)
    cols = [(grad_at(theta + h * V[:, j]) - grad_at(theta - h * V[:, j])) / (2 * h) for j in range(V.shape[1])]
    return torch.stack(cols, 1)


@pytest.mark.parametrize("switch", SWITCHES)
def test_train_mode_over_a_loader_both_ways(switch, monkeypatch):
    """Train mode: BatchNorm uses batch statistics (not folded), convolutions still patched on the CPU;
    a loader of unequal batches rebuilds the graph every product."""
    model, crit = cnn(seed=1), nn.CrossEntropyLoss()
    x, y = batch(n=7)
    loader = [(x[:4], y[:4]), (x[4:], y[4:])]
    stats_free = copy.deepcopy(model).train()  # the same train-mode function, without running-stat updates
    for m in stats_free.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.track_running_stats, m.running_mean, m.running_var, m.num_batches_tracked = False, None, None, None
    n = sum(p.numel() for p in model.parameters())
    V = torch.randn(n, 3, dtype=DT, generator=torch.Generator().manual_seed(0))
    ref = (4 * fd_products(stats_free, crit, x[:4], y[:4], V) + 3 * fd_products(stats_free, crit, x[4:], y[4:], V)) / 7
    running = [b.clone() for b in model.buffers()]
    seen = spy(model)
    HV = product_under(
        switch,
        monkeypatch,
        lambda on: HessianOperator(model, crit, dataloader=loader, train_mode=True, fast_paths=on),
        lambda op: op.matmat(V),
    )
    assert_close(HV, ref, 1e-7)  # central differences: O(h^2) truncation, O(eps/h) rounding
    on = switch == "on"
    assert seen["patched"] == [on, False, on, False] * 6  # 3 products x 2 batches: convolutions only
    assert not model.training and all(torch.equal(a, b) for a, b in zip(model.buffers(), running))


@pytest.mark.parametrize("switch", SWITCHES)
def test_channels_last_sensitive_model_both_ways(switch, monkeypatch):
    net, crit = ViewNet(5).to(DT), nn.CrossEntropyLoss()
    x, y = batch(classes=3)
    with pytest.raises(RuntimeError):  # what the fallback is for
        net(x.contiguous(memory_format=torch.channels_last))
    ref = func_hessian(net, crit, x, y)
    seen = spy(net)
    ops = []

    def compute(op):
        ops.append(op)
        return op.to_dense()

    dense = product_under(
        switch, monkeypatch, lambda on: HessianOperator(net, crit, data=(x, y), fast_paths=on), compute
    )
    assert_close(dense, ref)
    if switch == "on":  # tried once channels-last, which raised, then NCHW from then on
        assert seen["channels_last"] == [True, False] and not ops[0]._nhwc
    else:  # never tried
        assert seen["channels_last"] == [False] and ops[0]._nhwc
        assert seen["patched"] == [False]


@pytest.mark.parametrize("switch", SWITCHES)
def test_forward_over_reverse_both_ways(switch, monkeypatch):
    """torch.func traces the modules' own forwards: never patched, on or off, and the same products."""
    model, crit = cnn(seed=2), nn.CrossEntropyLoss()
    x, y = batch(n=4)
    ref = func_hessian(model, crit, x, y)
    V = torch.randn(ref.shape[0], 2, dtype=DT, generator=torch.Generator().manual_seed(1))
    seen = spy(model)
    HV = product_under(
        switch,
        monkeypatch,
        lambda on: HessianOperator(model, crit, data=(x, y), backend="forward_over_reverse", fast_paths=on),
        lambda op: op.matmat(V),
    )
    assert_close(HV, ref @ V)
    assert seen["patched"] and not any(seen["patched"])


def test_the_global_switch_is_read_at_every_product_and_rebuilds_a_reused_graph():
    model, crit = cnn(seed=3), nn.CrossEntropyLoss()
    x, y = batch()
    ref = func_hessian(model, crit, x, y)
    v = torch.randn(ref.shape[0], dtype=DT, generator=torch.Generator().manual_seed(2))
    seen = spy(model)
    H = HessianOperator(model, crit, data=(x, y))
    assert H.fast_paths
    assert_close(H @ v, ref @ v)
    assert seen["patched"] == [True] * 4
    with fast_paths.enabled(False):
        assert_close(H @ v, ref @ v)  # the graph built through the patched modules is not reused
    assert seen["patched"] == [True] * 4 + [False] * 4
    assert_close(H @ v, ref @ v)
    assert seen["patched"] == [True] * 4 + [False] * 4 + [True] * 4


def test_patching_is_undone_after_a_failed_product():
    model, crit = cnn(seed=4), nn.CrossEntropyLoss()
    x, y = batch()
    x[0, 0, 0, 0] = float("nan")
    H = HessianOperator(model, crit, data=(x, y))
    with pytest.raises(NonFiniteError):
        H @ torch.ones(H.size, dtype=DT)
    assert not any("forward" in m.__dict__ for m in model.modules())
    assert not model.training and all(p.requires_grad for p in model.parameters())


def test_switch_values(monkeypatch):
    monkeypatch.delenv(fast_paths.ENV, raising=False)
    assert fast_paths.is_enabled()
    for word in ("0", "false", "OFF", " no "):
        monkeypatch.setenv(fast_paths.ENV, word)
        assert not fast_paths.is_enabled()
        with fast_paths.enabled(True):  # a block overrides the environment
            assert fast_paths.is_enabled()
            with fast_paths.enabled(False):
                assert not fast_paths.is_enabled()
            assert fast_paths.is_enabled()
        assert not fast_paths.is_enabled()
    monkeypatch.setenv(fast_paths.ENV, "1")
    assert fast_paths.is_enabled()
