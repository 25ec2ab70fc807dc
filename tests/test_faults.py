"""Numerical faults: a product that turns NaN/Inf stops every solver with an error, never a NaN result."""

import pytest
import torch

import hessianflow as hf
from hessianflow.cli import common as _cli
from hessianflow.cli import eig as drv
from hessianflow.io.checkpoint import save_checkpoint
from hessianflow.io.checkpoint_format import make_checkpoint
from hessianflow.linalg.linop import LinearOperator, NonFiniteError
from hessianflow.training.models import get_model


class Poisoned(LinearOperator):
    """A diagonal operator whose ``bad_after``-th product (0-based) comes back with a NaN or an Inf."""

    def __init__(self, n=40, bad_after=3, value=float("nan")):
        super().__init__(n, torch.float64, "cpu")
        self.diag = torch.linspace(1.0, 5.0, n, dtype=torch.float64)
        self.bad_after, self.value, self.calls = bad_after, value, 0

    def _matvec(self, v):
        out = self.diag * v
        self.calls += 1
        if self.calls > self.bad_after:
            out = out.clone()
            out[0] = self.value
        return out


SOLVERS = {
    "power_iteration": lambda A: hf.power_iteration(A, k=2, max_iter=50, tol=1e-8, seed=0),
    "lanczos": lambda A: hf.lanczos(A, k=3, seed=0),
    "lanczos_SA": lambda A: hf.lanczos(A, k=2, which="SA", seed=0),
    "spectral_density": lambda A: hf.spectral_density(A, num_runs=2, num_steps=20, seed=0),
    "hutchinson": lambda A: hf.linalg.trace.hutchinson_trace(A, num_matvecs=20, seed=0),
    "hutchpp": lambda A: hf.linalg.trace.hutchpp_trace(A, num_matvecs=24, seed=0),
    "xtrace": lambda A: hf.linalg.trace.xtrace(A, num_matvecs=20, seed=0),
    "trace_auto": lambda A: hf.trace(A, num_matvecs=20, seed=0),
}


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
@pytest.mark.parametrize("name", sorted(SOLVERS))
def test_non_finite_product_raises(name, value):
    A = Poisoned(bad_after=3, value=value)
    with pytest.raises(NonFiniteError, match="non-finite"):
        SOLVERS[name](A)


@pytest.mark.filterwarnings("ignore::hessianflow.linalg.eigen.ConvergenceWarning")  # close eigenvalues, few steps
@pytest.mark.parametrize("name", sorted(SOLVERS))
def test_the_same_operator_without_the_fault_gives_finite_results(name):
    # guards the test above: the solvers do run to the end on this operator when nothing is poisoned
    res = SOLVERS[name](Poisoned(bad_after=10**9))
    values = [getattr(res, a) for a in ("eigenvalues", "estimate", "nodes") if hasattr(res, a)]
    assert values and all(torch.isfinite(torch.as_tensor(v)).all() for v in values)


def test_model_with_nan_parameter_stops_hessian_solvers():
    model = torch.nn.Linear(3, 2).double()
    with torch.no_grad():
        model.weight[0, 0] = float("nan")
    x, y = torch.randn(5, 3, dtype=torch.float64), torch.tensor([0, 1, 0, 1, 1])
    H = hf.HessianOperator(model, torch.nn.CrossEntropyLoss(), data=(x, y))
    with pytest.raises(NonFiniteError):
        hf.lanczos(H, k=1, seed=0)


def test_the_driver_reports_broken_weights_in_one_line_with_exit_3(tmp_path, capsys):
    """What the scripts promise for a NonFiniteError (README, cli/common.run): ``numerical error`` in one
    line, exit status 3, no traceback and no JSON claiming results."""
    torch.manual_seed(0)
    model = get_model("c1")
    with torch.no_grad():
        model.fc3.weight[0, 0] = float("nan")
    path = tmp_path / "broken.pkl"
    args = {"name": "synthetic", "seed": 1, "synthetic_train": 64, "synthetic_test": 32}
    save_checkpoint(make_checkpoint(model, dataset="synthetic", epoch=1, args=args), path)
    jpath = tmp_path / "out.json"
    code = _cli.run(drv.main, drv.parse_args, ["--resume", str(path), "--hessian-batch-size", "8", "--json",
                                              str(jpath), "--no-progress"])  # fmt: skip
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert code == _cli.EXIT_NUMERIC == 3
    assert len(lines) == 1 and "numerical error" in lines[0] and "nan" in lines[0], err
    assert "Traceback" not in err and not jpath.exists()
