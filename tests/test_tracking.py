"""Tests of hessianflow.training.tracking against the dense float64 Hessian of a small network."""

import json
import math
import warnings

import pytest
import torch
from dense_reference import mlp
from torch import nn

from hessianflow.curvature import exact_hessian
from hessianflow.linalg.eigen import ConvergenceWarning
from hessianflow.linalg.linop import NonFiniteError
from hessianflow.training.tracking import EigenTracker, load_history, top_eigenvalue


def make_problem(seed=0, n_samples=40):
    g = torch.Generator().manual_seed(seed)
    model = mlp(4, 6, 3, seed=seed)
    x = torch.randn(n_samples, 4, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (n_samples,), generator=g)
    return model, nn.CrossEntropyLoss(), (x, y)


@pytest.fixture(scope="module")
def problem():
    model, crit, data = make_problem()
    H = exact_hessian(model, crit, data=data)
    evals = torch.linalg.eigvalsh(H)  # ascending
    return model, crit, data, H, evals


def params_of(model):
    return [p.detach().clone() for p in model.parameters()]


# -- top_eigenvalue ----------------------------------------------------------------------------
def test_top_eigenvalue_lanczos_matches_dense(problem):
    model, crit, data, _, evals = problem
    res = top_eigenvalue(model, crit, data=data, method="lanczos", k=3, tol=1e-10, max_iter=200)
    expected = evals.flip(0)[:3]
    torch.testing.assert_close(res.eigenvalues, expected, rtol=1e-9, atol=1e-12)
    assert bool(res.converged.all())


def test_top_eigenvalue_passes_the_start_vector(problem):
    from hessianflow.curvature import HessianOperator
    from hessianflow.linalg.eigen import lanczos

    model, crit, data, _, evals = problem
    res = top_eigenvalue(model, crit, data=data, method="lanczos", tol=1e-10, max_iter=200, v0="gradient", seed=3)
    ref = lanczos(HessianOperator(model, crit, data=data), k=1, tol=1e-10, max_iter=200, v0="gradient", seed=3)
    assert torch.equal(res.eigenvalues, ref.eigenvalues) and res.num_matvecs == ref.num_matvecs
    torch.testing.assert_close(res.eigenvalues[0], evals[-1], rtol=1e-9, atol=0)
    random = top_eigenvalue(model, crit, data=data, method="lanczos", tol=1e-10, max_iter=200, seed=3)
    assert random.num_matvecs != res.num_matvecs or not torch.equal(random.eigenvalues, res.eigenvalues)


def test_top_eigenvalue_power_matches_dense(problem):
    model, crit, data, _, evals = problem
    dominant = evals[evals.abs().argmax()]
    ratio = float(evals.abs().sort(descending=True).values[1] / evals.abs().max())
    assert ratio < 0.9  # the test problem has a usable gap
    res = top_eigenvalue(model, crit, data=data, method="power", tol=1e-12, max_iter=3000)
    assert abs(float(res.eigenvalues[0]) - float(dominant)) <= 1e-9 * abs(float(dominant))
    # PyHessian's default tolerance: error about tol * r^2 / (1 - r^2) relative (see power_iteration)
    loose = top_eigenvalue(model, crit, data=data)  # method="power", tol=1e-3, max_iter=100
    bound = 1e-3 * ratio**2 / (1 - ratio**2)
    assert abs(float(loose.eigenvalues[0]) - float(dominant)) <= 3 * bound * abs(float(dominant))


def test_top_eigenvalue_dataloader_and_validation(problem):
    model, crit, data, _, _ = problem
    x, y = data
    loader = [(x[:25], y[:25]), (x[25:], y[25:])]
    ref = torch.linalg.eigvalsh(exact_hessian(model, crit, dataloader=loader, num_batches=1))[-1]
    res = top_eigenvalue(model, crit, dataloader=loader, num_batches=1, method="lanczos", tol=1e-10)
    assert float(res.eigenvalues[0]) == pytest.approx(float(ref), rel=1e-9)
    full = torch.linalg.eigvalsh(exact_hessian(model, crit, dataloader=loader))[-1]
    assert abs(float(full) - float(ref)) > 1e-3 * abs(float(full))  # the first batch alone differs
    with pytest.raises(ValueError, match="method"):
        top_eigenvalue(model, crit, data=data, method="arnoldi")
    with pytest.raises(ValueError, match="tol"):
        top_eigenvalue(model, crit, data=data, tol=0.0)
    with pytest.raises(ValueError, match="exactly one"):
        top_eigenvalue(model, crit)


