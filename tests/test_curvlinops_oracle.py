"""Cross-library oracle: hessianflow's Hessian, GGN and empirical Fisher against curvlinops' (Dangel et al.,
``curvlinops-for-pytorch``: ``HessianLinearOperator``, ``GGNLinearOperator``, ``EFLinearOperator``) on shared
cases, as dense float64 matrices, to 1e-12 of the largest entry.

Two libraries written independently agree on every case below, except where they *define* a matrix
differently; those conventions are named and tested as such, not papered over:

* **The empirical Fisher of a mean-reduced multi-output MSE or BCE loss differs by the number of outputs C.**
  hessianflow takes the gradient of each sample's own loss, ``criterion(f(x_i), y_i)``, which for
  ``MSELoss(reduction="mean")`` is a mean over the sample's C outputs: :math:`g_i = \\frac{2}{C} J_i^\\top (f_i - y_i)`,
  :math:`F = \\frac1N \\sum_i g_i g_i^\\top`. curvlinops scales the per-sample output gradient by the number of
  loss terms and divides the sum of outer products by ``N * C``: :math:`F_{cl} = \\frac{1}{NC} \\sum_i
  J_i^\\top (2 (f_i - y_i))(2 (f_i - y_i))^\\top J_i = C\\, F`. With ``reduction="sum"`` and for cross-entropy
  (one loss term per sample and position) the two agree.
* **With extra output dimensions (positions, tokens, pixels), curvlinops takes one outer product per
  position, hessianflow one per sample.** curvlinops flattens the positions into the batch (``batch c ... ->
  (batch ...) c``); hessianflow's sample is a leading-dimension slice of the batch, whose gradient sums its
  positions' gradients before the outer product. The two coincide when every position is made its own
  sample, which is what the tests below do (and they check that on the original batch the matrices differ).

The Hessian and the GGN are the same matrices in both libraries in every case. The mean over a loader is
by sample count in both (a smaller last batch weighs less).

curvlinops is a test requirement (``pip install -e '.[test]'``); without it these tests skip, and fail
under ``CI=true`` (``dense_reference.need``).
"""

import pytest
import torch
from dense_reference import mlp, need, small_cnn, warm_batchnorm
from torch import nn

from hessianflow import EmpiricalFisherOperator, GGNOperator, HessianOperator

DT = torch.float64
TOL = 1e-12


def _curvlinops():
    return need("curvlinops", "test")


def _dense_cl(name, model, crit, params, batches):
    cl = _curvlinops()
    op = getattr(cl, name)(model, crit, params, batches, check_deterministic=False)
    n = sum(p.numel() for p in params)
    return op @ torch.eye(n, dtype=DT)


def _dense_hf(cls, model, crit, batches):
    op = cls(model, crit, dataloader=batches) if len(batches) > 1 else cls(model, crit, data=batches[0])
    return op, op.to_dense()


def _rel(a, b):
    return float((a - b).abs().max() / b.abs().max())


def _batches(x, y, sizes=(7, 5)):
    out, i = [], 0
    for s in sizes:
        out.append((x[i : i + s], y[i : i + s]))
        i += s
    return out


