"""Tests of hessianflow.plotting: every figure is a real, non-blank PNG with the scales it promises."""

import functools
import math
import subprocess
import sys

import numpy as np
import pytest
import torch

pytest.importorskip("matplotlib")

import dense_reference  # noqa: E402

from hessianflow import plotting as P  # noqa: E402
from hessianflow.linalg.density import DensityResult  # noqa: E402

# these plots are mostly page: more than half of the pixels near-white (the shared default allows 0.3)
check_png = functools.partial(dense_reference.check_png, white=(0.5, 0.995))


def decaying_history(n=20, with_schedule=True):
    hist = []
    for e in range(n):
        rec = {"epoch": e, "eigenvalue": 200 * 0.7**e + 1.0, "top_k": [200 * 0.7**e + 1.0, 50 * 0.7**e + 0.5]}
        rec["converged"] = e != 3
        if with_schedule:
            rec["lr"] = 0.1 * 0.1 ** (e >= 10) * 0.1 ** (e >= 15)
            rec["batch_size"] = 128 * 2 ** min(e // 4, 3)
        hist.append(rec)
    return hist


# -- scale choice ------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "values, expected",
    [
        ([300.0, 30.0, 2.0], "log"),  # positive, more than two decades
        ([10.0, 9.0, 5.0, 2.0], "linear"),  # positive, less than a decade
        ([5.0, 5.0, 5.0], "linear"),
        ([-200.0, 1.0, 50.0], "symlog"),  # sign change, decades apart
        ([-2.0, 1.0, 1.5], "linear"),  # sign change, one decade at most
        ([0.0, 0.5, 100.0], "symlog"),  # zero cannot be shown on a log axis
        ([7.0], "linear"),
        ([None, 1.0, None, 1000.0], "log"),  # missing values ignored
    ],
)
def test_history_yscale(values, expected):
    assert P._history_yscale(values) == expected


# -- eigenvalue history ------------------------------------------------------------------------
def test_eigen_history_log_scale_decays_and_schedule(tmp_path):
    hist = decaying_history()
    path, fig = P.plot_eigen_history(
        hist, tmp_path / "h.png", lr_decay_epochs=[10, 15], title="c1 / CIFAR-10", return_fig=True
    )
    check_png(path)
    ax = fig.axes[0]
    assert ax.get_yscale() == "log"
    # the top eigenvalue series is drawn with the right numbers
    main = [ln for ln in ax.get_lines() if ln.get_label() == "top eigenvalue λ_1"]
    assert len(main) == 1
    np.testing.assert_allclose(main[0].get_ydata(), [r["eigenvalue"] for r in hist])
    # a second eigenvalue line from top_k
    assert any(ln.get_label() == "λ_2" for ln in ax.get_lines())
    # one dashed vertical line per lr decay, at those epochs
    vlines = [ln for ln in ax.get_lines() if ln.get_linestyle() == "--"]
    assert sorted(float(ln.get_xdata()[0]) for ln in vlines) == [10.0, 15.0]
    assert all(ln.get_xdata()[0] == ln.get_xdata()[1] for ln in vlines)
    # the not-converged epoch is marked
    bad = [ln for ln in ax.get_lines() if ln.get_label() == "not converged"]
    assert len(bad) == 1 and list(bad[0].get_xdata()) == [3.0]
    # a second panel with batch size and a twin axis with the learning rate
    assert len(fig.axes) == 3
    assert fig.axes[1].get_ylabel() == "batch size"
    assert fig.axes[2].get_ylabel().startswith("learning rate")
    assert fig.axes[2].get_yscale() == "log"
    assert fig.get_suptitle() == "c1 / CIFAR-10"
    assert fig.axes[1].get_xlabel() == "epoch"


