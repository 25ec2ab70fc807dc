"""Figures of Hessian analyses, saved as PNG files.

Matplotlib is optional (``pip install hessianflow[plot]``): it is imported inside each function, so the
package imports without it. The figures are built with :class:`matplotlib.figure.Figure` and saved with
the Agg canvas, never through ``pyplot``: no GUI backend is ever selected (the functions work in a
headless session, a worker thread or a job without ``$DISPLAY``), the global backend an interactive
session has chosen is left alone, and no figure is left open in pyplot's registry.

Every function saves one PNG (written to a temporary file in the target's directory and renamed onto
it, so an interrupted run never leaves a truncated image) and returns its path. ``title=`` is the
figure's headline (name the model, the data and the checkpoint there); ``subtitle=`` is a smaller second
line (the settings: batch, seed, number of runs).

The functions:

- :func:`plot_density`: the spectral density from stochastic Lanczos quadrature on a log axis, the
  figure of Ghorbani et al. (2019) and PyHessian (Yao et al. 2020).
- :func:`plot_eigen_history`: the top eigenvalue over training epochs (with learning-rate decays and,
  when logged, the batch size and learning rate), the figure of HessianFlow (Yao et al. 2018).
- :func:`plot_topk`: the top-k eigenvalues by index.
- :func:`plot_landscape_1d` / :func:`plot_landscape_2d`: the loss along the top eigenvector(s).
- :func:`plot_per_layer`: the top eigenvalue and the trace of each layer's Hessian block.
"""

from __future__ import annotations

import math
import os

from .io.checkpoint import atomic_write

__all__ = [
    "plot_density",
    "plot_eigen_history",
    "plot_topk",
    "plot_landscape_1d",
    "plot_landscape_2d",
    "plot_per_layer",
]

_DPI = 130
# PyHessian's density figure adds 1e-7 and shows [1e-10, 1e2]; a floor keeps log(0) off the axis.
_DENSITY_FLOOR = 1e-8
_MIN_DECADES = 1.0  # a log axis is chosen when the values span more than this many decades
_FAINT = ("tab:cyan", "tab:purple", "tab:olive", "tab:brown", "tab:pink", "tab:gray")


# -- helpers -----------------------------------------------------------------------------------
def _figure(nrows: int = 1, ncols: int = 1, figsize=(7.0, 4.5), **kwargs):
    """A new ``Figure`` and its axes, without pyplot (see the module docstring)."""
    try:
        from matplotlib.figure import Figure
    except ImportError as exc:
        raise ImportError(
            "hessianflow's plotting functions need matplotlib: pip install hessianflow[plot] "
            "(or pip install matplotlib)"
        ) from exc
    fig = Figure(figsize=figsize, layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False, **kwargs)
    return fig, axes


def _titles(fig, ax, title, subtitle, default):
    fig.suptitle(title if title else default, fontsize=12, fontweight="bold")
    if subtitle:
        ax.set_title(str(subtitle), fontsize=9, color="dimgray")


def _save(fig, path) -> str:
    """Save ``fig`` as a PNG at ``path`` with :func:`~hessianflow.io.checkpoint.atomic_write`; return the path.

    The directory is created if needed. A failed write raises ``OSError`` (an I/O failure, exit status
    4 in the scripts), and leaves the previous image, if any, in place.
    """
    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    atomic_write(path, lambda fh: fig.savefig(fh, format="png", dpi=_DPI), what="figure")
    return path


def _to_list(values, name: str) -> list[float]:
    """A flat list of floats from a list, a NumPy array or a torch tensor."""
    if hasattr(values, "detach"):
        values = values.detach().cpu().reshape(-1).tolist()
    elif hasattr(values, "tolist"):
        values = values.reshape(-1).tolist() if hasattr(values, "reshape") else values.tolist()
    try:
        out = [float(v) for v in values]
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{name} must be a sequence of numbers: {exc}") from exc
    return out


def _check_finite(values, name: str) -> None:
    bad = [v for v in values if not math.isfinite(v)]
    if bad:
        raise ValueError(f"{name} contains non-finite values ({bad[:3]}); nothing sensible to plot")


