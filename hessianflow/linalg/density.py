"""Spectral density by stochastic Lanczos quadrature (SLQ).

The spectral density of a symmetric :math:`A \\in \\mathbb{R}^{n \\times n}` with eigenvalues
:math:`\\lambda_i` is :math:`\\phi(t) = \\frac1n \\sum_i \\delta(t - \\lambda_i)`. For a random vector
:math:`v` with :math:`\\mathbb{E}[v v^\\top] = I/n` (a normalised Rademacher vector),
:math:`\\mathbb{E}[v^\\top f(A) v] = \\frac1n \\operatorname{tr} f(A) = \\int f\\,d\\phi`, and ``m`` Lanczos
steps from ``v`` give the ``m``-point Gauss quadrature rule of the measure
:math:`\\sum_i (v^\\top u_i)^2 \\delta_{\\lambda_i}`: nodes = eigenvalues :math:`\\theta_j` of the
tridiagonal matrix :math:`T_m`, weights = squared first components :math:`\\tau_j^2` of its
eigenvectors (Golub & Meurant 2010). Averaging the rules over independent runs estimates
:math:`\\phi` (Lin, Saad & Yang 2016; Ghorbani, Krishnan & Xiao 2019 used it for neural network
Hessians; PyHessian's ``density``).

The Lanczos process is the one of :mod:`hessianflow.linalg.eigen` (full reorthogonalisation, so no ghost
nodes).

The result keeps the raw nodes and weights, so a density is re-evaluated on any grid, with any smoothing
width, on a linear or a logarithmic scale (:meth:`DensityResult.log_density`, Papyan 2020), without a
single new product. :func:`block_densities` runs SLQ on the diagonal blocks of a matrix (a network's
parameter blocks) and measures how different their spectra are by the Jensen-Shannon divergence (Zhang
et al. 2024, "Why Transformers Need Adam: A Hessian Perspective").
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from .._checks import check_int, check_positive
from .._random import make_generator
from .eigen import ConvergenceWarning, lanczos_quadrature
from .linop import LinearOperator, as_operator
from .trace import _NONDETERMINISTIC
from .vectors import space_of

__all__ = ["DensityResult", "spectral_density", "BlockDensityResult", "block_densities", "js_divergence"]


def _smoothed(points: torch.Tensor, nodes: torch.Tensor, weights: torch.Tensor, sigma: float) -> torch.Tensor:
    """The Gaussian-smoothed quadrature measure at ``points``, averaged over the runs (rows)."""
    flat = points.reshape(-1, 1, 1)  # [g, 1, 1] against [R, m]
    kernel = torch.exp(-0.5 * ((flat - nodes) / sigma) ** 2) / (sigma * math.sqrt(2 * math.pi))
    return (kernel * weights).sum(dim=2).mean(dim=1).reshape(points.shape)


@dataclass
class DensityResult:
    """Gauss quadrature rules from :func:`spectral_density`, one per run.

    Attributes:
        nodes: ``[num_runs, m]`` float64 quadrature nodes (Ritz values). A run that stopped early at
            breakdown (its rule is then exact) is padded by repeating its last node with weight 0.
        weights: ``[num_runs, m]`` float64, each row non-negative and summing to 1.
        num_matvecs: products with the operator spent.
        size: the dimension ``n`` of the operator (needed for traces).
        status: the verdict as data: ``"estimated"`` (the rules estimate the density of a fixed matrix,
            their spread over runs in :meth:`moment_stderr`) or ``"nondeterministic"`` (the operator is
            not a fixed matrix: the nodes mix several matrices; a :class:`ConvergenceWarning` says so).
        reason: one sentence for ``"nondeterministic"``, else empty.

    Example:
        >>> import torch
        >>> res = spectral_density(torch.diag(torch.tensor([1.0, 3.0], dtype=torch.float64)), num_runs=2, seed=0)
        >>> res.nodes.round(decimals=8).tolist(), res.weights.round(decimals=8).tolist()
        ([[1.0, 3.0], [1.0, 3.0]], [[0.5, 0.5], [0.5, 0.5]])
        >>> round(res.moments(2), 8), round(res.trace_estimate(), 8)  # tr(A^2)/n = 5, tr(A) = 4
        (5.0, 4.0)
    """

    nodes: torch.Tensor
    weights: torch.Tensor
    num_matvecs: int
    size: int
    status: str = "estimated"
    reason: str = ""

    @property
    def accuracy(self) -> float | None:
        """The relative standard error of :meth:`trace_estimate` over runs (``None`` for one run)."""
        se, m1 = self.moment_stderr(1), self.moments(1)
        if not math.isfinite(se):
            return None
        return 0.0 if se == 0.0 else (abs(se / m1) if m1 != 0.0 else math.inf)

    @property
    def num_runs(self) -> int:
        return self.nodes.shape[0]

    def default_sigma(self) -> float:
        """The default kernel width of :meth:`density`: 1% of the node range.

        With the default 90 nodes per run, the bulk nodes are spaced about 1/90 of the range apart,
        so a Gaussian this wide merges neighbouring nodes into a smooth curve while isolated outlier
        eigenvalues stay visible as separate bumps. (PyHessian's :math:`\\sigma^2 = 10^{-5}` times the
        range is far narrower: a comb of spikes that is only readable on a log scale.) If all nodes
        coincide, 1% of their magnitude (or 0.01 when they are 0).
        """
        lo, hi = self.support()
        spread = hi - lo
        if spread > 0:
            return 0.01 * spread
        return 0.01 * max(abs(hi), 1.0) if hi != 0 else 0.01

    def density(self, grid, sigma: float | None = None) -> torch.Tensor:
        """Gaussian-smoothed density on ``grid``, averaged over runs.

        .. math::
            \\hat\\phi_\\sigma(t) = \\frac{1}{R} \\sum_{r=1}^{R} \\sum_j w_{rj}\\,
            \\frac{1}{\\sigma\\sqrt{2\\pi}} e^{-(t - \\theta_{rj})^2 / (2\\sigma^2)}

        integrates to 1 over a grid that extends a few ``sigma`` beyond :meth:`support`.

        Args:
            grid: points (a 1-D tensor or sequence) at which to evaluate the density.
            sigma: kernel width, default :meth:`default_sigma`.

        Returns:
            A float64 tensor shaped like ``grid``.
        """
        grid = torch.as_tensor(grid, dtype=torch.float64).cpu()
        if sigma is None:
            sigma = self.default_sigma()
        sigma = check_positive("sigma", sigma)
        return _smoothed(grid, self.nodes, self.weights, sigma)

    @classmethod
    def from_eigenvalues(cls, eigenvalues) -> DensityResult:
        """The exact density of a matrix with these eigenvalues (one rule: the eigenvalues, weights
        :math:`1/n`), for references and for matrices small enough for ``eigvalsh``.

        Example:
            >>> DensityResult.from_eigenvalues([1.0, 3.0]).moments(1)
            2.0
        """
        lam = torch.as_tensor(eigenvalues, dtype=torch.float64).reshape(1, -1).cpu()
        n = lam.shape[1]
        return cls(nodes=lam.sort(dim=1).values, weights=torch.full_like(lam, 1.0 / n), num_matvecs=0, size=n)

    def log_nodes(self, eps: float | None = None, side: str = "both") -> tuple[torch.Tensor, torch.Tensor, float]:
        """``(t, w, eps)``: the nodes as :math:`t_j = \\ln(|\\theta_j| + \\varepsilon)` and their weights, the
        nodes on the other side of 0 weighted 0 for ``side="positive"`` (:math:`\\theta_j > 0`) or
        ``"negative"`` (:math:`\\theta_j < 0`, by their magnitude). ``eps`` defaults to :math:`10^{-5}`
        times the largest :math:`|\\theta_j|` (Papyan 2020's :math:`10^{-5}`, made relative so that the
        density of :math:`cA` is that of :math:`A` shifted by :math:`\\ln c`).

        Example:
            >>> t, w, eps = DensityResult.from_eigenvalues([-2.0, 1.0]).log_nodes(side="positive")
            >>> [round(float(v), 4) for v in t[0]], w.tolist(), eps
            ([0.6932, 0.0], [[0.0, 0.5]], 2e-05)
        """
        if side not in ("both", "positive", "negative"):
            raise ValueError(f"side must be 'both', 'positive' or 'negative', got {side!r}")
        if eps is None:
            top = float(self.nodes.abs().max())
            eps = 1e-5 * top if top > 0 else 1.0
        eps = check_positive("eps", eps)
        keep = {"both": torch.ones_like(self.nodes, dtype=torch.bool), "positive": self.nodes > 0,
                "negative": self.nodes < 0}[side]  # fmt: skip
        return torch.log(self.nodes.abs() + eps), self.weights * keep, eps

    def log_density(self, grid, sigma: float | None = None, eps: float | None = None, side: str = "both",
                    wrt: str = "log") -> torch.Tensor:  # fmt: skip
        """The density on a logarithmic scale, for spectra spanning decades (Papyan 2020).

        The nodes are moved to :math:`t_j = \\ln(|\\theta_j| + \\varepsilon)` and smoothed there, so a
        bump is as wide at :math:`10^{-4}` as at :math:`10^{2}` (a linear-scale kernel is either wider than
        the small eigenvalues or a comb of spikes at the large ones):

        .. math::
            \\psi(t) = \\frac1R \\sum_r \\sum_j w_{rj}\\, \\frac{1}{\\sigma\\sqrt{2\\pi}}
            e^{-(t - t_{rj})^2 / (2\\sigma^2)},

        the density of :math:`\\ln(|\\lambda| + \\varepsilon)`, evaluated at :math:`t = \\ln(x + \\varepsilon)`
        for each grid point :math:`x > 0` (``wrt="log"``), or :math:`\\psi(t)/(x + \\varepsilon)`, the density
        of :math:`|\\lambda|` itself (``wrt="lambda"``, as curvlinops' ``papyan2020traces`` returns it).

        Negative and near-zero nodes: with ``side="both"`` a node counts by its magnitude (the sign is
        lost: an indefinite Hessian's negative eigenvalues sit among the positive ones); ``side="positive"``
        or ``"negative"`` keeps one side only (the curve then integrates to that side's share of the
        spectrum: plot both to see an indefinite spectrum). Nodes much smaller than ``eps`` (a null space)
        pile up at :math:`t = \\ln\\varepsilon`, the left end, instead of running off to :math:`-\\infty` (half
        of their bump lies below any grid of :math:`x > 0`).

        What the nodes can resolve: Lanczos places its nodes for the measure on the *linear* scale, so
        decades far below the top eigenvalue get few nodes; their mass is right, their shape is not until
        ``num_steps`` is a good fraction of :math:`n` (5 decades of 300 eigenvalues: flat within 8% with
        150 steps, the lower 2.5 decades wrong by a factor 2 with 60; ``tests/test_density_log_blocks.py``).

        Args:
            grid: points :math:`x > 0` (e.g. ``torch.logspace(-6, 2, 400)``).
            sigma: kernel width in natural-log units; default 1% of the range of the :math:`t_j` (as
                :meth:`default_sigma` on the linear scale), or 0.01 when they coincide.
            eps: the shift :math:`\\varepsilon` (see :meth:`log_nodes`).
            side: ``"both"``, ``"positive"`` or ``"negative"``.
            wrt: ``"log"`` or ``"lambda"`` (see above).

        Example (eigenvalues uniform in :math:`\\ln` over 4 decades: a flat density of height
        :math:`1/(4 \\ln 10)`; at 0.1, two decades above the default :math:`\\varepsilon = 10^{-3}`, 1% higher):
            >>> import math, torch
            >>> exact = DensityResult.from_eigenvalues(torch.logspace(-2, 2, 2000, dtype=torch.float64))
            >>> psi = exact.log_density(torch.tensor([0.1, 10.0]), sigma=0.2)
            >>> [round(float(v) * 4 * math.log(10), 2) for v in psi]
            [1.01, 1.0]
        """
        if wrt not in ("log", "lambda"):
            raise ValueError(f"wrt must be 'log' or 'lambda', got {wrt!r}")
        x = torch.as_tensor(grid, dtype=torch.float64).cpu()
        if bool((x <= 0).any()):
            raise ValueError("the grid of log_density holds magnitudes: every point must be > 0")
        t_nodes, w, eps = self.log_nodes(eps, side)
        if sigma is None:
            spread = float(t_nodes.max() - t_nodes.min())
            sigma = 0.01 * spread if spread > 0 else 0.01
        sigma = check_positive("sigma", sigma)
        psi = _smoothed(torch.log(x + eps), t_nodes, w, sigma)
        return psi if wrt == "log" else psi / (x + eps)

    def _per_run_moments(self, p: int) -> torch.Tensor:
        p = check_int("p", p, minimum=0)
        return (self.weights * self.nodes**p).sum(dim=1)  # [R]

    def moments(self, p: int) -> float:
        """Quadrature estimate of :math:`\\operatorname{tr}(A^p)/n`: the mean over runs of
        :math:`\\sum_j w_j \\theta_j^p`. Each run's value is an unbiased estimate of
        :math:`\\frac1n\\operatorname{tr}(A^p)` for ``p <= 2m - 1`` (Gauss quadrature is exact for
        polynomials of that degree)."""
        return float(self._per_run_moments(p).mean())

    def moment_stderr(self, p: int) -> float:
        """Standard error of :meth:`moments` from the spread over runs (``nan`` for one run)."""
        vals = self._per_run_moments(p)
        if vals.numel() < 2:
            return float("nan")
        return float(vals.std(unbiased=True) / math.sqrt(vals.numel()))

    def trace_estimate(self) -> float:
        """:math:`n` times the first moment: a Hutchinson-type estimate of :math:`\\operatorname{tr}A`."""
        return self.size * self.moments(1)

    def support(self) -> tuple[float, float]:
        """Smallest and largest node (estimates of the extreme eigenvalues, from inside)."""
        return float(self.nodes.min()), float(self.nodes.max())

    def to_dict(self) -> dict:
        """JSON-ready plain Python values."""
        return {
            "nodes": self.nodes.tolist(),
            "weights": self.weights.tolist(),
            "num_matvecs": int(self.num_matvecs),
            "size": int(self.size),
            "status": self.status,
            "reason": self.reason,
            "accuracy": self.accuracy if self.accuracy is None or math.isfinite(self.accuracy) else None,
        }


def spectral_density(A, num_runs: int = 10, num_steps: int = 90, seed=None, progress: bool = False):
    """Estimate the spectral density of ``A`` by stochastic Lanczos quadrature.

    Each run draws a Rademacher vector, normalises it, and runs ``m = min(num_steps, n)`` Lanczos
    steps with full reorthogonalisation (stopping early at breakdown, where the rule is exact); the
    nodes are the eigenvalues of the tridiagonal matrix and the weights the squared first components
    of its eigenvectors. Defaults follow Ghorbani et al. (2019) (``m = 90``) and PyHessian
    (``iter=100``, ``n_v=1``), with 10 runs so that :meth:`DensityResult.moment_stderr` is meaningful.

    Args:
        A: a :class:`~hessianflow.linalg.linop.LinearOperator` or a dense symmetric ``[n, n]`` tensor.
        num_runs: independent start vectors (>= 1).
        num_steps: Lanczos steps per run (>= 1); capped at ``n``.
        seed: ``None``, an int or a ``torch.Generator``.
        progress: show a tqdm progress bar over runs.

    Returns:
        A :class:`DensityResult`; ``num_matvecs`` is at most ``num_runs * min(num_steps, n)``.

    Raises:
        ValueError: for ``num_runs < 1`` or ``num_steps < 1``.

    Example:
        >>> import torch
        >>> A = torch.diag(torch.linspace(0.0, 1.0, 50, dtype=torch.float64))
        >>> res = spectral_density(A, num_runs=4, num_steps=20, seed=0)
        >>> res.nodes.shape, res.num_matvecs
        (torch.Size([4, 20]), 80)
        >>> lo, hi = res.support()
        >>> round(lo, 3), round(hi, 3)  # 20 steps reach the ends of the spectrum
        (0.0, 1.0)
        >>> round(float(res.density([0.5], sigma=0.1).squeeze()), 1)  # flat, of height 1 on [0, 1]
        1.0
    """
    op = as_operator(A)
    num_runs = check_int("num_runs", num_runs, minimum=1)
    num_steps = check_int("num_steps", num_steps, minimum=1)
    gen = make_generator(seed)
    start = op.num_matvecs
    m = min(num_steps, op.size)
    nodes = torch.zeros(num_runs, m, dtype=torch.float64)
    weights = torch.zeros(num_runs, m, dtype=torch.float64)
    space = space_of(op, op.dtype)
    for r in tqdm(range(num_runs), disable=not progress, desc="SLQ", leave=False):
        v = space.rademacher(gen)  # ±1: the same vector in any dtype
        theta, w, _ = lanczos_quadrature(op, v, m)
        j = theta.numel()
        nodes[r, :j] = theta
        nodes[r, j:] = theta[-1]
        weights[r, :j] = w
    result = DensityResult(nodes=nodes, weights=weights, num_matvecs=op.num_matvecs - start, size=op.size)
    if not bool(getattr(op, "deterministic", True)):
        result.status, result.reason = (
            "nondeterministic",
            _NONDETERMINISTIC.replace("the estimate and its standard error describe", "the quadrature rules describe"),
        )
        warnings.warn(f"spectral_density: {result.reason}", ConvergenceWarning, stacklevel=2)
    return result


class _PrincipalBlock(LinearOperator):
    """The principal submatrix :math:`A_{bb}` of an operator as an operator on the block's coordinates:
    one product of ``A`` per product (the vector zero outside the block, the result read on it)."""

    def __init__(self, op: LinearOperator, idx: torch.Tensor):
        super().__init__(idx.numel(), op.dtype, op.device)
        self.op, self.idx = op, idx.to(op.device)
        self.deterministic = getattr(op, "deterministic", True)

    def _matvec(self, v):
        full = torch.zeros(self.op.size, dtype=self.op.dtype, device=self.op.device)
        full[self.idx] = v
        return self.op.matvec(full)[self.idx]


def js_divergence(p: torch.Tensor, q: torch.Tensor) -> float:
    """The Jensen-Shannon divergence of two discrete distributions (normalised here), in nats:

    .. math:: \\mathrm{JS}(p, q) = \\tfrac12 \\mathrm{KL}(p \\,\\|\\, m) + \\tfrac12 \\mathrm{KL}(q \\,\\|\\, m),
              \\qquad m = \\tfrac12 (p + q),

    between 0 (equal) and :math:`\\ln 2` (disjoint supports). ``scipy.spatial.distance.jensenshannon``
    returns its square root (the Jensen-Shannon *distance*).

    Example:
        >>> import math, torch
        >>> js_divergence(torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])) == math.log(2)
        True
    """
    p = torch.as_tensor(p, dtype=torch.float64)
    q = torch.as_tensor(q, dtype=torch.float64)
    p, q = p / p.sum(), q / q.sum()
    m = 0.5 * (p + q)

    def kl(a):
        nz = a >= torch.finfo(torch.float64).tiny  # half a subnormal entry would round m to 0
        return float((a[nz] * torch.log(a[nz] / m[nz])).sum())

    return 0.5 * kl(p) + 0.5 * kl(q)


@dataclass
class BlockDensityResult:
    """SLQ densities of the diagonal blocks of a matrix, from :func:`block_densities`.

    Attributes:
        names: the blocks' names.
        densities: one :class:`DensityResult` per block (its raw nodes and weights).
        num_matvecs: products of the whole operator spent, over all blocks.

    Example (the exact densities of two blocks, half of whose spectra coincide):
        >>> res = BlockDensityResult(["a", "b"], [DensityResult.from_eigenvalues([1.0, 2.0]),
        ...                                      DensityResult.from_eigenvalues([2.0, 5.0])], 0)
        >>> js, mean = res.heterogeneity(sigma=0.05)
        >>> round(mean, 4)  # half the mass disjoint: ln 2 / 2
        0.3466
    """

    names: list
    densities: list
    num_matvecs: int

    def _grid_densities(self, scale: str, sigma: float | None, num_points: int, eps: float | None):
        """``[B, g]`` each block's smoothed density on one common grid (and the grid and width used)."""
        if scale not in ("linear", "log"):
            raise ValueError(f"scale must be 'linear' or 'log', got {scale!r}")
        if scale == "log":
            if eps is None:
                top = max(float(d.nodes.abs().max()) for d in self.densities)
                eps = 1e-5 * top if top > 0 else 1.0
            nodes = torch.cat([torch.log(d.nodes.abs() + eps).reshape(-1) for d in self.densities])
        else:
            nodes = torch.cat([d.nodes.reshape(-1) for d in self.densities])
        lo, hi = float(nodes.min()), float(nodes.max())
        if sigma is None:
            sigma = 0.01 * (hi - lo) if hi > lo else 0.01 * max(abs(hi), 1.0)
        sigma = check_positive("sigma", sigma)
        t = torch.linspace(lo - 4 * sigma, hi + 4 * sigma, check_int("num_points", num_points, minimum=2),
                           dtype=torch.float64)  # fmt: skip
        if scale == "log":  # in t = ln(|lambda| + eps) itself (the grid may reach below ln eps)
            rows = [_smoothed(t, *d.log_nodes(eps)[:2], sigma) for d in self.densities]
        else:
            rows = [d.density(t, sigma=sigma) for d in self.densities]
        return torch.stack(rows), t, sigma

    def heterogeneity(self, scale: str = "linear", sigma: float | None = None, num_points: int = 512,
                      eps: float | None = None) -> tuple[torch.Tensor, float]:  # fmt: skip
        """``(JS, mean)``: the pairwise Jensen-Shannon divergences ``[B, B]`` (nats) of the blocks'
        densities and their mean over the pairs :math:`i < j`: Zhang et al. (2024)'s measure of block
        heterogeneity (a transformer's blocks differ, a CNN's hardly, which they relate to Adam's edge over
        SGD). No products: re-evaluated from the nodes and weights.

        The densities are smoothed with one common width ``sigma`` on one grid of ``num_points`` over all
        the blocks' nodes (``scale="linear"``: default 1% of their range; ``"log"``: over
        :math:`\\ln(|\\lambda| + \\varepsilon)`, see :meth:`DensityResult.log_density`), then compared as
        discrete distributions (:func:`js_divergence`): 0 for equal spectra, :math:`\\ln 2` for disjoint ones.
        """
        rows, _, _ = self._grid_densities(scale, sigma, num_points, eps)
        B = rows.shape[0]
        js = torch.zeros(B, B, dtype=torch.float64)
        for i in range(B):
            for j in range(i + 1, B):
                js[i, j] = js[j, i] = js_divergence(rows[i], rows[j])
        pairs = B * (B - 1) // 2
        mean = float(js.triu(1).sum() / pairs) if pairs else 0.0
        return js, mean

    def to_dict(self) -> dict:
        """JSON-ready: the blocks' names, sizes and rules, and the default heterogeneity (linear and log)."""
        js, mean = self.heterogeneity()
        js_log, mean_log = self.heterogeneity(scale="log")
        return {
            "names": list(self.names),
            "sizes": [int(d.size) for d in self.densities],
            "num_matvecs": int(self.num_matvecs),
            "js": js.tolist(),
            "heterogeneity": mean,
            "js_log": js_log.tolist(),
            "heterogeneity_log": mean_log,
            "densities": [d.to_dict() for d in self.densities],
        }


