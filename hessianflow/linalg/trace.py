"""Stochastic trace estimation from matrix-vector products.

* :func:`hutchinson_trace`: Girard (1989) / Hutchinson (1989) with Rademacher vectors.
* :func:`hutchpp_trace`: Hutch++ (Meyer, Musco, Musco & Woodruff 2021): exact trace of a low-rank
  part plus Hutchinson on the rest.
* :func:`xtrace`: XTrace (Epperly, Tropp & Webber 2024): the exchangeable, leave-one-out version of
  Hutch++, with an error estimate.
* :func:`trace`: picks one (see its docstring for the rule and the measurements behind it).

All take a :class:`~hessianflow.linalg.linop.LinearOperator` or a dense symmetric tensor, use batched
products (:meth:`~hessianflow.linalg.linop.LinearOperator.matmat`), and report a standard error next to the
estimate. The samples and products are accumulated in float64 whatever the operator's dtype.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from .._checks import check_int, check_positive
from .._random import make_generator
from .linop import LinearOperator, as_operator
from .vectors import FlatVectors, space_of

__all__ = ["TraceResult", "hutchinson_trace", "hutchpp_trace", "xtrace", "trace"]

#: The values ``trace(method=...)`` accepts (public: :mod:`hessianflow.training.tracking` checks against it).
METHODS = ("auto", "hutchinson", "hutch++", "xtrace")


@dataclass
class TraceResult:
    """A trace estimate with its standard error.

    Attributes:
        estimate: the estimate of :math:`\\operatorname{tr} A`.
        stderr: its standard error, estimated from the samples (0 when the trace was computed
            exactly); the exact trace lies within 2 standard errors in about 95% of runs.
        num_matvecs: products with the operator spent.
        method: ``"hutchinson"``, ``"hutch++"``, ``"xtrace"``, ``"exact"`` (the budget allowed ``n``
            products of the identity), or ``"auto(...)"`` naming the method :func:`trace` chose.
        samples: the per-sample values the standard error comes from (Hutchinson: the
            :math:`z^\\top A z`; Hutch++: those of its Hutchinson part; XTrace: the leave-one-out
            estimates), or ``None``.
        status: the verdict as data: ``"exact"`` (computed from ``n`` products with the identity),
            ``"estimated"`` (a stochastic estimate, its error described by ``stderr``) or
            ``"nondeterministic"`` (the operator is not a fixed matrix: two products of the same vector
            differ, so ``stderr`` describes no fixed matrix's trace; a :class:`ConvergenceWarning` says so).
        reason: one sentence for a status other than ``"exact"`` and ``"estimated"``, else empty.
        accuracy: the relative standard error ``stderr / |estimate|`` (0 when exact; ``inf`` when the
            estimate is 0 and the standard error is not).

    Example:
        >>> import torch
        >>> from hessianflow.linalg.trace import hutchinson_trace
        >>> r = hutchinson_trace(torch.diag(torch.arange(1.0, 11.0)), num_matvecs=4, seed=0)
        >>> r.estimate, r.stderr, r.num_matvecs, r.method  # Rademacher vectors: exact on a diagonal
        (55.0, 0.0, 4, 'hutchinson')
        >>> sorted(r.to_dict())
        ['accuracy', 'estimate', 'method', 'num_matvecs', 'reason', 'samples', 'status', 'stderr']
    """

    estimate: float
    stderr: float
    num_matvecs: int
    method: str
    samples: list[float] | None = None
    status: str = "estimated"
    reason: str = ""

    @property
    def accuracy(self) -> float:
        """The relative standard error ``stderr / |estimate|`` (see the class docstring)."""
        if self.stderr == 0.0:
            return 0.0
        return abs(self.stderr / self.estimate) if self.estimate != 0.0 else math.inf

    def to_dict(self) -> dict:
        """JSON-ready plain Python values."""
        return {
            "estimate": float(self.estimate),
            "stderr": float(self.stderr),
            "num_matvecs": int(self.num_matvecs),
            "method": self.method,
            "samples": None if self.samples is None else [float(x) for x in self.samples],
            "status": self.status,
            "reason": self.reason,
            "accuracy": float(self.accuracy) if math.isfinite(self.accuracy) else None,
        }


def _mean_stderr(samples: torch.Tensor) -> tuple[float, float]:
    m = samples.numel()
    return float(samples.mean()), float(samples.std(unbiased=True) / math.sqrt(m))


def _products(op: LinearOperator, V: torch.Tensor) -> torch.Tensor:
    """``A V`` in float64 (the operator works in its own dtype)."""
    return op.matmat(V.to(dtype=op.dtype, device=op.device)).to(torch.float64)


def _exact(op: LinearOperator, start: int) -> TraceResult:
    """The trace from ``n`` products with the identity, when the budget allows it."""
    space = space_of(op, op.dtype)
    eye = space.eye()  # the unit vectors (this rank's rows of them, when sharded)
    value = float(space.column_dots(eye, op.matmat(eye)).double().sum())
    return TraceResult(value, 0.0, op.num_matvecs - start, "exact", None, status="exact")


_NONDETERMINISTIC = (
    "the operator is not deterministic (two products with the same vector differ: e.g. dropout or BatchNorm "
    "batch statistics over a shuffled loader in train mode), so the estimate and its standard error describe "
    "no fixed matrix"
)


def _verdict(op: LinearOperator, result: TraceResult) -> TraceResult:
    """Mark ``result`` for an operator that is not a fixed matrix, with a :class:`ConvergenceWarning`."""
    if bool(getattr(op, "deterministic", True)):
        return result
    from .eigen import ConvergenceWarning

    result.status, result.reason = "nondeterministic", _NONDETERMINISTIC
    warnings.warn(f"trace ({result.method}): {result.reason}", ConvergenceWarning, stacklevel=3)
    return result


def _hutchinson_samples(op, count, gen, batch_size, bar) -> torch.Tensor:
    space = space_of(op, torch.float64)  # the probes through the operator's vector space
    out = []
    done = 0
    while done < count:
        b = min(batch_size, count - done)
        # Drawn vector by vector, so the samples do not depend on batch_size.
        Z = space.rademacher(gen, b)
        out.append(space.column_dots(Z, _products(op, Z)).cpu())
        done += b
        if bar is not None:
            bar.update(b)
    return torch.cat(out)


def hutchinson_trace(
    A,
    num_matvecs: int = 100,
    seed=None,
    rtol: float | None = None,
    min_samples: int = 10,
    batch_size: int | None = None,
    progress: bool = False,
):
    """Hutchinson's estimator with Rademacher vectors (Hutchinson 1989; Girard 1989).

    .. math::
        \\widehat{\\operatorname{tr}}(A) = \\frac1m \\sum_{i=1}^m z_i^\\top A z_i, \\qquad
        \\mathrm{stderr} = \\frac{s_z}{\\sqrt m},

    with :math:`z_i` independent Rademacher vectors and :math:`s_z` the sample standard deviation of
    the :math:`z_i^\\top A z_i`. The variance of one sample is
    :math:`2(\\|A\\|_F^2 - \\sum_i a_{ii}^2)`.

    Optional early stop: after each block of products, stop once
    :math:`\\mathrm{stderr} \\le \\mathrm{rtol} \\cdot |\\widehat{\\operatorname{tr}}|`, but never
    before ``min_samples`` samples. The floor matters: PyHessian's ``trace`` stops when the running
    mean changes by less than ``tol`` relative, which can fire after 3 samples (this project saw it
    on a ResNet-20, 80x off).
    A standard error from a handful of samples is itself too noisy to trust.

    Args:
        A: a :class:`~hessianflow.linalg.linop.LinearOperator` or a dense symmetric ``[n, n]`` tensor.
        num_matvecs: the number of samples (= products) at most; >= 2. Default 100, as PyHessian's
            ``maxIter``.
        seed: ``None``, an int or a ``torch.Generator``.
        rtol: relative standard error at which to stop early; ``None`` (default) spends the budget.
        min_samples: no early stop before this many samples; >= 2, default 10 (the relative
            error of a standard deviation from ``m`` samples is about :math:`1/\\sqrt{2(m-1)}`:
            ~24% at 10). Like any data-dependent stop, ``rtol`` slightly lowers the coverage of
            ``estimate ± 2 stderr``.
        batch_size: vectors per :meth:`~hessianflow.linalg.linop.LinearOperator.matmat` call (also the
            granularity of the early stop); default ``min(num_matvecs, 10)``, which bounds memory at
            ten ``n``-vectors.
        progress: show a tqdm progress bar.

    Returns:
        A :class:`TraceResult` with ``samples`` the :math:`z_i^\\top A z_i`.

    Raises:
        ValueError: for ``num_matvecs < 2``, ``min_samples < 2``, a non-positive ``rtol`` or
            ``batch_size < 1``.

    Example:
        >>> import torch
        >>> g = torch.Generator().manual_seed(0)
        >>> Q = torch.linalg.qr(torch.randn(50, 50, generator=g, dtype=torch.float64)).Q
        >>> A = Q @ torch.diag(torch.linspace(1, 2, 50, dtype=torch.float64)) @ Q.T  # trace 75
        >>> r = hutchinson_trace(A, num_matvecs=100, seed=0)
        >>> round(r.estimate, 1), round(r.stderr, 1), r.num_matvecs
        (75.4, 0.3, 100)
    """
    op = as_operator(A)
    num_matvecs = check_int("num_matvecs", num_matvecs, minimum=2)
    min_samples = check_int("min_samples", min_samples, minimum=2)
    if rtol is not None:
        rtol = check_positive("rtol", rtol)
    batch_size = min(num_matvecs, 10) if batch_size is None else check_int("batch_size", batch_size, minimum=1)
    gen = make_generator(seed)
    start = op.num_matvecs
    samples = torch.zeros(0, dtype=torch.float64)
    with tqdm(total=num_matvecs, disable=not progress, desc="hutchinson", leave=False) as bar:
        while samples.numel() < num_matvecs:
            b = min(batch_size, num_matvecs - samples.numel())
            samples = torch.cat([samples, _hutchinson_samples(op, b, gen, b, bar)])
            if rtol is not None and samples.numel() >= min_samples:
                est, se = _mean_stderr(samples)
                if se <= rtol * abs(est):
                    break
    est, se = _mean_stderr(samples)
    return _verdict(op, TraceResult(est, se, op.num_matvecs - start, "hutchinson", samples.tolist()))


def hutchpp_trace(A, num_matvecs: int = 100, seed=None):
    """Hutch++ (Meyer, Musco, Musco & Woodruff 2021).

    The ``m`` products are split in thirds: a Rademacher sketch ``S`` (``m//3`` columns), an
    orthonormal basis ``Q`` of ``A S``, and the remaining products for Hutchinson on the deflated
    matrix:

    .. math::
        \\widehat{\\operatorname{tr}}(A) = \\operatorname{tr}(Q^\\top A Q) + \\frac1{m_g}
        \\sum_{i=1}^{m_g} g_i^\\top (I - QQ^\\top) A (I - QQ^\\top) g_i .

    The first term is computed exactly; for matrices whose spectrum decays it carries most of the
    trace, and the Hutchinson part only has to estimate the small remainder, so the error falls like
    :math:`1/m` instead of :math:`1/\\sqrt m`.

    Standard error: that of the Hutchinson part, :math:`s_g/\\sqrt{m_g}`. Conditionally on ``Q`` the
    estimator is unbiased and this is the usual standard error of a mean, so the coverage of
    ``estimate ± 2 stderr`` holds whatever ``Q`` came out of the sketch.

    If ``m//3 >= n`` the budget covers the exact trace, which is then computed with ``n`` products
    (``method="exact"``).

    Args:
        A: a :class:`~hessianflow.linalg.linop.LinearOperator` or a dense symmetric ``[n, n]`` tensor.
        num_matvecs: total products ``m`` (>= 4: the Hutchinson part needs 2 samples).
        seed: ``None``, an int or a ``torch.Generator``.

    Returns:
        A :class:`TraceResult`; ``samples`` are the Hutchinson part's :math:`g^\\top(\\cdot)g`.

    Raises:
        ValueError: for ``num_matvecs < 4``.

    Example:
        A decaying spectrum, where the sketch carries most of the trace:

        >>> import torch
        >>> g = torch.Generator().manual_seed(0)
        >>> Q = torch.linalg.qr(torch.randn(50, 50, generator=g, dtype=torch.float64)).Q
        >>> A = Q @ torch.diag(2.0 ** -torch.arange(50, dtype=torch.float64)) @ Q.T  # trace 2
        >>> r = hutchpp_trace(A, num_matvecs=30, seed=0)
        >>> round(r.estimate, 2), r.stderr < 1e-3, r.method
        (2.0, True, 'hutch++')
    """
    op = as_operator(A)
    m = check_int("num_matvecs", num_matvecs, minimum=4)
    gen = make_generator(seed)
    start, n = op.num_matvecs, op.size
    k = m // 3
    if k >= n:
        return _verdict(op, _exact(op, start))
    space = space_of(op, torch.float64)
    S = space.rademacher(gen, k, by_vector=False)
    Q = space.qr(_products(op, S))[0]  # [n, k]
    low_rank = float(space.column_dots(Q, _products(op, Q)).sum())
    G = space.rademacher(gen, m - 2 * k, by_vector=False)
    for _ in range(2):  # projecting twice keeps G exactly outside span(Q) in floating point
        G = G - Q @ space.inner(Q, G)
    samples = space.column_dots(G, _products(op, G)).cpu()
    mean, se = _mean_stderr(samples)
    return _verdict(op, TraceResult(low_rank + mean, se, op.num_matvecs - start, "hutch++", samples.tolist()))


def _xtrace_from_sketch(op, Om, Y, improved: bool):
    """XTrace from test vectors ``Om`` ``[n, s]`` and ``Y = A Om``; spends ``s`` more products.

    Returns the ``s`` leave-one-out estimates ``t_i`` (their mean is the XTrace estimate) and the
    jackknife standard error of that mean.

    For each ``i``, ``Q_(i)`` is an orthonormal basis of ``A Om`` without column ``i``, and

    .. math::
        t_i = \\operatorname{tr}(Q_{(i)}^\\top A Q_{(i)}) + \\omega_i^\\top (I - Q_{(i)} Q_{(i)}^\\top)
        A (I - Q_{(i)} Q_{(i)}^\\top) \\omega_i ,

    an unbiased Hutch++-type estimate (``ω_i`` is independent of ``Q_(i)``). All of them come from one
    QR ``Y = QR`` and ``Z = AQ``: in the coordinates of ``Q``, the columns of ``R`` other than the
    ``i``-th span the orthogonal complement of ``a_i = R^{-T} e_i``. Writing ``M`` for the matrix of
    the left-out ``a``'s, ``Π = M(MᵀM)^{-1}Mᵀ``, ``H = QᵀAQ``, ``w_i = Qᵀω_i`` and
    ``c_i = (I - Π) w_i``,

    .. math::
        t_i = \\operatorname{tr} H - \\operatorname{tr}(\\Pi H) + \\omega_i^\\top y_i
        - (Z^\\top\\omega_i)^\\top c_i - c_i^\\top r_i + c_i^\\top H c_i

    (the last four terms are :math:`u^\\top A u` for :math:`u = \\omega_i - Q c_i`). Every quantity is a
    bilinear form in the ``a``'s, so it is read off ``s × s`` matrices. With ``improved``
    (uniform-on-the-sphere ``ω``) the Hutchinson term is rescaled so that the part of ``ω_i`` outside
    ``Q_(i)`` has squared norm ``n - rank Q_(i)``: Epperly et al.'s improved estimator.

    Standard error: the leave-one-out ``t_i`` share most of their sketch, so they are positively
    correlated and ``std(t)/sqrt(s)`` (the paper's error estimate) under-covers on decaying spectra
    (measured: 84-88% at 2 standard errors instead of 95%). Instead, the jackknife over test vectors:
    ``X_(j)`` is XTrace computed without ``ω_j`` (its leave-one-out estimates deflate with ``s - 2``
    sketch vectors: ``M = [a_i, a_j]`` above, same ``s × s`` matrices, no products), and
    ``stderr² = (s-1)/s Σ_j (X_(j) - mean X)²``, conservative in expectation by the Efron-Stein
    inequality (Efron & Stein 1981).
    """
    s = Om.shape[1]
    sk = _sketch_coordinates(op, Om, Y, improved)
    ests = _leave_one_out(sk)
    if s < 3:
        return ests, float(ests.std(unbiased=True) / math.sqrt(s))
    return ests, _jackknife_stderr(sk)


@dataclass
class _Sketch:
    """The ``s x s`` (and ``s``-long) quantities the XTrace estimates are formed from, on the CPU.

    In the notation of :func:`_xtrace_from_sketch`: ``W = QᵀΩ``, ``T = ZᵀΩ``, ``H = QᵀAQ``
    (symmetrised), ``R`` from ``Y = QR``, ``Amat`` the normalised ``a_i`` as columns, ``Gm = AmatᵀAmat``,
    ``AX = Amatᵀ X``, and per test vector: ``om2 = |ω_i|²``, ``omy = ω_iᵀy_i``, ``tw``, ``wr``, ``ww``,
    ``wHw`` (column-wise products of ``T·W``, ``W·R``, ``W·W``, ``W·HW``).
    """

    n: int
    s: int
    improved: bool
    om2: torch.Tensor
    omy: torch.Tensor
    trH: torch.Tensor
    tw: torch.Tensor
    wr: torch.Tensor
    ww: torch.Tensor
    wHw: torch.Tensor
    Gm: torch.Tensor
    AW: torch.Tensor
    AT: torch.Tensor
    AR: torch.Tensor
    AHW: torch.Tensor
    AHA: torch.Tensor


def _sketch_coordinates(op, Om, Y, improved: bool) -> _Sketch:
    """QR of the sketch, its ``s`` further products ``Z = AQ``, and everything in ``Q``'s coordinates."""
    space = space_of(op, torch.float64)
    n, s = op.size, Om.shape[1]
    f64 = torch.float64
    Q, R = space.qr(Y)
    Z = _products(op, Q)  # [n, s]
    # n-length reductions through the vector space, then everything is s x s on the CPU.
    om2 = space.column_dots(Om, Om).cpu()
    omy = space.column_dots(Om, Y).cpu()
    W = space.inner(Q, Om).cpu()
    T = space.inner(Z, Om).cpu()
    H = space.inner(Q, Z).cpu()
    H = 0.5 * (H + H.T)
    R = R.cpu()
    d = R.diagonal()
    dmax = float(d.abs().max())
    floor = 1e3 * torch.finfo(f64).eps * dmax if dmax > 0 else 1.0
    Rreg = R.clone()
    # A rank-deficient sketch (A of rank < s) has R_ii ~ 0: lifting those to the rounding floor keeps
    # the a_i in the junk directions of Q, where the estimate is exact anyway.
    small = d.abs() < floor
    if bool(small.any()):
        idx = torch.nonzero(small).flatten()
        Rreg[idx, idx] = torch.where(d[idx] < 0, -floor, floor).to(f64)
    Rinv = torch.linalg.solve_triangular(Rreg, torch.eye(s, dtype=f64), upper=True)
    Amat = Rinv.T / torch.linalg.vector_norm(Rinv.T, dim=0, keepdim=True)  # columns a_i, normalised
    return _Sketch(
        n=n,
        s=s,
        improved=improved,
        om2=om2,
        omy=omy,
        trH=H.trace(),
        tw=(T * W).sum(dim=0),
        wr=(W * R).sum(dim=0),
        ww=(W * W).sum(dim=0),
        wHw=(W * (H @ W)).sum(dim=0),
        Gm=Amat.T @ Amat,
        AW=Amat.T @ W,
        AT=Amat.T @ T,
        AR=Amat.T @ R,
        AHW=Amat.T @ H @ W,
        AHA=Amat.T @ H @ Amat,
    )


def _deflated_estimates(sk: _Sketch, col, proj_w, proj_t, proj_r, proj_hw, whw_proj, tr_proj, rank):
    """The estimates deflated by ``rank`` left-out sketch vectors, from their projections.

    ``proj_x = (Π w_i) . x_i``; ``col`` reshapes the per-``i`` vectors to broadcast along ``i``.
    """
    hutch = col(sk.omy) - (col(sk.tw) - proj_t) - (col(sk.wr) - proj_r) + (col(sk.wHw) - 2 * proj_hw + whw_proj)
    if sk.improved:
        outside = (col(sk.om2) - col(sk.ww) + proj_w).clamp_min(torch.finfo(torch.float64).tiny)
        hutch = hutch * (sk.n - (sk.s - rank)) / outside
    return sk.trH - tr_proj + hutch


def _leave_one_out(sk: _Sketch) -> torch.Tensor:
    """The ``s`` leave-one-out estimates ``t_i``: ``Π = a_i a_iᵀ``."""
    b = sk.AW.diagonal()  # coefficient of w_i on a_i
    return _deflated_estimates(
        sk,
        lambda v: v,
        b * sk.AW.diagonal(),
        b * sk.AT.diagonal(),
        b * sk.AR.diagonal(),
        b * sk.AHW.diagonal(),
        b**2 * sk.AHA.diagonal(),
        sk.AHA.diagonal(),
        1,
    )


def _jackknife_stderr(sk: _Sketch) -> float:
    """The jackknife standard error over test vectors, from the leave-two-out estimates (``s >= 3``).

    All pairs as ``[s, s]`` arrays indexed ``[i, j]`` (``i != j``): ``Π = M (MᵀM)⁻¹ Mᵀ`` with
    ``M = [a_i, a_j]``, ``MᵀM = [[1, g], [g, 1]]``.
    """
    s = sk.s
    g = sk.Gm
    det = (1 - g**2).clamp_min(torch.finfo(torch.float64).eps)
    m1, m2 = sk.AW.diagonal()[:, None], sk.AW.T  # a_i . w_i, a_j . w_i
    b1 = (m1 - g * m2) / det
    b2 = (m2 - g * m1) / det

    def pair(X):  # (Π w_i) . x_i = b1 (a_i . x_i) + b2 (a_j . x_i), X[l, i] = a_l . x_i
        return b1 * X.diagonal()[:, None] + b2 * X.T

    e11, e22, e12 = sk.AHA.diagonal()[:, None], sk.AHA.diagonal()[None, :], sk.AHA
    pairs = _deflated_estimates(
        sk,
        lambda v: v[:, None],
        pair(sk.AW),
        pair(sk.AT),
        pair(sk.AR),
        pair(sk.AHW),
        b1**2 * e11 + 2 * b1 * b2 * e12 + b2**2 * e22,
        (e11 - 2 * g * e12 + e22) / det,
        2,
    )
    off = ~torch.eye(s, dtype=torch.bool)
    X = torch.where(off, pairs, 0.0).sum(dim=0) / (s - 1)  # X_(j): XTrace without w_j, the mean over i != j
    return math.sqrt((s - 1) / s * float(((X - X.mean()) ** 2).sum()))


def xtrace(A, num_matvecs: int = 100, seed=None):
    """XTrace (Epperly, Tropp & Webber 2024, "XTrace: making the most of every sample in stochastic
    trace estimation", SIAM J. Matrix Anal. Appl. 45(1)).

    Hutch++ spends a third of its products on a sketch that the Hutchinson part cannot reuse. XTrace
    uses ``s = m//2`` test vectors ``ω_i`` and ``s`` further products, and *every* test vector plays
    both roles: the ``i``-th leave-one-out estimate deflates with the sketch of the other ``s - 1``
    vectors and runs Hutchinson with ``ω_i`` (formulas in :func:`_xtrace_from_sketch`). The estimate
    is the mean of the ``s`` leave-one-out estimates ``t_i``.

    Standard error: *not* the paper's :math:`\\operatorname{std}(t_1,\\dots,t_s)/\\sqrt s`. The
    ``t_i`` share most of their sketch and their errors are positively correlated, so that formula
    under-covers on decaying spectra (measured on ``n = 300``, ``m = 60``, 100 seeds: it averaged
    0.65-0.8 of the actual RMS error on decaying spectra, and ``estimate ± 2 stderr`` held in 80-87%
    of runs there, 94% on a flat one).
    Instead the jackknife over test vectors (:func:`_xtrace_from_sketch`, no extra products), which
    is conservative in expectation (Efron-Stein). Measured on the same problems: coverage at
    2 standard errors 0.97-1.00, mean reported stderr 1.2x the actual RMS error on a flat spectrum
    and 2-3x on decaying ones. So the error bar is honest but can be loose; the ``t_i`` are returned
    in ``samples`` for other error estimates.

    Test vectors are uniform on the sphere of radius :math:`\\sqrt n` with the paper's "improved"
    normalisation (its default).

    If ``m//2 >= n`` the budget covers the exact trace, which is then computed with ``n`` products
    (``method="exact"``).

    Args:
        A: a :class:`~hessianflow.linalg.linop.LinearOperator` or a dense symmetric ``[n, n]`` tensor.
        num_matvecs: total products ``m`` (>= 4).
        seed: ``None``, an int or a ``torch.Generator``.

    Returns:
        A :class:`TraceResult` with ``samples`` the leave-one-out estimates.

    Raises:
        ValueError: for ``num_matvecs < 4``.

    Example:
        >>> import torch
        >>> g = torch.Generator().manual_seed(0)
        >>> Q = torch.linalg.qr(torch.randn(50, 50, generator=g, dtype=torch.float64)).Q
        >>> A = Q @ torch.diag(2.0 ** -torch.arange(50, dtype=torch.float64)) @ Q.T  # trace 2
        >>> r = xtrace(A, num_matvecs=30, seed=0)
        >>> round(r.estimate, 2), r.stderr < 1e-3, len(r.samples)
        (2.0, True, 15)
    """
    op = as_operator(A)
    m = check_int("num_matvecs", num_matvecs, minimum=4)
    gen = make_generator(seed)
    start, n = op.num_matvecs, op.size
    s = m // 2
    if s >= n:
        return _verdict(op, _exact(op, start))
    space = space_of(op, torch.float64)
    Om = space.randn(gen, s)
    Om = Om * (math.sqrt(n) / space.column_norms(Om)[None, :])
    ests, se = _xtrace_from_sketch(op, Om, _products(op, Om), improved=True)
    return _verdict(op, TraceResult(float(ests.mean()), se, op.num_matvecs - start, "xtrace", ests.tolist()))


def trace(A, num_matvecs: int = 100, seed=None, method: str = "auto"):
    """Estimate :math:`\\operatorname{tr} A` with ``num_matvecs`` products.

    ``method`` is ``"hutchinson"``, ``"hutch++"``, ``"xtrace"`` or ``"auto"``.

    ``"auto"`` decides from the products it has to compute anyway. It first computes
    ``Y = A Ω`` for ``s = m//2`` Rademacher vectors and measures how much of ``A`` a leave-one-out
    sketch captures,

    .. math::
        \\rho = \\frac{\\sum_i \\|(I - P_{(i)}) A\\omega_i\\|^2}{\\sum_i \\|A\\omega_i\\|^2}
        \\approx \\frac{\\|(I-P)A\\|_F^2}{\\|A\\|_F^2},

    (``P_(i)`` the projector on the other columns of ``Y``; free from the QR of ``Y``). Deflation
    pays when the variance it leaves, at most :math:`\\rho` times Hutchinson's, survives being
    estimated with half the samples: if :math:`\\rho < 1/2` it finishes as XTrace (the ``s`` further
    products go to ``A Q``), otherwise as Hutchinson (``m - s`` further Rademacher samples; the first
    ``s`` samples :math:`\\omega_i^\\top A\\omega_i` are kept, and they are the vectors
    :func:`hutchinson_trace` draws first for the same seed). On a flat spectrum it is therefore
    exactly Hutchinson, sample for sample, where XTrace alone would be worse (it has only ``m/2``
    Hutchinson samples: measured 1.2-1.5x Hutchinson's RMS error); on a decaying spectrum it is
    XTrace (measured: ~1/100 of Hutchinson's RMS error for a 1/i^2 spectrum at 60 products). Both
    are tested in ``tests/test_trace.py``. The XTrace branch uses the Rademacher vectors of the first
    half, without the sphere normalisation (which needs rotation-invariant vectors), so it is a
    little less accurate than :func:`xtrace` (1.0-1.4x its RMS error in the same measurements).
    Rademacher rather than sphere vectors for the first half because Hutchinson with Rademacher
    vectors is exact on diagonal matrices and never worse than with sphere vectors by more than the
    factor :math:`(n+2)/n` (variances from Avron & Toledo 2011).

    The choice is data-dependent, so the chosen estimator's standard error is not exactly its
    unconditional one; measured coverage at 2 standard errors is in ``tests/test_trace.py``
    (0.96 flat, 1.00 decaying, 50 seeds).

    Args:
        A: a :class:`~hessianflow.linalg.linop.LinearOperator` or a dense symmetric ``[n, n]`` tensor.
        num_matvecs: total products (>= 4 for ``"auto"``, ``"hutch++"``, ``"xtrace"``; >= 2 for
            ``"hutchinson"``). Default 100, as PyHessian's ``trace(maxIter=100)``.
        seed: ``None``, an int or a ``torch.Generator``.
        method: ``"auto"`` (default), ``"hutchinson"``, ``"hutch++"`` or ``"xtrace"``.

    Returns:
        A :class:`TraceResult`; for ``"auto"`` its ``method`` is ``"auto(xtrace)"``,
        ``"auto(hutchinson)"`` or ``"auto(exact)"`` (the budget covered ``n`` products: ``m >= n``, where
        the explicit ``"xtrace"`` and ``"hutch++"`` keep their estimators up to ``2n`` and ``3n``).

    Raises:
        ValueError: for an unknown ``method`` or ``num_matvecs`` below the chosen method's minimum.

    Example:
        ``"auto"`` picks XTrace on a decaying spectrum and Hutchinson on a flat one:

        >>> import torch
        >>> g = torch.Generator().manual_seed(0)
        >>> Q = torch.linalg.qr(torch.randn(50, 50, generator=g, dtype=torch.float64)).Q
        >>> decaying = Q @ torch.diag(2.0 ** -torch.arange(50, dtype=torch.float64)) @ Q.T  # trace 2
        >>> flat = Q @ torch.diag(torch.linspace(1, 2, 50, dtype=torch.float64)) @ Q.T  # trace 75
        >>> r = trace(decaying, num_matvecs=30, seed=0)
        >>> round(r.estimate, 2), r.method
        (2.0, 'auto(xtrace)')
        >>> r = trace(flat, num_matvecs=30, seed=0)
        >>> abs(r.estimate - 75) < 3 * r.stderr, r.method
        (True, 'auto(hutchinson)')
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if method == "hutchinson":
        return hutchinson_trace(A, num_matvecs=num_matvecs, seed=seed)
    if method == "hutch++":
        return hutchpp_trace(A, num_matvecs=num_matvecs, seed=seed)
    if method == "xtrace":
        return xtrace(A, num_matvecs=num_matvecs, seed=seed)
    return _auto_trace(as_operator(A), check_int("num_matvecs", num_matvecs, minimum=4), make_generator(seed))


def _auto_trace(op: LinearOperator, m: int, gen: torch.Generator) -> TraceResult:
    """``trace(method="auto")``: XTrace or Hutchinson, chosen from the first ``m//2`` products."""
    start, n = op.num_matvecs, op.size
    s = m // 2
    if m >= n:  # n products give the exact trace (issue 21: the switch was at 2n)
        result = _exact(op, start)
        result.method = "auto(exact)"
        return _verdict(op, result)
    space = space_of(op, torch.float64)
    # drawn vector by vector: the same vectors hutchinson_trace draws first for this seed
    Om = space.rademacher(gen, s)
    Y = _products(op, Om)
    rho = _uncaptured_fraction(Y, space)
    if rho < 0.5:
        ests, se = _xtrace_from_sketch(op, Om, Y, improved=False)
        return _verdict(op, TraceResult(float(ests.mean()), se, op.num_matvecs - start, "auto(xtrace)", ests.tolist()))
    first = space.column_dots(Om, Y).cpu()
    rest = _hutchinson_samples(op, m - s, gen, min(m - s, 10), None)
    samples = torch.cat([first, rest])
    mean, se = _mean_stderr(samples)
    return _verdict(op, TraceResult(mean, se, op.num_matvecs - start, "auto(hutchinson)", samples.tolist()))


def _uncaptured_fraction(Y: torch.Tensor, space=None) -> float:
    """The share of the sketch ``Y`` that each column's other columns leave uncaptured.

    :math:`\\sum_i \\|(I - P_{(i)}) y_i\\|^2 / \\sum_i \\|y_i\\|^2` for the columns ``y_i`` of ``Y``.

    With ``Y = QR``, the part of ``y_i`` outside the span of the other columns has norm
    ``1 / ||row i of R^{-1}||``.
    """
    space = space if space is not None else FlatVectors(Y.shape[0], Y.dtype, Y.device)
    total = float(space.column_dots(Y, Y).sum())
    if total == 0.0:
        return 0.0  # A Ω = 0: the sketch says A is (numerically) zero, deflation is exact
    R = space.qr(Y)[1]
    d = R.diagonal().abs()
    if float(d.min()) <= 1e3 * torch.finfo(torch.float64).eps * float(d.max()):
        return 0.0  # rank-deficient sketch: A has rank < s and the sketch captures all of it
    s = R.shape[0]
    Rinv = torch.linalg.solve_triangular(R, torch.eye(s, dtype=R.dtype, device=R.device), upper=True)
    outside = 1.0 / (Rinv * Rinv).sum(dim=1)
    return float(outside.sum()) / total
