"""Per-rank memory and seconds per Hessian product of an FSDP2-sharded GPT-2, for 1, 2 and 4 ranks (CPU, gloo).

Usage::

    python benchmarks/bench_fsdp.py                       # 1, 2, 4 ranks and the unsharded operator
    python benchmarks/bench_fsdp.py --ranks 1 2 --layers 4 --json fsdp.json

Workload: a HuggingFace ``GPT2LMHeadModel`` from a config (``--layers`` blocks of width ``--embd``, a
``--vocab`` vocabulary, untied embeddings, float32), the causal-LM loss over a global batch of ``--batch``
random sequences of ``--seq`` tokens split over the ranks. Sharded runs build the model on the ``meta``
device, apply ``fully_shard`` per block and at the root and only then materialise the shards
(``to_empty``), the way a model that does not fit on one device is built, so no rank ever holds the whole
model. Each configuration is a fresh ``torchrun`` launch of this file's worker mode.

Reported per configuration (the largest rank's value): resident memory after the imports, with the
model, and at its peak (``VmRSS`` and ``VmHWM`` from ``/proc``), the bytes of this rank's parameters, of
one operator vector and of a 20-vector Krylov basis (computed from the tensors' sizes), and the median
seconds per product after one warm-up.
The unsharded row is ``HessianOperator`` on the plain model in one process. hessian-eigenthings'
``HessianOperator`` is tried on the sharded model (2 ranks) and its error, if any, recorded.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def _status_mb(field: str) -> float:
    """``VmRSS`` (now) or ``VmHWM`` (peak) of this process from /proc (``ru_maxrss`` would carry the
    torchrun launcher's peak across ``exec``)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def _config(args):
    from transformers import GPT2Config

    return GPT2Config(vocab_size=args.vocab, n_positions=args.seq, n_embd=args.embd, n_layer=args.layers,
                      n_head=args.heads, tie_word_embeddings=False, resid_pdrop=0.0, embd_pdrop=0.0,
                      attn_pdrop=0.0)  # fmt: skip


def _batch(args, rank, world):
    import torch

    from hessianflow.distributed import shard

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, args.vocab, (args.batch, args.seq), generator=g)
    mine = ids[shard(args.batch, rank, world)]
    return {"input_ids": mine, "labels": mine}


def worker(args) -> None:
    import torch
    import torch.distributed as dist
    import transformers  # noqa: F401 - counted in the baseline

    import hessianflow as hf
    from hessianflow.curvature.losses import causal_lm_loss

    rss_import = _status_mb("VmRSS")

    sharded = args.mode == "sharded"
    if sharded:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard
        from transformers import GPT2LMHeadModel

        dist.init_process_group("gloo")
        rank, world = dist.get_rank(), dist.get_world_size()
        with torch.device("meta"):
            model = GPT2LMHeadModel(_config(args))
        mesh = init_device_mesh("cpu", (world,))
        for block in model.transformer.h:
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)
        model.to_empty(device="cpu")
        g = torch.Generator().manual_seed(rank)
        with torch.no_grad():
            for p in model.parameters():  # this rank's shard only (values do not matter for the timing)
                p.to_local().normal_(0.0, 0.02, generator=g)
    else:
        from transformers import GPT2LMHeadModel

        rank, world = 0, 1
        torch.manual_seed(0)
        model = GPT2LMHeadModel(_config(args))
    model.eval()
    rss_model = _status_mb("VmRSS")
    H = hf.HessianOperator(model, loss_fn=causal_lm_loss, data=_batch(args, rank, world))
    space = getattr(H, "vector_space", None)
    local = H.local_size
    v = torch.randn(local, generator=torch.Generator().manual_seed(1))
    times = []
    for i in range(args.repeats + 1):
        if sharded:
            dist.barrier()
        t0 = time.perf_counter()
        H @ v
        if i:
            times.append(time.perf_counter() - t0)
    out = {
        "mode": args.mode,
        "rank": rank,
        "world": world,
        "parameters": H.size,
        "local_entries": local,
        "param_mb": sum(p.numel() * p.element_size() for p in H.params) / 2**20,
        "vector_mb": local * 4 / 2**20,
        "basis20_mb": 20 * local * 8 / 2**20,  # the solvers' float64 Krylov basis
        "rss_import_mb": rss_import,
        "rss_model_mb": rss_model,
        "rss_peak_mb": _status_mb("VmHWM"),
        "seconds_per_product": statistics.median(times),
        "sharded_space": type(space).__name__ if space is not None else "FlatVectors",
    }
    if sharded and world == 2 and args.eigenthings:
        out["hessian_eigenthings"] = _eigenthings(model, _batch(args, rank, world))
    with open(os.path.join(args.out, f"{args.mode}-{world}-rank{rank}.json"), "w") as f:
        json.dump(out, f)
    if sharded:
        dist.destroy_process_group()


