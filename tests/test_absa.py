"""ABSA: the controller against hand-worked schedules, the loop against exact full-batch steps."""

import contextlib
import copy
import io

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from dense_reference import mlp
from torch.utils.data import DataLoader, TensorDataset

from hessianflow.linalg.linop import NonFiniteError
from hessianflow.training.absa import ABSAController, Decision
from hessianflow.training.adversarial import fgsm
from hessianflow.training.loop import evaluate, set_lr, train_epoch

DT = torch.float64


def make(**kw):
    cfg = dict(large_ratio_cap=128, base_lr=0.1, lr_decay=0.2, lr_decay_epochs=[], epochs=100)
    cfg.update(kw)
    return ABSAController(**cfg)


def feed(ctl, eigs, start=0):
    return [ctl.end_of_epoch(start + i, e) for i, e in enumerate(eigs)]


# -- the controller ------------------------------------------------------------------------------


def test_eigen_drop_doubles_batch_and_lr_and_halves_adv():
    ctl = make()
    assert (ctl.large_ratio, ctl.reference, ctl.current_adv_ratio(0), ctl.lr(0)) == (1, None, 0.2, 0.1)
    assert ctl.needs_eigenvalue(0)
    d = feed(ctl, [10.0, 6.0, 5.0, 2.4, 2.0])
    assert [x.reason for x in d] == ["first", "none", "eigen_drop", "eigen_drop", "none"]
    assert [x.large_ratio for x in d] == [1, 1, 2, 4, 4]
    assert [x.factor for x in d] == [1.0, 1.0, 2.0, 2.0, 1.0]
    assert [x.grew for x in d] == [False, False, True, True, False]
    assert [x.reference for x in d] == [10.0, 10.0, 5.0, 2.4, 2.4]
    assert [x.lr for x in d] == pytest.approx([0.1, 0.1, 0.2, 0.4, 0.4], rel=1e-15)
    assert [x.adv_ratio for x in d] == pytest.approx([0.2, 0.2, 0.1, 0.05, 0.05], rel=1e-15)
    assert ctl.epochs_since_change == 1  # reset at the drop of epoch 3, one check since
    assert ctl.history == d and isinstance(d[0], Decision)
    assert d[2].to_dict()["eigenvalue"] == 5.0


def test_cap_clips_the_factor_and_stops_checks_and_adversarial_training():
    ctl = make(large_ratio_cap=3)
    d = feed(ctl, [8.0, 4.0, 2.0])
    assert [x.large_ratio for x in d] == [1, 2, 3]
    assert [x.factor for x in d] == [1.0, 2.0, 1.5]
    assert d[2].lr == pytest.approx(0.3, rel=1e-15)
    assert d[2].adv_ratio == 0.0 and ctl.adv_stopped
    assert not ctl.needs_eigenvalue(3)
    assert ctl.current_adv_ratio(3) == 0.0
    after = ctl.end_of_epoch(3)  # no eigenvalue needed at the cap
    assert (after.reason, after.grew, after.factor, after.large_ratio) == ("capped", False, 1.0, 3)
    ignored = ctl.end_of_epoch(4, 0.001)  # a big drop changes nothing once capped
    assert (ignored.reason, ignored.large_ratio, ignored.reference) == ("capped", 3, 2.0)


def test_duration_fallback_after_exactly_duration_checks():
    ctl = make(duration=3)
    d = feed(ctl, [10.0] * 7)
    # The first check counts: the initial batch is used for exactly 3 epochs, then each next one too.
    assert [x.reason for x in d] == ["first", "none", "duration", "none", "none", "duration", "none"]
    assert [x.large_ratio for x in d] == [1, 1, 2, 2, 2, 4, 4]
    assert [x.adv_ratio for x in d] == pytest.approx([0.2, 0.2, 0.1, 0.1, 0.1, 0.05, 0.05])
    assert [x.lr for x in d] == pytest.approx([0.1, 0.1, 0.2, 0.2, 0.2, 0.4, 0.4])
    # The fallback does not move the reference (HessianFlow): only a measured drop does.
    assert all(x.reference == 10.0 for x in d)


