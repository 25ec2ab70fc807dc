"""Adapters for the peer libraries the benchmarks compare against (never imported by the package).

Each peer is optional: :func:`load` returns the module or ``None`` with the reason, and the benchmark
prints that reason in place of the peer's rows. Install them with::

    pip install --no-deps pyhessian==0.1 hessian-eigenthings==1.0.0a5 curvlinops-for-pytorch \
        backpack-for-pytorch einops einconv linear_operator opt-einsum unfoldNd

(``--no-deps`` keeps pip from replacing the installed torch; the last six are curvlinops' own
dependencies, which pull nothing else in.)

The adapters call each peer's public API the way its documentation shows, on the same model, batch and
loss as hessianflow. They only add what a fair comparison needs and the peers do not provide: a count of
Hessian-vector products (a transparent wrapper around the product function) and seeding of the global
RNG where a peer draws from it. Nothing here changes what a peer computes.
"""

from __future__ import annotations

import contextlib
import importlib
import time

import numpy as np
import torch

PEERS = ("pyhessian", "hessian_eigenthings", "curvlinops")


def load(name: str):
    """``(module, None)`` or ``(None, reason)`` for one peer (imported lazily, errors kept short)."""
    try:
        mod = importlib.import_module(name)
    except Exception as exc:  # noqa: BLE001 - a missing or broken peer is reported, never fatal
        return None, f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    return mod, None


def version(name: str) -> str:
    """The installed distribution version of a peer, or ``"-"``."""
    from importlib import metadata

    dist = {
        "pyhessian": "pyhessian",
        "hessian_eigenthings": "hessian-eigenthings",
        "curvlinops": "curvlinops-for-pytorch",
    }.get(name, name)
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "-"


def clear_grads(model: torch.nn.Module) -> None:
    """Drop ``.grad`` (PyHessian leaves graph-carrying gradients behind: ``backward(create_graph=True)``)."""
    for p in model.parameters():
        p.grad = None


@contextlib.contextmanager
def default_dtype(dtype: torch.dtype):
    """PyHessian draws its vectors with ``torch.randn(p.size())`` in the default dtype: a float64 model
    needs float64 as the default, or autograd rejects the float32 ``grad_outputs``."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


# ------------------------------------------------------------------------------------------------
# PyHessian 0.1 (Yao et al. 2020)
# ------------------------------------------------------------------------------------------------
class PyHessianCounter:
    """Counts PyHessian's Hessian-vector products by wrapping ``pyhessian.hessian.hessian_vector_product``
    (the one function its solvers call for single-batch products) for the duration of a ``with``."""

    def __init__(self):
        self.count = 0

    def __enter__(self):
        ph = importlib.import_module("pyhessian.hessian")  # the module (the package exports the class too)
        self._orig = ph.hessian_vector_product

        def counted(gradsH, params, v):
            self.count += 1
            return self._orig(gradsH, params, v)

        ph.hessian_vector_product = counted
        return self

    def __exit__(self, *exc):
        ph = importlib.import_module("pyhessian.hessian")
        ph.hessian_vector_product = self._orig
        return False


def pyhessian_hessian(model, criterion, x, y):
    """``pyhessian.hessian(model, criterion, data=(x, y), cuda=False)`` (one forward and one
    ``backward(create_graph=True)``, the graph kept for all later products)."""
    import pyhessian

    clear_grads(model)
    with default_dtype(next(model.parameters()).dtype):
        return pyhessian.hessian(model, criterion, data=(x, y), cuda=False)


def pyhessian_eigenvalues(model, criterion, x, y, top_n: int, max_iter: int, tol: float, seed: int):
    """PyHessian's power iteration; returns ``(eigenvalues sorted descending, products)``."""
    torch.manual_seed(seed)
    try:
        with PyHessianCounter() as c:
            h = pyhessian_hessian(model, criterion, x, y)
            with default_dtype(next(model.parameters()).dtype):
                vals, _ = h.eigenvalues(maxIter=max_iter, tol=tol, top_n=top_n)
        return sorted((float(v) for v in vals), reverse=True), c.count
    finally:
        clear_grads(model)


def pyhessian_trace(model, criterion, x, y, max_iter: int, tol: float, seed: int):
    """PyHessian's Hutchinson trace; returns the per-sample values it computed (its estimate is their
    mean; it reports no error bar)."""
    torch.manual_seed(seed)
    try:
        h = pyhessian_hessian(model, criterion, x, y)
        with default_dtype(next(model.parameters()).dtype):
            return [float(s) for s in h.trace(maxIter=max_iter, tol=tol)]
    finally:
        clear_grads(model)


def pyhessian_hvp(h, vecs):
    """One product on a built ``pyhessian.hessian`` (its graph reused), with PyHessian's own function."""
    from pyhessian.utils import hessian_vector_product

    return hessian_vector_product(h.gradsH, h.params, vecs)


