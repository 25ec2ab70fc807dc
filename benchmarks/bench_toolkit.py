"""Products per digit of accuracy: hf.diagonal against curvlinops' hutchinson_diag / xdiag, and hf.solve against
scipy's cg / minres (through op.to_scipy(), products counted by the same operator), in the same run; and the
sampled Fisher (GGNOperator(mc_samples=M)) against curvlinops' FisherMCLinearOperator: digits per draws M and
the time of one product (both spend one product per vector whatever M: the draws only change the output
Hessian).

A digit of accuracy is -log10 of the relative error (diagonal: ||d_est - d|| / ||d||, the median over seeds;
solve: the true relative residual ||b - A x|| / ||b||); "products/digit" is the budget divided by the digits.
Usage::

    python benchmarks/bench_toolkit.py
    python benchmarks/bench_toolkit.py --n 2000 --seeds 10
    python benchmarks/bench_toolkit.py --only-fisher --seeds 5

The matrices are Q diag(lambda) Q^T in float64 with chosen spectra (a decaying one, where deflation pays,
and a flat one, where it cannot).
"""

from __future__ import annotations

import argparse
import math
import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from hessianflow.linalg.diagonal import diagonal  # noqa: E402
from hessianflow.linalg.linop import DenseOperator  # noqa: E402
from hessianflow.linalg.solve import solve  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=1000, help="matrix size (default 1000)")
    p.add_argument("--seeds", type=int, default=5, help="seeds per stochastic estimate (default 5)")
    p.add_argument("--budgets", type=int, nargs="+", default=[20, 60, 200], help="products (default 20 60 200)")
    p.add_argument(
        "--mc-samples", type=int, nargs="+", default=[1, 16, 256, 4096],
        help="sampled Fisher: draws per position (default 1 16 256 4096)",
    )  # fmt: skip
    p.add_argument("--only-fisher", action="store_true", help="only the sampled Fisher's table")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    return p.parse_args(argv)


def matrix(lam: torch.Tensor, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    Q = torch.linalg.qr(torch.randn(lam.numel(), lam.numel(), generator=g, dtype=torch.float64)).Q
    A = Q @ torch.diag(lam) @ Q.T
    return (A + A.T) / 2


def digits(err: float) -> float:
    return -math.log10(max(err, 1e-16))


def bench_diagonal(A: torch.Tensor, budgets, seeds) -> list[tuple]:
    import curvlinops

    d = A.diagonal()
    rows = []
    for m in budgets:
        for name, fn in [
            ("hf hutchinson", lambda s, m=m: diagonal(A, m, "hutchinson", seed=s).estimate),
            ("hf xdiag", lambda s, m=m: diagonal(A, m, "xdiag", seed=s).estimate),
            ("hf auto", lambda s, m=m: diagonal(A, m, "auto", seed=s).estimate),
            ("curvlinops hutchinson_diag", lambda s, m=m: (torch.manual_seed(s), curvlinops.hutchinson_diag(A, m))[1]),
            ("curvlinops xdiag", lambda s, m=m: (torch.manual_seed(s), curvlinops.xdiag(A, m))[1]),
        ]:
            errs = [float(torch.linalg.vector_norm(fn(s) - d) / torch.linalg.vector_norm(d)) for s in range(seeds)]
            dg = digits(float(np.median(errs)))
            rows.append((m, name, float(np.median(errs)), dg, m / dg if dg > 0 else float("inf")))
    return rows


def bench_solve(A: torch.Tensor, tols) -> list[tuple]:
    import scipy.sparse.linalg as spla

    b = torch.randn(A.shape[0], generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    bn = b.numpy()
    rows = []
    for tol in tols:
        for method in ("cg", "minres"):
            r = solve(A, b, method=method, tol=tol, max_iter=5000)
            rows.append((tol, f"hf {method}", r.residual, digits(r.residual), r.num_matvecs / digits(r.residual)))
            op = DenseOperator(A)
            S = op.to_scipy()
            x, _ = (spla.cg if method == "cg" else spla.minres)(S, bn, rtol=tol, maxiter=5000)
            res = float(np.linalg.norm(bn - A.numpy() @ x) / np.linalg.norm(bn))
            rows.append((tol, f"scipy {method}", res, digits(res), op.num_matvecs / digits(res)))
    return rows


def _fisher_problem(loss: str, seed: int = 0):
    """A float64 MLP 8-16-C on 64 samples and its loss: CE (C = 5), MSE (C = 3) or BCE with logits (C = 3)."""
    from torch import nn

    g = torch.Generator().manual_seed(seed)
    x = torch.randn(64, 8, generator=g, dtype=torch.float64)
    C = 5 if loss == "cross-entropy" else 3
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, C)).double()
    if loss == "cross-entropy":
        return model, nn.CrossEntropyLoss(), x, torch.randint(0, C, (64,), generator=g)
    if loss == "MSE":
        return model, nn.MSELoss(), x, torch.randn(64, C, generator=g, dtype=torch.float64)
    return model, nn.BCEWithLogitsLoss(), x, (torch.rand(64, C, generator=g) < 0.5).double()