def test_duration_counter_restarts_after_a_drop():
    ctl = make(duration=3)
    d = feed(ctl, [10.0, 5.0, 4.0, 4.0, 4.0, 4.0])
    assert [x.reason for x in d] == ["first", "eigen_drop", "none", "none", "duration", "none"]
    assert [x.large_ratio for x in d] == [1, 2, 2, 2, 4, 4]
    ctl = make(duration=None)
    assert all(x.reason in ("first", "none") for x in feed(ctl, [10.0] * 30))
    assert ctl.large_ratio == 1


def test_adversarial_training_stops_after_half_the_epochs():
    ctl = make(epochs=10)
    assert [ctl.current_adv_ratio(e) for e in range(10)] == [0.2] * 5 + [0.0] * 5
    feed(ctl, [10.0] * 4)
    assert not ctl.adv_stopped
    d = ctl.end_of_epoch(4, 10.0)
    assert ctl.adv_stopped and d.adv_ratio == 0.0
    assert ctl.current_adv_ratio(2) == 0.0  # for good: even if asked about an earlier epoch
    # Odd counts and tiny runs follow HessianFlow's 1-based `epoch >= epochs // 2` (at least one epoch).
    assert [make(epochs=11).current_adv_ratio(e) for e in range(11)] == [0.2] * 5 + [0.0] * 6
    assert [make(epochs=1).current_adv_ratio(0), make(epochs=2).current_adv_ratio(1)] == [0.2, 0.0]


def test_lr_decay_epochs_combine_with_growth():
    ctl = make(lr_decay_epochs=[4, 2], lr_decay=0.2)
    assert [ctl.lr(e) for e in range(6)] == pytest.approx([0.1, 0.1, 0.02, 0.02, 0.004, 0.004], rel=1e-14)
    d = feed(ctl, [10.0, 5.0])
    # the batch doubled at the end of epoch 1; epoch 2 is past the decay at 2: 0.1 * (2 / 1) * 0.2
    assert d[1].lr == pytest.approx(0.04, rel=1e-14)
    assert [ctl.lr(e) for e in range(6)] == pytest.approx([0.2, 0.2, 0.04, 0.04, 0.008, 0.008], rel=1e-14)


def test_cap_of_one_and_sgd_baseline():
    ctl = make(large_ratio_cap=1)
    assert not ctl.needs_eigenvalue(0) and ctl.current_adv_ratio(0) == 0.0
    d = [ctl.end_of_epoch(e, None if e % 2 else 3.0) for e in range(4)]
    assert all(x.reason == "capped" and x.large_ratio == 1 and not x.grew for x in d)
    assert ctl.lr(3) == 0.1 and ctl.reference is None

    sgd = make(method="sgd", large_ratio_cap=16, lr_decay_epochs=[2])
    assert sgd.large_ratio == 16 and not sgd.needs_eigenvalue(0)
    assert sgd.current_adv_ratio(0) == 0.0
    assert [sgd.lr(e) for e in range(3)] == pytest.approx([0.1, 0.1, 0.02])
    assert sgd.end_of_epoch(0).reason == "capped"


def test_controller_errors():
    ctl = make()
    with pytest.raises(ValueError, match="eigenvalue"):
        ctl.end_of_epoch(0)
    for bad in (float("nan"), float("inf"), -float("inf")):
        with pytest.raises(NonFiniteError, match="epoch 0"):
            ctl.end_of_epoch(0, bad)
    assert ctl.history == [] and ctl.reference is None  # a refused call changes nothing
    ctl.end_of_epoch(0, 1.0)
    with pytest.raises(ValueError, match="increase"):
        ctl.end_of_epoch(0, 1.0)
    for kw in (
        {"large_ratio_cap": 0},
        {"base_lr": -1.0},
        {"adv_ratio": 1.5},
        {"method": "adam"},
        {"duration": 0},
        {"lr_decay_epochs": [-1]},
        {"epochs": 0},
    ):
        with pytest.raises(ValueError):
            make(**kw)


