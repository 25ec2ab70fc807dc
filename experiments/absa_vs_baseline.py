"""ABSA against fixed small- and large-batch SGD: optimizer updates to reach a test accuracy.

The finding of Yao, Gholami, Arfeen, Liaw, Gonzalez, Keutzer and Mahoney, "Large batch size training of
neural networks with adversarial training and second-order information" (arXiv:1810.01021): ABSA
(adaptive batch size from the top Hessian eigenvalue, plus FGSM adversarial training) reaches the
small-batch baseline's accuracy with far fewer optimizer updates. This script runs the training script
three times, as a user would (``hessianflow.cli.train``, i.e. ``train.py``):

* ``small``: ``--method sgd --large-ratio 1``: batch ``--batch-size``, learning rate ``--lr``;
* ``large``: ``--method sgd --large-ratio L``: batch ``L x --batch-size``, learning rate ``L x --lr``
  (the linear scaling ABSA itself applies when it grows the batch, so ``large`` is ABSA's end point
  trained from the start);
* ``absa``: ``--method absa --large-ratio L --duration D``: starts like ``small`` and doubles the batch
  (and the rate) when the top eigenvalue of a ``--hessian-batch-size`` batch has halved since the
  reference, or after ``D`` checks without such a drop;

then reads each run's ``train_log.jsonl`` for the updates at the first epoch whose test accuracy reaches
``--target-acc``, the batch-size schedule and the rule behind each change (``eigen_drop`` or
``duration``), and runs the eigenvalue driver (``hessian_eig_driver.py --eigen-type full``) on each final
checkpoint for the top eigenvalue of the whole training set.

**The reference eigenvalue.** HessianFlow (and ``ABSAController``) take the first eigenvalue, measured
after the first epoch, as the reference that later ones must halve from. Early in training the
eigenvalue usually *rises* (the loss leaves its initial plateau), so a reference taken there is low and
the halving rule may never fire: then every change comes from ``--duration``. The JSON records, for
the ABSA run, the training loss at the reference, every check's eigenvalue over the reference, and
the epoch at which an opt-in "peak" reference (the largest eigenvalue seen since the last change) would
first have fired on the same measured eigenvalues (a counterfactual valid up to the first change only).

Usage::

    python experiments/absa_vs_baseline.py                        # digits, ResNet-8: minutes on 2 cores
    python experiments/absa_vs_baseline.py --duration 2 --target-acc 0.97 --out-dir experiments/runs/absa_d2
    python experiments/absa_vs_baseline.py --config cifar10 --data-dir ./data   # CIFAR-10, ResNet-20 (GPU)

Writes ``OUT_DIR/absa_vs_baseline.json`` and ``OUT_DIR/absa_vs_baseline.png`` (test accuracy against
updates; batch size against epoch with the rule of each change; the eigenvalue checks), and each run's
directory ``OUT_DIR/<run>/`` (train.py's log, metrics and checkpoint, the driver's JSON).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

import hessianflow as hf
from hessianflow.cli import common as _cli
from hessianflow.cli import eig as driver
from hessianflow.cli import train
from hessianflow.io.checkpoint import check_writable_dir, write_json
from hessianflow.training.data import DATASETS
from hessianflow.training.models import ARCHS

CONFIGS = {
    # digits: 1,437 training images, 45 mini-batches of 32 an epoch
    "digits": dict(
        name="digits",
        arch="ResNet",
        depth=8,
        batch_size=32,
        large_ratio=8,
        lr=0.02,
        epochs=12,
        duration=3,
        target_acc=0.95,
        hessian_batch_size=128,
        eval_batch=512,
    ),
    # CIFAR-10 (needs the data set in --data-dir): HessianFlow's README command, ResNet-20, 128 x up to 128
    "cifar10": dict(
        name="cifar10",
        arch="ResNet",
        depth=20,
        batch_size=128,
        large_ratio=128,
        lr=0.1,
        epochs=90,
        duration=10,
        target_acc=0.90,
        hessian_batch_size=128,
        eval_batch=1000,
    ),
}
RUNS = ("small", "large", "absa")


def build_parser() -> argparse.ArgumentParser:
    # the scripts' argument types and one-line errors (exit 2): a bad value is refused before any work
    p = _cli.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--config", type=str, choices=sorted(CONFIGS), default="digits",
        help="a set of defaults: digits (offline, minutes on a CPU) or cifar10 (GPU, data in --data-dir)",
    )  # fmt: skip
    p.add_argument("--name", type=str, choices=sorted(DATASETS), default=None, help="data set (default: config's)")
    p.add_argument("--data-dir", type=str, default="./data", help="torchvision data sets' directory")
    p.add_argument("--arch", type=str, choices=ARCHS, default=None, help="model (default: config's)")
    p.add_argument("--depth", type=_cli.positive_int, default=None, help="ResNet depth 6n+2 (default: config's)")
    p.add_argument(
        "--batch-size", type=_cli.positive_int, default=None,
        help="the small (mini-)batch size (default: config's)",
    )  # fmt: skip
    p.add_argument(
        "--large-ratio", type=_cli.positive_int, default=None,
        help="L: the large baseline's and ABSA's largest batch is L x --batch-size (default: config's)",
    )  # fmt: skip
    p.add_argument(
        "--lr", type=_cli.positive_float, default=None, help="learning rate at --batch-size (default: config's)"
    )
    p.add_argument(
        "--lr-decay-epoch", type=_cli.nonneg_int, nargs="*", default=None,
        help="epochs after which the rate is multiplied by 0.2, for all three runs (default: train.py's, "
        "30 60 90, those within --epochs)",
    )  # fmt: skip
    p.add_argument("--epochs", type=_cli.positive_int, default=None, help="epochs of every run (default: config's)")
    p.add_argument(
        "--duration", type=_cli.positive_int, default=None,
        help="ABSA: checks without a halving before the batch grows",
    )  # fmt: skip
    p.add_argument(
        "--adv-ratio", type=_cli.unit_float, default=0.2, help="ABSA: initial FGSM fraction (train.py's default)"
    )
    p.add_argument(
        "--target-acc", type=_cli.unit_float, default=None, help="the test accuracy the updates are counted to"
    )
    p.add_argument(
        "--hessian-batch-size", type=_cli.positive_int, default=None, help="ABSA: samples of each eigenvalue check"
    )
    p.add_argument(
        "--eval-batch", type=_cli.positive_int, default=None,
        help="batch of the final whole-training-set eigenvalue",
    )  # fmt: skip
    p.add_argument("--final-eig-tol", type=_cli.positive_float, default=1e-3, help="the driver's lanczos tolerance")
    p.add_argument(
        "--final-num-batches", type=_cli.positive_int, default=None,
        help="final eigenvalue on the first N batches of --eval-batch training samples (default: all of them)",
    )  # fmt: skip
    p.add_argument("--seed", type=int, default=1, help="train.py's --seed (initialisation, data order, checks)")
    p.add_argument(
        "--synthetic-train", type=_cli.positive_int, default=None,
        help="synthetic data only: training images (tests)",
    )  # fmt: skip
    p.add_argument(
        "--synthetic-test", type=_cli.positive_int, default=None, help="synthetic data only: test images (tests)"
    )
    p.add_argument("--out-dir", type=str, default="experiments/runs/absa_vs_baseline", help="output directory")
    p.add_argument("--device", type=str, default="auto", help="train.py's and the driver's --device")
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
    _cli.check_resnet_depth(parser, args.arch, args.depth)
    _cli.check_device(parser, args.device)
    # the command lines this runs, checked by the scripts' own rules before any of them starts (the same
    # one-line error, exit 2: e.g. --lr-decay-epoch 5 3, or one beyond --epochs)
    for run in RUNS:
        train.parse_args(train_argv(args, run))
        driver.parse_args(driver_argv(args, run))
    return args


# -- steps ----------------------------------------------------------------------------------------------


def train_argv(args, run: str) -> list:
    """train.py's command line for one of the three runs."""
    out = os.path.join(args.out_dir, run)
    argv = [
        "--name", args.name, "--data-dir", args.data_dir, "--arch", args.arch, "--depth", str(args.depth),
        "--batch-size", str(args.batch_size), "--epochs", str(args.epochs), "--seed", str(args.seed),
        "--test-batch-size", str(args.eval_batch), "--hessian-batch-size", str(args.hessian_batch_size),
        "--device", args.device, "--out-dir", out, "--save", os.path.join(out, "model_param.pkl"), "--no-progress",
    ]  # fmt: skip
    if args.lr_decay_epoch is not None:
        argv += ["--lr-decay-epoch", *map(str, args.lr_decay_epoch)] if args.lr_decay_epoch else []
    for flag, key in (("--synthetic-train", "synthetic_train"), ("--synthetic-test", "synthetic_test")):
        if getattr(args, key) is not None:
            argv += [flag, str(getattr(args, key))]
    if run == "small":
        return argv + ["--method", "sgd", "--large-ratio", "1", "--lr", str(args.lr)]
    if run == "large":
        large_lr = str(args.lr * args.large_ratio)
        return argv + ["--method", "sgd", "--large-ratio", str(args.large_ratio), "--lr", large_lr]
    return argv + [
        "--method", "absa", "--large-ratio", str(args.large_ratio), "--lr", str(args.lr),
        "--duration", str(args.duration), "--adv-ratio", str(args.adv_ratio),
    ]  # fmt: skip