def _history_yscale(values) -> str:
    """The y-scale for a series: ``"log"``, ``"symlog"`` or ``"linear"``.

    ``"log"`` when every value is positive and they span more than a decade (eigenvalues over training
    typically fall by orders of magnitude); ``"symlog"`` when the values change sign (or touch zero) and
    their nonzero magnitudes span more than a decade; ``"linear"`` otherwise.
    """
    vals = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    if len(vals) < 2:
        return "linear"
    mags = [abs(v) for v in vals if v != 0.0]
    if not mags:
        return "linear"
    decades = math.log10(max(mags) / min(mags))
    if decades <= _MIN_DECADES:
        return "linear"
    return "log" if min(vals) > 0 else "symlog"


def _apply_scale(ax, values, axis: str = "y") -> str:
    scale = _history_yscale(values)
    setter = ax.set_yscale if axis == "y" else ax.set_xscale
    if scale == "symlog":
        mags = [abs(v) for v in values if v]
        # Linear within the smallest magnitude shown, so no nonzero value falls into the linear band.
        setter("symlog", linthresh=max(min(mags), max(mags) * 1e-8))
    else:
        setter(scale)
    return scale


# -- spectral density --------------------------------------------------------------------------
def plot_density(
    result_or_grid_and_density,
    path,
    title: str | None = None,
    sigma: float | None = None,
    num_points: int = 1000,
    log: bool = True,
    subtitle: str | None = None,
    margin: float = 0.05,
    return_fig: bool = False,
):
    """Plot a Hessian spectral density (stochastic Lanczos quadrature, Ghorbani et al. 2019).

    Args:
        result_or_grid_and_density: a :class:`~hessianflow.linalg.density.DensityResult` (smoothed with its
            ``density(grid, sigma)`` on a grid spanning its ``support()`` plus ``margin`` of the width
            on each side), or a pair ``(grid, density)`` of equal-length sequences.
        path: where to write the PNG.
        title: the headline (model, data, checkpoint).
        sigma: the Gaussian smoothing width for a ``DensityResult`` (``None``: its own default).
        num_points: the number of grid points for a ``DensityResult`` (PyHessian's ``num_bins`` is
            10000; 1000 is enough for a figure).
        log: a log density axis, floored at ``1e-8`` as in PyHessian's figure (which adds ``1e-7`` and
            shows ``[1e-10, 1e2]``), so that the outliers' tiny masses remain visible beside the bulk.
        subtitle: a smaller second line (number of runs, steps, the batch).
        margin: the fraction of the support's width added on each side of the grid.

    Returns:
        the path written (and the ``Figure``, with ``return_fig=True``).

    Example:
        >>> import os, tempfile, torch
        >>> from hessianflow import plot_density
        >>> grid = torch.linspace(-1.0, 10.0, 200)
        >>> density = torch.exp(-(grid - 5.0) ** 2) / 3.14159**0.5  # or a DensityResult of spectral_density
        >>> path, fig = plot_density((grid, density), os.path.join(tempfile.mkdtemp(), "density.png"), return_fig=True)
        >>> open(path, "rb").read(4), fig.axes[0].get_yscale()
        (b'\\x89PNG', 'log')
    """
    num_points = int(num_points)
    if num_points < 2:
        raise ValueError(f"num_points must be at least 2, got {num_points}")
    obj = result_or_grid_and_density
    support = None
    if hasattr(obj, "density") and hasattr(obj, "support"):
        lo, hi = (float(x) for x in obj.support())
        support = (lo, hi)
        width = hi - lo
        pad = margin * width if width > 0 else max(abs(lo), 1.0) * margin
        if sigma is not None or hasattr(obj, "default_sigma"):
            # Room for the Gaussian tails of the extreme nodes.
            pad = max(pad, 3.0 * float(sigma if sigma is not None else obj.default_sigma()))
        import torch

        grid_t = torch.linspace(lo - pad, hi + pad, num_points, dtype=torch.float64)
        dens = obj.density(grid_t, sigma=sigma)
        grid, density = _to_list(grid_t, "grid"), _to_list(dens, "density")
    else:
        try:
            grid_in, dens_in = obj
        except (TypeError, ValueError) as exc:
            raise ValueError("plot_density takes a DensityResult or a pair (grid, density)") from exc
        grid, density = _to_list(grid_in, "grid"), _to_list(dens_in, "density")
    if len(grid) != len(density) or len(grid) < 2:
        raise ValueError(f"grid and density must have the same length >= 2, got {len(grid)} and {len(density)}")
    _check_finite(grid, "grid")
    _check_finite(density, "density")
    if min(density) < -1e-12 * max(1.0, max(abs(d) for d in density)):
        raise ValueError(f"a density cannot be negative (minimum {min(density):.3g})")

    fig, axes = _figure()
    ax = axes[0, 0]
    if log:
        shown = [max(d, _DENSITY_FLOOR) for d in density]
        ax.semilogy(grid, shown, color="tab:blue", lw=1.5)
        top = max(shown)
        ax.set_ylim(_DENSITY_FLOOR / 3, top * 3 if top > _DENSITY_FLOOR else 1.0)
        ax.set_ylabel("density (log scale)")
    else:
        ax.plot(grid, density, color="tab:blue", lw=1.5)
        ax.fill_between(grid, density, color="tab:blue", alpha=0.2)
        ax.set_ylim(bottom=0)
        ax.set_ylabel("density")
    ax.set_xlim(grid[0], grid[-1])
    ax.set_xlabel("Hessian eigenvalue λ")
    if support is not None:
        # One legend entry for both lines: text beside them would sit on the outlier peaks.
        for i, x in enumerate(support):
            ax.axvline(
                x,
                color="tab:red",
                ls=":",
                lw=1,
                label=f"extreme Ritz values: λ_min ≈ {support[0]:.3g}, λ_max ≈ {support[1]:.3g}" if i == 0 else None,
            )
        ax.legend(loc="best", fontsize=8)
    ax.grid(True, which="major", alpha=0.4)
    ax.grid(True, which="minor", alpha=0.12)
    _titles(fig, ax, title, subtitle, "Hessian eigenvalue density (stochastic Lanczos quadrature)")
    out = _save(fig, path)
    return (out, fig) if return_fig else out