def test_non_positive_reference_never_counts_as_a_drop():
    ctl = make(duration=None)
    d = feed(ctl, [-1.0, -5.0, 0.0])
    assert [x.reason for x in d] == ["first", "none", "none"]


def _plain(obj):
    if isinstance(obj, dict):
        return all(isinstance(k, str) and _plain(v) for k, v in obj.items())
    if isinstance(obj, list):
        return all(_plain(v) for v in obj)
    return obj is None or isinstance(obj, (bool, int, float, str))


@pytest.mark.parametrize("split", [0, 1, 3, 6])
def test_state_dict_round_trip_continues_identically(split):
    eigs = [10.0, 9.0, 4.9, 4.0, 4.0, 4.0, 1.0, 0.9, 0.2, 0.2, 0.2, 0.1]
    kw = dict(large_ratio_cap=16, duration=3, epochs=12, lr_decay_epochs=[5, 9])
    ref = make(**kw)
    full = feed(ref, eigs)

    a = make(**kw)
    feed(a, eigs[:split])
    state = a.state_dict()
    assert _plain(state)
    buf = io.BytesIO()
    torch.save({"absa": state}, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=True)["absa"]
    b = make(**kw)
    b.load_state_dict(loaded)
    rest = feed(b, eigs[split:], start=split)
    assert [x.to_dict() for x in b.history] == [x.to_dict() for x in full]
    assert [x.to_dict() for x in rest] == [x.to_dict() for x in full[split:]]
    assert b.state_dict() == ref.state_dict()
    assert [b.current_adv_ratio(e) for e in range(12)] == [ref.current_adv_ratio(e) for e in range(12)]
    # the schedule used in this test does exercise growth, duration, decay and the adv stop
    assert {x.reason for x in full} >= {"first", "eigen_drop", "duration", "none"}


def test_load_state_dict_strict_config_check():
    a = make(large_ratio_cap=16)
    feed(a, [10.0, 5.0])
    b = make(large_ratio_cap=32)
    with pytest.raises(ValueError, match="large_ratio_cap"):
        b.load_state_dict(a.state_dict())
    b.load_state_dict(a.state_dict(), strict=False)
    assert b.large_ratio == 2 and b.reference == 5.0 and b.large_ratio_cap == 32
    with pytest.raises(ValueError):
        b.load_state_dict({"version": 99})


# -- the training loop -----------------------------------------------------------------------------


def _data(n=10, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 5, generator=g, dtype=DT), torch.randint(0, 3, (n,), generator=g)


def _flat(model):
    return torch.cat([p.detach().flatten() for p in model.parameters()])


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_accumulation_over_unequal_micro_batches_equals_full_batch_step(reduction):
    X, y = _data()
    loader = DataLoader(TensorDataset(X, y), batch_size=4)  # micro-batches of 4, 4, 2
    model = mlp(5, 6, 3)
    ref = copy.deepcopy(model)
    lr = 0.3
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    out = train_epoch(model, loader, opt, nn.CrossEntropyLoss(reduction=reduction), large_ratio=3)
    assert (out["optimizer_steps"], out["micro_batches"], out["samples"]) == (1, 3, 10)

    loss = F.cross_entropy(ref(X), y)
    grads = torch.autograd.grad(loss, list(ref.parameters()))
    expected = torch.cat([(p - lr * g).detach().flatten() for p, g in zip(ref.parameters(), grads)])
    torch.testing.assert_close(_flat(model), expected, rtol=1e-12, atol=0)
    assert out["loss"] == pytest.approx(loss.item(), rel=1e-12)
    acc = (ref(X).argmax(1) == y).double().mean().item()
    assert out["accuracy"] == pytest.approx(acc)
    assert all(p.grad is None for p in model.parameters())