class Tied(nn.Module):
    """Weight tying: the decoder reuses the encoder's weight (as GPT-2's ``lm_head`` reuses ``wte``)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(3)
        self.enc = nn.Linear(4, 4)
        self.dec = nn.Linear(4, 4)
        self.dec.weight = self.enc.weight

    def forward(self, x):
        return self.dec(torch.tanh(self.enc(x)))


def _case(name):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(12, 3, generator=g, dtype=DT)
    if name.startswith("mse"):
        return mlp(3, 4, 2), nn.MSELoss(reduction=name.split("-")[1]), x, torch.randn(12, 2, generator=g, dtype=DT)
    if name.startswith("ce"):
        y = torch.randint(0, 3, (12,), generator=g)
        return mlp(3, 4, 3), nn.CrossEntropyLoss(reduction=name.split("-")[1]), x, y
    if name.startswith("bce"):
        y = torch.randint(0, 2, (12, 2), generator=g).to(DT)
        return mlp(3, 4, 2), nn.BCEWithLogitsLoss(reduction=name.split("-")[1]), x, y
    if name == "batchnorm-eval":
        model = warm_batchnorm(small_cnn(seed=1, side=4), (16, 2, 4, 4), scale=2.0, shift=0.5)
        xi = torch.randn(12, 2, 4, 4, generator=g, dtype=DT)
        return model, nn.CrossEntropyLoss(), xi, torch.randint(0, 4, (12,), generator=g)
    if name == "tied":
        xi = torch.randn(12, 4, generator=g, dtype=DT)
        return Tied().to(DT), nn.CrossEntropyLoss(), xi, torch.randint(0, 4, (12,), generator=g)
    raise KeyError(name)


CASES = ["mse-mean", "mse-sum", "ce-mean", "ce-sum", "bce-mean", "bce-sum", "batchnorm-eval", "tied"]
# the empirical Fisher's factor curvlinops / hessianflow (see the module docstring): C outputs of a mean MSE/BCE
EF_FACTOR = {"mse-mean": 2.0, "bce-mean": 2.0}


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("batches", ["one batch", "unequal batches"])
def test_hessian_ggn_ef_agree(case, batches):
    _curvlinops()
    model, crit, x, y = _case(case)
    data = _batches(x, y) if batches == "unequal batches" else [(x, y)]
    for hf_cls, cl_name in [
        (HessianOperator, "HessianLinearOperator"),
        (GGNOperator, "GGNLinearOperator"),
        (EmpiricalFisherOperator, "EFLinearOperator"),
    ]:
        op, mine = _dense_hf(hf_cls, model, crit, data)
        theirs = _dense_cl(cl_name, model, crit, op.params, data)
        if hf_cls is EmpiricalFisherOperator:
            theirs = theirs / EF_FACTOR.get(case, 1.0)
        assert _rel(mine, theirs) <= TOL, (case, batches, hf_cls.__name__, _rel(mine, theirs))
    if case == "tied":
        assert op.size == 4 * 4 + 4 + 4  # the tied weight counted once, in both libraries


def test_mean_mse_ef_differs_by_the_number_of_outputs():
    """Not a fudge factor: with C = 5 outputs the ratio is 5, and with ``reduction="sum"`` it is 1."""
    _curvlinops()
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(9, 3, generator=g, dtype=DT), torch.randn(9, 5, generator=g, dtype=DT)
    model = mlp(3, 4, 5)
    for reduction, factor in [("mean", 5.0), ("sum", 1.0)]:
        crit = nn.MSELoss(reduction=reduction)
        op, mine = _dense_hf(EmpiricalFisherOperator, model, crit, [(x, y)])
        theirs = _dense_cl("EFLinearOperator", model, crit, op.params, [(x, y)])
        assert _rel(mine * factor, theirs) <= TOL


class PositionwiseMSE(nn.Module):
    """``[N, T, D] -> [N, T, C]``, the same map at every position (a token-wise head)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(5)
        self.net = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))

    def forward(self, x):
        return self.net(x)


class PositionwiseCE(nn.Module):
    """``[N, D, T] -> [N, C, T]`` logits with classes along dim 1 (CrossEntropyLoss's layout)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(6)
        self.net = nn.Sequential(nn.Conv1d(3, 4, 1), nn.Tanh(), nn.Conv1d(4, 3, 1))

    def forward(self, x):
        return self.net(x)


@pytest.mark.parametrize("kind", ["mse", "ce"])
def test_extra_output_dimensions(kind):
    """Hessian and GGN agree on the batch as it is; the empirical Fisher agrees once every position is a
    sample (curvlinops' convention), and differs on the batch as it is (hessianflow's: one outer product per
    sample)."""
    _curvlinops()
    g = torch.Generator().manual_seed(2)
    N, T = 6, 4
    if kind == "mse":
        model, crit = PositionwiseMSE().to(DT), nn.MSELoss()
        x, y = torch.randn(N, T, 3, generator=g, dtype=DT), torch.randn(N, T, 2, generator=g, dtype=DT)
        per_position = (x.reshape(N * T, 1, 3), y.reshape(N * T, 1, 2))
        factor = 2.0  # C = 2 outputs of a mean MSE (the first convention)
    else:
        model, crit = PositionwiseCE().to(DT), nn.CrossEntropyLoss()
        x, y = torch.randn(N, 3, T, generator=g, dtype=DT), torch.randint(0, 3, (N, T), generator=g)
        per_position = (x.permute(0, 2, 1).reshape(N * T, 3, 1), y.reshape(N * T, 1))
        factor = 1.0
    data = _batches(x, y, sizes=(4, 2))
    for hf_cls, cl_name in [(HessianOperator, "HessianLinearOperator"), (GGNOperator, "GGNLinearOperator")]:
        op, mine = _dense_hf(hf_cls, model, crit, data)
        assert _rel(mine, _dense_cl(cl_name, model, crit, op.params, data)) <= TOL, hf_cls.__name__
    op, per_sample = _dense_hf(EmpiricalFisherOperator, model, crit, data)
    theirs = _dense_cl("EFLinearOperator", model, crit, op.params, data) / factor
    _, per_pos = _dense_hf(EmpiricalFisherOperator, model, crit, [per_position])
    assert _rel(per_pos, theirs) <= TOL
    assert _rel(per_sample, theirs) > 1e-2  # the conventions really differ on the batch as it is