# -- eigenvalue over training ------------------------------------------------------------------
def _series(history, key):
    xs, ys, conv = [], [], []
    for i, rec in enumerate(history):
        if not isinstance(rec, dict):
            raise ValueError(f"history[{i}] is not a dict")
        value = rec.get(key)
        if value is None:
            continue
        x = rec.get("epoch", i)
        xs.append(float(x))
        ys.append(float(value))
        conv.append(rec.get("converged") is not False)
    return xs, ys, conv


def _further_eigenvalues(ax, history) -> list[float]:
    """Draw ``top_k[1:]`` of the records (up to the 10th eigenvalue) as fainter lines; their values."""
    values = []
    k = max((len(rec.get("top_k") or []) for rec in history), default=0)
    for j in range(1, min(k, 10)):
        px = [float(rec.get("epoch", i)) for i, rec in enumerate(history) if len(rec.get("top_k") or []) > j]
        py = [float(rec["top_k"][j]) for rec in history if len(rec.get("top_k") or []) > j]
        values += py
        ax.plot(px, py, marker=".", ms=4, lw=0.8, alpha=0.6, color=_FAINT[(j - 1) % len(_FAINT)], label=f"λ_{j + 1}")
    return values


def _schedule_panel(bx, history, has_bs: bool, has_lr: bool) -> None:
    """The batch size and learning rate over the epochs, as steps (HessianFlow's adaptive schedule).

    Axis labels in the colour of their line: a legend would cover the steps of one or the other.
    """
    if has_bs:
        bx_x = [float(r.get("epoch", i)) for i, r in enumerate(history) if r.get("batch_size") is not None]
        bx_y = [float(r["batch_size"]) for r in history if r.get("batch_size") is not None]
        bx.step(bx_x, bx_y, where="post", color="tab:green", marker=".")
        bx.set_ylabel("batch size", color="tab:green")
        bx.tick_params(axis="y", colors="tab:green")
        if min(bx_y) > 0 and max(bx_y) / min(bx_y) >= 4:
            from matplotlib.ticker import ScalarFormatter

            bx.set_yscale("log", base=2)
            bx.yaxis.set_major_formatter(ScalarFormatter())
        else:
            bx.set_ylim(0, max(bx_y) * 1.15)  # a constant batch size is a flat line, not a zoomed wiggle
    if has_lr:
        lx = bx.twinx() if has_bs else bx
        lr_x = [float(r.get("epoch", i)) for i, r in enumerate(history) if r.get("lr") is not None]
        lr_y = [float(r["lr"]) for r in history if r.get("lr") is not None]
        lx.step(lr_x, lr_y, where="post", color="tab:orange", marker=".", ls="-" if not has_bs else "--")
        lx.set_ylabel("learning rate" + (" (dashed)" if has_bs else ""), color="tab:orange")
        lx.tick_params(axis="y", colors="tab:orange")
        if min(lr_y) > 0 and max(lr_y) / min(lr_y) > 10:
            lx.set_yscale("log")


