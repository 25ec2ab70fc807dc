"""Peak memory of a GGN product on a large-vocabulary language model, analytic vs autograd cross-entropy.

Usage::

    MALLOC_MMAP_THRESHOLD_=65536 python benchmarks/bench_ggn_memory.py            # vocab 32000, 4 x 64 tokens
    MALLOC_MMAP_THRESHOLD_=65536 python benchmarks/bench_ggn_memory.py --vocab 50257 --batch 2 --seq 128
    python benchmarks/bench_ggn_memory.py --vocab 50257 --batch 4 --seq 512 \
        --modes analytic fused fused_compiled hessian hessian_fused      # issue 24: 2048 tokens, 50k vocabulary
    python benchmarks/bench_ggn_memory.py --vocab 50257 --batch 4 --seq 512 --kernels   # the kernels alone, seconds

The CPU has no allocator statistics, so each measurement runs in its own process and reads the peak
resident set size (``VmHWM``): first after one gradient (forward and backward of the causal-LM loss),
then after two GGN products with the first-order graph reused. ``MALLOC_MMAP_THRESHOLD_=65536`` makes
glibc serve every large tensor by ``mmap`` and return it on free, so the resident size tracks the live
tensors. Reported: the product's peak beyond the gradient's peak, as a multiple of the logits tensor
(``batch * seq * vocab`` floats). The model: an embedding, a tanh layer and an untied vocabulary head of
hidden size 16 (so the logits dominate), float32, one thread. The target of issue 10: the analytic path
at most 3x the logits beyond the gradient's peak.

The modes: ``analytic`` (the GGN's softmax kept, :func:`~hessianflow.curvature.products._softmax_ce_product`),
``autograd`` (a double backward through ``log_softmax``), ``hessian``; issue 24's ``fused`` and
``fused_compiled`` (the GGN with ``fused_cross_entropy=True`` / ``"compiled"``: chunked over rows, nothing
logits-sized kept) and ``hessian_fused`` (the Hessian with ``fused_cross_entropy=True``). Each also reports
the seconds of its first product (state, and compiling for ``fused_compiled``) and the median of the next ones.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
import types

import torch
from torch import nn

MODES = ("analytic", "autograd", "hessian", "fused", "fused_compiled", "hessian_fused")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--vocab", type=int, default=32000, help="vocabulary size (default 32000)")
    p.add_argument("--hidden", type=int, default=16, help="hidden size (default 16: the logits dominate)")
    p.add_argument("--batch", type=int, default=4, help="sequences per batch (default 4)")
    p.add_argument("--seq", type=int, default=64, help="tokens per sequence (default 64)")
    p.add_argument("--modes", nargs="+", default=["analytic", "autograd", "hessian"], choices=MODES,
                   help="which products to measure (default: analytic autograd hessian)")  # fmt: skip
    p.add_argument("--products", type=int, default=3, help="products per mode (default 3; the first is timed apart)")
    p.add_argument(
        "--kernels",
        action="store_true",
        help="instead: time the output-Hessian kernels alone (analytic, fused, compiled)",
    )
    p.add_argument("--mode", default=None, help=argparse.SUPPRESS)  # one measurement, in a child process
    return p


class _LM(nn.Module):
    def __init__(self, vocab, hidden):
        super().__init__()
        torch.manual_seed(0)
        self.wte = nn.Embedding(vocab, hidden)
        self.mix = nn.Linear(hidden, hidden)
        self.lm_head = nn.Linear(hidden, vocab, bias=False)

    def forward(self, input_ids):
        return types.SimpleNamespace(logits=self.lm_head(torch.tanh(self.mix(self.wte(input_ids)))))


def _maxrss_mib() -> float:
    """This process's peak resident set size in MiB: ``VmHWM`` (the address space's own high-water mark;
    ``ru_maxrss`` would carry over the parent's size from before ``exec``), else ``ru_maxrss``."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _measure(args) -> dict:
    import hessianflow as hf

    torch.set_num_threads(1)
    model = _LM(args.vocab, args.hidden)
    ids = torch.randint(0, args.vocab, (args.batch, args.seq), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids, "labels": ids}
    start = _maxrss_mib()
    hf.causal_lm_loss(model, batch).backward()
    model.zero_grad(set_to_none=True)
    grad_peak = _maxrss_mib()
    fused = {"fused": True, "fused_compiled": "compiled", "hessian_fused": True}.get(args.mode, False)
    if args.mode.startswith("hessian"):
        op = hf.HessianOperator(model, loss_fn=hf.causal_lm_loss, data=batch, fused_cross_entropy=fused)
    else:
        analytic = args.mode != "autograd"
        op = hf.GGNOperator(
            model, loss_fn=hf.causal_lm_loss, data=batch, analytic_cross_entropy=analytic, fused_cross_entropy=fused
        )
    v = torch.randn(op.size, generator=torch.Generator().manual_seed(1))
    seconds = []
    for _ in range(args.products):
        t0 = time.perf_counter()
        op @ v
        seconds.append(time.perf_counter() - t0)
    return {
        "gradient_mib": grad_peak - start,
        "beyond_gradient_mib": _maxrss_mib() - grad_peak,
        "first_product_s": seconds[0],
        "product_s": statistics.median(seconds[1:]) if len(seconds) > 1 else None,
    }


def _kernels(args) -> dict:
    """Seconds of one output-Hessian product on ``[batch * seq, vocab]`` float32 logits (best of 3 after a
    warm-up, one thread): the analytic kernel with its softmax kept, the fused one eager and compiled."""
    from hessianflow.curvature.fused_ce import FusedSoftmaxCE
    from hessianflow.curvature.products import _softmax_ce_product

    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    rows = args.batch * args.seq
    logits, u = torch.randn(rows, args.vocab, generator=g), torch.randn(rows, args.vocab, generator=g)
    w = torch.full((rows,), 1.0 / rows)
    p = torch.softmax(logits, -1)
    eager, compiled = FusedSoftmaxCE(), FusedSoftmaxCE(compiled=True)
    calls = {
        "analytic (softmax kept)": lambda: _softmax_ce_product(p, w[:, None], -1, u),
        "fused, eager chunks": lambda: eager.apply(logits, w, -1, u),
        "fused, compiled chunks": lambda: compiled.apply(logits, w, -1, u),
    }
    out = {}
    for name, fn in calls.items():
        fn()
        ts = []
        for _ in range(3):
            t0 = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t0)
        out[name] = min(ts)
    out["compile_status"] = compiled.status.to_dict()
    return out


def main(args) -> dict:
    if args.kernels:
        return _kernels(args)
    if args.mode is not None:
        return _measure(args)
    logits_mib = args.batch * args.seq * args.vocab * 4 / 2**20
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": os.environ.get("MALLOC_MMAP_THRESHOLD_", "65536")}
    config = {k: v for k, v in vars(args).items() if k not in ("mode", "modes", "kernels")}
    out = {"logits_mib": logits_mib, "config": config}
    for mode in args.modes:
        argv = [sys.executable, __file__, "--mode", mode] + [
            f"--{k}={v}" for k, v in out["config"].items()
        ]  # fmt: skip
        res = json.loads(subprocess.run(argv, env=env, capture_output=True, text=True, check=True).stdout)
        res["beyond_gradient_x_logits"] = res["beyond_gradient_mib"] / logits_mib
        res["gradient_x_logits"] = res["gradient_mib"] / logits_mib
        out[mode] = res
    return out


if __name__ == "__main__":
    a = build_parser().parse_args()
    result = main(a)
    print(json.dumps(result, indent=2 if a.mode is None else None))
