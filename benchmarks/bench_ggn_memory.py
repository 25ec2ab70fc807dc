"""Peak memory of a GGN product on a large-vocabulary language model, analytic vs autograd cross-entropy.

Usage::

    MALLOC_MMAP_THRESHOLD_=65536 python benchmarks/bench_ggn_memory.py            # vocab 32000, 4 x 64 tokens
    MALLOC_MMAP_THRESHOLD_=65536 python benchmarks/bench_ggn_memory.py --vocab 50257 --batch 2 --seq 128

The CPU has no allocator statistics, so each measurement runs in its own process and reads the peak
resident set size (``VmHWM``): first after one gradient (forward and backward of the causal-LM loss),
then after two GGN products with the first-order graph reused. ``MALLOC_MMAP_THRESHOLD_=65536`` makes
glibc serve every large tensor by ``mmap`` and return it on free, so the resident size tracks the live
tensors. Reported: the product's peak beyond the gradient's peak, as a multiple of the logits tensor
(``batch * seq * vocab`` floats). The model: an embedding, a tanh layer and an untied vocabulary head of
hidden size 16 (so the logits dominate), float32, one thread. The target of issue 10: the analytic path
at most 3x the logits beyond the gradient's peak.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import types

import torch
from torch import nn


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--vocab", type=int, default=32000, help="vocabulary size (default 32000)")
    p.add_argument("--hidden", type=int, default=16, help="hidden size (default 16: the logits dominate)")
    p.add_argument("--batch", type=int, default=4, help="sequences per batch (default 4)")
    p.add_argument("--seq", type=int, default=64, help="tokens per sequence (default 64)")
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
    if args.mode == "hessian":
        op = hf.HessianOperator(model, loss_fn=hf.causal_lm_loss, data=batch)
    else:
        analytic = args.mode == "analytic"
        op = hf.GGNOperator(model, loss_fn=hf.causal_lm_loss, data=batch, analytic_cross_entropy=analytic)
    v = torch.randn(op.size, generator=torch.Generator().manual_seed(1))
    for _ in range(2):
        op @ v
    return {"gradient_mib": grad_peak - start, "beyond_gradient_mib": _maxrss_mib() - grad_peak}


def main(args) -> dict:
    if args.mode is not None:
        return _measure(args)
    logits_mib = args.batch * args.seq * args.vocab * 4 / 2**20
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": os.environ.get("MALLOC_MMAP_THRESHOLD_", "65536")}
    out = {"logits_mib": logits_mib, "config": {k: v for k, v in vars(args).items() if k != "mode"}}
    for mode in ("analytic", "autograd", "hessian"):
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