def pyhessian_density(model, criterion, x, y, iters: int, n_v: int, seed: int):
    """PyHessian's SLQ ``density(iter, n_v)``: ``(result or None, error string or None, products, seconds)``.

    On torch >= 2.0 it runs all Lanczos products and then fails in ``torch.eig`` (removed from torch);
    the error is returned, not patched around.
    """
    torch.manual_seed(seed)
    t0 = time.perf_counter()
    try:
        with PyHessianCounter() as c:
            h = pyhessian_hessian(model, criterion, x, y)
            with default_dtype(next(model.parameters()).dtype):
                try:
                    out = h.density(iter=iters, n_v=n_v)
                    err = None
                except Exception as exc:  # noqa: BLE001 - the failure is the result being reported
                    out, err = None, f"{type(exc).__name__}: {exc}"
        return out, err, c.count, time.perf_counter() - t0
    finally:
        clear_grads(model)


# ------------------------------------------------------------------------------------------------
# hessian-eigenthings 1.0.0a5
# ------------------------------------------------------------------------------------------------
def eigenthings_operator(model, criterion, x, y):
    """hessian-eigenthings' ``HessianOperator`` on the one batch, with a product counter
    (``op.count``). It runs a fresh forward and double backward per product (its design)."""
    import hessian_eigenthings as he

    class Counted(he.HessianOperator):
        count = 0

        def matvec(self, v):
            Counted.count += 1
            return super().matvec(v)

    Counted.count = 0
    return Counted(model, [(x, y)], he.supervised_loss(criterion))


def eigenthings_lanczos(op, k: int, max_iter: int, seed: int):
    """``hessian_eigenthings.lanczos`` (largest algebraic); returns eigenvalues sorted descending."""
    import hessian_eigenthings as he

    res = he.lanczos(op, k=k, max_iter=max_iter, which="LA", seed=seed)
    return sorted(res.eigenvalues.double().tolist(), reverse=True)


def eigenthings_start_vector(n: int, dtype, seed: int) -> torch.Tensor:
    """The start vector ``hessian_eigenthings.lanczos(seed=seed)`` draws (to count its steps offline)."""
    gen = torch.Generator(device="cpu")
    gen.manual_seed(seed)
    return torch.randn(n, dtype=dtype, generator=gen)


def eigenthings_density(op, steps: int, seed: int):
    import hessian_eigenthings as he

    return he.spectral_density(op, num_runs=1, lanczos_steps=steps, seed=seed)


# ------------------------------------------------------------------------------------------------
# curvlinops 3.x + scipy
# ------------------------------------------------------------------------------------------------
class _CountedScipy:
    """A scipy ``LinearOperator`` around curvlinops' operator that counts product columns."""

    def __init__(self, op):
        from scipy.sparse.linalg import LinearOperator

        self.count = 0
        inner = op

        def matvec(v):
            self.count += 1
            return inner.matvec(v)

        def matmat(V):
            self.count += V.shape[1]
            return inner.matmat(V)

        self.scipy = LinearOperator(inner.shape, matvec=matvec, matmat=matmat, rmatvec=matvec, dtype=inner.dtype)


def curvlinops_operator(model, criterion, x, y):
    """``curvlinops.HessianLinearOperator(model, criterion, params, [(x, y)])`` and its scipy form
    (products by ``torch.func`` forward-over-reverse, a fresh forward each time). The determinism
    check, which costs extra products, is off (the model is in eval mode and the batch is fixed)."""
    import curvlinops

    params = [p for p in model.parameters() if p.requires_grad]
    H = curvlinops.HessianLinearOperator(model, criterion, params, [(x, y)], check_deterministic=False)
    dtype = np.float64 if next(model.parameters()).dtype == torch.float64 else np.float32
    return H, _CountedScipy(H.to_scipy(dtype=dtype))


def curvlinops_eigsh(model, criterion, x, y, k: int, tol: float, seed: int):
    """``scipy.sparse.linalg.eigsh(H, k, which="LA", tol=tol)`` on curvlinops' operator; returns
    ``(eigenvalues sorted descending, products)``."""
    from scipy.sparse.linalg import eigsh

    _, counted = curvlinops_operator(model, criterion, x, y)
    n = counted.scipy.shape[0]
    v0 = np.random.default_rng(seed).standard_normal(n).astype(counted.scipy.dtype)
    vals = eigsh(counted.scipy, k=k, which="LA", tol=tol, v0=v0, return_eigenvectors=False)
    return sorted((float(v) for v in vals), reverse=True), counted.count


def curvlinops_xtrace(model, criterion, x, y, num_matvecs: int, seed: int) -> float:
    import curvlinops

    H, _ = curvlinops_operator(model, criterion, x, y)
    torch.manual_seed(seed)
    return float(curvlinops.xtrace(H, num_matvecs))