# -- EigenTracker.step ---------------------------------------------------------------------------
def test_step_records_dense_eigenvalues_and_trace(problem):
    model, crit, data, H, evals = problem
    before = params_of(model)
    model.train()
    tr = EigenTracker(crit, data=data, top_k=2, method="lanczos", tol=1e-10, trace=True, trace_matvecs=200)
    rec = tr.step(model, 0, lr=0.1, batch_size=40, train_loss=torch.tensor(1.25))
    # the model is untouched and its mode restored
    assert all(torch.equal(a, b) for a, b in zip(before, params_of(model)))
    assert model.training
    top2 = evals.flip(0)[:2].tolist()
    assert rec["eigenvalue"] == pytest.approx(top2[0], rel=1e-9)
    assert rec["top_k"] == pytest.approx(top2, rel=1e-9)
    assert rec["converged"] is True
    # lanczos' tol bounds the eigenvalues (criterion="eigenvalue", the default since issue 13): the residual
    # is then only about sqrt(tol * |lambda| * gap), and the eigenvalues above are what tol=1e-10 buys
    assert 0 <= rec["residual"] <= 1e-4 * abs(top2[0])
    # Hutchinson: within 3 standard errors of the dense trace, with a standard error that is informative
    exact = float(H.trace())
    assert rec["trace_stderr"] > 0
    assert abs(rec["trace"] - exact) <= 3 * rec["trace_stderr"]
    assert rec["trace_stderr"] < 0.25 * abs(exact)
    assert rec["num_matvecs"] >= 200 + 2
    assert rec["seconds"] > 0
    assert rec["lr"] == 0.1 and rec["batch_size"] == 40 and rec["train_loss"] == 1.25
    assert isinstance(rec["train_loss"], float)
    assert list(rec)[:9] == ["epoch", "eigenvalue", "top_k", "residual", "converged", "trace", "trace_stderr",
                             "num_matvecs", "seconds"]  # fmt: skip
    # the record returned is a copy
    rec["eigenvalue"] = 0.0
    assert tr.history[0]["eigenvalue"] == pytest.approx(top2[0], rel=1e-9)


def test_step_power_default_and_same_seed_same_answer(problem):
    model, crit, data, _, evals = problem
    dominant = float(evals[evals.abs().argmax()])
    a = EigenTracker(crit, data=data, seed=3)
    b = EigenTracker(crit, data=data, seed=3)
    ra, rb = a.step(model, 1), b.step(model, 1)
    assert ra["eigenvalue"] == rb["eigenvalue"]  # reproducible
    assert ra["eigenvalue"] == pytest.approx(dominant, rel=1e-3)
    assert ra["trace"] is None and ra["trace_stderr"] is None
    assert a.eigenvalues == [ra["eigenvalue"]]


def test_not_converged_is_recorded_as_such(problem):
    model, crit, data, _, _ = problem
    tr = EigenTracker(crit, data=data, max_iter=2, tol=1e-12)
    with pytest.warns(ConvergenceWarning):
        rec = tr.step(model, 0)
    assert rec["converged"] is False
    assert tr.history[0]["converged"] is False
    assert rec["num_matvecs"] == 2
    assert math.isfinite(rec["eigenvalue"])


