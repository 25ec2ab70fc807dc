"""The diagonal and the squared Frobenius norm of an operator, from matrix-vector products.

* :func:`diagonal`: Hutchinson's diagonal estimator (Bekas, Kokiopoulou & Saad 2007), XDiag (Epperly,
  Tropp & Webber 2024), the exact diagonal when the budget reaches ``n`` products, or ``"auto"``, which
  chooses between the two estimators from the first half of its products (the rule of
  :func:`hessianflow.linalg.trace.trace`).
* :func:`frobenius_norm_sq`: :math:`\\|A\\|_F^2 = \\operatorname{tr}(A^\\top A)` by Hutchinson on
  :math:`A^\\top A` (:math:`\\|A z\\|^2` per Rademacher vector), with a standard error, beside
  :func:`hessianflow.linalg.trace.trace` (PyHessian issue #14 asks for the sum of squared Hessian entries).

Both take a :class:`~hessianflow.linalg.linop.LinearOperator` or a dense symmetric tensor and use batched
products; samples are accumulated in float64.

Vectors: the random draws, XDiag's QR and the Frobenius norms' column norms go through the operator's vector
space (:func:`~hessianflow.linalg.vectors.space_of`), so a sharded operator's estimates are this rank's slice
of the diagonal with only scalars and ``s x s`` Gram matrices all-reduced. The estimators' elementwise
products (:math:`z \\odot A z`, a row's sum over the sketch's columns) need no new method: they are local
to each coordinate, like the solvers' linear combinations. Two things stay flat: the exact diagonal, whose
unit vectors are indexed globally (refused for a sharded space), and the meaning of the diagonal itself,
which is in the standard coordinates: XDiag's formula uses :math:`Q^\\top A = (AQ)^\\top`, the symmetry of
every curvature operator, not self-adjointness in a space's own weighted inner product.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .._checks import check_int
from .._random import make_generator
from .algebra import symmetric_operator
from .linop import LinearOperator
from .trace import TraceResult, _uncaptured_fraction
from .vectors import VectorSpace, space_of

__all__ = ["DiagonalResult", "diagonal", "frobenius_norm_sq"]

METHODS = ("auto", "hutchinson", "xdiag", "exact")
_CHUNK = 64  # vectors per matmat call: bounds memory at 64 n-vectors


@dataclass
class DiagonalResult:
    """A diagonal estimate with a standard error per entry.

    Attributes:
        estimate: ``[n]`` float64 estimate of :math:`\\operatorname{diag}(A)`, on the operator's device.
        stderr: ``[n]`` float64 standard error of each entry (zeros when exact).
        num_matvecs: products with the operator spent.
        method: ``"hutchinson"``, ``"xdiag"``, ``"exact"``, or ``"auto(...)"`` naming the choice.

    Example:
        >>> import torch
        >>> r = diagonal(torch.diag(torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)), num_matvecs=3)
        >>> r.estimate.tolist(), r.stderr.tolist(), r.method
        ([1.0, 2.0, 3.0], [0.0, 0.0, 0.0], 'auto(exact)')
        >>> sorted(r.to_dict())
        ['estimate', 'method', 'num_matvecs', 'stderr']
    """

    estimate: torch.Tensor
    stderr: torch.Tensor
    num_matvecs: int
    method: str

    def to_dict(self) -> dict:
        """JSON-ready plain Python values (two lists of ``n`` floats)."""
        return {
            "estimate": self.estimate.detach().cpu().tolist(),
            "stderr": self.stderr.detach().cpu().tolist(),
            "num_matvecs": int(self.num_matvecs),
            "method": self.method,
        }


def _products(op: LinearOperator, V: torch.Tensor) -> torch.Tensor:
    """``A V`` in float64, ``_CHUNK`` columns at a time."""
    cols = [op.matmat(V[:, i : i + _CHUNK].to(op.dtype)).double() for i in range(0, V.shape[1], _CHUNK)]
    return torch.cat(cols, dim=1)


def _exact(op: LinearOperator, start: int) -> DiagonalResult:
    """``diag(A)`` from ``n`` products with the unit vectors, ``_CHUNK`` at a time."""
    n, out = op.size, []
    for i in range(0, n, _CHUNK):
        E = torch.zeros(n, min(_CHUNK, n - i), dtype=op.dtype, device=op.device)
        idx = torch.arange(E.shape[1], device=op.device)
        E[i + idx, idx] = 1
        out.append(op.matmat(E).double()[i + idx, idx])
    d = torch.cat(out)
    return DiagonalResult(d, torch.zeros_like(d), op.num_matvecs - start, "exact")


def _require_flat(space: VectorSpace, what: str) -> None:
    if space.local_size != space.size:
        raise ValueError(
            f"{what} multiplies by the unit vectors, indexed over the whole vector; with a sharded vector space "
            "pass num_matvecs < n for an estimate"
        )


def _mean_stderr(samples: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Row means of ``[n, m]`` samples and their standard errors, with the unbiased (``m - 1``) variance."""
    m = samples.shape[1]
    return samples.mean(dim=1), samples.std(dim=1, unbiased=True) / math.sqrt(m)