def test_incomplete_last_group_steps_with_its_own_mean_and_momentum_matches_optimizer():
    X, y = _data()
    loader = DataLoader(TensorDataset(X, y), batch_size=4)  # groups (4, 4) and (2)
    model = mlp(5, 6, 3)
    ref = copy.deepcopy(model)
    kw = dict(lr=0.2, momentum=0.9, weight_decay=1e-3)
    out = train_epoch(model, loader, torch.optim.SGD(model.parameters(), **kw), nn.CrossEntropyLoss(), 2)
    assert (out["optimizer_steps"], out["micro_batches"]) == (2, 3)

    ref_opt = torch.optim.SGD(ref.parameters(), **kw)
    for sl in (slice(0, 8), slice(8, 10)):
        ref_opt.zero_grad()
        F.cross_entropy(ref(X[sl]), y[sl]).backward()
        ref_opt.step()
    torch.testing.assert_close(_flat(model), _flat(ref), rtol=1e-12, atol=0)


def test_max_batches_and_large_ratio_one():
    X, y = _data(n=12)
    loader = DataLoader(TensorDataset(X, y), batch_size=3)
    model = mlp(5, 6, 3)
    ref = copy.deepcopy(model)
    out = train_epoch(
        model, loader, torch.optim.SGD(model.parameters(), lr=0.1), nn.CrossEntropyLoss(), 1, max_batches=2
    )
    assert (out["optimizer_steps"], out["micro_batches"], out["samples"]) == (2, 2, 6)
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.1)
    for sl in (slice(0, 3), slice(3, 6)):
        ref_opt.zero_grad()
        F.cross_entropy(ref(X[sl]), y[sl]).backward()
        ref_opt.step()
    torch.testing.assert_close(_flat(model), _flat(ref), rtol=1e-12, atol=0)


