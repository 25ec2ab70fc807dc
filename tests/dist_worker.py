"""The worker that tests/test_distributed.py starts under torchrun.

    python -m torch.distributed.run --nproc_per_node 2 tests/dist_worker.py ops OUT_DIR
    python -m torch.distributed.run --nproc_per_node 2 tests/dist_worker.py train OUT_DIR -- TRAIN.PY FLAGS
    python -m torch.distributed.run --nproc_per_node 2 tests/dist_worker.py train_resnet OUT_DIR -- FLAGS
    python -m torch.distributed.run --nproc_per_node 2 tests/dist_worker.py driver OUT_DIR -- DRIVER FLAGS

``ops`` computes curvature products and every algorithm over each rank's shard of a small float64
problem and saves ``OUT_DIR/ops_rank{r}.pt``; the test computes the one-process reference in-process
with :func:`operator_results` ``(rank=0, world=1)`` and compares. ``train`` runs train.py's ``main``
(through ``_cli.run``, as ``python train.py`` does) and saves every rank's returned metrics to
``OUT_DIR/metrics_rank{r}.json`` (``train_resnet``: the same with train_resnet.py);
``$DIST_WORKER_FAIL_RANK`` makes that rank's ABSA eigenvalue check raise. ``driver`` runs
hessian_eig_driver.py's ``main`` (through ``_cli.run``) and saves every rank's returned result to
``OUT_DIR/driver_rank{r}.json``; ``$DIST_WORKER_FAIL_RANK`` makes that rank's loss landscape fail.
``stall`` has the last rank never join a collective (the group timeout's test). Timings are not taken
here: benchmarks/bench_distributed.py is its own torchrun worker.
"""

from __future__ import annotations

import json
import os
import sys
import time

import torch
from torch import nn

from hessianflow._random import make_generator, randn  # noqa: E402
from hessianflow.curvature import (  # noqa: E402
    GGNOperator,
    HessianOperator,
    products,  # noqa: E402
)
from hessianflow.curvature.analysis import loss_landscape  # noqa: E402
from hessianflow.distributed import (  # noqa: E402
    assert_same_on_all_ranks,
    broadcast_buffers,
    exit_process,
    init_distributed,
    shard,
)
from hessianflow.linalg.density import spectral_density  # noqa: E402
from hessianflow.linalg.eigen import lanczos, power_iteration  # noqa: E402
from hessianflow.linalg.trace import hutchinson_trace, trace  # noqa: E402

try:  # a script run from tests/ (torchrun puts its folder on sys.path), or imported by pytest
    from dense_reference import mlp
except ImportError:  # pragma: no cover - pytest's importlib mode
    from tests.dense_reference import mlp

N, D, C = 37, 5, 3  # 37 samples: shards of 19 and 18 for two ranks, batches of (10, 9) and (10, 8)
BATCH = 10
N_DDP = 36  # DDP averages the ranks' mean gradients: equal shards make that the global mean


def problem():
    """A float64 tanh network (39 parameters) and a 37-sample data set, the same in every process."""
    g = torch.Generator().manual_seed(0)
    X = torch.randn(N, D, generator=g, dtype=torch.float64)
    y = torch.randint(0, C, (N,), generator=g)
    return mlp(D, 4, C, seed=0), X, y


def _loader(X, y):
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(X, y), batch_size=BATCH)


def vectors(n):
    return (
        randn((n,), make_generator(10), dtype=torch.float64),
        randn((n, 4), make_generator(11), dtype=torch.float64),
    )