def bench_sampled_fisher(mcs, seeds) -> list[tuple]:
    """The sampled Fisher against the exact GGN: the relative Frobenius error of the dense matrix (median over
    seeds) per draws M, and the time of one product, hessianflow's GGNOperator(mc_samples=M) against
    curvlinops' FisherMCLinearOperator(mc_samples=M) on the same model and data."""
    import time

    import curvlinops

    from hessianflow.curvature import GGNOperator

    rows = []
    for loss in ("cross-entropy", "MSE", "BCE"):
        model, crit, x, y = _fisher_problem(loss)
        params = list(model.parameters())
        n = sum(p.numel() for p in params)
        eye = torch.eye(n, dtype=torch.float64)
        G = GGNOperator(model, crit, data=(x, y)).to_dense()
        for lib in ("hf", "curvlinops"):  # the exact GGN's product, for the time
            if lib == "hf":
                op = GGNOperator(model, crit, data=(x, y))
                mat = lambda V, op=op: op.matmat(V)  # noqa: E731
            else:
                op = curvlinops.GGNLinearOperator(model, crit, params, [(x, y)], check_deterministic=False)
                mat = lambda V, op=op: op @ V  # noqa: E731
            mat(eye[:, :1])  # the first-order graph (hf) is built once, outside the timing
            t0 = time.perf_counter()
            F = torch.cat([mat(eye[:, i : i + 32]) for i in range(0, n, 32)], dim=1)
            ms = 1e3 * (time.perf_counter() - t0) / n
            err = float(torch.linalg.norm(F - G) / torch.linalg.norm(G))
            rows.append((loss, "exact GGN", lib, err, digits(err), ms))
        for M in mcs:
            for lib in ("hf", "curvlinops"):
                errs, secs = [], []
                for s in range(seeds):
                    if lib == "hf":
                        op = GGNOperator(model, crit, data=(x, y), mc_samples=M, seed=s)
                        mat = lambda V, op=op: op.matmat(V)  # noqa: E731
                    else:
                        op = curvlinops.FisherMCLinearOperator(
                            model, crit, params, [(x, y)], seed=s, mc_samples=M, check_deterministic=False
                        )
                        mat = lambda V, op=op: op @ V  # noqa: E731
                    t0 = time.perf_counter()
                    F = torch.cat([mat(eye[:, i : i + 32]) for i in range(0, n, 32)], dim=1)
                    secs.append((time.perf_counter() - t0) / n)
                    errs.append(float(torch.linalg.norm(F - G) / torch.linalg.norm(G)))
                err = float(np.median(errs))
                rows.append((loss, M, lib, err, digits(err), 1e3 * float(np.median(secs))))
    return rows


def main(args) -> dict:
    n = args.n
    torch.set_num_threads(args.threads)
    if args.only_fisher:
        return _print_fisher(args, {})
    spectra = {
        "decaying 1/i^2": 1.0 / torch.arange(1, n + 1, dtype=torch.float64) ** 2,
        "flat [1, 2]": torch.linspace(1.0, 2.0, n, dtype=torch.float64),
    }
    out = {}
    for name, lam in spectra.items():
        A = matrix(lam)
        rows = bench_diagonal(A, args.budgets, args.seeds)
        print(f"\n#### diagonal, n = {n}, spectrum {name} (median relative error over {args.seeds} seeds)\n")
        print("| products | method | rel. error | digits | products/digit |\n|---|---|---|---|---|")
        for m, meth, err, dg, ppd in rows:
            print(f"| {m} | {meth} | {err:.2e} | {dg:.2f} | {ppd:.1f} |")
        out[f"diagonal/{name}"] = rows
    pd_spec = {"condition 1e3": torch.logspace(-3, 0, n, dtype=torch.float64)}
    for name, lam in pd_spec.items():
        rows = bench_solve(matrix(lam), [1e-4, 1e-8])
        print(f"\n#### solve, n = {n}, positive definite, {name} (products counted on the same operator)\n")
        print("| tol | method | true rel. residual | digits | products/digit |\n|---|---|---|---|---|")
        for tol, meth, res, dg, ppd in rows:
            print(f"| {tol:g} | {meth} | {res:.2e} | {dg:.2f} | {ppd:.1f} |")
        out[f"solve/{name}"] = rows
    return _print_fisher(args, out)


def _print_fisher(args, out: dict) -> dict:
    rows = bench_sampled_fisher(args.mc_samples, args.seeds)
    seeds = args.seeds
    print(f"\n#### sampled Fisher against the exact GGN, MLP 8-16-C, 64 samples, float64 (median over {seeds} seeds)\n")
    print("| loss | M | library | rel. error ‖F_M - G‖/‖G‖ | digits | ms per product |\n|---|---|---|---|---|---|")
    for loss, M, lib, err, dg, ms in rows:
        print(f"| {loss} | {M} | {lib} | {err:.2e} | {dg:.2f} | {ms:.2f} |")
    out["sampled_fisher"] = rows
    return out


if __name__ == "__main__":
    main(parse_args())