def _hutchinson_samples(op: LinearOperator, count: int, gen: torch.Generator, space: VectorSpace) -> torch.Tensor:
    """``[n, count]`` samples :math:`z \\odot A z` with Rademacher ``z``."""
    # [count, n] transposed, so the vectors do not depend on the chunking (as in hessianflow.linalg.trace)
    Z = space.rademacher(gen, count)  # [n, count], drawn vector by vector
    return Z * _products(op, Z)


def _xdiag(
    op: LinearOperator, Om: torch.Tensor, Y: torch.Tensor, space: VectorSpace
) -> tuple[torch.Tensor, torch.Tensor]:
    """XDiag from test vectors ``Om`` ``[n, s]`` and ``Y = A Om``; ``s`` further products ``A Q``.

    Leave-one-out estimate ``i`` (Epperly, Tropp & Webber 2024, Sec. 2.3), with :math:`Q_{(i)}` an
    orthonormal basis of the sketch without column ``i``:

    .. math::
        d_i = \\operatorname{diag}(Q_{(i)} Q_{(i)}^\\top A)
            + \\omega_i \\odot \\big((I - Q_{(i)} Q_{(i)}^\\top) A \\omega_i\\big) / \\omega_i^{2}.

    With :math:`Y = QR` and :math:`s_i` the normalised ``i``-th column of :math:`R^{-\\top}`,
    :math:`Q_{(i)} Q_{(i)}^\\top = Q (I - s_i s_i^\\top) Q^\\top`, :math:`Q^\\top A \\omega_i = R e_i` and
    :math:`Q^\\top A = Z^\\top` (``Z = AQ``, ``A`` symmetric), so

    .. math:: d_i = \\operatorname{diag}(Q Z^\\top) - (Q s_i) \\odot (Z s_i)
        + (Q s_i)\\,(s_i^\\top R e_i) \\odot \\omega_i / \\omega_i^{2},

    all ``s`` at once as ``[n, s]`` arrays. Returns the mean of the :math:`d_i` and the standard error
    :math:`\\operatorname{std}(d_1, \\dots, d_s)/\\sqrt s` per entry (see :func:`diagonal` on its coverage).
    """
    s = Om.shape[1]
    Q, R = space.qr(Y)
    Z = _products(op, Q)  # [n, s]
    d = R.diagonal()
    dmax = float(d.abs().max())
    floor = 1e3 * torch.finfo(torch.float64).eps * dmax if dmax > 0 else 1.0
    Rreg = R.clone()
    # a rank-deficient sketch (rank A < s): lift R_ii ~ 0 to the rounding floor, as hessianflow.linalg.trace does;
    # those columns of Q are junk directions where the estimate is exact anyway
    small = d.abs() < floor
    if bool(small.any()):
        idx = torch.nonzero(small).flatten()
        Rreg[idx, idx] = torch.where(d[idx] < 0, -floor, floor).to(R.dtype)
    eye = torch.eye(s, dtype=R.dtype, device=R.device)
    RinvT = torch.linalg.solve_triangular(Rreg, eye, upper=True).T  # R^{-T}
    S = RinvT / torch.linalg.vector_norm(RinvT, dim=0, keepdim=True)  # [s, s], columns s_i
    QS, ZS = Q @ S, Z @ S  # [n, s]
    c = (S * R).sum(dim=0)  # s_i^T R e_i
    base = (Q * Z).sum(dim=1, keepdim=True)  # diag(Q Z^T), [n, 1]
    D = base - QS * ZS + QS * c * Om / Om**2  # [n, s] leave-one-out estimates
    return _mean_stderr(D)