@pytest.mark.parametrize("large_ratio", [1, 3])
def test_nan_loss_raises_before_the_step(large_ratio):
    X, y = _data(n=9)
    X[4, 0] = float("nan")  # in the second mini-batch of 3
    loader = DataLoader(TensorDataset(X, y), batch_size=3)
    model = mlp(5, 6, 3)
    model.eval()
    ref = copy.deepcopy(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(NonFiniteError, match=r"epoch 7, mini-batch 1"):
        train_epoch(model, loader, opt, nn.CrossEntropyLoss(), large_ratio, epoch=7)
    if large_ratio == 3:
        # the group holding the NaN never stepped: the weights are untouched
        torch.testing.assert_close(_flat(model), _flat(ref), rtol=0, atol=0)
    else:
        # exactly the first (clean) step was taken
        ref_opt = torch.optim.SGD(ref.parameters(), lr=0.1)
        F.cross_entropy(ref(X[:3]), y[:3]).backward()
        ref_opt.step()
        torch.testing.assert_close(_flat(model), _flat(ref), rtol=1e-12, atol=0)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert all(p.grad is None for p in model.parameters())
    assert not model.training  # the mode is restored on the error path too


def test_nan_loss_skip_mode_drops_that_micro_batch():
    X, y = _data(n=9)
    X[4, 0] = float("nan")
    loader = DataLoader(TensorDataset(X, y), batch_size=3)
    model = mlp(5, 6, 3)
    ref = copy.deepcopy(model)
    out = train_epoch(
        model,
        loader,
        torch.optim.SGD(model.parameters(), lr=0.1),
        nn.CrossEntropyLoss(),
        3,
        non_finite="skip",
    )
    assert (out["skipped"], out["micro_batches"], out["samples"], out["optimizer_steps"]) == (1, 2, 6, 1)
    keep = torch.tensor([0, 1, 2, 6, 7, 8])
    g = torch.autograd.grad(F.cross_entropy(ref(X[keep]), y[keep]), list(ref.parameters()))
    expected = torch.cat([(p - 0.1 * gi).detach().flatten() for p, gi in zip(ref.parameters(), g)])
    torch.testing.assert_close(_flat(model), expected, rtol=1e-12, atol=0)


class _Recorder(nn.Module):
    """BatchNorm model that records (training flag, input) at every forward."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.bn = nn.BatchNorm1d(5)
        self.fc = nn.Linear(5, 3)
        self.calls = []

    def forward(self, x):
        self.calls.append((self.training, x.detach().clone()))
        return self.fc(self.bn(x))


def test_adversarial_examples_made_in_eval_mode_and_trained_in_train_mode():
    X, y = _data(n=8)
    model = _Recorder().to(DT)
    init = copy.deepcopy(model)
    loader = DataLoader(TensorDataset(X, y), batch_size=4)
    clamp = (-1.0, 1.0)
    out = train_epoch(
        model, loader, torch.optim.SGD(model.parameters(), lr=0.1), nn.CrossEntropyLoss(), 2,
        adv_ratio=0.6, eps=0.05, clamp=clamp,
    )  # fmt: skip
    assert out["adversarial_samples"] == 2 * round(0.6 * 4)
    assert [flag for flag, _ in model.calls] == [False, True, False, True]
    # first mini-batch: FGSM on the first round(0.6*4)=2 samples, computed with the initial weights
    expected_adv = fgsm(init, X[:2], y[:2], 0.05, clamp=clamp)
    torch.testing.assert_close(model.calls[0][1], X[:2], rtol=0, atol=0)
    torch.testing.assert_close(model.calls[1][1][:2], expected_adv, rtol=0, atol=1e-15)
    torch.testing.assert_close(model.calls[1][1][2:], X[2:4], rtol=0, atol=0)
    assert not torch.equal(expected_adv, X[:2])
    assert model.training


class _FakeDDP(nn.Module):
    """Stands in for DistributedDataParallel: counts the micro-steps run under no_sync()."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner
        self.no_sync_entries = 0

    @contextlib.contextmanager
    def no_sync(self):
        self.no_sync_entries += 1
        yield

    def forward(self, x):
        return self.inner(x)


def test_no_sync_on_micro_steps_that_do_not_step():
    X, y = _data(n=10)
    loader = DataLoader(TensorDataset(X, y), batch_size=2)  # 5 batches; groups (0,1) (2,3) (4)
    model = _FakeDDP(mlp(5, 6, 3))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    entries = []
    orig_step = opt.step

    def step(*a, **k):
        entries.append(model.no_sync_entries)
        return orig_step(*a, **k)

    opt.step = step
    out = train_epoch(model, loader, opt, nn.CrossEntropyLoss(), 2)
    assert out["optimizer_steps"] == 3
    assert model.no_sync_entries == 2 and entries == [1, 2, 2]


def test_evaluate_weights_unequal_batches_and_restores_mode():
    X, y = _data(n=10)
    model = mlp(5, 6, 3)
    model.train()
    out = evaluate(model, DataLoader(TensorDataset(X, y), batch_size=4), nn.CrossEntropyLoss())
    with torch.no_grad():
        logits = model(X)
    assert out["loss"] == pytest.approx(F.cross_entropy(logits, y).item(), rel=1e-12)
    assert out["accuracy"] == pytest.approx((logits.argmax(1) == y).double().mean().item())
    assert out["samples"] == 10 and model.training
    assert all(p.grad is None for p in model.parameters())


def test_progress_bar_gives_the_same_result(capsys):
    X, y = _data()
    loader = DataLoader(TensorDataset(X, y), batch_size=4)
    m1, m2 = mlp(5, 6, 3), mlp(5, 6, 3)
    a = train_epoch(m1, loader, torch.optim.SGD(m1.parameters(), lr=0.1), nn.CrossEntropyLoss(), 2, progress=True)
    b = train_epoch(m2, loader, torch.optim.SGD(m2.parameters(), lr=0.1), nn.CrossEntropyLoss(), 2)
    assert a == b
    torch.testing.assert_close(_flat(m1), _flat(m2), rtol=0, atol=0)
    assert "0/3" in capsys.readouterr().err  # a bar over the 3 mini-batches was drawn (on stderr)


def test_set_lr_and_loop_argument_errors():
    model = mlp(5, 6, 3)
    opt = torch.optim.SGD([{"params": model[0].parameters()}, {"params": model[2].parameters(), "lr": 1.0}], lr=0.5)
    set_lr(opt, 0.01)
    assert [g["lr"] for g in opt.param_groups] == [0.01, 0.01]
    X, y = _data()
    loader = DataLoader(TensorDataset(X, y), batch_size=4)
    for kw in (
        {"large_ratio": 0},
        {"large_ratio": 1, "adv_ratio": 2.0},
        {"large_ratio": 1, "non_finite": "x"},
    ):
        with pytest.raises(ValueError):
            train_epoch(model, loader, opt, nn.CrossEntropyLoss(), **kw)


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed not built")
def test_real_ddp_single_process_matches_plain_model(tmp_path):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        torch.manual_seed(0)
        net = nn.Sequential(nn.Linear(5, 6), nn.BatchNorm1d(6), nn.Tanh(), nn.Linear(6, 3)).to(DT)
        ref = copy.deepcopy(net)
        ddp = nn.parallel.DistributedDataParallel(net)
        X, y = _data(n=20)
        loader = DataLoader(TensorDataset(X, y), batch_size=4)
        kw = dict(adv_ratio=0.5, eps=0.1)
        a = train_epoch(
            ddp, loader, torch.optim.SGD(ddp.parameters(), lr=0.1, momentum=0.9), nn.CrossEntropyLoss(), 2, **kw
        )
        b = train_epoch(
            ref, loader, torch.optim.SGD(ref.parameters(), lr=0.1, momentum=0.9), nn.CrossEntropyLoss(), 2, **kw
        )
    finally:
        dist.destroy_process_group()
    assert a == b and a["optimizer_steps"] == 3 and a["adversarial_samples"] == 10
    torch.testing.assert_close(_flat(net), _flat(ref), rtol=1e-12, atol=0)
    for k, v in ref.state_dict().items():  # BatchNorm running statistics too
        torch.testing.assert_close(net.state_dict()[k], v, rtol=1e-12, atol=0)


def _amp_net():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.BatchNorm2d(8), nn.Flatten(), nn.Linear(8 * 6 * 6, 4)
    )