def block_densities(A, blocks, names=None, num_runs: int = 4, num_steps: int = 40, seed=None,
                    progress: bool = False) -> BlockDensityResult:  # fmt: skip
    """SLQ densities of the diagonal blocks :math:`A_{bb}` of ``A`` and their heterogeneity (Zhang et al. 2024).

    Zhang et al. ("Why Transformers Need Adam: A Hessian Perspective", 2024) run SLQ on each parameter
    block's Hessian :math:`H_{bb}` and average the pairwise Jensen-Shannon divergences between the blocks'
    densities (:meth:`BlockDensityResult.heterogeneity`). Each block's product is a product of ``A`` with a
    vector zero outside the block, read on the block: ``num_runs * min(num_steps, |b|)`` products per block
    (a block of at most ``num_steps`` coordinates gets its exact eigenvalues, with random weights). The
    defaults, 4 runs of 40 steps, keep a network of tens of blocks to a few thousand products; raise them
    for smoother densities. The blocks' vectors are slices of one flat vector (the default vector space).

    Args:
        A: a :class:`~hessianflow.linalg.linop.LinearOperator` or a dense symmetric ``[n, n]`` tensor.
        blocks: index sets (1-D integer tensors or lists), e.g. the coordinates of each parameter tensor
            (:func:`hessianflow.curvature.compare.parameter_blocks`).
        names: the blocks' names (default ``"0"``, ``"1"``, ...).
        num_runs, num_steps, seed, progress: as in :func:`spectral_density` (one generator for all blocks).

    Example (two blocks with the same spectrum, one with a disjoint one):
        >>> import torch
        >>> A = torch.diag(torch.tensor([1.0, 2.0, 1.0, 2.0, 10.0, 11.0], dtype=torch.float64))
        >>> res = block_densities(A, [[0, 1], [2, 3], [4, 5]], names=["a", "b", "c"], seed=0)
        >>> js, mean = res.heterogeneity(sigma=0.1)
        >>> round(float(js[0, 2]), 4), round(float(js[0, 1]), 2)  # ln 2 = 0.6931 for disjoint spectra
        (0.6931, 0.0)
    """
    op = as_operator(A)
    idx = [torch.as_tensor(b, dtype=torch.long).reshape(-1) for b in blocks]
    if not idx or any(b.numel() == 0 for b in idx):
        raise ValueError("blocks must be a non-empty list of non-empty index sets")
    for i, b in enumerate(idx):
        if int(b.min()) < 0 or int(b.max()) >= op.size:
            raise ValueError(f"block {i} has indices outside 0..{op.size - 1}")
    names = [str(i) for i in range(len(idx))] if names is None else list(names)
    if len(names) != len(idx):
        raise ValueError(f"{len(names)} names for {len(idx)} blocks")
    gen = make_generator(seed)
    start = op.num_matvecs
    densities = []
    for b in tqdm(idx, disable=not progress, desc="block SLQ", leave=False):
        densities.append(spectral_density(_PrincipalBlock(op, b), num_runs=num_runs, num_steps=num_steps, seed=gen))
    return BlockDensityResult(names=names, densities=densities, num_matvecs=op.num_matvecs - start)