def test_eigen_history_integer_epochs_get_integer_ticks_and_the_decay_its_first_epoch(tmp_path):
    """Four epochs gave ticks 1.25, 1.5, ...; the decay line must stand where the rate panel drops."""
    hist = [{"epoch": e, "eigenvalue": 30.0 + e, "lr": 0.1 if e <= 2 else 0.02, "batch_size": 64} for e in (1, 2, 3, 4)]
    path, fig = P.plot_eigen_history(hist, tmp_path / "h.png", lr_decay_epochs=[3], return_fig=True)
    check_png(path)
    for ax in fig.axes:
        lo, hi = ax.get_xlim()
        ticks = [t for t in ax.get_xticks() if lo <= t <= hi]
        assert len(ticks) >= 2 and all(float(t).is_integer() for t in ticks), ticks
    (decay,) = [ln for ln in fig.axes[0].get_lines() if ln.get_linestyle() == "--"]
    assert list(decay.get_xdata()) == [3, 3] and decay.get_label() == "lr decay (new rate from epoch 3)"
    # the rate panel's step drops at the same x: its last point at the old rate is epoch 2
    (rate,) = fig.axes[2].get_lines()
    xs, ys = list(rate.get_xdata()), list(rate.get_ydata())
    assert xs[[i for i, y in enumerate(ys) if y < ys[0]][0]] == 3.0
    # fractional epochs keep matplotlib's ticks
    frac = [{"epoch": e / 2, "eigenvalue": 1.0 + e} for e in range(1, 5)]
    _, fig = P.plot_eigen_history(frac, tmp_path / "f.png", return_fig=True)
    assert any(not float(t).is_integer() for t in fig.axes[0].get_xticks())


def test_eigen_history_linear_and_single_panel(tmp_path):
    hist = [{"epoch": e, "eigenvalue": 10.0 - 0.2 * e} for e in range(6)]
    path, fig = P.plot_eigen_history(hist, tmp_path / "h.png", return_fig=True)
    check_png(path)
    assert fig.axes[0].get_yscale() == "linear"
    assert len(fig.axes) == 1
    assert fig.axes[0].get_xlabel() == "epoch"
    assert fig.get_suptitle()  # a default title


def test_eigen_history_symlog_and_skips_missing(tmp_path):
    hist = [{"epoch": 0, "eigenvalue": -300.0}, {"epoch": 1, "eigenvalue": None}, {"epoch": 2, "eigenvalue": 2.0}]
    hist.append({"epoch": 3, "eigenvalue": 80.0})
    path, fig = P.plot_eigen_history(hist, tmp_path / "h.png", return_fig=True)
    check_png(path)
    ax = fig.axes[0]
    assert ax.get_yscale() == "symlog"
    main = [ln for ln in ax.get_lines() if ln.get_label() == "top eigenvalue λ_1"][0]
    assert list(main.get_xdata()) == [0.0, 2.0, 3.0]


def test_eigen_history_other_key(tmp_path):
    hist = [{"epoch": e, "eigenvalue": 1.0, "trace": 100.0 * 3**e} for e in range(4)]
    _, fig = P.plot_eigen_history(hist, tmp_path / "t.png", key="trace", return_fig=True)
    assert fig.axes[0].get_yscale() == "log"
    assert "trace" in fig.axes[0].get_ylabel()


def test_eigen_history_errors(tmp_path):
    with pytest.raises(ValueError, match="no record"):
        P.plot_eigen_history([{"epoch": 0, "eigenvalue": None}], tmp_path / "x.png")
    with pytest.raises(ValueError, match="non-finite"):
        P.plot_eigen_history([{"epoch": 0, "eigenvalue": float("nan")}], tmp_path / "x.png")
    with pytest.raises(ValueError, match="list of dicts"):
        P.plot_eigen_history({"epoch": 0}, tmp_path / "x.png")
    assert not (tmp_path / "x.png").exists()