@pytest.mark.parametrize("adv_ratio", [0.0, 0.25])
def test_autocast_per_forward_equals_a_hand_written_amp_loop(adv_ratio):
    # bf16 autocast must be entered per forward: one context around the epoch keeps the bf16 copies of
    # the weights of the first step (autocast's cast cache) and trains on stale weights (train.py --amp
    # did, and diverged on a GPU). The loop must equal the textbook pattern step for step.
    g = torch.Generator().manual_seed(3)
    batches = [(torch.randn(8, 3, 6, 6, generator=g), torch.randint(0, 4, (8,), generator=g)) for _ in range(6)]
    crit = nn.CrossEntropyLoss()
    a, b = _amp_net(), _amp_net()
    opt_a = torch.optim.SGD(a.parameters(), lr=0.2, momentum=0.9, weight_decay=5e-4)
    opt_b = torch.optim.SGD(b.parameters(), lr=0.2, momentum=0.9, weight_decay=5e-4)
    stats = train_epoch(a, batches, opt_a, crit, 1, adv_ratio=adv_ratio, eps=0.05, autocast_dtype=torch.bfloat16)
    b.train()
    k = round(adv_ratio * 8)
    for x, y in batches:
        if k:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                adv = fgsm(b, x[:k], y[:k], 0.05, criterion=crit)
            x = torch.cat([adv, x[k:]])
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = crit(b(x), y)
        opt_b.zero_grad()
        loss.backward()
        opt_b.step()
    assert stats["optimizer_steps"] == 6 and stats["adversarial_samples"] == 6 * k
    for (name, pa), pb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(pa, pb), name
    # and the bf16 forward really ran: the weights differ from a float32 run of the same loop
    c = _amp_net()
    train_epoch(c, batches, torch.optim.SGD(c.parameters(), lr=0.2, momentum=0.9, weight_decay=5e-4), crit, 1,
                adv_ratio=adv_ratio, eps=0.05)  # fmt: skip
    assert not torch.equal(c[0].weight, a[0].weight)