def driver_argv(args, run: str) -> list:
    """hessian_eig_driver.py's command line for the final eigenvalue of one run."""
    out = os.path.join(args.out_dir, run)
    argv = [
        "--resume", os.path.join(out, "model_param.pkl"), "--eigen-type", "full", "--hessian-batch-size",
        str(args.eval_batch), "--tol", str(args.final_eig_tol), "--json", os.path.join(out, "eigen_full.json"),
        "--device", args.device, "--no-progress",
    ]  # fmt: skip
    if args.final_num_batches is not None:
        argv += ["--num-batches", str(args.final_num_batches)]
    return argv


def final_eigenvalue(args, run: str) -> dict:
    """The driver on the run's checkpoint: top eigenvalue of the Hessian over the whole training set."""
    res = driver.main(driver.parse_args(driver_argv(args, run)))["eigen"]
    return {"eigenvalue": res["eigenvalues"][0], "residual": res["residuals"][0], "converged": res["all_converged"]}


def read_log(args, run: str) -> list:
    with open(os.path.join(args.out_dir, run, "train_log.jsonl")) as f:
        return [json.loads(line) for line in f]


def updates_to_target(log: list, target: float):
    """Updates and epoch at the end of the first epoch whose test accuracy reaches ``target`` (None: never)."""
    for r in log:
        if r["test_acc"] >= target:
            return r["updates"], r["epoch"]
    return None, None