def operator_results(rank: int, world: int) -> dict:
    """Products and algorithm outputs over this rank's shard (``world=1``: the whole data set)."""
    model, X, y = problem()
    ce = nn.CrossEntropyLoss()
    sl = shard(N, rank, world)
    loader = _loader(X[sl], y[sl])
    H = HessianOperator(model, ce, dataloader=loader)
    v, V = vectors(H.size)
    out = {"shard_size": sl.stop - sl.start}
    out["Hv"] = H @ v
    out["num_samples"] = H.num_samples
    out["HV"] = H @ V
    out["lanczos"] = lanczos(H, k=3, tol=1e-10, seed=1).eigenvalues
    out["gradient"] = H.gradient()  # all-reduced like the products
    out["lanczos_gradient_start"] = lanczos(H, k=1, tol=1e-10, seed=1, v0="gradient").eigenvalues
    out["power"] = power_iteration(H, k=1, max_iter=80, tol=1e-9, seed=2).eigenvalues
    slq = spectral_density(H, num_runs=2, num_steps=12, seed=3)
    out["slq_nodes"], out["slq_weights"] = slq.nodes, slq.weights
    # rtol=: a data-dependent number of samples; trace(): a data-dependent choice of method
    hutch = hutchinson_trace(H, num_matvecs=40, seed=4, rtol=0.14, min_samples=4, batch_size=4)
    out["hutchinson"], out["hutchinson_matvecs"] = hutch.estimate, hutch.num_matvecs
    auto = trace(H, num_matvecs=30, seed=5)
    out["trace_auto"], out["trace_auto_method"] = auto.estimate, auto.method
    out["ggn_v"] = GGNOperator(model, ce, dataloader=loader) @ v
    out["sum_v"] = HessianOperator(model, nn.CrossEntropyLoss(reduction="sum"), dataloader=loader) @ v
    # train.py's pattern: each rank holds its shard of one batch, passed as a one-element list
    s12 = shard(12, rank, world)
    out["one_batch_v"] = HessianOperator(model, ce, dataloader=[(X[:12][s12], y[:12][s12])]) @ v
    # a data set smaller than the world: the other ranks hold empty shards
    s1 = shard(1, rank, world)
    out["tiny_v"] = HessianOperator(model, ce, dataloader=_loader(X[:1][s1], y[:1][s1])) @ v
    out["tiny_gradient"] = HessianOperator(model, ce, dataloader=_loader(X[:1][s1], y[:1][s1])).gradient()
    # the loss landscape over the shards: a loader, a one-batch list, an empty shard, a sum-reduced loss
    steps = [-0.5, 0.0, 0.3]
    out["landscape"] = loss_landscape(model, ce, dataloader=loader, directions=v, alphas=steps)
    out["landscape_2d"] = loss_landscape(model, ce, dataloader=loader, directions=V[:, :2], alphas=steps, betas=[0.2])
    out["landscape_one_batch"] = loss_landscape(
        model, ce, dataloader=[(X[:12][s12], y[:12][s12])], directions=v, alphas=steps
    )
    tiny = _loader(X[:1][s1], y[:1][s1])
    out["landscape_tiny"] = loss_landscape(model, ce, dataloader=tiny, directions=v, alphas=steps)
    sum_ce = nn.CrossEntropyLoss(reduction="sum")
    out["landscape_sum"] = loss_landscape(model, sum_ce, dataloader=loader, directions=v, alphas=steps)
    return out


def ddp_reference() -> dict:
    """One process: two (HVP, SGD step) rounds on the first 36 samples, as :func:`ddp_results` does."""
    model, X, y = problem()
    ce = nn.CrossEntropyLoss()
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    v, _ = vectors(sum(p.numel() for p in model.parameters()))
    out = {}
    for step in range(2):
        out[f"hv{step}"] = HessianOperator(model, ce, data=(X[:N_DDP], y[:N_DDP])) @ v
        ce(model(X[:N_DDP]), y[:N_DDP]).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    out["params"] = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    return out


