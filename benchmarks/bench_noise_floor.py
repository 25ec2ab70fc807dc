"""The solvers' noise-floor estimate against float64 (issue 21: "Numbers in low precision").

For each model and operator, the top eigenvalue of the float32 operator (``lanczos(k=1)`` at a ``tol`` far
below float32's reach, so the solve runs until the floor stops it) is compared with the float64 copy's
(``tol=1e-10``, the residual rule). Printed per row: the true relative error of the float32 value, the
floor the solver reports (``EigenResult.noise``, relative to the eigenvalue), their ratio (>= 1: honest;
the larger, the more pessimistic), and the relative error of one float32 product against float64.

Usage::

    python benchmarks/bench_noise_floor.py                       # C1, ResNet-20, tiny GPT-2; Hessian and GGN
    python benchmarks/bench_noise_floor.py --models c1 --batch 16 --seeds 2

Models: C1 (``models.get_model("c1")``) and ResNet-20 in eval mode on synthetic 32x32 images (batch
``--batch``, BatchNorm statistics from 4 train-mode passes), and a tiny GPT-2 (``transformers``'
``GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=256)``, 4 sequences of 32 tokens, the causal-LM
loss). Random weights near initialisation: the floor is a property of the products' arithmetic.
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
import warnings

import torch
from torch import nn


def _vision(arch: str, batch: int, seed: int):
    from hessianflow.training.models import get_model

    torch.manual_seed(seed)
    model = get_model(arch, depth=20)
    x = torch.randn(batch, 3, 32, 32)
    y = torch.randint(0, 10, (batch,))
    model.train()
    with torch.no_grad():
        for _ in range(4):
            model(x)
    model.eval()
    return model, nn.CrossEntropyLoss(), {"data": (x, y)}


def _gpt2(seed: int):
    from transformers import GPT2Config, GPT2LMHeadModel

    from hessianflow.curvature.losses import causal_lm_loss

    torch.manual_seed(seed)
    cfg = GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=256, n_positions=64, attn_implementation="eager")
    model = GPT2LMHeadModel(cfg).eval()
    ids = torch.randint(0, 256, (4, 32))
    return model, None, {"data": {"input_ids": ids, "labels": ids}, "loss_fn": causal_lm_loss}


def _operator(kind: str, model, criterion, extra: dict):
    import hessianflow as hf

    Op = hf.GGNOperator if kind == "ggn" else hf.HessianOperator
    if criterion is None:
        return Op(model, **extra)
    return Op(model, criterion, **extra)


def measure(name: str, kind: str, model, criterion, extra: dict, seed: int) -> dict:
    from hessianflow.linalg.eigen import lanczos

    op32 = _operator(kind, model.float(), criterion, extra)
    m64 = copy.deepcopy(model).double()
    extra64 = dict(extra)
    if "data" in extra and isinstance(extra["data"], tuple):
        extra64["data"] = (extra["data"][0].double(), extra["data"][1])
    op64 = _operator(kind, m64, criterion, extra64)
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = lanczos(op64, k=1, tol=1e-10, criterion="residual", seed=seed)
        got = lanczos(op32, k=1, tol=1e-9, seed=seed)
    truth, value = float(ref.eigenvalues[0]), float(got.eigenvalues[0])
    v = torch.randn(op64.size, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    p64 = op64 @ v
    p32 = (op32 @ v.float()).double()
    err = abs(value - truth) / abs(truth)
    return {
        "model": name,
        "operator": kind,
        "seed": seed,
        "lambda_1": truth,
        "error": err,
        "floor": got.noise,
        "ratio": got.noise / err if err > 0 else float("inf"),
        "product_error": float(torch.linalg.vector_norm(p32 - p64) / torch.linalg.vector_norm(p64)),
        "products": (ref.num_matvecs, got.num_matvecs),
        "seconds": time.perf_counter() - t0,
    }


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", type=str, default="c1,resnet20,gpt2", help="comma-separated: c1, resnet20, gpt2")
    p.add_argument("--operators", type=str, default="hessian,ggn", help="comma-separated: hessian, ggn")
    p.add_argument("--batch", type=int, default=32, help="images per batch for C1 and ResNet-20")
    p.add_argument("--seeds", type=int, default=1, help="models (and solver seeds) per row")
    p.add_argument("--threads", type=int, default=1, help="torch threads")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = []
    print("| model | operator | seed | lambda_1 (float64) | float32 error | floor reported | floor / error | "
          "product error | products f64, f32 |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|")
    for name in [m.strip() for m in args.models.split(",") if m.strip()]:
        for seed in range(args.seeds):
            for kind in [o.strip() for o in args.operators.split(",") if o.strip()]:
                if name == "gpt2":
                    model, crit, extra = _gpt2(seed)
                else:
                    model, crit, extra = _vision("c1" if name == "c1" else "resnet", args.batch, seed)
                r = measure(name, kind, model, crit, extra, seed)
                rows.append(r)
                print(f"| {name} | {kind} | {seed} | {r['lambda_1']:.6g} | {r['error']:.1e} | {r['floor']:.1e} | "
                      f"{r['ratio']:.1f} | {r['product_error']:.1e} | {r['products'][0]}, {r['products'][1]} |",
                      flush=True)  # fmt: skip
    return rows


if __name__ == "__main__":
    main(sys.argv[1:])
