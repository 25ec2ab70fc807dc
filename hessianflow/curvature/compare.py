"""The approximation audit: how far the GGN, the empirical Fisher and a block-diagonal Hessian are from the
Hessian, on the user's own model and data, in one call.

For each kind of curvature, against the Hessian :math:`H`:

* the top-``k`` eigenvalues (Lanczos, ``which="LA"``) and their relative errors
  :math:`|\\lambda_i(K) - \\lambda_i(H)| / |\\lambda_i(H)|`;
* the overlap of the top-``k`` eigenspaces: the cosines of the principal angles between them (Björck &
  Golub 1973), i.e. the singular values of :math:`U_H^\\top U_K`, and their mean square
  :math:`\\|U_H^\\top U_K\\|_F^2 / k \\in [0, 1]` (1: the same subspace; about ``k/n`` for random ones);
* the trace ratio :math:`\\operatorname{tr} K / \\operatorname{tr} H` (:func:`hessianflow.linalg.trace.trace`,
  the same seed for every kind, so their sampling errors are correlated);
* the Wasserstein-1 distance between the spectral densities: between the stochastic Lanczos quadrature
  measures (:func:`hessianflow.linalg.density.spectral_density`, each the average of its runs' Gauss rules, the
  same start vectors for every kind), computed exactly from their cumulative distribution functions
  (:math:`W_1 = \\int |F_K(t) - F_H(t)|\\,dt`), without a grid or a smoothing width; also divided by the
  width of the Hessian's spectrum.

Block-diagonal approximations are known to misplace eigenvalues by order one in mid-scale language models;
this makes the check one call on any model.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from ..linalg.algebra import BlockDiagonalOperator
from ..linalg.density import DensityResult, spectral_density
from ..linalg.eigen import EigenResult, lanczos
from ..linalg.trace import trace
from .analysis import layer_blocks
from .operators import EmpiricalFisherOperator, GGNOperator, HessianOperator

__all__ = [
    "KindComparison",
    "CurvatureComparison",
    "compare_curvatures",
    "plot_comparison",
    "wasserstein1",
    "parameter_blocks",
]

KINDS = ("hessian", "ggn", "empirical_fisher", "block_diagonal")
#: every kind compare_curvatures knows: the defaults and the sampled Fisher (GGNOperator(mc_samples=))
ALL_KINDS = (*KINDS, "sampled_fisher")


@dataclass
class KindComparison:
    """One kind of curvature against the Hessian (see :func:`compare_curvatures`).

    Attributes:
        kind: ``"hessian"``, ``"ggn"``, ``"empirical_fisher"`` or ``"block_diagonal"``.
        eigenvalues: its top-``k`` eigenvalues, descending.
        top_k_rel_error: :math:`|\\lambda_i(K) - \\lambda_i(H)| / |\\lambda_i(H)|`, ``k`` numbers.
        principal_cosines: the singular values of :math:`U_H^\\top U_K`, descending (cosines of the
            principal angles between the top-``k`` eigenspaces).
        subspace_overlap: :math:`\\|U_H^\\top U_K\\|_F^2 / k`, the mean squared cosine.
        trace: its trace estimate, and ``trace_stderr`` its standard error.
        trace_ratio: :math:`\\operatorname{tr} K / \\operatorname{tr} H` (of the estimates).
        density_w1: Wasserstein-1 distance between its SLQ spectral measure and the Hessian's.
        density_w1_rel: ``density_w1`` divided by the width of the Hessian's SLQ support.
        converged: whether every one of its top-``k`` eigenpairs converged.
        num_matvecs: products with its operator spent (for ``block_diagonal``: block products, each
            costing one Hessian product per block).

    Example:
        >>> kc = KindComparison("ggn", [2.0], [0.0], [1.0], 1.0, 3.0, 0.0, 1.0, 0.0, 0.0, True, 10)
        >>> sorted(kc.to_dict())[:4]
        ['converged', 'density_w1', 'density_w1_rel', 'eigenvalues']
    """

    kind: str
    eigenvalues: list
    top_k_rel_error: list
    principal_cosines: list
    subspace_overlap: float
    trace: float
    trace_stderr: float
    trace_ratio: float
    density_w1: float
    density_w1_rel: float
    converged: bool
    num_matvecs: int

    def to_dict(self) -> dict:
        """JSON-ready plain Python values."""
        return {
            "eigenvalues": [float(v) for v in self.eigenvalues],
            "top_k_rel_error": [float(v) for v in self.top_k_rel_error],
            "principal_cosines": [float(v) for v in self.principal_cosines],
            "subspace_overlap": float(self.subspace_overlap),
            "trace": float(self.trace),
            "trace_stderr": float(self.trace_stderr),
            "trace_ratio": float(self.trace_ratio),
            "density_w1": float(self.density_w1),
            "density_w1_rel": float(self.density_w1_rel),
            "converged": bool(self.converged),
            "num_matvecs": int(self.num_matvecs),
        }


@dataclass
class CurvatureComparison:
    """The result of :func:`compare_curvatures`: one :class:`KindComparison` per kind.

    Attributes:
        kinds: ``{kind: KindComparison}``, the Hessian first.
        k: the number of top eigenpairs compared.
        densities: ``{kind: DensityResult}``, the SLQ rules (for :func:`plot_comparison`).
        eigen: ``{kind: EigenResult}``, the Lanczos results (eigenvectors included).

    Example:
        >>> import torch
        >>> from torch import nn
        >>> torch.manual_seed(0)
        <torch._C.Generator object at ...>
        >>> model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
        >>> x, y = torch.randn(16, 3, dtype=torch.float64), torch.randint(0, 2, (16,))
        >>> res = compare_curvatures(model, nn.CrossEntropyLoss(), data=(x, y), k=2, seed=0)
        >>> list(res.to_dict()), res.to_dict()["hessian"]["top_k_rel_error"]
        (['hessian', 'ggn', 'empirical_fisher', 'block_diagonal'], [0.0, 0.0])
        >>> print(res.table().splitlines()[0])
        | kind | top-2 eigenvalues | rel. error | subspace overlap | trace ratio | W1 (rel.) |
    """

    kinds: dict
    k: int
    densities: dict = field(default_factory=dict)
    eigen: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        """``{kind: {...}}`` with at least ``top_k_rel_error``, ``subspace_overlap`` and ``trace_ratio``."""
        return {kind: kc.to_dict() for kind, kc in self.kinds.items()}

    def table(self) -> str:
        """A Markdown table, one row per kind."""
        head = f"| kind | top-{self.k} eigenvalues | rel. error | subspace overlap | trace ratio | W1 (rel.) |"
        rows = [head, "|---|---|---|---|---|---|"]
        for kind, kc in self.kinds.items():
            eig = ", ".join(f"{v:.4g}" for v in kc.eigenvalues)
            err = ", ".join(f"{v:.2g}" for v in kc.top_k_rel_error)
            rows.append(
                f"| {kind} | {eig} | {err} | {kc.subspace_overlap:.3f} | {kc.trace_ratio:.3f} | "
                f"{kc.density_w1:.3g} ({kc.density_w1_rel:.3f}) |"
            )
        return "\n".join(rows)


def wasserstein1(a: DensityResult, b: DensityResult) -> float:
    """:math:`W_1 = \\int |F_a(t) - F_b(t)|\\,dt` between two SLQ spectral measures, exactly.

    Each measure is the average of its runs' Gauss quadrature rules (nodes with weights summing to 1
    per run); :math:`F` is its cumulative distribution function, a step function, so the integral is a
    finite sum over the sorted nodes of both.

    Example:
        >>> import torch
        >>> a = DensityResult(torch.tensor([[0.0, 1.0]]), torch.tensor([[0.5, 0.5]]), 0, 2)
        >>> b = DensityResult(torch.tensor([[0.0, 3.0]]), torch.tensor([[0.5, 0.5]]), 0, 2)
        >>> wasserstein1(a, b)  # half the mass moved by 2
        1.0
    """
    xa, wa = a.nodes.reshape(-1).double(), (a.weights / a.num_runs).reshape(-1).double()
    xb, wb = b.nodes.reshape(-1).double(), (b.weights / b.num_runs).reshape(-1).double()
    x = torch.cat([xa, xb])
    w = torch.cat([wa, -wb])
    order = torch.argsort(x)
    x, cdf_diff = x[order], torch.cumsum(w[order], dim=0)
    return float((cdf_diff[:-1].abs() * (x[1:] - x[:-1])).sum())


def _block_indices(model: nn.Module, H: HessianOperator):
    """``layer_blocks(model)`` as index sets into the operator's flat parameter vector."""
    offsets, start = {}, 0
    for p in H.params:
        offsets[id(p)] = (start, p.numel())
        start += p.numel()
    names, blocks = [], []
    for name, params in layer_blocks(model):
        idx = [torch.arange(offsets[id(p)][0], sum(offsets[id(p)])) for p in params if id(p) in offsets]
        if idx:
            names.append(name)
            blocks.append(torch.cat(idx))
    return blocks, names


