"""Large-batch training ends at sharper points: the top Hessian eigenvalue after small- and large-batch SGD.

The finding of Yao, Gholami, Lei, Keutzer and Mahoney, "Hessian-based Analysis of Large Batch Training
and Robustness to Adversaries" (NeurIPS 2018, arXiv:1806.05320; HessianFlow's first paper; after Keskar
et al., ICLR 2017): the same model trained with a large batch converges to a point whose loss Hessian
has a larger top eigenvalue than with a small batch. This script trains the same model, from the same
initialisation for each seed, with a small and a large batch, until the training loss on the whole
(un-augmented) training set reaches ``--loss-target`` (or ``--max-epochs`` pass), then computes the top
eigenvalue of the Hessian of the mean loss over the whole training set (``HessianOperator(dataloader=...)``
and ``lanczos``), the test accuracy, and the ratio large/small per seed with its spread. One seed per
``--track-seeds`` also records the eigenvalue after every epoch on a fixed ``--track-samples`` subset.

Learning rate (``--lr-rule``): ``constant`` (the default) trains both batches with ``--lr``: the finding
is about the batch size at the same optimiser settings (Keskar et al. 2017 kept them), and ``lr / batch``,
the scale of SGD's gradient noise, then differs by the batch ratio. ``linear`` multiplies the large
batch's rate by ``large / small`` (Goyal et al. 2017), up to ``--lr-cap``, which keeps ``lr / batch`` fixed
and is known to shrink the gap (Jastrzebski et al. 2018); ``sqrt`` scales by its square root (Krizhevsky
2014; Hoffer et al. 2017). See experiments/README.md for what each rule measured here.

Usage::

    python experiments/large_batch_sharpness.py                       # digits, C1, 3 seeds: minutes on 2 cores
    python experiments/large_batch_sharpness.py --lr-rule linear --out-dir experiments/runs/sharpness_linear
    python experiments/large_batch_sharpness.py --config cifar10 --data-dir ./data   # CIFAR-10, ResNet-20 (GPU)

Writes ``OUT_DIR/large_batch_sharpness.json`` (every number, the settings, the versions) and
``OUT_DIR/large_batch_sharpness.png`` (eigenvalue against epoch; final eigenvalue per seed), plus each
run's checkpoint (``OUT_DIR/<regime>_seed<k>.pkl``, the train.py format: ``hessian_eig_driver.py
--resume ... --eigen-type full`` reads it).
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time

import torch
from torch import nn

import hessianflow as hf
from hessianflow.cli import common as _cli
from hessianflow.io.checkpoint import check_writable_dir, write_json
from hessianflow.io.checkpoint_format import make_checkpoint
from hessianflow.training.data import DATASETS, dataset_info, get_datasets, subset_loader
from hessianflow.training.models import ARCHS, get_model

# Each configuration is a set of flag defaults; a flag given on the command line wins.
CONFIGS = {
    # digits (1,437 training images): a ResNet-8 (78k parameters; a whole-training-set Hessian product
    # costs about 2.5 training epochs, 5 s on one busy core, C1's 9 s)
    "digits": dict(
        name="digits",
        arch="ResNet",
        depth=8,
        small_batch=32,
        large_batch=256,
        lr=0.05,
        loss_target=0.05,
        max_epochs=60,
        seeds=[0, 1, 2],
        eval_batch=512,
    ),
    # CIFAR-10 (50,000 images; needs the data set in --data-dir): ResNet-20, 128 vs 4096
    "cifar10": dict(
        name="cifar10",
        arch="ResNet",
        depth=20,
        small_batch=128,
        large_batch=4096,
        lr=0.1,
        loss_target=0.05,
        max_epochs=200,
        seeds=[0, 1, 2],
        eval_batch=1000,
    ),
}


def build_parser() -> argparse.ArgumentParser:
    # the scripts' argument types and one-line errors (exit 2): a bad value is refused before any work
    p = _cli.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="Usage lines: see the module docstring (python -c 'import experiments.large_batch_sharpness as m; "
        "print(m.__doc__)').",
    )
    p.add_argument(
        "--config", type=str, choices=sorted(CONFIGS), default="digits",
        help="a set of defaults: digits (offline, minutes on a CPU) or cifar10 (GPU, data in --data-dir)",
    )  # fmt: skip
    p.add_argument("--name", type=str, choices=sorted(DATASETS), default=None, help="data set (default: config's)")
    p.add_argument("--data-dir", type=str, default="./data", help="torchvision data sets' directory")
    p.add_argument("--arch", type=str, choices=ARCHS, default=None, help="model (default: config's)")
    p.add_argument("--depth", type=_cli.positive_int, default=None, help="ResNet depth 6n+2 (default: config's)")
    p.add_argument(
        "--small-batch", type=_cli.positive_int, default=None, help="the small batch size (default: config's)"
    )
    p.add_argument(
        "--large-batch", type=_cli.positive_int, default=None, help="the large batch size (default: config's)"
    )
    p.add_argument(
        "--lr", type=_cli.positive_float, default=None, help="learning rate of the small batch (default: config's)"
    )
    p.add_argument(
        "--lr-rule", type=str, choices=("constant", "linear", "sqrt"), default="constant",
        help="the large batch's learning rate: constant (= --lr), linear (x large/small) or sqrt, "
        "each capped at --lr-cap",
    )  # fmt: skip
    p.add_argument("--lr-cap", type=_cli.positive_float, default=math.inf, help="largest rate of the large batch")
    p.add_argument("--momentum", type=_cli.nonneg_float, default=0.9, help="SGD momentum")
    p.add_argument("--weight-decay", type=_cli.nonneg_float, default=0.0, help="weight decay (0: the Hessian's loss)")
    p.add_argument(
        "--loss-target", type=_cli.nonneg_float, default=None,
        help="stop when the mean training loss over the whole training set is at most this (default: config's)",
    )  # fmt: skip
    p.add_argument(
        "--max-epochs", type=_cli.positive_int, default=None, help="epoch budget per run (default: config's)"
    )
    p.add_argument(
        "--seeds", type=_cli.nonneg_int, nargs="+", default=None, help="seeds: initialisation and data order"
    )
    p.add_argument(
        "--eval-batch", type=_cli.positive_int, default=None, help="batch size of evaluations and Hessian products"
    )
    p.add_argument(
        "--eig-tol", type=_cli.positive_float, default=1e-3, help="lanczos tolerance of the final eigenvalue"
    )
    p.add_argument(
        "--track-seeds", type=_cli.nonneg_int, default=1,
        help="record the eigenvalue after every epoch for the first N seeds",
    )  # fmt: skip
    p.add_argument(
        "--track-samples", type=_cli.positive_int, default=128,
        help="training samples (a fixed random subset) of the per-epoch eigenvalue; the final one uses all",
    )  # fmt: skip
    p.add_argument(
        "--num-train", type=_cli.positive_int, default=None, help="use only the first N training images (tests)"
    )
    p.add_argument("--out-dir", type=str, default="experiments/runs/large_batch_sharpness", help="output directory")
    p.add_argument("--device", type=str, default="auto", help="auto (cuda when available), cpu or cuda")
    p.add_argument(
        "--threads", type=_cli.nonneg_int, default=1,
        help="CPU threads (1: on a shared two-core machine 2-6x faster than torch's default; 0: torch's default)",
    )  # fmt: skip
    return p


def parse_args(argv=None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    for key, value in CONFIGS[args.config].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    # what needs several flags (or a config's value), before any work
    if args.large_batch <= args.small_batch:
        parser.error(
            f"argument --large-batch: --large-batch {args.large_batch} must exceed --small-batch {args.small_batch}"
        )
    if len(set(args.seeds)) < len(args.seeds):
        parser.error(
            f"argument --seeds: {' '.join(map(str, args.seeds))} repeats a seed (each seed is one pair of runs)"
        )
    _cli.check_resnet_depth(parser, args.arch, args.depth)
    _cli.check_device(parser, args.device)
    return args


def large_lr(args) -> float:
    """The large batch's learning rate under ``--lr-rule``, capped at ``--lr-cap``."""
    k = args.large_batch / args.small_batch
    factor = {"constant": 1.0, "linear": k, "sqrt": math.sqrt(k)}[args.lr_rule]
    return min(args.lr * factor, args.lr_cap)