def ddp_results(rank: int, world: int) -> dict:
    """HVPs through a DDP-wrapped model between DDP training steps (each with a ``no_sync`` micro-step)."""
    model, X, y = problem()
    ce = nn.CrossEntropyLoss()
    ddp = nn.parallel.DistributedDataParallel(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    v, _ = vectors(sum(p.numel() for p in model.parameters()))
    sl = shard(N_DDP, rank, world)
    xs, ys = X[sl], y[sl]
    half = xs.shape[0] // 2
    out = {}
    for step in range(2):
        out[f"hv{step}"] = HessianOperator(ddp, ce, dataloader=[(xs, ys)]) @ v
        out[f"no_grad_after_hvp{step}"] = all(p.grad is None for p in model.parameters())
        with ddp.no_sync():  # a micro-step that does not end in an optimizer step: no all-reduce
            (ce(ddp(xs[:half]), ys[:half]) * half).backward()
        (ce(ddp(xs[half:]), ys[half:]) * (xs.shape[0] - half)).backward()
        for p in model.parameters():
            p.grad.div_(xs.shape[0])
        opt.step()
        opt.zero_grad(set_to_none=True)
    out["params"] = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    return out


def fault_results(rank: int, world: int) -> dict:
    """Failures on one rank become errors on every rank, and the group stays usable."""
    model, X, y = problem()
    ce = nn.CrossEntropyLoss()
    sl = shard(N, rank, world)
    v, V = vectors(sum(p.numel() for p in model.parameters()))
    out = {}
    Xbad = X[sl].clone()
    if rank == world - 1:
        Xbad[2, 0] = float("nan")  # a NaN loss on the last rank's shard only
    try:
        HessianOperator(model, ce, dataloader=_loader(Xbad, y[sl])) @ v
        out["nan_error"] = None
    except Exception as exc:  # noqa: BLE001 - recorded for the test
        out["nan_error"] = (type(exc).__name__, str(exc))
    out["after_error_v"] = HessianOperator(model, ce, dataloader=_loader(X[sl], y[sl])) @ v
    # a batched product that only the last rank cannot do (as if vmap had no rule for an op there)
    original = products.double_backprop_hmm

    def no_rule(*args, **kwargs):
        raise RuntimeError("no batching rule (injected)")

    if rank == world - 1:
        products.double_backprop_hmm = no_rule
    try:
        H = HessianOperator(model, ce, dataloader=_loader(X[sl], y[sl]))
        out["fallback_HV"] = H @ V
        out["fallback_batched_ok"] = H._batched_ok
    finally:
        products.double_backprop_hmm = original
    bn = nn.BatchNorm1d(3)
    with torch.no_grad():
        bn.running_mean.fill_(rank + 1.0)
    out["buffers_sent"] = broadcast_buffers(bn)
    out["bn_mean"] = bn.running_mean.clone()
    assert_same_on_all_ranks([1.5, None, float("nan")], "constants")
    try:
        assert_same_on_all_ranks([0.5, float(rank)], "the rank")
        out["disagree_error"] = None
    except RuntimeError as exc:
        out["disagree_error"] = str(exc)
    return out


def _train(out_dir: str, argv: list[str], rank: int, script: str = "train") -> int:
    import importlib

    from hessianflow.cli import common as _cli
    from hessianflow.cli import train

    module = importlib.import_module(f"hessianflow.cli.{script}")  # train or train_resnet (runs train.main)

    fail_rank = os.environ.get("DIST_WORKER_FAIL_RANK")
    if fail_rank is not None and int(fail_rank) == rank:

        def broken(*args, **kwargs):
            raise RuntimeError(f"injected failure on rank {rank} in the eigenvalue check")

        train.top_eigenvalue = broken

    def main(args):
        metrics = module.main(args)
        with open(os.path.join(out_dir, f"metrics_rank{rank}.json"), "w") as f:
            json.dump(metrics, f)
        return metrics

    return _cli.run(main, module.parse_args, argv)


def _driver(out_dir: str, argv: list[str], rank: int) -> int:
    from hessianflow.cli import common as _cli
    from hessianflow.cli import eig as drv
    from hessianflow.io.checkpoint import write_json

    fail_rank = os.environ.get("DIST_WORKER_FAIL_RANK")
    if fail_rank is not None and int(fail_rank) == rank:
        # functional_call is the landscape's forward pass (the operators use autograd on the model)
        def broken(*args, **kwargs):
            raise RuntimeError(f"injected failure on rank {rank} in the loss landscape")

        torch.func.functional_call = broken

    def main(args):
        result = drv.main(args)
        write_json(os.path.join(out_dir, f"driver_rank{rank}.json"), result)
        return result

    return _cli.run(main, drv.parse_args, argv)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    mode, out_dir, rest = argv[0], argv[1], argv[2:]
    if rest[:1] == ["--"]:
        rest = rest[1:]
    os.makedirs(out_dir, exist_ok=True)
    rank = int(os.environ.get("RANK", "0"))
    if mode in ("train", "train_resnet"):
        return _train(out_dir, rest, rank, mode)
    if mode == "driver":
        return _driver(out_dir, rest, rank)
    ctx = init_distributed("cpu")
    try:
        if mode == "ops":
            res = operator_results(ctx.rank, ctx.world_size)
            if ctx.enabled:
                res["ddp"] = ddp_results(ctx.rank, ctx.world_size)
                res["fault"] = fault_results(ctx.rank, ctx.world_size)
            torch.save(res, os.path.join(out_dir, f"ops_rank{ctx.rank}.pt"))
        elif mode == "stall":
            # the last rank stops answering (alive, but never joins the collective): the others must
            # fail after the group's timeout ($HESSIANFLOW_DIST_TIMEOUT) instead of waiting for ever
            if ctx.rank == ctx.world_size - 1:
                time.sleep(float(rest[0]) if rest else 300.0)
            else:
                torch.distributed.all_reduce(torch.ones(3))
        else:
            raise SystemExit(f"unknown mode {mode!r}")
    finally:
        ctx.close()
    return 0


if __name__ == "__main__":
    exit_process(main() or 0)  # a torchrun worker: see hessianflow.distributed.exit_process
