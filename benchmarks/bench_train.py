"""Seconds per epoch of train.py's ABSA loop on a CIFAR-10-sized set, split into training and the eigenvalue check.

Usage::

    python benchmarks/bench_train.py                              # CPU: 20 batches timed, scaled to 50,000 images
    python benchmarks/bench_train.py --batches 40 --repeats 5
    python benchmarks/bench_train.py --device cuda --batches 0    # GPU: whole epochs of 50,000 images
    python benchmarks/bench_train.py --quick                      # a smoke run (ResNet-8, 4 batches)

What is timed, with train.py's own defaults (read from ``train.build_parser()``, so they follow the script):

* **training**: :func:`hessianflow.training.loop.train_epoch` over the augmented synthetic CIFAR-shaped set
  (``utils.get_datasets("synthetic", num_train=...)``, random crop, normalised), through train.py's
  loader and per-epoch sampler, ResNet-20, SGD with momentum and weight decay, batch 128, accumulation
  ratio 1 (ABSA's first phase), with 20% FGSM examples (``--adv-ratio 0.2``, ``--eps 0.005``: the
  first half of an ABSA run) and without (the second half). ``--batches`` mini-batches are timed and
  the time is scaled to the 391 mini-batches of 50,000 images (``--batches 0``: the whole set).
* **test evaluation**: :func:`hessianflow.training.loop.evaluate` on the 10,000 test images (scaled the same way).
* **eigenvalue check**: what train.py runs after every ABSA epoch while the batch can still grow:
  :func:`hessianflow.training.tracking.top_eigenvalue` (power iteration, ``--eig-max-iter 10``, ``--eig-tol 1e-2``)
  on a fresh un-augmented batch of ``--hessian-batch-size 128`` samples, including drawing that batch.

The check is compared with an epoch (training + test evaluation). Repeats are interleaved (a training
block, then a check, then the next repeat) and the median is reported. The target: the check costs at
most 5% of an epoch at the defaults.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
import warnings

import torch
from torch import nn

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from hessianflow.cli import train  # noqa: E402
from hessianflow.training.adversarial import normalized_bounds, pixel_eps  # noqa: E402
from hessianflow.training.data import dataset_info, fixed_batch, get_datasets, set_augmentation_epoch  # noqa: E402
from hessianflow.training.loop import evaluate, train_epoch  # noqa: E402
from hessianflow.training.models import get_model  # noqa: E402
from hessianflow.training.tracking import top_eigenvalue  # noqa: E402

CIFAR_TRAIN, CIFAR_TEST = 50_000, 10_000


def load() -> str:
    try:
        return ", ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device):
    sync(device)
    t0 = time.perf_counter()
    out = fn()
    sync(device)
    return time.perf_counter() - t0, out


def table(headers, rows) -> str:
    def f(x):
        if x is None:
            return "-"
        return format(x, ".3g") if isinstance(x, float) else str(x)

    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(f(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", type=str, default="cpu", help="cpu or cuda[:i]")
    p.add_argument("--depth", type=int, default=20, help="ResNet depth (6n+2)")
    p.add_argument(
        "--batches", type=int, default=20, help="training mini-batches timed per repeat (0: the whole 50,000 images)"
    )
    p.add_argument("--test-batches", type=int, default=10, help="test batches timed per repeat (0: all 10,000)")
    p.add_argument("--repeats", type=int, default=3, help="interleaved repeats (median reported)")
    p.add_argument("--threads", type=int, default=1, help="torch.set_num_threads on the CPU (0: torch's choice)")
    p.add_argument("--quick", action="store_true", help="ResNet-8, 4 batches, 1 repeat: checks that it runs")
    p.add_argument(
        "--alternative",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also time a Lanczos check (tol=0.1) on the same batches and judge both against a converged value",
    )
    p.add_argument("--json", type=str, default=None, help="also write the numbers to this JSON file")
    args = p.parse_args(argv)
    if args.quick:
        args.depth, args.batches, args.test_batches, args.repeats = 8, 4, 2, 1
    if args.batches < 0 or args.test_batches < 0 or args.repeats < 1:
        p.error("--batches and --test-batches must be >= 0 and --repeats >= 1")
    return args


def main(args) -> dict:
    device = torch.device(args.device)
    if device.type == "cpu" and args.threads:
        torch.set_num_threads(args.threads)
    d = train.build_parser().parse_args([])  # train.py's defaults
    bs, hbs = d.batch_size, d.hessian_batch_size
    per_epoch = math.ceil(CIFAR_TRAIN / bs)
    test_per_epoch = math.ceil(CIFAR_TEST / d.test_batch_size)
    n_batches = per_epoch if args.batches == 0 else min(args.batches, per_epoch)
    n_test = test_per_epoch if args.test_batches == 0 else min(args.test_batches, test_per_epoch)
    num_train = min(CIFAR_TRAIN, max(n_batches * bs + bs, hbs))  # one batch more for the warm-up
    num_test = min(CIFAR_TEST, n_test * d.test_batch_size)

    print("# train.py epoch benchmark\n")
    print(
        f"- {platform.platform()}, torch {torch.__version__}, device {device}"
        + (
            f" ({torch.cuda.get_device_name(device)})"
            if device.type == "cuda"
            else f", {torch.get_num_threads()} threads"
        )
        + f"; load average {load()}"
    )
    print(f"- command: {' '.join(sys.argv)}")
    t0 = time.perf_counter()
    train_set, plain_set, test_set = get_datasets(
        "synthetic", augment=True, seed=d.seed, num_train=num_train, num_test=num_test
    )
    info = dataset_info("synthetic")
    print(
        f"- synthetic CIFAR-shaped data: {num_train} train / {num_test} test images made in "
        f"{time.perf_counter() - t0:.1f} s"
    )
    torch.manual_seed(d.seed)
    model = get_model("ResNet", depth=args.depth, num_classes=info.num_classes).to(device)
    criterion = nn.CrossEntropyLoss()
    opt = torch.optim.SGD(model.parameters(), lr=d.lr, momentum=d.momentum, weight_decay=d.weight_decay)
    sampler = train.EpochSampler(len(train_set), d.seed)
    loader = train._loader(train_set, bs, sampler, 0, device)
    test_loader = train._loader(test_set, d.test_batch_size, None, 0, device)
    eps = pixel_eps(d.eps, info.std).to(device)
    clamp = tuple(b.to(device=device, dtype=torch.float32) for b in normalized_bounds(info.mean, info.std))
    print(
        f"- ResNet-{args.depth}, batch {bs}, adv ratio {d.adv_ratio}, eps {d.eps}; eigenvalue check: power iteration "
        f"max_iter={d.eig_max_iter}, tol={d.eig_tol}, Hessian batch {hbs}; one epoch = {per_epoch} batches "
        f"+ {test_per_epoch} test batches; timed {n_batches} + {n_test} per repeat, {args.repeats} repeats"
    )

    def run_train(adv: float, epoch: int):
        sampler.set_epoch(epoch)
        set_augmentation_epoch(train_set, epoch)
        return train_epoch(
            model, loader, opt, criterion, 1, adv_ratio=adv, eps=eps, clamp=clamp, device=device,
            max_batches=n_batches, epoch=epoch + 1,
        )  # fmt: skip

    def run_check(epoch: int, method: str = "power", max_iter: int = d.eig_max_iter, tol: float = d.eig_tol):
        # train.py: a fresh un-augmented batch per epoch (_hessian_batch; here utils.fixed_batch, the same draw
        # of distinct random samples), then top_eigenvalue with its defaults
        x, y = fixed_batch(plain_set, hbs, seed=d.seed * 7919 + epoch)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # 10 power iterations often stop short of tol: it warns
            return top_eigenvalue(
                model, criterion, dataloader=[(x, y)], method=method, max_iter=max_iter, tol=tol, seed=d.seed + epoch
            )

    # warm-up (allocator, kernels): one batch of each, one check
    train_epoch(
        model, loader, opt, criterion, 1, adv_ratio=d.adv_ratio, eps=eps, clamp=clamp, device=device, max_batches=1
    )
    evaluate(model, test_loader, criterion, device, max_batches=1)
    run_check(0)

    times = {"train_adv": [], "train_plain": [], "test": [], "check": [], "check_lanczos": []}
    products, eigs, alt_rows = [], [], []
    for r in range(args.repeats):
        s, st = timed(lambda r=r: run_train(d.adv_ratio, 2 * r), device)
        times["train_adv"].append(s / st["micro_batches"])
        s, st = timed(lambda r=r: run_train(0.0, 2 * r + 1), device)
        times["train_plain"].append(s / st["micro_batches"])
        s, ev = timed(lambda: evaluate(model, test_loader, criterion, device, max_batches=n_test), device)
        times["test"].append(s / math.ceil(ev["samples"] / d.test_batch_size))
        s, res = timed(lambda r=r: run_check(r + 1), device)
        times["check"].append(s)
        products.append(res.num_matvecs)
        eigs.append(float(res.eigenvalues[0]))
        if args.alternative:
            # PROTOTYPE, not what train.py does: Lanczos to a residual of 0.1 (eigenvalue error ~ 0.1^2), on
            # the same batch; and a converged value (untimed) to judge both
            s, alt = timed(lambda r=r: run_check(r + 1, "lanczos", 50, 0.1), device)
            times["check_lanczos"].append(s)
            ref = float(run_check(r + 1, "lanczos", 200, 1e-4).eigenvalues[0])
            alt_rows.append((alt.num_matvecs, float(alt.eigenvalues[0]), ref))

    med = {k: statistics.median(v) for k, v in times.items() if v}
    epoch_adv = med["train_adv"] * per_epoch + med["test"] * test_per_epoch
    epoch_plain = med["train_plain"] * per_epoch + med["test"] * test_per_epoch
    rows = [
        ["training, 20% FGSM (first half of ABSA)", med["train_adv"], "batch", med["train_adv"] * per_epoch,
         bs / med["train_adv"], None],
        ["training, no FGSM (second half)", med["train_plain"], "batch", med["train_plain"] * per_epoch,
         bs / med["train_plain"], None],
        ["test evaluation", med["test"], "batch", med["test"] * test_per_epoch, d.test_batch_size / med["test"], None],
        [f"eigenvalue check ({statistics.median(products):.0f} products)", med["check"], "check", med["check"],
         None, f"{100 * med['check'] / epoch_adv:.2f}% / {100 * med['check'] / epoch_plain:.2f}%"],
    ]  # fmt: skip
    text = table(
        ["phase", "seconds (median)", "per", "seconds per epoch (scaled)", "images/s", "check / epoch (FGSM / plain)"],
        rows,
    )
    print(f"\n## ResNet-{args.depth}, one epoch of 50,000 images (load {load()})\n")
    print(text)
    frac = max(med["check"] / epoch_adv, med["check"] / epoch_plain)
    print(
        f"\nEpoch = training + test evaluation: {epoch_adv:.1f} s with FGSM, {epoch_plain:.1f} s without. The check "
        f"costs {100 * med['check'] / epoch_adv:.2f}% of an epoch with FGSM and "
        f"{100 * med['check'] / epoch_plain:.2f}% without (target <= 5%: {'met' if frac <= 0.05 else 'NOT met'}); "
        f"power iteration used {products} products, "
        f"top eigenvalue {', '.join(f'{e:.4g}' for e in eigs)}."
    )
    if alt_rows:
        rows = [
            [f"train.py's check: power iteration (max_iter={d.eig_max_iter}, tol={d.eig_tol})",
             statistics.median(products), med["check"], 100 * med["check"] / epoch_plain,
             max(abs(e - a[2]) / abs(a[2]) for e, a in zip(eigs, alt_rows))],
            ["prototype: lanczos (tol=0.1), same batch", statistics.median(a[0] for a in alt_rows),
             med["check_lanczos"], 100 * med["check_lanczos"] / epoch_plain,
             max(abs(a[1] - a[2]) / abs(a[2]) for a in alt_rows)],
        ]  # fmt: skip
        print("\nThe check's accuracy against a converged value (lanczos, tol=1e-4, untimed), worst over repeats:\n")
        print(table(["check", "products (median)", "seconds (median)", "% of an epoch", "max rel. error"], rows))
    out = {
        "args": vars(args),
        "device": str(device),
        "threads": torch.get_num_threads(),
        "seconds": times,
        "median": med,
        "epoch_seconds_adv": epoch_adv,
        "epoch_seconds_plain": epoch_plain,
        "check_fraction_adv": frac,
        "check_fraction_plain": med["check"] / epoch_plain,
        "check_products": products,
        "eigenvalues": eigs,
        "alternative": alt_rows,
        "load_end": load(),
        "table": text,
    }
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    return out


if __name__ == "__main__":
    main(parse_args())