def schedule(log: list) -> list:
    """Each batch-size change: the epoch after which it happened, from, to, and the rule that made it."""
    return [
        {"after_epoch": r["epoch"], "from": r["batch_size"], "to": r["next_batch_size"], "rule": r["decision"]}
        for r in log
        if r["next_batch_size"] != r["batch_size"]
    ]


def reference_study(log: list) -> dict:
    """What HessianFlow's first-epoch reference did on this run, and when a peak reference would have fired."""
    checks = [r for r in log if r["eigenvalue"] is not None and r["decision"] != "capped"]
    if not checks:
        return {}
    ref = checks[0]["eigenvalue"]
    first_change = next((r["epoch"] for r in log if r["next_batch_size"] != r["batch_size"]), None)
    peak, peak_fire = -float("inf"), None
    for r in checks:
        if first_change is not None and r["epoch"] > first_change:
            break  # after the first change the measured trajectory is not the counterfactual's
        if peak > 0 and r["eigenvalue"] <= peak / 2:
            peak_fire = r["epoch"]
            break
        peak = max(peak, r["eigenvalue"])
    return {
        "reference_epoch": checks[0]["epoch"],
        "reference_eigenvalue": ref,
        "train_loss_at_reference": checks[0]["train_loss"],
        "checks": [
            {
                "epoch": r["epoch"],
                "eigenvalue": r["eigenvalue"],
                "over_reference": r["eigenvalue"] / ref,
                "train_loss": r["train_loss"],
                "decision": r["decision"],
            }
            for r in checks
        ],  # fmt: skip
        "halving_fired": any(r["decision"] == "eigen_drop" for r in checks),
        "first_change_epoch": first_change,
        "first_change_rule": next((r["decision"] for r in log if r["next_batch_size"] != r["batch_size"]), None),
        "peak_reference_would_fire_at_epoch": peak_fire,
    }