# -- density -----------------------------------------------------------------------------------
def test_density_from_result(tmp_path):
    # A bulk near 0 and two outliers (the figure of Ghorbani et al. 2019), as quadrature nodes/weights.
    g = torch.Generator().manual_seed(0)
    bulk = torch.randn(3, 38, generator=g, dtype=torch.float64) * 0.1
    nodes = torch.cat([bulk, torch.tensor([[20.0, 35.0]] * 3, dtype=torch.float64)], dim=1)  # [3, 40]
    weights = torch.cat([torch.full((3, 38), 0.98 / 38, dtype=torch.float64), torch.full((3, 2), 0.01)], dim=1)
    res = DensityResult(nodes=nodes, weights=weights.double(), num_matvecs=120, size=120)
    path, fig = P.plot_density(res, tmp_path / "d.png", title="toy", subtitle="3 runs", return_fig=True)
    check_png(path)
    ax = fig.axes[0]
    assert ax.get_yscale() == "log"
    lo, hi = res.support()
    x0, x1 = ax.get_xlim()
    assert x0 < lo and x1 > hi  # the grid spans the support plus a margin
    assert lo == float(bulk.min()) and hi == 35.0
    (curve,) = [ln for ln in ax.get_lines() if ln.get_linestyle() == "-"]
    y = curve.get_ydata()
    assert y.min() == pytest.approx(1e-8)  # the floor between the bulk and the outliers
    assert ax.get_ylim()[0] < 1e-8 < ax.get_ylim()[1]
    # the curve is the result's own density on the plotted grid
    np.testing.assert_allclose(y, np.maximum(res.density(torch.as_tensor(curve.get_xdata())).numpy(), 1e-8))


def test_density_from_grid_linear(tmp_path):
    grid = np.linspace(-3, 3, 200)
    dens = np.exp(-(grid**2) / 2) / math.sqrt(2 * math.pi)
    path, fig = P.plot_density((grid, dens), tmp_path / "d.png", log=False, return_fig=True)
    check_png(path)
    assert fig.axes[0].get_yscale() == "linear"
    assert fig.axes[0].get_xlabel().startswith("Hessian eigenvalue")
    with pytest.raises(ValueError, match="same length"):
        P.plot_density((grid, dens[:-1]), tmp_path / "e.png")
    with pytest.raises(ValueError, match="negative"):
        P.plot_density((grid, dens - 1.0), tmp_path / "e.png")
    with pytest.raises(ValueError, match="DensityResult or a pair"):
        P.plot_density(3.0, tmp_path / "e.png")


# -- top-k, landscapes, per layer --------------------------------------------------------------
def test_topk(tmp_path):
    vals = torch.tensor([52.3, 31.0, 20.1, 11.2, 5.5, -0.3])
    path, fig = P.plot_topk(vals, tmp_path / "k.png", title="ResNet-20", return_fig=True)
    check_png(path)
    ax = fig.axes[0]
    pts = [ln for ln in ax.get_lines() if ln.get_marker() == "o"]
    xs = sorted(x for ln in pts for x in ln.get_xdata())
    ys = sorted(y for ln in pts for y in ln.get_ydata())
    assert xs == [1, 2, 3, 4, 5, 6]
    np.testing.assert_allclose(ys, sorted(vals.tolist()), rtol=1e-6)
    assert ax.get_ylim()[0] < -0.3  # the negative one is inside the axes
    with pytest.raises(ValueError, match="no eigenvalues"):
        P.plot_topk([], tmp_path / "e.png")


def test_landscape_1d(tmp_path):
    a = np.linspace(-1, 1, 31)
    loss = 0.2 + 4 * a**2
    path, fig = P.plot_landscape_1d(a[::-1], loss[::-1], tmp_path / "l.png", return_fig=True)
    check_png(path)
    ax = fig.axes[0]
    (curve,) = [ln for ln in ax.get_lines() if ln.get_label() == "loss"]
    np.testing.assert_allclose(curve.get_xdata(), a)  # sorted by alpha
    assert "eigenvector" in ax.get_xlabel() and ax.get_ylabel() == "loss"
    with pytest.raises(ValueError, match="same length"):
        P.plot_landscape_1d(a, loss[:-1], tmp_path / "e.png")
    with pytest.raises(ValueError, match="non-finite"):
        P.plot_landscape_1d(a, np.where(a > 0.5, np.inf, loss), tmp_path / "e.png")


