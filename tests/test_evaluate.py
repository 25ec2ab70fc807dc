"""One loss-and-accuracy evaluation (absa.evaluate) under the scripts' evaluate_on_ranks."""

import math

import pytest
import torch
from torch import nn

from hessianflow import evaluate
from hessianflow.cli.common import evaluate_on_ranks


def _data(n=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 5, generator=g), torch.randint(0, 3, (n,), generator=g)


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3))


def test_sums_are_float64_of_each_batch_loss():
    x, y = _data()
    model, crit = _model(), nn.CrossEntropyLoss()
    batches = [(x[:3], y[:3]), (x[3:7], y[3:7]), (x[7:], y[7:])]
    out = evaluate(model, batches, crit)
    with torch.no_grad():
        expected = sum(float(crit(model(a), b)) * a.shape[0] for a, b in batches)
        correct = sum(int((model(a).argmax(1) == b).sum()) for a, b in batches)
    assert out["loss_sum"] == expected  # the same float64 arithmetic, exactly
    assert out["loss"] == expected / 10 and out["correct"] == correct and out["accuracy"] == correct / 10
    assert out["samples"] == 10


def test_an_empty_batch_is_skipped_not_a_nan():
    x, y = _data()
    model = _model()
    full = evaluate(model, [(x, y)], nn.CrossEntropyLoss())
    with_empty = evaluate(model, [(x[:0], y[:0]), (x, y)], nn.CrossEntropyLoss())
    assert math.isfinite(with_empty["loss"]) and with_empty == full
    nothing = evaluate(model, [(x[:0], y[:0])], nn.CrossEntropyLoss())
    assert nothing["samples"] == 0 and math.isnan(nothing["loss"])


def test_sum_reduction_and_no_accuracy_for_regression():
    x, _ = _data()
    target = torch.randn(10, 3)
    model = _model()
    out = evaluate(model, [(x[:4], target[:4]), (x[4:], target[4:])], nn.MSELoss(reduction="sum"))
    with torch.no_grad():
        total = float(nn.MSELoss(reduction="sum")(model(x), target))
    assert out["loss_sum"] == pytest.approx(total, rel=1e-6) and out["loss"] == pytest.approx(total / 10, rel=1e-6)
    assert out["accuracy"] is None and out["correct"] is None


def test_evaluate_on_ranks_in_one_process_is_evaluate():
    x, y = _data(n=13)
    model = _model()
    batches = [(x[:5], y[:5]), (x[5:], y[5:])]
    one = evaluate(model, batches, nn.CrossEntropyLoss())
    ranks = evaluate_on_ranks(model, batches, nn.CrossEntropyLoss(), torch.device("cpu"))
    assert ranks == {"loss": one["loss"], "accuracy": one["accuracy"], "samples": 13}