def plot(results, args, path) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colours = {"small": "tab:blue", "large": "tab:red", "absa": "tab:green"}
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for run, res in results.items():
        log = res["log"]
        axes[0].plot([r["updates"] for r in log], [r["test_acc"] for r in log], "o-", color=colours[run], label=run)
        axes[1].step([r["epoch"] for r in log], [r["batch_size"] for r in log], where="post", color=colours[run],
                     label=run)  # fmt: skip
    axes[0].axhline(args.target_acc, color="grey", ls="--", lw=1, label=f"target {args.target_acc}")
    axes[0].set_xscale("log")
    axes[0].set_xlabel("optimizer updates")
    axes[0].set_ylabel("test accuracy")
    axes[0].legend()
    for ch in results["absa"]["schedule"]:
        axes[1].annotate(ch["rule"], (ch["after_epoch"] + 1, ch["to"]), fontsize=8, color=colours["absa"])
    axes[1].set_yscale("log", base=2)
    axes[1].set_xlabel("epoch")
    axes[1].set_ylabel("batch size")
    axes[1].legend()
    ref = results["absa"]["reference"]
    if ref:
        ep = [c["epoch"] for c in ref["checks"]]
        axes[2].plot(ep, [c["eigenvalue"] for c in ref["checks"]], "o-", color=colours["absa"], label="ABSA checks")
        axes[2].axhline(ref["reference_eigenvalue"], color="k", lw=1, label="reference (epoch 1)")
        axes[2].axhline(ref["reference_eigenvalue"] / 2, color="k", ls=":", lw=1, label="halving threshold")
        axes[2].set_yscale("log")
        axes[2].legend()
    axes[2].set_xlabel("epoch")
    axes[2].set_ylabel(f"top eigenvalue ({args.hessian_batch_size} samples)")
    fig.suptitle(f"{args.arch} on {args.name}: batch {args.batch_size} x up to {args.large_ratio}, lr {args.lr}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def main(args) -> dict:
    """The three training runs, their final eigenvalues, the comparison; JSON and PNG; returns the JSON's dict."""
    check_writable_dir(args.out_dir, what="the runs and results")  # before any work (exit 2)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    results = {}
    for run in RUNS:
        argv = train_argv(args, run)
        metrics = train.main(train.parse_args(argv))
        log = read_log(args, run)
        updates, epoch = updates_to_target(log, args.target_acc)
        results[run] = {
            "train_argv": argv, "updates_to_target": updates, "epoch_to_target": epoch,
            "final_test_acc": metrics["final_test_acc"], "best_test_acc": metrics["best_test_acc"],
            "total_updates": metrics["updates"], "final_batch_size": metrics["final_batch_size"],
            "wall_time": metrics["wall_time"], "schedule": schedule(log), "final": final_eigenvalue(args, run),
            "log": log,
        }  # fmt: skip
    results["absa"]["reference"] = reference_study(results["absa"]["log"])
    small = results["small"]["updates_to_target"]
    table = {
        run: {
            "updates_to_target": r["updates_to_target"],
            "fewer_updates_than_small": None if (small is None or r["updates_to_target"] is None)
            else small / r["updates_to_target"],
            "final_test_acc": r["final_test_acc"], "final_batch_size": r["final_batch_size"],
            "final_top_eigenvalue": r["final"]["eigenvalue"],
        }
        for run, r in results.items()
    }  # fmt: skip
    for run, row in table.items():
        print(f"{run:5s}: updates to test acc {args.target_acc}: {row['updates_to_target']}, final test acc "
              f"{row['final_test_acc']:.3f}, final batch {row['final_batch_size']}, top eigenvalue (whole train set) "
              f"{row['final_top_eigenvalue']:.4g}")  # fmt: skip
    print("ABSA schedule: " + (", ".join(f"{c['from']}->{c['to']} after epoch {c['after_epoch']} ({c['rule']})"
                                         for c in results["absa"]["schedule"]) or "no change"))  # fmt: skip
    out = {
        "experiment": "absa_vs_baseline",
        "settings": vars(args),
        "table": table,
        "runs": results,
        "versions": hf.io.checkpoint.versions(),
    }
    out["json"] = write_json(os.path.join(args.out_dir, "absa_vs_baseline.json"), out)
    out["png"] = plot(results, args, os.path.join(args.out_dir, "absa_vs_baseline.png"))
    return out


if __name__ == "__main__":
    sys.exit(_cli.run(main, parse_args))  # the scripts' exit statuses: 2 a user error, in one line