# -- steps ----------------------------------------------------------------------------------------------


def load_data(args):
    """The un-augmented training set (trained on and analysed: the same loss), the test set, the info."""
    _, plain, test = get_datasets(args.name, data_dir=args.data_dir, augment=False, seed=0)
    if args.num_train is not None:
        plain = torch.utils.data.Subset(plain, range(min(args.num_train, len(plain))))
    return plain, test, dataset_info(args.name)


def top_eigenvalue(model, criterion, loader, tol, seed, max_iter=None):
    """Top eigenvalue of the Hessian of the mean loss over ``loader`` (every sample weighs the same)."""
    H = hf.HessianOperator(model, criterion, dataloader=loader)
    res = hf.lanczos(H, k=1, tol=tol, seed=seed, max_iter=max_iter)
    return {
        "eigenvalue": float(res.eigenvalues[0]),
        "residual": float(res.residuals[0]),
        "converged": bool(res.converged),
        "num_matvecs": int(res.num_matvecs),
    }


def train_one(args, regime, seed, plain, test, info, device, track):
    """Train one model to the loss target; its final eigenvalue on the whole training set."""
    batch, lr = (args.small_batch, args.lr) if regime == "small" else (args.large_batch, large_lr(args))
    torch.manual_seed(seed)  # the same initialisation for both regimes of a seed
    model = get_model(
        args.arch, depth=args.depth, num_classes=info.num_classes, in_channels=info.in_channels,
        input_size=info.input_size,
    ).to(device)  # fmt: skip
    criterion = nn.CrossEntropyLoss()
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=args.momentum, weight_decay=args.weight_decay)
    g = torch.Generator().manual_seed(seed)
    loader = torch.utils.data.DataLoader(plain, batch_size=batch, shuffle=True, generator=g)
    full = subset_loader(plain, batch_size=args.eval_batch)
    track_loader = subset_loader(plain, batch_size=args.track_samples, num_batches=1, seed=1000 + seed)
    history, updates, t0 = [], 0, time.time()
    for epoch in range(1, args.max_epochs + 1):
        stats = hf.train_epoch(model, loader, opt, criterion, device=device)
        updates += int(stats["optimizer_steps"])
        train = hf.evaluate(model, full, criterion, device=device)
        row = {"epoch": epoch, "updates": updates, "train_loss": train["loss"], "train_acc": train["accuracy"]}
        if track:
            # a cheap trace of the trend: 10 products at most (the final eigenvalue is converged)
            row["eigenvalue_subset"] = top_eigenvalue(model, criterion, track_loader, 1e-2, seed, 10)["eigenvalue"]
        history.append(row)
        if train["loss"] <= args.loss_target:
            break
    seconds_train = time.time() - t0
    t1 = time.time()
    eig = top_eigenvalue(model, criterion, full, args.eig_tol, seed)
    test_res = hf.evaluate(model, subset_loader(test, batch_size=args.eval_batch), criterion, device=device)
    ckpt_path = os.path.join(args.out_dir, f"{regime}_seed{seed}.pkl")
    hf.io.checkpoint.save_checkpoint(
        make_checkpoint(model, dataset=args.name, epoch=len(history), args={**vars(args), "seed": seed}), ckpt_path
    )
    return {
        "regime": regime, "seed": seed, "batch_size": batch, "lr": lr, "epochs": len(history), "updates": updates,
        "reached_target": history[-1]["train_loss"] <= args.loss_target, "train_loss": history[-1]["train_loss"],
        "train_acc": history[-1]["train_acc"], "test_loss": test_res["loss"], "test_acc": test_res["accuracy"],
        **eig, "seconds_train": seconds_train, "seconds_eigen": time.time() - t1, "checkpoint": ckpt_path,
        "history": history,
    }  # fmt: skip