def test_step_changes_with_training(problem):
    # The eigenvalue follows the model: after a few steps of SGD the recorded value is that model's.
    model, crit, data = make_problem(seed=1)
    tr = EigenTracker(crit, data=data, method="lanczos", tol=1e-10)
    first = tr.step(model, 0)["eigenvalue"]
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    for _ in range(20):
        opt.zero_grad()
        crit(model(data[0]), data[1]).backward()
        opt.step()
    second = tr.step(model, 1)["eigenvalue"]
    ref = float(torch.linalg.eigvalsh(exact_hessian(model, crit, data=data))[-1])
    assert second == pytest.approx(ref, rel=1e-9)
    assert abs(second - first) > 1e-3 * abs(first)


def test_step_validation(problem):
    model, crit, data, _, _ = problem
    tr = EigenTracker(crit, data=data, method="lanczos")
    with pytest.raises(ValueError, match="reserved"):
        tr.step(model, 0, eigenvalue=3.0)
    tr.step(model, 0)
    with pytest.raises(ValueError, match="not after"):
        tr.step(model, 0)
    with pytest.raises(ValueError, match="epoch must be"):
        tr.step(model, float("nan"))
    with pytest.raises(ValueError, match="must be a number"):
        tr.step(model, 1, lr={"a": 1})
    assert len(tr.history) == 1  # nothing half-recorded
    with pytest.raises(ValueError, match="no data"):
        EigenTracker(crit).step(model, 0)
    with pytest.raises(ValueError, match="at most one"):
        EigenTracker(crit, data=data, dataloader=[data])
    for bad in ({"method": "qr"}, {"top_k": 0}, {"tol": -1.0}, {"max_iter": 1.5}, {"trace_method": "x"}):
        with pytest.raises(ValueError):
            EigenTracker(crit, data=data, **bad)
    with pytest.raises(ValueError, match="seed"):
        EigenTracker(crit, data=data, seed=torch.Generator())


# -- NaN refusal -----------------------------------------------------------------------------------
def test_nan_refused(problem):
    model, crit, data, _, _ = problem
    tr = EigenTracker(crit, data=data, method="lanczos")
    with pytest.raises(NonFiniteError):
        tr.record(0, float("nan"))
    with pytest.raises(NonFiniteError):
        tr.record(0, torch.tensor(float("inf")))
    with pytest.raises(NonFiniteError, match="train_loss"):
        tr.record(0, 1.0, train_loss=float("nan"))
    bad_model, _, _ = make_problem()
    with torch.no_grad():
        bad_model[0].weight[0, 0] = float("nan")
    with pytest.raises(NonFiniteError):
        tr.step(bad_model, 0)
    with pytest.raises(NonFiniteError, match="test_loss"):
        tr.step(model, 0, test_loss=float("inf"))
    assert tr.history == []  # nothing was recorded


# -- record() ------------------------------------------------------------------------------------
def test_record_external_values():
    tr = EigenTracker(nn.MSELoss())
    r0 = tr.record(0, 12.5, lr=0.1, batch_size=128, converged=True)
    r1 = tr.record(1, None, lr=0.1, batch_size=256, note="no check this epoch")
    assert r0["eigenvalue"] == 12.5 and r0["top_k"] == [12.5] and r0["converged"] is True
    assert r1["eigenvalue"] is None and r1["top_k"] == [] and r1["trace"] is None
    assert tr.eigenvalues == [12.5, None]
    with pytest.raises(ValueError, match="number or None"):
        tr.record(2, "large")
    with pytest.raises(ValueError, match="not after"):
        tr.record(1, 1.0)


# -- files -----------------------------------------------------------------------------------------
def filled_tracker(problem, out_dir=None):
    model, crit, data, _, _ = problem
    tr = EigenTracker(crit, data=data, top_k=2, method="lanczos", trace=True, trace_matvecs=20, out_dir=out_dir)
    tr.step(model, 0, lr=0.1, batch_size=32, train_acc=0.5, phase="warmup")
    tr.record(1, None, lr=0.1, batch_size=64)
    tr.record(2, 1.0 / 3.0, lr=0.01, batch_size=64, test_acc=0.75, note="nan", big=2**70, tiny=5e-324)
    return tr


