"""The Hessian spectrum of a GPT-2-style model sharded with FSDP2, no rank holding the whole model.

    torchrun --nproc_per_node 2 examples/fsdp_spectrum.py --text README.md
    torchrun --nproc_per_node 4 examples/fsdp_spectrum.py --text my_corpus.txt --layers 4 --embd 128 --json out.json
    python examples/fsdp_spectrum.py            # one process (a one-rank group), for a quick look

A HuggingFace ``GPT2LMHeadModel`` is built from a config (no download), trained for a few steps on a
character-level encoding of a local text file, then wrapped with ``fully_shard`` per transformer block and
at the root. Every rank takes its share of a global batch of text windows and the curvature operators act
on this rank's shards: the top-k Hessian eigenvalues (Lanczos), the trace (Hutchinson) and the spectral
density (stochastic Lanczos quadrature), the same numbers on every rank; the eigenvectors stay sharded.
On GPUs (``--device cuda``) the ranks use NCCL, on CPUs gloo.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch
import torch.distributed as dist

import hessianflow as hf
from hessianflow.curvature.losses import causal_lm_loss
from hessianflow.distributed import exit_process, init_distributed, shard


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--text", type=str, default=os.path.join(os.path.dirname(__file__), "..", "README.md"),
                   help="a local text file (default: the repository's README)")
    p.add_argument("--layers", type=int, default=2, help="transformer blocks (default 2)")
    p.add_argument("--embd", type=int, default=32, help="embedding width (default 32)")
    p.add_argument("--heads", type=int, default=2, help="attention heads (default 2)")
    p.add_argument("--seq", type=int, default=32, help="tokens per window (default 32)")
    p.add_argument("--batch", type=int, default=16, help="windows in the global batch, split over the ranks")
    p.add_argument("--train-steps", type=int, default=30, help="Adam steps before the analysis (default 30)")
    p.add_argument("--top-k", type=int, default=3, help="top eigenvalues (default 3)")
    p.add_argument("--trace-matvecs", type=int, default=20, help="Hutchinson products (default 20)")
    p.add_argument("--density-steps", type=int, default=20, help="Lanczos steps of the density (default 20)")
    p.add_argument("--dtype", choices=["float32", "float64"], default="float32", help="model dtype (default float32)")
    p.add_argument("--backend", choices=["double_backprop", "finite_difference"], default="double_backprop",
                   help="exact products, or central differences of two gradients (default double_backprop)")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="default cpu")
    p.add_argument("--seed", type=int, default=0, help="default 0")
    p.add_argument("--json", type=str, default=None, help="write the results here (rank 0)")
    return p.parse_args(argv)  # fmt: skip


def text_windows(path: str, seq: int, count: int, seed: int):
    """``count`` windows of ``seq + 1`` characters of the file, as token ids over its own alphabet."""
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            text = f.read()
    except OSError as exc:
        raise SystemExit(f"cannot read --text {path!r}: {exc.strerror}") from None
    if len(text) < seq + 2:
        raise SystemExit(f"--text {path!r} holds {len(text)} characters; --seq {seq} needs at least {seq + 2}")
    alphabet = sorted(set(text))
    ids = torch.tensor([alphabet.index(c) for c in text], dtype=torch.long)
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, len(ids) - seq - 1, (count,), generator=g)
    return torch.stack([ids[s : s + seq] for s in starts]), len(alphabet)


def build(vocab: int, args, dtype):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(args.seed)
    cfg = GPT2Config(vocab_size=vocab, n_positions=args.seq, n_embd=args.embd, n_layer=args.layers,
                     n_head=args.heads, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0,
                     eos_token_id=0)  # fmt: skip
    return GPT2LMHeadModel(cfg).to(dtype)


def main(argv=None) -> dict:
    args = parse(argv)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    ctx = init_distributed(args.device)
    if not dist.is_initialized():  # one plain process: a one-rank group, so the model can still be sharded
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "29533")
        dist.init_process_group("gloo", rank=0, world_size=1)
    rank, world = dist.get_rank(), dist.get_world_size()
    device = ctx.device
    dtype = getattr(torch, args.dtype)
    if args.batch < world:
        raise SystemExit(f"--batch {args.batch} is smaller than the {world} ranks: every rank needs a window")
    windows, vocab = text_windows(args.text, args.seq, args.batch, args.seed)
    model = build(vocab, args, dtype).to(device)
    # a few steps of training (every rank the same: the model is replicated before it is sharded)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(args.train_steps):
        opt.zero_grad()
        model(input_ids=windows.to(device), labels=windows.to(device)).loss.backward()
        opt.step()
    model.eval()
    mesh = init_device_mesh(device.type, (world,))
    for block in model.transformer.h:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    share = shard(args.batch, rank, world)
    batch = {"input_ids": windows[share].to(device), "labels": windows[share].to(device)}
    H = hf.HessianOperator(model, loss_fn=causal_lm_loss, data=batch, backend=args.backend)
    start = time.perf_counter()
    eig = hf.lanczos(H, k=args.top_k, seed=args.seed)
    tr = hf.trace(H, num_matvecs=args.trace_matvecs, seed=args.seed, method="hutchinson")
    dens = hf.spectral_density(H, num_runs=1, num_steps=args.density_steps, seed=args.seed)
    seconds = time.perf_counter() - start
    result = {
        "ranks": world,
        "parameters": H.size,
        "entries_on_this_rank": H.local_size,
        "dtype": args.dtype,
        "backend": args.backend,
        "top_eigenvalues": eig.eigenvalues.tolist(),
        "converged": eig.converged.tolist(),
        "trace": tr.estimate,
        "trace_stderr": tr.stderr,
        "density_nodes": dens.nodes.flatten().tolist(),
        "density_weights": dens.weights.flatten().tolist(),
        "products": H.num_matvecs,
        "seconds": seconds,
        "eigenvector_shard": list(eig.eigenvectors.shape),
    }
    if args.backend == "finite_difference":
        result["product_relative_error"] = H.product.error
    if rank == 0:
        print(f"{world} rank(s), {H.size:,} parameters ({H.local_size:,} on rank 0), {args.dtype}, {args.backend}")
        print("top eigenvalues:", ", ".join(f"{v:.4g}" for v in result["top_eigenvalues"]))
        print(f"trace: {tr.estimate:.4g} +- {tr.stderr:.2g}   ({H.num_matvecs} products in {seconds:.1f} s)")
        if args.json:
            with open(args.json, "w") as f:
                json.dump(result, f, indent=1)
    ctx.close()
    if dist.is_initialized():
        dist.destroy_process_group()
    return result


if __name__ == "__main__":
    status = 0 if main() else 1
    if "RANK" in os.environ:  # a torchrun worker: see hessianflow.distributed.exit_process
        exit_process(status)
    sys.exit(status)