def test_landscape_2d(tmp_path):
    a = np.linspace(-1, 1, 21)
    b = np.linspace(-0.5, 0.5, 11)
    Z = 0.1 + 5 * a[:, None] ** 2 + b[None, :] ** 2  # [len(a), len(b)]
    path, fig = P.plot_landscape_2d(a, b, Z, tmp_path / "s.png", title="c1", return_fig=True)
    check_png(path, white=(0.1, 0.9))  # filled contours: mostly colour
    ax = fig.axes[0]
    assert ax.get_xlim() == (-1.0, 1.0) and ax.get_ylim() == (-0.5, 0.5)  # alphas on x, betas on y
    assert len(fig.axes) == 2  # with a colour bar
    assert fig.axes[1].get_ylabel().startswith("loss")
    with pytest.raises(ValueError, match="shape"):
        P.plot_landscape_2d(a, b, Z.T, tmp_path / "e.png")
    # losses spanning decades get a log colour scale
    _, fig2 = P.plot_landscape_2d(a, b, np.exp(8 * Z), tmp_path / "s2.png", return_fig=True)
    assert "log" in fig2.axes[1].get_ylabel()


def test_per_layer(tmp_path):
    names = ["conv1.weight", "layer1.0.conv1.weight", "fc.weight", "fc.bias"]
    eig = [1.0, 30.0, 400.0, 2.0]
    tr = [-5.0, 100.0, 800.0, 3.0]
    path, fig = P.plot_per_layer(names, eig, tr, tmp_path / "p.png", title="ResNet", return_fig=True)
    check_png(path)
    assert len(fig.axes) == 2
    assert fig.axes[0].get_xscale() == "log"  # positive, decades apart
    assert fig.axes[1].get_xscale() == "symlog"  # a negative trace
    labels = [t.get_text() for t in fig.axes[0].get_yticklabels()]
    assert labels == names
    widths = sorted(p.get_width() + p.get_x() for p in fig.axes[0].patches)
    np.testing.assert_allclose(widths, sorted(eig))
    # one panel only
    _, fig1 = P.plot_per_layer(names, None, tr, tmp_path / "q.png", return_fig=True)
    assert len(fig1.axes) == 1 and "trace" in fig1.axes[0].get_xlabel()
    with pytest.raises(ValueError, match="4 layers"):
        P.plot_per_layer(names, eig[:3], None, tmp_path / "e.png")
    with pytest.raises(ValueError, match="eigenvalues, traces or both"):
        P.plot_per_layer(names, None, None, tmp_path / "e.png")


def test_save_is_atomic_and_creates_dirs(tmp_path):
    target = tmp_path / "a" / "b" / "k.png"
    assert P.plot_topk([3.0, 1.0], target) == str(target)
    check_png(target, min_side=200)
    assert sorted(p.name for p in target.parent.iterdir()) == ["k.png"]  # no temporary left behind


# -- optional dependency -----------------------------------------------------------------------
def test_missing_matplotlib_message(monkeypatch, tmp_path):
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(ImportError, match=r"pip install hessianflow\[plot\]"):
        P.plot_topk([1.0], tmp_path / "x.png")


@pytest.mark.slow
def test_imports_without_matplotlib_and_never_uses_pyplot(tmp_path):
    code = f"""
import sys
sys.modules["matplotlib"] = None  # as if not installed
import hessianflow, hessianflow.plotting, hessianflow.training.tracking
del sys.modules["matplotlib"]
from hessianflow.plotting import plot_topk
plot_topk([2.0, 1.0], {str(tmp_path / "k.png")!r})
assert "matplotlib.pyplot" not in sys.modules, "pyplot was imported"
print("ok")
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"
    check_png(tmp_path / "k.png", min_side=200)
