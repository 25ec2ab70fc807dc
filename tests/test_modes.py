"""model_mode: the one save-and-restore of a model's train/eval modes and requires_grad flags."""

import pytest
from torch import nn

from hessianflow._modes import model_mode


def _mixed() -> nn.Module:
    """A model whose submodules disagree with their parents (what a recursive ``train(flag)`` would erase)."""
    model = nn.Sequential(
        nn.Linear(3, 4),
        nn.Sequential(nn.BatchNorm1d(4), nn.Dropout(0.3)),
        nn.Linear(4, 2),
    )
    model.train()
    model[1].eval()  # a frozen block inside a training network
    model[1][1].train()  # ... holding a dropout left in train mode
    model[0].weight.requires_grad_(False)
    model[2].bias.requires_grad_(False)
    return model


def _state(model):
    return [m.training for m in model.modules()], [p.requires_grad for p in model.parameters()]


@pytest.mark.parametrize("train", [True, False, None])
def test_mixed_modes_and_flags_restored_exactly(train):
    model = _mixed()
    before = _state(model)
    assert len(set(before[0])) == 2 and len(set(before[1])) == 2  # the fixture really is mixed
    with model_mode(model, train, requires_grad=model.parameters()) as m:
        assert m is model
        modes, flags = _state(model)
        if train is None:
            assert modes == before[0]
        else:
            assert modes == [train] * len(modes)
        assert all(flags)
        model[1][0].training = not model[1][0].training  # the block may change modes itself
    assert _state(model) == before


def test_restored_after_an_exception():
    model = _mixed()
    before = _state(model)
    with pytest.raises(RuntimeError, match="boom"):
        with model_mode(model, False, requires_grad=list(model.parameters())):
            assert not any(_state(model)[0]) and all(_state(model)[1])
            raise RuntimeError("boom")
    assert _state(model) == before


def test_restored_when_train_itself_fails_half_way():
    class Fails(nn.Module):
        def train(self, mode=True):
            raise RuntimeError("no train() here")

    model = nn.Sequential(nn.Linear(2, 2), Fails())
    model[0].eval()  # the container trains, its first child does not
    before = _state(model)
    with pytest.raises(RuntimeError, match="no train"):
        with model_mode(model, True):
            pass  # pragma: no cover - never reached
    assert _state(model) == before


def test_requires_grad_only_touches_the_given_parameters():
    model = _mixed()
    before = _state(model)
    with model_mode(model, None, requires_grad=[model[0].weight]):
        assert model[0].weight.requires_grad
        assert not model[2].bias.requires_grad  # not asked for
    assert _state(model) == before


def test_no_requires_grad_argument_leaves_flags_alone():
    model = _mixed()
    before = _state(model)
    with model_mode(model, True):
        assert _state(model)[1] == before[1]
        model[0].weight.requires_grad_(True)  # not ours to restore: no parameters were given
    assert _state(model)[0] == before[0]
    assert model[0].weight.requires_grad


def test_shared_parameter_listed_twice_keeps_its_flag():
    lin = nn.Linear(2, 2)
    lin.weight.requires_grad_(False)
    model = nn.Sequential(lin, lin)
    with model_mode(model, True, requires_grad=[lin.weight, lin.weight, lin.bias]):
        assert lin.weight.requires_grad
    assert not lin.weight.requires_grad and lin.bias.requires_grad