def plot_eigen_history(
    history,
    path,
    lr_decay_epochs=None,
    title: str | None = None,
    key: str = "eigenvalue",
    subtitle: str | None = None,
    return_fig: bool = False,
):
    """Plot a tracked quantity (by default the top Hessian eigenvalue) over training epochs.

    The y-axis is logarithmic when the values are positive and span more than a decade, symmetric-log
    when they span decades and change sign, linear otherwise (see :func:`_history_yscale`). Points whose
    solve did not converge (``converged`` is ``False``) are drawn as red crosses. When the records carry
    ``top_k`` lists longer than one (and ``key`` is ``"eigenvalue"``), the further eigenvalues are drawn
    as fainter lines. When they carry ``batch_size`` and/or ``lr``, a second panel shows them (the
    schedule of HessianFlow's adaptive batch size, Yao et al. 2018).

    Args:
        history: a list of dicts with ``"epoch"`` and ``key`` (records without ``key`` or with ``None``
            are skipped), e.g. :attr:`hessianflow.training.tracking.EigenTracker.history`.
        path: where to write the PNG.
        lr_decay_epochs: the first epoch run at each decayed learning rate (dashed vertical lines, where
            the rate panel drops; the records' ``lr`` is the rate each epoch ran at). train.py's
            ``--lr-decay-epoch d`` decays the rate *after* epoch ``d``: pass ``d + 1``.
        title: the headline (model, data).
        key: the record field to plot.
        subtitle: a smaller second line.
        return_fig: also return the ``Figure`` (for inspection in tests or notebooks).

    Returns:
        the path written (and the figure, with ``return_fig=True``).

    Example:
        >>> import os, tempfile
        >>> from hessianflow.plotting import plot_eigen_history
        >>> history = [{"epoch": e, "eigenvalue": 40.0 / e, "lr": 0.1 if e < 3 else 0.02} for e in range(1, 6)]
        >>> path = plot_eigen_history(history, os.path.join(tempfile.mkdtemp(), "eig.png"), lr_decay_epochs=[3])
        >>> open(path, "rb").read(4)
        b'\\x89PNG'
    """
    if not isinstance(history, (list, tuple)):
        raise ValueError(f"history must be a list of dicts, got {type(history).__name__}")
    xs, ys, conv = _series(history, key)
    if not ys:
        raise ValueError(f"no record in the history has a value for {key!r}")
    _check_finite(ys, key)
    has_bs = any(rec.get("batch_size") is not None for rec in history)
    has_lr = any(rec.get("lr") is not None for rec in history)
    two = has_bs or has_lr
    fig, axes = _figure(
        2 if two else 1,
        1,
        figsize=(7.5, 6.0 if two else 4.5),
        sharex=True,
        **({"height_ratios": [3, 1.3]} if two else {}),
    )
    ax = axes[0, 0]
    label = "top eigenvalue λ_1" if key == "eigenvalue" else key
    ax.plot(xs, ys, marker="o", ms=5, lw=1.8, color="tab:blue", label=label, zorder=3)
    values_for_scale = list(ys)
    if key == "eigenvalue":
        values_for_scale += _further_eigenvalues(ax, history)
    bad = [(x, y) for x, y, c in zip(xs, ys, conv) if not c]
    if bad:
        ax.plot(*zip(*bad), ls="none", marker="x", ms=9, mew=2, color="tab:red", label="not converged", zorder=4)
    scale = _apply_scale(ax, values_for_scale)
    decays = sorted(float(e) for e in (lr_decay_epochs or []))
    # The epochs go in the legend entry: text beside the lines would sit on the data points. "from epoch
    # N": the first epoch run at the new rate, where the rate panel's step drops (an epoch's record holds
    # the rate it was trained with), as the scripts' epoch line says it.
    plural = "s" if len(decays) > 1 else ""
    decay_label = f"lr decay (new rate from epoch{plural} " + ", ".join(f"{e:g}" for e in decays) + ")"
    for i, e in enumerate(decays):
        for a in axes[:, 0]:
            a.axvline(e, color="gray", ls="--", lw=1.2, label=decay_label if (i == 0 and a is ax) else None)
    if all(float(x).is_integer() for x in xs):  # whole epochs: no ticks at 1.25, 1.5, ...
        from matplotlib.ticker import MaxNLocator

        for a in axes[:, 0]:
            a.xaxis.set_major_locator(MaxNLocator(integer=True))
    ylabel = "Hessian eigenvalue" if key == "eigenvalue" else key
    ax.set_ylabel(ylabel + ("" if scale == "linear" else f" ({scale} scale)"))
    ax.grid(True, which="major", alpha=0.4)
    ax.grid(True, which="minor", alpha=0.12)
    ax.legend(loc="best", fontsize=8)
    if two:
        bx = axes[1, 0]
        _schedule_panel(bx, history, has_bs, has_lr)
        bx.grid(True, alpha=0.4)
        bx.set_xlabel("epoch")
    else:
        ax.set_xlabel("epoch")
    _titles(fig, ax, title, subtitle, "Top Hessian eigenvalue during training")
    out = _save(fig, path)
    return (out, fig) if return_fig else out