def test_csv_and_json_round_trip(problem, tmp_path):
    tr = filled_tracker(problem)
    csv_path = tr.to_csv(tmp_path / "h.csv")
    json_path = tr.to_json(tmp_path / "h.json")
    from_json = load_history(json_path)
    assert from_json == tr.history  # exactly the same numbers
    from_csv = load_history(csv_path)
    assert len(from_csv) == 3
    for got, want in zip(from_csv, tr.history):
        assert got == want  # floats written with repr read back bit for bit
    assert from_csv[2]["eigenvalue"] == 1.0 / 3.0
    assert from_csv[2]["note"] == "nan" and from_csv[2]["big"] == 2**70 and from_csv[2]["tiny"] == 5e-324
    assert isinstance(from_csv[0]["top_k"], list) and len(from_csv[0]["top_k"]) == 2
    assert from_csv[0]["converged"] is True and from_csv[0]["phase"] == "warmup"
    header = open(csv_path).readline().strip().split(",")
    assert header[:3] == ["epoch", "eigenvalue", "top_k"] and "test_acc" in header
    obj = json.load(open(json_path))
    assert obj["version"] == 1 and obj["config"]["method"] == "lanczos" and obj["config"]["top_k"] == 2
    # no temporary files left behind
    assert sorted(p.name for p in tmp_path.iterdir()) == ["h.csv", "h.json"]


def test_out_dir_saves_after_every_record(problem, tmp_path):
    out = tmp_path / "run"
    tr = filled_tracker(problem, out_dir=out)
    assert sorted(p.name for p in out.iterdir()) == ["eigen_history.csv", "eigen_history.json"]
    assert load_history(out / "eigen_history.json") == tr.history
    assert load_history(out / "eigen_history.csv") == tr.history
    with pytest.raises(ValueError, match="out_dir"):
        EigenTracker(nn.MSELoss()).save()


def test_state_dict_round_trip(problem, tmp_path):
    tr = filled_tracker(problem)
    state = tr.state_dict()
    # plain types: survives a weights_only checkpoint
    torch.save({"tracker": state}, tmp_path / "ck.pt")
    loaded = torch.load(tmp_path / "ck.pt", weights_only=True)["tracker"]
    _, crit, data, _, _ = problem
    fresh = EigenTracker(crit, data=data, top_k=2, method="lanczos", trace=True, trace_matvecs=20)
    fresh.load_state_dict(loaded)
    assert fresh.history == tr.history
    assert fresh.history is not loaded["history"]
    # a resumed run continues after the last epoch, and not at it
    with pytest.raises(ValueError, match="not after"):
        fresh.record(2, 1.0)
    fresh.record(3, 0.25)
    assert [r["epoch"] for r in fresh.history] == [0, 1, 2, 3]
    assert len(tr.history) == 3  # the original is unaffected
    other = EigenTracker(crit, data=data, method="power")
    with pytest.raises(ValueError, match="method"):
        other.load_state_dict(state)
    other.load_state_dict(state, strict=False)
    assert other.history == tr.history
    with pytest.raises(ValueError, match="version"):
        other.load_state_dict({"history": []})
    bad = dict(state, history=[{"epoch": 2}, {"epoch": 1}])
    with pytest.raises(ValueError, match="increasing"):
        other.load_state_dict(bad, strict=False)


def test_plot_via_tracker(problem, tmp_path):
    pytest.importorskip("matplotlib")
    import matplotlib.image as mpimg

    tr = filled_tracker(problem)
    path = tr.plot(tmp_path / "eig.png", lr_decay_epochs=[2], title="toy MLP / random data")
    with open(path, "rb") as fh:
        assert fh.read(8) == b"\x89PNG\r\n\x1a\n"
    img = mpimg.imread(path)
    assert img.shape[0] > 200 and img[..., :3].std() > 0.05


def test_no_warning_when_converged(problem):
    model, crit, data, _, _ = problem
    tr = EigenTracker(crit, data=data, method="lanczos")
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConvergenceWarning)
        assert tr.step(model, 0)["converged"] is True
