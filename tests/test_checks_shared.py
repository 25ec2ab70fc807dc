"""ABSA, the attacks and the checkpoint reader check integers and positive numbers by the one rule of
hessianflow._checks: any integral type but bool, the argument named first, one message."""

import numpy as np
import pytest
import torch
from torch import nn

from hessianflow import ABSAController
from hessianflow.io import checkpoint_format as cf
from hessianflow.io.checkpoint import save_checkpoint
from hessianflow.training.adversarial import pgd
from hessianflow.training.loop import set_lr


def _controller(**kw):
    return ABSAController(**{"base_lr": 0.1, "epochs": 4, **kw})


@pytest.mark.parametrize(
    "kw, name, minimum",
    [
        ({"large_ratio_cap": 0}, "large_ratio_cap", 1),
        ({"large_ratio_cap": True}, "large_ratio_cap", 1),
        ({"epochs": 2.0}, "epochs", 1),
        ({"duration": 0}, "duration", 1),
        ({"lr_decay_epochs": [2, -1]}, "each of lr_decay_epochs", 0),
    ],
)
def test_absa_integer_arguments_one_message(kw, name, minimum):
    with pytest.raises(ValueError, match=rf"^{name} must be an integer >= {minimum}, got "):
        _controller(**kw)


def test_absa_accepts_numpy_integers_as_python_ints():
    c = _controller(large_ratio_cap=np.int64(8), epochs=np.int32(4), lr_decay_epochs=[np.int64(2)])
    assert type(c.large_ratio_cap) is int and type(c.epochs) is int and type(c.lr_decay_epochs[0]) is int
    assert c.lr(np.int64(3)) == pytest.approx(0.1 * 0.2)
    with pytest.raises(ValueError, match=r"^epoch must be an integer >= 0"):
        c.lr(-1)


@pytest.mark.parametrize("lr", ["0.1", True, float("nan"), 0.0, -1.0])
def test_learning_rates_are_positive_finite_numbers(lr):
    opt = torch.optim.SGD(nn.Linear(2, 2).parameters(), lr=0.5)
    with pytest.raises(ValueError, match=r"^lr must be a positive finite number"):
        set_lr(opt, lr)
    with pytest.raises(ValueError, match=r"^base_lr must be a positive finite number"):
        _controller(base_lr=lr)
    assert opt.param_groups[0]["lr"] == 0.5


def test_pgd_steps_by_the_same_rule():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 3))
    x, y = torch.rand(2, 1, 2, 2), torch.tensor([0, 2])
    for steps in (0, True, 2.0):
        with pytest.raises(ValueError, match=r"^steps must be an integer >= 1"):
            pgd(model, x, y, 0.1, steps=steps)
    assert torch.equal(pgd(model, x, y, 0.1, steps=np.int64(2), seed=0), pgd(model, x, y, 0.1, steps=2, seed=0))


def test_checkpoint_record_with_a_bool_batch_size_is_refused(tmp_path):
    torch.manual_seed(0)
    record = {"epoch": 1, "batch_size": True, "large_ratio": 1, "test_loss": 1.0}
    ckpt = cf.make_checkpoint(
        cf.get_model("c1"), dataset="synthetic", epoch=1, args={}, optimizer={}, absa={}, rng={},
        history=[record], updates=1, best_test_acc=0.5, elapsed=1.0,
    )  # fmt: skip
    save_checkpoint(ckpt, tmp_path / "c.pkl")
    with pytest.raises(cf.CheckpointError, match="'history' holds a record without integer batch_size"):
        cf.read_checkpoint(tmp_path / "c.pkl", purpose="resume")
    record["batch_size"] = 32
    save_checkpoint(ckpt, tmp_path / "c.pkl")
    cf.read_checkpoint(tmp_path / "c.pkl", purpose="resume")