def _eigenthings(model, batch) -> dict:
    """hessian-eigenthings' operator (both its methods) on the sharded model: what a product gives, in one line."""
    try:
        import hessian_eigenthings as he
    except ImportError as exc:
        return {"autograd": f"not installed ({exc})"}
    import torch

    out = {}
    for method in ("autograd", "finite_difference"):
        try:
            op = he.HessianOperator(model, [batch], he.hf_lm_loss(), method=method)
            n = sum(p.numel() for p in model.parameters())
            w = op.matvec(torch.randn(n))
            out[method] = f"ran: |Hv| = {float(w.norm()):.3g}"
        except Exception as exc:  # noqa: BLE001 - the failure is the result
            out[method] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}"
    return out


def launch(args, mode, world, out) -> list[dict]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo", "CUDA_VISIBLE_DEVICES": "",
           "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}  # fmt: skip
    common = [__file__, "--worker", "--mode", mode, "--out", out, *_model_flags(args)]
    if mode == "sharded":
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(world),
               "--master_addr", "127.0.0.1", "--master_port", str(port), *common]  # fmt: skip
    else:
        cmd = [sys.executable, *common]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=3600)
    if proc.returncode != 0:
        raise SystemExit(f"{mode} x {world} failed:\n{proc.stderr[-3000:]}")
    return [json.load(open(os.path.join(out, f"{mode}-{world}-rank{r}.json"))) for r in range(world)]


def _model_flags(args):
    flags = []
    for k in ("layers", "embd", "heads", "vocab", "seq", "batch", "repeats"):
        flags += [f"--{k}", str(getattr(args, k))]
    return flags + ([] if args.eigenthings else ["--no-eigenthings"])


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ranks", type=int, nargs="+", default=[1, 2, 4], help="world sizes (default 1 2 4)")
    p.add_argument("--layers", type=int, default=6, help="GPT-2 blocks (default 6)")
    p.add_argument("--embd", type=int, default=512, help="width (default 512)")
    p.add_argument("--heads", type=int, default=8, help="attention heads (default 8)")
    p.add_argument("--vocab", type=int, default=8192, help="vocabulary (default 8192)")
    p.add_argument("--seq", type=int, default=32, help="tokens per sequence (default 32)")
    p.add_argument("--batch", type=int, default=8, help="global batch of sequences (default 8)")
    p.add_argument("--repeats", type=int, default=2, help="timed products after one warm-up (default 2)")
    p.add_argument("--no-eigenthings", dest="eigenthings", action="store_false", help="skip the peer")
    p.add_argument("--json", type=str, default=None, help="write all rows here")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--mode", choices=["sharded", "plain"], default="sharded", help=argparse.SUPPRESS)
    p.add_argument("--out", type=str, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        return worker(args)
    rows = []
    with tempfile.TemporaryDirectory() as out:
        runs = [("plain", 1)] + [("sharded", w) for w in args.ranks]
        for mode, world in runs:
            ranks = launch(args, mode, world, out)
            worst = {k: max(r[k] for r in ranks) for k in ranks[0] if isinstance(ranks[0][k], float)}
            row = {"mode": mode, "ranks": world, "parameters": ranks[0]["parameters"], **worst}
            if "hessian_eigenthings" in ranks[0]:
                row["hessian_eigenthings"] = ranks[0]["hessian_eigenthings"]
            rows.append(row)
            print(json.dumps(row), flush=True)
    print()
    print(f"GPT-2 {args.layers} blocks x {args.embd}, vocab {args.vocab}, {rows[0]['parameters']:,} parameters, "
          f"float32, global batch {args.batch} x {args.seq} tokens, CPU gloo")  # fmt: skip
    print("| operator | ranks | params / rank (MB) | vector / rank (MB) | 20-vector basis / rank (MB) | "
          "RSS after imports (MB) | RSS with the model (MB) | peak RSS / rank (MB) | s / product |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        name = "unsharded" if r["mode"] == "plain" else "FSDP2-sharded"
        print(f"| {name} | {r['ranks']} | {r['param_mb']:.1f} | {r['vector_mb']:.1f} | {r['basis20_mb']:.1f} | "
              f"{r['rss_import_mb']:.0f} | {r['rss_model_mb']:.0f} | {r['rss_peak_mb']:.0f} | "
              f"{r['seconds_per_product']:.2f} |")  # fmt: skip
    for r in rows:
        for method, what in r.get("hessian_eigenthings", {}).items():
            print(f"hessian-eigenthings HessianOperator(method={method!r}), sharded, {r['ranks']} ranks: {what}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