def diagonal(A, num_matvecs: int = 100, method: str = "auto", seed=None) -> DiagonalResult:
    """Estimate :math:`\\operatorname{diag}(A)` with a standard error per entry.

    ``"hutchinson"`` (Bekas, Kokiopoulou & Saad 2007) averages :math:`m` samples
    :math:`z \\odot A z` over Rademacher vectors :math:`z`:

    .. math::
        \\hat d = \\frac1m \\sum_{k=1}^m z_k \\odot A z_k, \\qquad
        \\operatorname{Var}(z \\odot A z)_i = \\sum_{j \\ne i} a_{ij}^2,

    unbiased, and exact on a diagonal matrix; the standard error of entry ``i`` is the sample standard
    deviation of its ``m`` samples (with the unbiased ``m - 1`` denominator) over :math:`\\sqrt m`.

    ``"xdiag"`` (Epperly, Tropp & Webber 2024, "XTrace: making the most of every sample in stochastic
    trace estimation", SIAM J. Matrix Anal. Appl. 45(1), Sec. 2.3) spends ``s = m//2`` products on a
    sketch :math:`Y = A\\Omega` and ``s`` on :math:`A Q`, takes the diagonal of the low-rank part exactly
    and runs Hutchinson on the rest, every test vector in both roles (leave-one-out, see :func:`_xdiag`);
    exact when ``rank A < s``, and far better than Hutchinson on a decaying spectrum. Its standard error
    is the spread of the ``s`` leave-one-out estimates over :math:`\\sqrt s`; those share most of their
    sketch, so like XTrace's it can under-cover on decaying spectra (measured in
    ``tests/test_diagonal.py``, ``n = 300``, 60 products, 30 seeds: ``estimate ± 2 stderr`` held for 85% of
    the entries on a flat spectrum, 91-93% on decaying ones; Hutchinson's, 95%).

    ``"exact"``: ``n`` products with the unit vectors; chosen by every method when ``num_matvecs >= n``.

    ``"auto"`` (default) computes the sketch :math:`Y = A\\Omega` with ``m//2`` Rademacher vectors, measures
    the share :math:`\\rho` of it that deflation leaves (as :func:`hessianflow.linalg.trace.trace` does), and
    finishes as XDiag if :math:`\\rho < 1/2` (deflation leaves at most half of Hutchinson's variance),
    otherwise as Hutchinson, keeping the first ``m//2`` samples :math:`\\omega \\odot A\\omega`.

    Args:
        A: a symmetric :class:`~hessianflow.linalg.linop.LinearOperator` or a dense symmetric ``[n, n]`` tensor.
        num_matvecs: products to spend (``m``; >= 2 for Hutchinson, >= 4 for ``"xdiag"``/``"auto"``,
            unless ``m >= n``: then the diagonal is exact).
            Default 100, as :func:`hessianflow.linalg.trace.trace`.
        method: ``"auto"``, ``"hutchinson"``, ``"xdiag"`` or ``"exact"``.
        seed: ``None``, an int or a ``torch.Generator``.

    Returns:
        A :class:`DiagonalResult`.

    Raises:
        ValueError: for an unknown method or too small a budget.

    Example:
        A rank-5 matrix: XDiag's sketch captures it whole, so 12 products give the diagonal exactly.

        >>> import torch
        >>> g = torch.Generator().manual_seed(0)
        >>> U = torch.randn(200, 5, generator=g, dtype=torch.float64)
        >>> A = U @ U.T
        >>> r = diagonal(A, num_matvecs=12, seed=0)
        >>> r.method, torch.allclose(r.estimate, A.diagonal()), r.num_matvecs
        ('auto(xdiag)', True, 12)
        >>> h = diagonal(A, num_matvecs=12, method="hutchinson", seed=0)
        >>> bool(((h.estimate - A.diagonal()).abs() < 4 * h.stderr).float().mean() > 0.95)
        True
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    op = symmetric_operator(A, "diagonal")
    start, n = op.num_matvecs, op.size
    m = check_int("num_matvecs", num_matvecs, minimum=1)
    space = space_of(op, torch.float64)
    if method == "exact" or m >= n:
        _require_flat(space, "the exact diagonal")
        result = _exact(op, start)
        result.method = "auto(exact)" if method == "auto" else "exact"
        return result
    m = check_int("num_matvecs", num_matvecs, minimum=2 if method == "hutchinson" else 4)
    gen = make_generator(seed)
    if method == "hutchinson":
        est, se = _mean_stderr(_hutchinson_samples(op, m, gen, space))
        return DiagonalResult(est, se, op.num_matvecs - start, "hutchinson")
    s = m // 2
    Om = space.rademacher(gen, s)  # [n, s]
    Y = _products(op, Om)
    if method == "xdiag" or _uncaptured_fraction(Y, space) < 0.5:
        est, se = _xdiag(op, Om, Y, space)
        return DiagonalResult(est, se, op.num_matvecs - start, "xdiag" if method == "xdiag" else "auto(xdiag)")
    samples = torch.cat([Om * Y, _hutchinson_samples(op, m - s, gen, space)], dim=1)
    est, se = _mean_stderr(samples)
    return DiagonalResult(est, se, op.num_matvecs - start, "auto(hutchinson)")


def frobenius_norm_sq(A, num_matvecs: int = 100, seed=None) -> TraceResult:
    """Estimate :math:`\\|A\\|_F^2 = \\sum_{ij} a_{ij}^2` by Hutchinson on :math:`A^\\top A`.

    .. math::
        \\widehat{\\|A\\|_F^2} = \\frac1m \\sum_{k=1}^m \\|A z_k\\|^2, \\qquad
        \\mathbb{E}\\,\\|A z\\|^2 = \\operatorname{tr}(A^\\top A)

    for Rademacher :math:`z` (Hutchinson 1989; Girard 1989), one product per sample, with the standard
    error :math:`s/\\sqrt m` of the samples. For a Hessian this is :math:`\\sum_i \\lambda_i^2`, the sum of
    squared eigenvalues (PyHessian #14); with :func:`hessianflow.linalg.trace.trace` it gives the spread of the
    spectrum, :math:`\\|A\\|_F^2/n - (\\operatorname{tr}A/n)^2`. When ``num_matvecs >= n`` it is computed
    exactly from ``n`` products with the unit vectors (``method="exact"``).

    Args:
        A: a symmetric :class:`~hessianflow.linalg.linop.LinearOperator` or a dense symmetric ``[n, n]`` tensor.
        num_matvecs: samples (= products); >= 2. Default 100, as :func:`hessianflow.linalg.trace.trace`.
        seed: ``None``, an int or a ``torch.Generator``.

    Returns:
        A :class:`~hessianflow.linalg.trace.TraceResult` (``estimate``, ``stderr``, ``num_matvecs``,
        ``method="hutchinson"`` or ``"exact"``, ``samples`` the :math:`\\|A z_k\\|^2`).

    Example:
        >>> import torch
        >>> A = torch.tensor([[2.0, 1.0], [1.0, 3.0]], dtype=torch.float64)  # ||A||_F^2 = 4 + 1 + 1 + 9
        >>> frobenius_norm_sq(A, num_matvecs=2).estimate
        15.0
        >>> g = torch.Generator().manual_seed(0)
        >>> B = torch.randn(100, 100, generator=g, dtype=torch.float64)
        >>> B = B + B.T
        >>> r = frobenius_norm_sq(B, num_matvecs=30, seed=0)
        >>> abs(r.estimate - float((B**2).sum())) < 4 * r.stderr, r.method
        (True, 'hutchinson')
    """
    op = symmetric_operator(A, "frobenius_norm_sq")
    m = check_int("num_matvecs", num_matvecs, minimum=2)
    gen = make_generator(seed)
    start, n = op.num_matvecs, op.size
    space = space_of(op, torch.float64)
    if m >= n:
        _require_flat(space, "the exact squared Frobenius norm")
        total = 0.0
        for i in range(0, n, _CHUNK):
            E = torch.zeros(n, min(_CHUNK, n - i), dtype=op.dtype, device=op.device)
            idx = torch.arange(E.shape[1], device=op.device)
            E[i + idx, idx] = 1
            total += float((op.matmat(E).double() ** 2).sum())
        return TraceResult(total, 0.0, op.num_matvecs - start, "exact", None)
    Z = space.rademacher(gen, m)
    AZ = _products(op, Z)
    samples = space.column_dots(AZ, AZ).cpu()
    mean, se = float(samples.mean()), float(samples.std(unbiased=True) / math.sqrt(m))
    return TraceResult(mean, se, op.num_matvecs - start, "hutchinson", samples.tolist())