def parameter_blocks(op, by: str = "param"):
    """``(blocks, names)``: index sets into a curvature operator's flat vector, one per parameter tensor
    (``by="param"``: Zhang et al. 2024's blocks, e.g. a layer's weight and its bias apart) or per module
    (``by="layer"``: :func:`~hessianflow.curvature.analysis.layer_blocks`), for
    :func:`~hessianflow.linalg.density.block_densities` and
    :class:`~hessianflow.linalg.algebra.BlockDiagonalOperator`.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from hessianflow import HessianOperator
        >>> model = nn.Linear(2, 1).double()
        >>> H = HessianOperator(model, nn.MSELoss(), data=(torch.zeros(3, 2), torch.zeros(3, 1)))
        >>> blocks, names = parameter_blocks(H)
        >>> names, [b.tolist() for b in blocks]
        (['weight', 'bias'], [[0, 1], [2]])
    """
    if by == "layer":
        return _block_indices(op.model, op)
    if by != "param":
        raise ValueError(f"by must be 'param' or 'layer', got {by!r}")
    blocks, start = [], 0
    for p in op.params:
        blocks.append(torch.arange(start, start + p.numel()))
        start += p.numel()
    return blocks, list(op.param_names)


def _operator(kind: str, model, criterion, data, dataloader, H, operator_kwargs, mc_samples=1, mc_seed=0):
    if kind == "hessian":
        return H
    if kind == "sampled_fisher":
        return GGNOperator(model, criterion, data=data, dataloader=dataloader, mc_samples=mc_samples, seed=mc_seed,
                           **operator_kwargs)  # fmt: skip
    if kind == "ggn":
        return GGNOperator(model, criterion, data=data, dataloader=dataloader, **operator_kwargs)
    if kind == "empirical_fisher":
        return EmpiricalFisherOperator(model, criterion, data=data, dataloader=dataloader, **operator_kwargs)
    if kind == "block_diagonal":
        blocks, names = _block_indices(model, H)
        return BlockDiagonalOperator(H, blocks, names)
    raise ValueError(f"unknown kind {kind!r}: expected one of {ALL_KINDS}")


