"""The approximation audit (hessianflow.curvature.compare.compare_curvatures) on ResNet-20 and a GPT-2-style model.

Prints, per model, a Markdown table: for the Hessian, the GGN, the empirical Fisher and the block-diagonal
Hessian (one block per module with parameters, hessianflow.curvature.analysis.layer_blocks), the top-k eigenvalues,
their relative errors against the Hessian's, the mean squared cosine of the principal angles between the
top-k eigenspaces, the trace ratio and the Wasserstein-1 distance between the SLQ spectral measures.
Usage::

    python benchmarks/bench_compare.py                        # both models, the settings of docs/compare_curvatures.md
    python benchmarks/bench_compare.py --models gpt2 --k 5    # one model
    python benchmarks/bench_compare.py --train-steps 0        # at initialisation

ResNet-20 (hessianflow.training.models, float32) on one batch of the offline synthetic data set
(hessianflow.training.data),
after --train-steps steps of SGD on the training split; the GPT-2-style model is transformers' GPT2 with a
tiny config (float64, hf.curvature.losses.causal_lm_loss) on random tokens of a fixed seed, after --train-steps Adam
steps on them. CPU by default; everything is seeded.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from hessianflow.curvature.compare import compare_curvatures  # noqa: E402
from hessianflow.curvature.losses import causal_lm_loss  # noqa: E402
from hessianflow.training.data import make_synthetic  # noqa: E402
from hessianflow.training.models import get_model  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--models",
        nargs="+",
        default=["resnet20", "resnet20_digits", "gpt2"],
        choices=["resnet20", "resnet20_digits", "gpt2"],
        help="which models (default: all three; resnet20_digits is ResNet-20 on scikit-learn's bundled digits)",
    )
    p.add_argument(
        "--kinds",
        nargs="+",
        default=["ggn", "empirical_fisher", "sampled_fisher", "block_diagonal"],
        choices=["ggn", "empirical_fisher", "sampled_fisher", "block_diagonal"],
        help="the kinds compared with the Hessian (default: all four)",
    )
    p.add_argument("--mc-samples", type=int, default=1, help="sampled Fisher: targets drawn per position (default 1)")
    p.add_argument(
        "--heterogeneity", action="store_true",
        help="instead of the comparison: SLQ per parameter tensor of the Hessian and the blocks' mean pairwise "
        "Jensen-Shannon divergence (Zhang et al. 2024), with --num-runs and --num-steps",
    )  # fmt: skip
    p.add_argument("--k", type=int, default=3, help="top eigenpairs compared (default 3)")
    p.add_argument("--batch-size", type=int, default=8, help="ResNet-20: images in the batch (default 8)")
    p.add_argument(
        "--image-size",
        type=int,
        default=16,
        help="ResNet-20: side of the synthetic images (default 16: a quarter of CIFAR's products)",
    )
    p.add_argument("--train-steps", type=int, default=100, help="optimiser steps before the audit (default 100)")
    p.add_argument("--trace-matvecs", type=int, default=30, help="products per trace estimate (default 30)")
    p.add_argument("--num-runs", type=int, default=2, help="SLQ runs (default 2)")
    p.add_argument("--num-steps", type=int, default=20, help="Lanczos steps per SLQ run (default 20)")
    p.add_argument("--tol", type=float, default=1e-3, help="Lanczos tolerance, relative (default 1e-3)")
    p.add_argument("--seed", type=int, default=0, help="seed of the data, the models and the vectors (default 0)")
    p.add_argument("--threads", type=int, default=2, help="torch intra-op threads (default 2)")
    return p.parse_args(argv)  # fmt: skip


def resnet_problem(args):
    # float32: a block-diagonal product of ResNet-20 is one Hessian product per block (43 of them)
    d = make_synthetic(num_train=256, num_test=8, image_size=args.image_size, seed=args.seed)
    x, y = d["train_images"].float(), d["train_targets"]
    torch.manual_seed(args.seed)
    model = get_model("resnet", depth=20, num_classes=10)
    _train_briefly(model, x, y, args.train_steps)
    batch = (x[: args.batch_size], y[: args.batch_size])
    label = f"ResNet-20, synthetic {args.image_size}x{args.image_size}, batch {args.batch_size}, float32"
    return model, {"criterion": nn.CrossEntropyLoss(), "data": batch}, label


def _train_briefly(model, x, y, steps: int) -> None:
    """``steps`` SGD steps (lr 0.05, momentum 0.9) on consecutive batches of 32, then eval mode."""
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    model.train()
    for step in range(steps):
        idx = torch.arange(step * 32, step * 32 + 32) % x.shape[0]
        opt.zero_grad()
        nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
        opt.step()
    model.eval()


def digits_problem(args):
    """ResNet-20 (one input channel) on scikit-learn's bundled digits (16x16, hessianflow.training.data's
    fixed split), normalised with the split's statistics, trained like resnet_problem."""
    from hessianflow.training.data import DATASETS, load_digits_tensors

    d = load_digits_tensors()
    info = DATASETS["digits"]
    x = (d["train_images"] - info.mean[0]) / info.std[0]
    y = d["train_targets"]
    torch.manual_seed(args.seed)
    model = get_model("resnet", depth=20, num_classes=10, in_channels=1, input_size=16)
    _train_briefly(model, x, y, args.train_steps)
    batch = (x[: args.batch_size], y[: args.batch_size])
    label = f"ResNet-20, digits 16x16, batch {args.batch_size}, float32"
    return model, {"criterion": nn.CrossEntropyLoss(), "data": batch}, label