def summarise(runs, seeds) -> dict:
    """Per-seed ratios large/small and their spread; per-regime means."""
    by = {(r["regime"], r["seed"]): r for r in runs}
    ratios = [by["large", s]["eigenvalue"] / by["small", s]["eigenvalue"] for s in seeds]
    out = {
        "ratios": ratios,
        "ratio_mean": statistics.fmean(ratios),
        "ratio_std": statistics.stdev(ratios) if len(ratios) > 1 else 0.0,
        "ratio_min": min(ratios),
        "ratio_max": max(ratios),
        "seeds_large_sharper": sum(q > 1 for q in ratios),
    }
    for regime in ("small", "large"):
        rs = [by[regime, s] for s in seeds]
        for key in ("eigenvalue", "test_acc", "train_loss", "epochs", "updates"):
            vals = [r[key] for r in rs]
            out[f"{regime}_{key}_mean"] = statistics.fmean(vals)
            out[f"{regime}_{key}_std"] = statistics.stdev(vals) if len(vals) > 1 else 0.0
        out[f"{regime}_all_reached_target"] = all(r["reached_target"] for r in rs)
    return out


def plot(runs, summary, args, path) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colours = {"small": "tab:blue", "large": "tab:red"}
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    for r in runs:
        if "eigenvalue_subset" in r["history"][0]:
            ep = [h["epoch"] for h in r["history"]]
            ax1.plot(ep, [h["eigenvalue_subset"] for h in r["history"]], "o-", color=colours[r["regime"]],
                     label=f"batch {r['batch_size']} (seed {r['seed']})")  # fmt: skip
    ax1.set_xlabel("epoch")
    ax1.set_ylabel(f"top eigenvalue ({args.track_samples} training samples)")
    ax1.set_yscale("log")
    ax1.legend()
    ax1.set_title("eigenvalue during training")
    for regime, dx in (("small", -0.15), ("large", 0.15)):
        rs = [r for r in runs if r["regime"] == regime]
        ax2.bar([i + dx for i in range(len(rs))], [r["eigenvalue"] for r in rs], width=0.3, color=colours[regime],
                label=f"batch {rs[0]['batch_size']}, lr {rs[0]['lr']:.3g}")  # fmt: skip
    ax2.set_xticks(range(len(args.seeds)), [f"seed {s}" for s in args.seeds])
    ax2.set_ylabel("top eigenvalue, whole training set")
    ax2.set_title(f"large/small = {summary['ratio_mean']:.2f} ± {summary['ratio_std']:.2f}")
    ax2.legend()
    fig.suptitle(f"{args.arch} on {args.name}: lr rule {args.lr_rule}, train loss target {args.loss_target}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def main(args) -> dict:
    """Train every (regime, seed), summarise, write the JSON and the PNG; return the JSON's dict."""
    check_writable_dir(args.out_dir, what="the results and checkpoints")  # before any work (exit 2)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))  # fmt: skip
    plain, test, info = load_data(args)
    runs = []
    for i, seed in enumerate(args.seeds):
        for regime in ("small", "large"):
            r = train_one(args, regime, seed, plain, test, info, device, track=i < args.track_seeds)
            print(
                f"seed {seed} {regime:5s} batch {r['batch_size']:5d} lr {r['lr']:.4g}: {r['epochs']} epochs, "
                f"{r['updates']} updates, train loss {r['train_loss']:.4f}, test acc {r['test_acc']:.3f}, "
                f"top eigenvalue {r['eigenvalue']:.4g} ({r['num_matvecs']} products)", flush=True,
            )  # fmt: skip
            runs.append(r)
    summary = summarise(runs, args.seeds)
    print(
        f"large/small top eigenvalue: {summary['ratio_mean']:.2f} ± {summary['ratio_std']:.2f} (min "
        f"{summary['ratio_min']:.2f}, max {summary['ratio_max']:.2f}); larger in {summary['seeds_large_sharper']} "
        f"of {len(args.seeds)} seeds"
    )
    result = {
        "experiment": "large_batch_sharpness",
        "settings": {k: (None if v == math.inf else v) for k, v in vars(args).items()},
        "large_lr": large_lr(args),
        "num_train": len(plain),
        "summary": summary,
        "runs": runs,
        "versions": hf.io.checkpoint.versions(),
    }
    result["json"] = write_json(os.path.join(args.out_dir, "large_batch_sharpness.json"), result)
    result["png"] = plot(runs, summary, args, os.path.join(args.out_dir, "large_batch_sharpness.png"))
    return result


if __name__ == "__main__":
    sys.exit(_cli.run(main, parse_args))  # the scripts' exit statuses: 2 a user error, in one line