def _compare(kind, ref: EigenResult, res: EigenResult, tr, tr_h, dens, dens_h, k, used) -> KindComparison:
    lam_h, lam = ref.eigenvalues.double(), res.eigenvalues.double()
    rel = ((lam - lam_h).abs() / lam_h.abs().clamp_min(torch.finfo(torch.float64).tiny)).tolist()
    M = ref.eigenvectors.double().T @ res.eigenvectors.double()  # [k, k]
    cos = torch.linalg.svdvals(M).clamp(max=1.0)
    lo, hi = dens_h.support()
    w1 = wasserstein1(dens, dens_h)
    return KindComparison(
        kind=kind,
        eigenvalues=lam.tolist(),
        top_k_rel_error=rel,
        principal_cosines=cos.cpu().tolist(),
        subspace_overlap=float((cos**2).sum() / k),
        trace=tr.estimate,
        trace_stderr=tr.stderr,
        trace_ratio=tr.estimate / tr_h.estimate if tr_h.estimate != 0 else float("nan"),
        density_w1=w1,
        density_w1_rel=w1 / (hi - lo) if hi > lo else float("nan"),
        converged=bool(res.converged.all()),
        num_matvecs=used,
    )


def compare_curvatures(
    model: nn.Module,
    criterion=None,
    data=None,
    dataloader=None,
    *,
    loss_fn=None,
    kinds=KINDS,
    k: int = 5,
    seed=0,
    tol: float = 1e-4,
    trace_matvecs: int = 100,
    num_runs: int = 5,
    num_steps: int = 40,
    max_iter: int | None = None,
    mc_samples: int = 1,
    **operator_kwargs,
) -> CurvatureComparison:
    """Compare the GGN, the empirical Fisher and the block-diagonal Hessian with the Hessian.

    For every kind in ``kinds`` the operator is built on the same model, loss and data
    (:class:`~hessianflow.curvature.HessianOperator`, :class:`~hessianflow.curvature.GGNOperator`,
    :class:`~hessianflow.curvature.EmpiricalFisherOperator`, and for ``"block_diagonal"`` the Hessian with
    every block off the diagonal removed, the blocks being :func:`hessianflow.curvature.analysis.layer_blocks`'
    (one per module with parameters of its own): a
    :class:`~hessianflow.linalg.algebra.BlockDiagonalOperator`); then its top-``k`` eigenpairs by
    :func:`hessianflow.linalg.eigen.lanczos`, its trace by :func:`hessianflow.linalg.trace.trace` and its
    spectral density by :func:`hessianflow.linalg.density.spectral_density`, each with the same ``seed`` for
    every kind. The numbers reported are described in the module docstring and in :class:`KindComparison`.

    Costs: a block-diagonal product is one Hessian product per block (``B`` per product).

    Args:
        model: the network.
        criterion: ``criterion(model(inputs), targets)``, or ``loss_fn=`` (for the GGN an
            :class:`~hessianflow.curvature.losses.OutputLoss` such as
            :func:`hessianflow.curvature.losses.causal_lm_loss`).
        data: one batch; or ``dataloader=`` (then ``reduction=`` as for the operators).
        loss_fn: see ``criterion``.
        kinds: which curvatures (of :data:`ALL_KINDS`; ``"sampled_fisher"``, the GGN's Monte Carlo estimate
            with ``mc_samples`` targets drawn per position, is not among the defaults); ``"hessian"`` is
            always computed (the reference) and reported first.
        k: top eigenpairs to compare (default 5).
        seed: one seed for every random vector (Lanczos start, trace, SLQ).
        tol: Lanczos tolerance, on each eigenvalue's relative error (:func:`~hessianflow.linalg.eigen.lanczos`'s
            default criterion); default ``1e-4``, three digits beyond what the table shows.
        trace_matvecs: products per trace estimate (default 100, as :func:`~hessianflow.linalg.trace.trace`).
        num_runs, num_steps: SLQ runs and Lanczos steps per run (defaults 5 and 40: fewer than
            :func:`~hessianflow.linalg.density.spectral_density`'s 10 x 90, as the comparison needs the shape of
            the density and its mass, not its fine detail).
        max_iter: Lanczos products at most per kind (default: Lanczos' own).
        mc_samples: the sampled Fisher's draws per position (default 1, as curvlinops'); its draws' seed
            is ``seed`` (0 when ``seed`` is not an int).
        **operator_kwargs: passed to every operator (``params=``, ``reduction=``, ``micro_batch_size=``...).

    Returns:
        A :class:`CurvatureComparison`; its ``to_dict()`` maps each kind to its numbers.

    Example:
        See :class:`CurvatureComparison`; the GGN of a linear model with squared error *is* the Hessian:

        >>> import torch
        >>> from torch import nn
        >>> torch.manual_seed(0)
        <torch._C.Generator object at ...>
        >>> x, y = torch.randn(20, 4, dtype=torch.float64), torch.randn(20, 1, dtype=torch.float64)
        >>> res = compare_curvatures(nn.Linear(4, 1).double(), nn.MSELoss(), data=(x, y), kinds=("ggn",), k=2)
        >>> d = res.to_dict()["ggn"]
        >>> max(d["top_k_rel_error"]) < 1e-8, round(d["subspace_overlap"], 6), round(d["trace_ratio"], 6)
        (True, 1.0, 1.0)
    """
    kinds = ["hessian"] + [kd for kd in kinds if kd != "hessian"]
    for kd in kinds:
        if kd not in ALL_KINDS:
            raise ValueError(f"unknown kind {kd!r}: expected one of {ALL_KINDS}")
    if loss_fn is not None:
        operator_kwargs["loss_fn"] = loss_fn
    H = HessianOperator(model, criterion, data=data, dataloader=dataloader, **operator_kwargs)
    lanczos_kw = {"k": k, "which": "LA", "tol": tol, "seed": seed}
    if max_iter is not None:
        lanczos_kw["max_iter"] = max_iter
    out, densities, eigen = {}, {}, {}
    ref = tr_h = dens_h = None
    for kind in kinds:
        mc_seed = seed if isinstance(seed, int) and not isinstance(seed, bool) else 0
        op = _operator(kind, model, criterion, data, dataloader, H, operator_kwargs, mc_samples, mc_seed)
        start = op.num_matvecs
        res = lanczos(op, **lanczos_kw)
        tr = trace(op, num_matvecs=trace_matvecs, seed=seed)
        dens = spectral_density(op, num_runs=num_runs, num_steps=num_steps, seed=seed)
        if kind == "hessian":
            ref, tr_h, dens_h = res, tr, dens
        out[kind] = _compare(kind, ref, res, tr, tr_h, dens, dens_h, k, op.num_matvecs - start)
        densities[kind], eigen[kind] = dens, res
    return CurvatureComparison(kinds=out, k=k, densities=densities, eigen=eigen)