# -- top-k -------------------------------------------------------------------------------------
def plot_topk(eigenvalues, path, title: str | None = None, subtitle: str | None = None, return_fig: bool = False):
    """A stem plot of eigenvalues by index (1 = the largest), e.g. ``EigenResult.eigenvalues``.

    Args:
        eigenvalues: a sequence (list, array, tensor) of eigenvalues, in the order to show.
        path: where to write the PNG.
        title: the headline (model, data, checkpoint).
        subtitle: a smaller second line.

    Returns:
        the path written (and the ``Figure``, with ``return_fig=True``).

    Example:
        >>> import os, tempfile
        >>> from hessianflow.plotting import plot_topk
        >>> path = plot_topk([52.1, 20.3, 11.8, 7.5], os.path.join(tempfile.mkdtemp(), "topk.png"), title="top-4")
        >>> open(path, "rb").read(4)
        b'\\x89PNG'
    """
    vals = _to_list(eigenvalues, "eigenvalues")
    if not vals:
        raise ValueError("no eigenvalues to plot")
    _check_finite(vals, "eigenvalues")
    idx = list(range(1, len(vals) + 1))
    fig, axes = _figure(figsize=(max(5.0, min(12.0, 0.45 * len(vals) + 3.0)), 4.5))
    ax = axes[0, 0]
    pos = [(i, v) for i, v in zip(idx, vals) if v >= 0]
    neg = [(i, v) for i, v in zip(idx, vals) if v < 0]
    for pts, color, label in ((pos, "tab:blue", "λ ≥ 0"), (neg, "tab:red", "λ < 0")):
        if pts:
            xi, yi = zip(*pts)
            ax.vlines(xi, 0, yi, color=color, lw=2)
            ax.plot(xi, yi, "o", color=color, ms=7, label=label)
    ax.axhline(0, color="black", lw=0.8)
    if len(vals) <= 20:
        for i, v in zip(idx, vals):
            ax.annotate(
                f"{v:.3g}",
                (i, v),
                xytext=(0, 6 if v >= 0 else -12),
                textcoords="offset points",
                ha="center",
                fontsize=8,
            )
    ax.set_xticks(idx if len(idx) <= 30 else idx[:: max(1, len(idx) // 15)])
    ax.set_xlim(0.3, len(vals) + 0.7)
    lo, hi = min(0.0, min(vals)), max(0.0, max(vals))
    span = hi - lo if hi > lo else 1.0
    ax.set_ylim(lo - 0.12 * span if lo < 0 else 0.0, hi + 0.12 * span)
    ax.set_xlabel("index i (eigenvalues in the order given; 1 = largest)")
    ax.set_ylabel("Hessian eigenvalue λ_i")
    ax.grid(True, alpha=0.4)
    if neg and pos:
        ax.legend(loc="best", fontsize=8)
    _titles(fig, ax, title, subtitle, f"Top-{len(vals)} Hessian eigenvalues")
    out = _save(fig, path)
    return (out, fig) if return_fig else out


# -- loss landscape ----------------------------------------------------------------------------
def plot_landscape_1d(
    alphas,
    losses,
    path,
    title: str | None = None,
    subtitle: str | None = None,
    xlabel: str | None = None,
    return_fig: bool = False,
):
    """The loss along one direction, :math:`L(\\theta + \\alpha v)`, with ``v`` the top eigenvector.

    Args:
        alphas: the step sizes :math:`\\alpha` (0 is the trained parameters, marked on the plot).
        losses: the loss at each step, same length.
        path: where to write the PNG.
        title: the headline (model, data, checkpoint).
        subtitle: a smaller second line.
        xlabel: the x-axis label (default: the step along the top eigenvector).

    Returns:
        the path written (and the ``Figure``, with ``return_fig=True``).

    Example:
        >>> import os, tempfile
        >>> from hessianflow.plotting import plot_landscape_1d
        >>> alphas = [-1.0, -0.5, 0.0, 0.5, 1.0]
        >>> losses = [0.5 + 2.0 * a * a for a in alphas]  # e.g. hessianflow.curvature.analysis.loss_landscape
        >>> path = plot_landscape_1d(alphas, losses, os.path.join(tempfile.mkdtemp(), "l1d.png"))
        >>> open(path, "rb").read(4)
        b'\\x89PNG'
    """
    a = _to_list(alphas, "alphas")
    loss = _to_list(losses, "losses")
    if len(a) != len(loss) or len(a) < 2:
        raise ValueError(f"alphas and losses must have the same length >= 2, got {len(a)} and {len(loss)}")
    _check_finite(a, "alphas")
    _check_finite(loss, "losses")
    order = sorted(range(len(a)), key=a.__getitem__)
    a, loss = [a[i] for i in order], [loss[i] for i in order]
    fig, axes = _figure()
    ax = axes[0, 0]
    ax.plot(a, loss, marker="o", ms=3, lw=1.8, color="tab:blue", label="loss")
    if a[0] <= 0.0 <= a[-1]:
        ax.axvline(0.0, color="tab:red", ls=":", lw=1.2, label="trained parameters (α = 0)")
        j = min(range(len(a)), key=lambda i: abs(a[i]))
        ax.plot([a[j]], [loss[j]], "o", color="tab:red", ms=8, zorder=3)
    if min(loss) > 0 and max(loss) / min(loss) > 100:
        ax.set_yscale("log")
        ax.set_ylabel("loss (log scale)")
    else:
        ax.set_ylabel("loss")
    ax.set_xlabel(xlabel or "step α along the top Hessian eigenvector (θ + α·v₁, ‖v₁‖ = 1)")
    ax.grid(True, alpha=0.4)
    ax.legend(loc="best", fontsize=8)
    _titles(fig, ax, title, subtitle, "Loss along the top Hessian eigenvector")
    out = _save(fig, path)
    return (out, fig) if return_fig else out


def plot_landscape_2d(
    alphas,
    betas,
    losses_2d,
    path,
    title: str | None = None,
    subtitle: str | None = None,
    levels: int = 30,
    log: bool | None = None,
    return_fig: bool = False,
):
    """The loss on a plane, :math:`L(\\theta + \\alpha v_1 + \\beta v_2)`, as filled contours.

    Args:
        alphas: the steps along :math:`v_1` (the top eigenvector), length ``m``.
        betas: the steps along :math:`v_2` (the second eigenvector), length ``p``.
        losses_2d: the losses, shape ``[m, p]``: ``losses_2d[i][j]`` is the loss at
            ``(alphas[i], betas[j])``.
        path: where to write the PNG.
        title: the headline (model, data, checkpoint).
        subtitle: a smaller second line.
        levels: the number of contour levels.
        log: logarithmic colour levels; ``None`` (default): when the losses are positive and span more
            than two decades (loss surfaces rise steeply away from a minimum).

    Returns:
        the path written (and the ``Figure``, with ``return_fig=True``).

    Example:
        >>> import os, tempfile, torch
        >>> from hessianflow.plotting import plot_landscape_2d
        >>> a = torch.linspace(-1, 1, 5)
        >>> losses = 0.5 + 2.0 * a[:, None] ** 2 + 0.5 * a[None, :] ** 2  # [alphas, betas]
        >>> path = plot_landscape_2d(a, a, losses, os.path.join(tempfile.mkdtemp(), "l2d.png"))
        >>> open(path, "rb").read(4)
        b'\\x89PNG'
    """
    a = _to_list(alphas, "alphas")
    b = _to_list(betas, "betas")
    if hasattr(losses_2d, "detach"):
        losses_2d = losses_2d.detach().cpu().tolist()
    elif hasattr(losses_2d, "tolist"):
        losses_2d = losses_2d.tolist()
    try:
        Z = [[float(v) for v in row] for row in losses_2d]
    except (TypeError, ValueError) as exc:
        raise ValueError(f"losses_2d must be a 2-D array of numbers: {exc}") from exc
    if len(a) < 2 or len(b) < 2:
        raise ValueError("alphas and betas need at least 2 points each")
    if len(Z) != len(a) or any(len(row) != len(b) for row in Z):
        shape = (len(Z), len(Z[0]) if Z else 0)
        raise ValueError(f"losses_2d must have shape [len(alphas), len(betas)] = [{len(a)}, {len(b)}], got {shape}")
    flat = [v for row in Z for v in row]
    _check_finite(a, "alphas")
    _check_finite(b, "betas")
    _check_finite(flat, "losses_2d")
    import numpy as np

    Zt = np.asarray(Z, dtype=float).T  # contourf wants [len(y), len(x)]
    lo, hi = float(Zt.min()), float(Zt.max())
    if log is None:
        log = lo > 0 and hi / lo > 100
    if log and lo <= 0:
        raise ValueError("log=True needs positive losses")
    fig, axes = _figure(figsize=(6.8, 5.4))
    ax = axes[0, 0]
    if hi <= lo:
        hi = lo + 1.0
    if log:
        from matplotlib.colors import LogNorm

        lv = np.geomspace(lo, hi, int(levels))
        cs = ax.contourf(a, b, Zt, levels=lv, norm=LogNorm(vmin=lo, vmax=hi), cmap="viridis")
    else:
        from matplotlib.ticker import MaxNLocator

        lv = MaxNLocator(int(levels)).tick_values(lo, hi)
        cs = ax.contourf(a, b, Zt, levels=lv, cmap="viridis")
    ax.contour(a, b, Zt, levels=lv[:: max(1, len(lv) // 8)], colors="white", linewidths=0.6, alpha=0.7)
    if log:
        from matplotlib.ticker import LogFormatterSciNotation, LogLocator

        cb = fig.colorbar(cs, ax=ax, ticks=LogLocator(), format=LogFormatterSciNotation())
    else:
        cb = fig.colorbar(cs, ax=ax)
    cb.set_label("loss" + (" (log colour scale)" if log else ""))
    if a[0] <= 0 <= a[-1] and b[0] <= 0 <= b[-1]:
        ax.plot([0.0], [0.0], marker="*", color="tab:red", ms=13, mec="white", ls="none", label="trained parameters")
        ax.legend(loc="upper right", fontsize=8)
    ax.set_xlabel("α along v₁ (top Hessian eigenvector)")
    ax.set_ylabel("β along v₂ (second eigenvector)")
    _titles(fig, ax, title, subtitle, "Loss on the plane of the top two Hessian eigenvectors")
    out = _save(fig, path)
    return (out, fig) if return_fig else out


# -- per layer ---------------------------------------------------------------------------------
def plot_per_layer(
    names, eigenvalues, traces, path, title: str | None = None, subtitle: str | None = None, return_fig: bool = False
):
    """Horizontal bars of each layer's top Hessian eigenvalue and trace (its diagonal block's).

    Args:
        names: the layer (parameter or module) names, top to bottom.
        eigenvalues: the top eigenvalue of each layer's block, or ``None`` to leave the panel out.
        traces: the trace of each layer's block, or ``None`` to leave the panel out.
        path: where to write the PNG.
        title: the headline (model, data, checkpoint).
        subtitle: a smaller second line.

    Returns:
        the path written (and the ``Figure``, with ``return_fig=True``).

    Example:
        >>> import os, tempfile
        >>> from hessianflow.plotting import plot_per_layer
        >>> names = ["conv1", "conv2", "fc"]
        >>> path = os.path.join(tempfile.mkdtemp(), "layers.png")
        >>> path = plot_per_layer(names, [12.0, 3.5, 0.8], [40.0, 9.0, 1.1], path)
        >>> open(path, "rb").read(4)
        b'\\x89PNG'
    """
    names = [str(n) for n in names]
    if not names:
        raise ValueError("no layers to plot")
    panels = []
    for vals, label in ((eigenvalues, "top eigenvalue λ_max"), (traces, "trace tr(H)")):
        if vals is None:
            continue
        v = _to_list(vals, label)
        if len(v) != len(names):
            raise ValueError(f"{label}: {len(v)} values for {len(names)} layers")
        _check_finite(v, label)
        panels.append((v, label))
    if not panels:
        raise ValueError("pass eigenvalues, traces or both")
    height = max(3.0, 0.32 * len(names) + 1.8)
    fig, axes = _figure(1, len(panels), figsize=(5.0 + 3.2 * len(panels), height), sharey=True)
    y = list(range(len(names)))
    for col, (v, label) in enumerate(panels):
        ax = axes[0, col]
        colors = ["tab:blue" if x >= 0 else "tab:red" for x in v]
        scale = _history_yscale(v)
        if scale == "log":
            # Bars on a log axis start at a floor below the smallest value, not at 0.
            left = min(v) / 3
            ax.barh(y, [x - left for x in v], left=left, color=colors)
            ax.set_xscale("log")
        else:
            ax.barh(y, v, color=colors)
            _apply_scale(ax, v, axis="x")
            ax.axvline(0, color="black", lw=0.8)
        if len(names) <= 40:
            for yi, x in zip(y, v):
                ax.annotate(
                    f" {x:.3g} ",
                    (x, yi),
                    va="center",
                    ha="left" if x >= 0 else "right",
                    fontsize=7,
                    annotation_clip=False,
                )
        ax.margins(x=0.12)
        ax.set_axisbelow(True)
        ax.set_xlabel(label + ("" if scale == "linear" else f" ({scale} scale)"))
        ax.grid(True, axis="x", which="both", alpha=0.35)
        if col == 0:
            ax.set_yticks(y)
            ax.set_yticklabels(names, fontsize=8)
            ax.invert_yaxis()
            ax.set_ylabel("layer")
    _titles(fig, axes[0, 0], title, subtitle, "Hessian curvature per layer (diagonal blocks)")
    out = _save(fig, path)
    return (out, fig) if return_fig else out
