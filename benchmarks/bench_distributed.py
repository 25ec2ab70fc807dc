"""The full-data-set Hessian-vector product on two gloo processes against one, on this machine's CPUs.

Usage::

    python benchmarks/bench_distributed.py                    # 1024 images, 3 timed products per launch
    python benchmarks/bench_distributed.py --samples 4096 --rounds 2 --json dist.json

Workload: CIFAR ResNet-8 (``models.get_model("ResNet", depth=8)``, float32, eval mode) and the mean
cross-entropy over ``--samples`` random 3x32x32 images in batches of 128; the product is
``HessianOperator(model, loss, dataloader=...) @ v``, i.e. a forward and a double backward per batch.
Each configuration is a fresh ``torchrun`` launch of this file's worker mode
(``bench_distributed.py --worker OUT_DIR SAMPLES REPEATS``, one JSON file per rank):

* ``1 proc x 1 thread`` and ``1 proc x T threads`` (T = the CPU count): one process over all samples;
* ``2 procs x 1 thread``: each rank takes its contiguous half (``hessianflow.distributed.shard``) and one
  gloo all-reduce sums the size-weighted halves.

Reported: the median seconds per product (after one warm-up product; ranks start each product
together after a barrier, and the slower rank's time counts) and the ratios. The configurations are
interleaved over ``--rounds`` so that a change of machine load hits all of them. The products of all
configurations are checked to agree (relative norm difference below 1e-5, float32).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKER = os.path.abspath(__file__)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(nproc: int, threads: int, samples: int, repeats: int, timeout: float) -> dict:
    """One torchrun launch; returns the per-rank results."""
    with tempfile.TemporaryDirectory() as out:
        env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
        env.update(
            {
                "OMP_NUM_THREADS": str(threads),
                "GLOO_SOCKET_IFNAME": "lo",
                "CUDA_VISIBLE_DEVICES": "",
                "HESSIANFLOW_DIST_TIMEOUT": "120",
                "PYTHONPATH": ROOT + os.pathsep + env.get("PYTHONPATH", ""),
            }
        )
        cmd = [
            sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", str(nproc),
            "--master_addr", "127.0.0.1", "--master_port", str(_free_port()),
            WORKER, "--worker", out, str(samples), str(repeats),
        ]  # fmt: skip
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
        if proc.returncode != 0:
            raise RuntimeError(f"{nproc} process(es) failed:\n{proc.stderr[-4000:]}")
        ranks = []
        for r in range(nproc):
            with open(os.path.join(out, f"bench_rank{r}.json")) as f:
                ranks.append(json.load(f))
    return {
        # the product ends when the slower rank is done: take the max over ranks of each repeat
        "seconds": [max(t) for t in zip(*(r["seconds"] for r in ranks))],
        "norm": ranks[0]["norm"],
        "samples": ranks[0]["samples"],
        "params": ranks[0]["params"],
        "threads": ranks[0]["threads"],
    }


def bench_results(rank: int, world: int, n: int = 1024, repeats: int = 3) -> dict:
    """Seconds per full-data-set product of a small CIFAR ResNet (float32) over ``n`` synthetic images."""
    import torch
    from torch import nn

    from hessianflow._random import make_generator, randn
    from hessianflow.curvature import HessianOperator
    from hessianflow.distributed import shard
    from hessianflow.training.models import get_model

    g = torch.Generator().manual_seed(0)
    X = torch.randn(n, 3, 32, 32, generator=g)
    y = torch.randint(0, 10, (n,), generator=g)
    torch.manual_seed(0)
    model = get_model("ResNet", depth=8, num_classes=10)
    sl = shard(n, rank, world)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(X[sl], y[sl]), batch_size=128)
    H = HessianOperator(model, nn.CrossEntropyLoss(), dataloader=loader)
    v = randn((H.size,), make_generator(0))
    hv = H @ v  # warm-up (allocator, thread pools)
    times = []
    for _ in range(repeats):
        if world > 1:
            torch.distributed.barrier()
        t = time.perf_counter()
        hv = H @ v
        times.append(time.perf_counter() - t)
    return {
        "world": world,
        "threads": torch.get_num_threads(),
        "samples": H.num_samples,
        "params": H.size,
        "seconds": times,
        "norm": float(hv.norm()),
    }


def worker(out_dir: str, samples: int, repeats: int) -> None:
    """One rank of a launch (under torchrun, or alone): time the products, write ``bench_rank{r}.json``."""
    from hessianflow.distributed import init_distributed

    ctx = init_distributed("cpu")
    try:
        res = bench_results(ctx.rank, ctx.world_size, samples, repeats)
        with open(os.path.join(out_dir, f"bench_rank{ctx.rank}.json"), "w") as f:
            json.dump(res, f)
    finally:
        ctx.close()


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--samples", type=int, default=1024, help="images in the data set (default: 1024)")
    p.add_argument("--repeats", type=int, default=3, help="timed products per launch (default: 3)")
    p.add_argument("--rounds", type=int, default=1, help="launches of each configuration, interleaved (default: 1)")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds allowed per launch (default: 600)")
    p.add_argument("--json", type=str, default=None, help="also write the results here")
    args = p.parse_args(argv)
    cpus = os.cpu_count() or 1
    configs = [("1 proc x 1 thread", 1, 1), (f"1 proc x {cpus} threads", 1, cpus), ("2 procs x 1 thread", 2, 1)]
    times = {name: [] for name, _, _ in configs}
    norms = {}
    for _ in range(args.rounds):
        for name, nproc, threads in configs:
            res = launch(nproc, threads, args.samples, args.repeats, args.timeout)
            times[name].extend(res["seconds"])
            norms[name] = res["norm"]
            info = res
    ref = norms[configs[0][0]]
    for name, norm in norms.items():
        if abs(norm - ref) > 1e-5 * abs(ref):
            raise RuntimeError(f"the products disagree: |Hv| = {norm} ({name}) vs {ref} ({configs[0][0]})")
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    median = {name: statistics.median(t) for name, t in times.items()}
    print(
        f"full-data-set Hessian-vector product, ResNet-8 ({info['params']:,} parameters), {info['samples']} images "
        f"in batches of 128, float32, {cpus} CPUs, gloo; load average {load}"
    )
    print(f"{'configuration':<24}{'s / product (median)':>22}{'all timings (s)':>40}")
    for name in times:
        shown = " ".join(f"{t:.2f}" for t in times[name])
        print(f"{name:<24}{median[name]:>22.3f}{shown:>40}")
    two = median["2 procs x 1 thread"]
    ratios = {
        "2 procs / 1 proc x 1 thread": two / median["1 proc x 1 thread"],
        f"2 procs / 1 proc x {cpus} threads": two / median[f"1 proc x {cpus} threads"],
    }
    for k, v in ratios.items():
        print(f"time ratio {k}: {v:.2f}  (below 1: two processes are faster)")
    result = {"samples": args.samples, "cpus": cpus, "load": load, "seconds": times, "median": median, "ratios": ratios}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    if sys.argv[1:2] == ["--worker"]:
        worker(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
    else:
        main()
