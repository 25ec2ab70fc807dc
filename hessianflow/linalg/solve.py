"""Linear systems with a curvature operator: :math:`(A + \\delta I)\\, x = b` by CG or MINRES.

* ``method="cg"``: conjugate gradients (Hestenes & Stiefel 1952), for positive (semi-)definite
  operators: the GGN, the (empirical) Fisher, a damped Hessian near a minimum. It stops with
  ``status="indefinite"`` the moment it meets a direction of non-positive curvature.
* ``method="minres"``: MINRES (Paige & Saunders 1975), for any symmetric operator, the indefinite
  Hessian included; on a singular, inconsistent system it returns a least-squares solution and says so.

Both take a :class:`~hessianflow.linalg.linop.LinearOperator` or a dense symmetric tensor, work in the operator's
dtype and device (inner products in float64), and never claim a convergence they did not reach: the
reported ``residual`` is the *true* relative residual :math:`\\|b - (A + \\delta I) x\\| / \\|b\\|`,
recomputed with one product at the end of each run of the recurrence (the recurrences' own residuals drift
from it in finite precision, and by far more with float32 or noisy products). When the true residual is
above ``tol`` the method restarts from it (residual replacement); a restart that does not halve it means the
products' rounding is the limit, and the result says ``status="stagnated"`` with the accuracy reached.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import torch

from .._checks import check_int, check_positive
from .algebra import symmetric_operator
from .eigen import ConvergenceWarning
from .linop import LinearOperator, check_vector
from .vectors import FlatVectors, VectorSpace, space_of

__all__ = ["SolveResult", "solve"]

METHODS = ("cg", "minres")
_MAX_ITER_CAP = 1000  # products; see solve()'s max_iter


@dataclass
class SolveResult:
    """The solution of :math:`(A + \\delta I) x = b` and the verdict on it.

    Attributes:
        x: ``[n]`` the solution estimate, in the operator's dtype and device.
        converged: whether the true relative residual is at most ``tol``.
        residual: the true relative residual :math:`\\|b - (A + \\delta I) x\\| / \\|b\\|` (one product
            computes it; 0 for ``b = 0``).
        num_matvecs: products with the operator spent (iterations plus the residual checks).
        iterations: iterations of the recurrence (one product each).
        status: ``"converged"``, ``"max_iter"`` (budget spent), ``"indefinite"`` (CG met
            :math:`p^\\top (A + \\delta I) p \\le 0`), ``"least_squares"`` (MINRES: a singular system
            that ``b`` is not in the range of; ``x`` minimises the residual) or ``"stagnated"`` (a
            restart from the true residual did not halve it: the products' rounding or noise is the limit).
        reason: one sentence explaining ``status`` with the numbers; ``""`` when converged.
        method: ``"cg"`` or ``"minres"``.
        damping: :math:`\\delta`.
        tol: the requested relative residual.

    Example:
        >>> import torch
        >>> A = torch.diag(torch.tensor([1.0, 2.0, 4.0], dtype=torch.float64))
        >>> r = solve(A, torch.ones(3, dtype=torch.float64))
        >>> r.x, r.converged, r.status
        (tensor([1.0000, 0.5000, 0.2500], dtype=torch.float64), True, 'converged')
        >>> sorted(r.to_dict())
        ['converged', 'damping', 'iterations', 'method', 'num_matvecs', 'reason', 'residual', 'status', 'tol']
    """

    x: torch.Tensor
    converged: bool
    residual: float
    num_matvecs: int
    iterations: int
    status: str
    reason: str
    method: str
    damping: float
    tol: float

    def to_dict(self, include_x: bool = False) -> dict:
        """JSON-ready plain Python values; the solution (``n`` floats) only on request."""
        out = {
            "converged": bool(self.converged),
            "residual": float(self.residual),
            "num_matvecs": int(self.num_matvecs),
            "iterations": int(self.iterations),
            "status": self.status,
            "reason": self.reason,
            "method": self.method,
            "damping": float(self.damping),
            "tol": float(self.tol),
        }
        if include_x:
            out["x"] = self.x.detach().cpu().double().tolist()
        return out


class _Float64Inner(FlatVectors):
    """The flat default with its dot products and norms in float64, whatever the vectors' dtype (the
    solvers' vectors stay in the operator's dtype; their reductions do not lose float32's digits)."""

    def dot(self, x, y):
        return float(torch.dot(x.double(), y.double()))

    def norm(self, x):
        return float(torch.linalg.vector_norm(x.double()))


def _space(op: LinearOperator) -> VectorSpace:
    """The operator's vector space (:func:`~hessianflow.linalg.vectors.space_of`): a sharded or weighted
    one as it is, the flat default with float64 reductions."""
    space = space_of(op, op.dtype)
    return _Float64Inner(op.size, op.dtype, op.device) if type(space) is FlatVectors else space


@dataclass
class _Run:
    """What one run of a recurrence returns to :func:`solve`'s restart loop."""

    x: torch.Tensor
    iterations: int
    status: str  # "target", "max_iter", "indefinite", "least_squares"
    detail: float = 0.0  # the curvature met (indefinite) or the least-squares test value


def _cg(apply, space: VectorSpace, x: torch.Tensor, r: torch.Tensor, target: float, budget: int) -> _Run:
    """Hestenes & Stiefel (1952), from ``x`` with residual ``r``, until ``||r|| <= target``."""
    p = r.clone()
    rs = space.dot(r, r)
    for it in range(1, budget + 1):
        Ap = apply(p)
        pAp = space.dot(p, Ap)
        if pAp <= 0.0:
            return _Run(x, it, "indefinite", pAp / max(space.dot(p, p), torch.finfo(torch.float64).tiny))
        alpha = rs / pAp
        x = x + alpha * p
        r = r - alpha * Ap
        rs_new = space.dot(r, r)
        if math.sqrt(rs_new) <= target:
            return _Run(x, it, "target")
        p = r + (rs_new / rs) * p
        rs = rs_new
    return _Run(x, budget, "max_iter")


def _minres(
    apply, space: VectorSpace, x: torch.Tensor, r: torch.Tensor, target: float, budget: int, tol: float
) -> _Run:
    """Paige & Saunders (1975), unpreconditioned, from ``x`` with residual ``r`` (the recurrence of
    scipy's ``minres``), until the residual estimate ``phibar <= target`` or, for a singular system,
    :math:`\\|A r\\| / (\\|A\\| \\|r\\|) \\le` ``tol`` (a least-squares solution)."""
    eps = torch.finfo(torch.float64).eps
    beta1 = space.norm(r)
    y, r1, r2 = r, r, r
    oldb, beta, dbar, epsln, phibar = 0.0, beta1, 0.0, 0.0, beta1
    tnorm2, cs, sn = 0.0, -1.0, 0.0
    w = torch.zeros_like(x)
    w2 = torch.zeros_like(x)
    for it in range(1, budget + 1):
        v = y / beta
        y = apply(v)
        if it >= 2:
            y = y - (beta / oldb) * r1
        alfa = space.dot(v, y)
        y = y - (alfa / beta) * r2
        r1, r2 = r2, y
        oldb, beta = beta, space.norm(y)
        tnorm2 += alfa**2 + oldb**2 + beta**2
        oldeps = epsln
        delta = cs * dbar + sn * alfa
        gbar = sn * dbar - cs * alfa
        epsln = sn * beta
        dbar = -cs * beta
        root = math.hypot(gbar, dbar)
        gamma = max(math.hypot(gbar, beta), eps)
        cs, sn = gbar / gamma, beta / gamma
        phi, phibar = cs * phibar, sn * phibar
        w1, w2 = w2, w
        w = (v - oldeps * w1 - delta * w2) / gamma
        x = x + phi * w
        if phibar <= target:
            return _Run(x, it, "target")
        anorm = math.sqrt(tnorm2)
        if anorm > 0 and root / anorm <= tol:  # ||A r|| / (||A|| ||r||): r is (nearly) in the null space
            return _Run(x, it, "least_squares", root / anorm)
        if beta <= eps * anorm:  # Lanczos breakdown: the Krylov space is invariant, x is final
            return _Run(x, it, "target")
    return _Run(x, budget, "max_iter")


def _reason(status: str, method: str, residual: float, tol: float, detail: float, max_iter: int) -> str:
    if status == "converged":
        return ""
    if status == "indefinite":
        return (
            f"CG met a direction of non-positive curvature (p^T (A + damping I) p / |p|^2 = {detail:.3g}): the "
            "matrix is not positive definite (a Hessian away from a minimum is indefinite); use method='minres' "
            "or a damping above -lambda_min"
        )
    if status == "least_squares":
        return (
            f"A + damping I is singular and b is not in its range: x is a least-squares solution "
            f"(||A r|| / (||A|| ||r||) = {detail:.2e} <= tol) and the residual stays at {residual:.2e}; "
            "add damping for a unique solution"
        )
    if status == "stagnated":
        return (
            f"a restart from the true residual did not halve it: the products' rounding or noise limits the "
            f"relative residual to about {residual:.2e}, above tol={tol:g} (loosen tol to the accuracy reached)"
        )
    return f"the relative residual is {residual:.2e} > tol={tol:g} after max_iter={max_iter} iterations of {method}"


def solve(
    A,
    b: torch.Tensor,
    damping: float = 0.0,
    method: str = "minres",
    tol: float = 1e-6,
    max_iter: int | None = None,
    x0: torch.Tensor | None = None,
) -> SolveResult:
    """Solve :math:`(A + \\delta I)\\, x = b` for a symmetric operator :math:`A` with products only.

    ``method="cg"`` (Hestenes & Stiefel 1952) minimises the error in the :math:`(A + \\delta I)`-norm
    over the Krylov space :math:`\\mathcal{K}_k = \\operatorname{span}\\{r_0, A r_0, \\dots\\}`; it needs
    :math:`A + \\delta I` positive definite (GGN, Fisher, or damping above :math:`-\\lambda_{\\min}`) and
    stops with ``status="indefinite"`` otherwise. ``method="minres"`` (Paige & Saunders 1975) minimises
    the residual :math:`\\|b - (A + \\delta I) x_k\\|` over the same space and needs only symmetry: the
    default, because a Hessian is indefinite away from a minimum. Both spend one product per iteration;
    on a positive definite system they take about the same number.

    Convergence: ``converged`` is ``True`` only if the *true* relative residual
    :math:`\\|b - (A + \\delta I) x\\| / \\|b\\| \\le` ``tol`` (see the module docstring for the restart
    rule). Otherwise ``converged=False``, ``status``/``reason`` say why, and a
    :class:`~hessianflow.linalg.eigen.ConvergenceWarning` built from those fields is emitted.

    Vectors: every dot product and norm goes through the operator's vector space
    (:func:`~hessianflow.linalg.vectors.space_of`; float64 reductions on the flat default), so a sharded
    operator's solve keeps this rank's slice of ``b`` and ``x`` and all-reduces only scalars, and under a
    weighted inner product :math:`\\langle x, y \\rangle_W` an operator self-adjoint in it is solved (the
    residual is then measured in its norm).

    Influence functions (Koh & Liang 2017) are the usual use:
    :math:`\\mathcal{I}(z, z_{\\mathrm{test}}) = -\\nabla L(z_{\\mathrm{test}})^\\top (H + \\delta I)^{-1}
    \\nabla L(z)`, one solve per test point (``examples/influence.py``).

    Args:
        A: a symmetric :class:`~hessianflow.linalg.linop.LinearOperator` or a dense symmetric ``[n, n]`` tensor.
            A general operator (``A @ B``) is refused.
        b: ``[n]`` right-hand side (this rank's slice of it for a sharded vector space).
        damping: :math:`\\delta`, added to the diagonal (any finite real; a shift in MINRES).
        method: ``"minres"`` (default) or ``"cg"``.
        tol: the relative residual to reach; default ``1e-6`` (scipy's ``cg``/``minres`` default to
            ``1e-5``; one more digit because influence scores are differences of such solutions). Float32
            products typically reach 1e-4 to 1e-6 before their rounding stops them (``"stagnated"``).
        max_iter: iterations (products) at most, restarts included; default ``min(10 n, 1000)``: ``10 n``
            is scipy's ``cg`` default (rounding makes CG take more than the ``n`` steps of exact
            arithmetic), capped at 1000 because a curvature product costs a forward and two backward passes.
        x0: ``[n]`` starting guess (one extra product for its residual); default zero.

    Returns:
        A :class:`SolveResult`.

    Raises:
        ValueError: for an unknown ``method``, a non-positive ``tol``, a ``b`` or ``x0`` of the wrong shape.
        TypeError: for a general (non-symmetric) operator.

    Example:
        The damped indefinite matrix ``diag(-1, 2, 3) + 0.5 I``: MINRES solves it, CG refuses it.

        >>> import torch
        >>> A = torch.diag(torch.tensor([-1.0, 2.0, 3.0], dtype=torch.float64))
        >>> b = torch.tensor([1.0, 5.0, 7.0], dtype=torch.float64)
        >>> r = solve(A, b, damping=0.5, tol=1e-10)
        >>> r.x.round(decimals=8), r.converged, r.residual < 1e-10
        (tensor([-2.,  2.,  2.], dtype=torch.float64), True, True)
        >>> import warnings
        >>> with warnings.catch_warnings(record=True) as caught:
        ...     warnings.simplefilter("always")
        ...     bad = solve(A, b, damping=0.5, method="cg")
        >>> bad.converged, bad.status, type(caught[0].message).__name__
        (False, 'indefinite', 'ConvergenceWarning')
    """
    op: LinearOperator = symmetric_operator(A, "solve")
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    tol = check_positive("tol", tol)
    if isinstance(damping, bool) or not isinstance(damping, (int, float)) or not math.isfinite(damping):
        raise ValueError(f"damping must be a finite real number, got {damping!r}")
    damping = float(damping)
    n = op.size
    max_iter = min(10 * n, _MAX_ITER_CAP) if max_iter is None else check_int("max_iter", max_iter, minimum=1)
    space = _space(op)
    b = check_vector(b, space.local_size, op.dtype, op.device)
    start = op.num_matvecs

    def apply(v):
        out = op.matvec(v)
        return out.add_(v, alpha=damping) if damping else out

    bnorm = space.norm(b)
    x = torch.zeros_like(b) if x0 is None else check_vector(x0, space.local_size, op.dtype, op.device).clone()
    if bnorm == 0.0:
        x = torch.zeros_like(b)
        return SolveResult(x, True, 0.0, op.num_matvecs - start, 0, "converged", "", method, damping, tol)
    r = b.clone() if x0 is None else b - apply(x)
    res = space.norm(r) / bnorm
    iterations, status, detail = 0, "max_iter", 0.0
    while True:
        if res <= tol:
            status = "converged"
            break
        if iterations >= max_iter:
            status = "max_iter"
            break
        budget = max_iter - iterations
        if method == "cg":
            run = _cg(apply, space, x, r, tol * bnorm, budget)
        else:
            run = _minres(apply, space, x, r, tol * bnorm, budget, tol)
        iterations += run.iterations
        x = run.x
        r = b - apply(x)  # the true residual: the verdict, and the next run's start
        new = space.norm(r) / bnorm
        if new <= tol:
            res, status = new, "converged"
            break
        if run.status in ("indefinite", "least_squares"):
            res, status, detail = new, run.status, run.detail
            break
        if run.status == "target" and new > 0.5 * res:
            res, status = new, "stagnated"
            break
        res = new
    converged = status == "converged"
    reason = _reason(status, method, res, tol, detail, max_iter)
    result = SolveResult(x, converged, res, op.num_matvecs - start, iterations, status, reason, method, damping, tol)
    if not converged:
        warnings.warn(f"solve ({method}): not converged ({status}): {reason}", ConvergenceWarning, stacklevel=2)
    return result