def plot_comparison(result: CurvatureComparison, path, title: str | None = None, num_points: int = 600):
    """One figure: the top-``k`` eigenvalues of each kind (left) and their spectral densities (right).

    The densities are the SLQ rules smoothed on one grid spanning every kind's support, with the Hessian's
    default width (:meth:`~hessianflow.linalg.density.DensityResult.default_sigma`), on a log axis floored at
    ``1e-8`` (as :func:`hessianflow.plotting.plot_density`). Needs matplotlib (``pip install
    'hessianflow[plot]'``), imported only here.

    Args:
        result: a :class:`CurvatureComparison`.
        path: where to write the PNG.
        title: the headline.
        num_points: grid points for the densities.

    Returns:
        The path written.

    Example:
        >>> import os, tempfile, torch
        >>> from torch import nn
        >>> torch.manual_seed(0)
        <torch._C.Generator object at ...>
        >>> model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
        >>> x, y = torch.randn(16, 3, dtype=torch.float64), torch.randint(0, 2, (16,))
        >>> res = compare_curvatures(model, nn.CrossEntropyLoss(), data=(x, y), k=2, num_runs=2, num_steps=10)
        >>> p = plot_comparison(res, os.path.join(tempfile.mkdtemp(), "compare.png"))
        >>> os.path.getsize(p) > 10000
        True
    """
    from ..plotting import _figure, _save

    fig, axes = _figure(1, 2, figsize=(11.0, 4.5))
    ax_eig, ax_den = axes[0]
    for i, (kind, kc) in enumerate(result.kinds.items()):
        ranks = [j + 1 + 0.08 * (i - 1.5) for j in range(len(kc.eigenvalues))]
        ax_eig.plot(ranks, kc.eigenvalues, "o" if kind == "hessian" else "x", label=kind, markersize=7)
    ax_eig.set_xlabel("rank")
    ax_eig.set_ylabel("eigenvalue")
    ax_eig.set_title(f"top-{result.k} eigenvalues", fontsize=10)
    ax_eig.legend(fontsize=8)
    lo = min(d.support()[0] for d in result.densities.values())
    hi = max(d.support()[1] for d in result.densities.values())
    sigma = result.densities["hessian"].default_sigma()
    pad = 0.05 * (hi - lo) + 3 * sigma
    grid = torch.linspace(lo - pad, hi + pad, num_points, dtype=torch.float64)
    for kind, dens in result.densities.items():
        ax_den.plot(grid.numpy(), dens.density(grid, sigma=sigma).clamp_min(1e-8).numpy(), label=kind, lw=1.2)
    ax_den.set_yscale("log")
    ax_den.set_xlabel("eigenvalue")
    ax_den.set_ylabel("density (SLQ)")
    ax_den.set_title("spectral densities", fontsize=10)
    ax_den.legend(fontsize=8)
    fig.suptitle(title or "curvature approximations against the Hessian", fontsize=12, fontweight="bold")
    return _save(fig, path)