def gpt2_problem(args):
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(vocab_size=64, n_positions=32, bos_token_id=0, eos_token_id=0, n_embd=32, n_layer=2,
                     n_head=2, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)  # fmt: skip
    torch.manual_seed(args.seed)
    model = GPT2LMHeadModel(cfg).double().eval()
    g = torch.Generator().manual_seed(args.seed)
    ids = torch.randint(0, 64, (4, 16), generator=g)
    batch = {"input_ids": ids, "labels": ids}
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(args.train_steps):
        opt.zero_grad()
        causal_lm_loss(model, batch).backward()
        opt.step()
    return model, {"loss_fn": causal_lm_loss, "data": batch}, "GPT-2 (2 layers, 32 wide, vocab 64), 4 x 16 tokens"


def heterogeneity(model, kw, label, n, args) -> dict:
    """Zhang et al. (2024)'s block heterogeneity of the Hessian: SLQ on each parameter tensor's diagonal block,
    the mean pairwise JS divergence of the blocks' densities (linear and log scale)."""
    from hessianflow import HessianOperator
    from hessianflow.curvature.compare import parameter_blocks
    from hessianflow.linalg.density import block_densities

    H = HessianOperator(model, **kw)
    blocks, names = parameter_blocks(H)
    t0 = time.perf_counter()
    res = block_densities(H, blocks, names=names, num_runs=args.num_runs, num_steps=args.num_steps, seed=args.seed)
    secs = time.perf_counter() - t0
    _, mean = res.heterogeneity()
    js_log, mean_log = res.heterogeneity(scale="log")
    print(
        f"\n### {label} ({n} parameters, {len(blocks)} parameter tensors; {secs:.0f} s, {res.num_matvecs} products)\n"
    )
    print(
        f"mean pairwise JS divergence of the blocks' Hessian densities: {mean:.3f} (linear), {mean_log:.3f} (log scale)"
    )
    pairs = [(float(js_log[i, j]), names[i], names[j]) for i in range(len(names)) for j in range(i + 1, len(names))]
    top = sorted(pairs, reverse=True)[:3]
    print("most different pairs (log scale): " + "; ".join(f"{a} / {b}: {v:.3f}" for v, a, b in top))
    return {"heterogeneity": mean, "heterogeneity_log": mean_log, "blocks": len(blocks), "seconds": secs,
            "num_matvecs": res.num_matvecs}  # fmt: skip


def main(args) -> dict:
    torch.set_num_threads(args.threads)
    out = {}
    for name in args.models:
        problem = {"resnet20": resnet_problem, "resnet20_digits": digits_problem, "gpt2": gpt2_problem}[name]
        model, kw, label = problem(args)
        n = sum(p.numel() for p in model.parameters() if p.requires_grad)
        if args.heterogeneity:
            out[name] = heterogeneity(model, kw, label, n, args)
            continue
        t0 = time.perf_counter()
        res = compare_curvatures(model, k=args.k, seed=args.seed, tol=args.tol, trace_matvecs=args.trace_matvecs,
                                 num_runs=args.num_runs, num_steps=args.num_steps, kinds=tuple(args.kinds),
                                 mc_samples=args.mc_samples, **kw)  # fmt: skip
        secs = time.perf_counter() - t0
        print(f"\n### {label} ({n} parameters; {secs:.0f} s)\n")
        print(res.table())
        prods = ", ".join(f"{k}: {v.num_matvecs}" for k, v in res.kinds.items())
        print(f"\nproducts: {prods}; all converged: {all(v.converged for v in res.kinds.values())}")
        out[name] = res.to_dict()
    return out


if __name__ == "__main__":
    main(parse_args())
