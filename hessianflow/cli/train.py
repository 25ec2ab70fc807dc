"""Train a model with ABSA (adaptive batch size + adversarial training) or a large-batch SGD baseline.

HessianFlow's train.py, with its flags and defaults. Usage::

    python train.py --name cifar10 --epochs 90 --lr 0.02 --lr-decay 0.2 --lr-decay-epoch 30 60 --arch c1
    python train.py --arch ResNet --lr 0.1 --lr-decay 0.2 --lr-decay-epoch 30 60 80 --large-ratio 128 --method absa
    python train.py --name synthetic --arch c1 --epochs 6 --large-ratio 8 --duration 2   # offline, minutes
    python train.py --resume model_param.pkl                                              # continue a run
    torchrun --nproc_per_node 4 train.py --arch ResNet --method absa                      # data-parallel

Every epoch prints one line and appends it as JSON to ``OUT_DIR/train_log.jsonl``; the checkpoint
(``--save``, written atomically after every epoch) holds everything needed to resume or to analyse the
model with hessian_eig_driver.py; ``OUT_DIR/metrics.json`` sums the run up. Exit status: 0 done, 2 a
user error, 3 a NaN/Inf loss (the last good checkpoint is kept), 4 an I/O failure.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys
import time
import warnings

import numpy as np
import torch
from torch import nn

from ..distributed import assert_same_on_all_ranks, broadcast_buffers, init_distributed, is_distributed, shard
from ..io.checkpoint import (
    CheckpointError,
    WriteError,
    atomic_write,
    check_writable_dir,
    jsonable,
    remove_stale_temporaries,
    rng_state,
    save_checkpoint,
    set_rng_state,
    write_json,
)
from ..io.checkpoint_format import (
    load_state_into,
    make_checkpoint,
    read_checkpoint,
    upgrade_state_dict,
    verify_checksum,
)
from ..linalg.eigen import ConvergenceWarning
from ..linalg.linop import NonFiniteError
from ..training.absa import ABSAController
from ..training.adversarial import normalized_bounds, pixel_eps
from ..training.data import DATASETS, dataset_info, fixed_batch, get_datasets, set_augmentation_epoch
from ..training.loop import set_lr, train_epoch
from ..training.models import ARCHS, canonical_arch, get_model
from ..training.tracking import EigenTracker, top_eigenvalue
from . import common as _cli
from .resume import resume_settings

TRAIN_DEFAULTS = {
    "name": "cifar10",
    "batch_size": 128,
    "test_batch_size": 200,
    "epochs": 90,
    "lr": 0.1,
    "lr_decay": 0.2,
    "lr_decay_epoch": [30, 60, 90],
    "seed": 1,
    "arch": "ResNet",
    "large_ratio": 128,
    "depth": 20,
    "method": "absa",
    "weight_decay": 5e-4,
    "save": "model_param.pkl",
    "out_dir": "runs",
    "eigen_type": "approximate",
}


def _add_model_flags(p, d, fixed_arch=None) -> None:
    """The 'model' flags (no ``--arch`` where the script fixes it)."""
    g = p.add_argument_group("model")
    if fixed_arch is None:
        g.add_argument("--arch", type=_cli.choice_ci(ARCHS), default=d["arch"], help=f"model: {', '.join(ARCHS)}")
    g.add_argument(
        "--depth", type=_cli.positive_int, default=d["depth"], help="ResNet depth, 6n+2 (20, 32, 44, 56, 110)"
    )


def _add_optimisation_flags(p, d) -> None:
    """The 'optimisation' flags."""
    g = p.add_argument_group("optimisation")
    g.add_argument("--batch-size", type=_cli.positive_int, default=d["batch_size"], help="mini-batch size per process")
    g.add_argument("--test-batch-size", type=_cli.positive_int, default=d["test_batch_size"], help="test batch size")
    g.add_argument("--epochs", type=_cli.positive_int, default=d["epochs"], help="number of epochs")
    g.add_argument("--lr", type=_cli.positive_float, default=d["lr"], help="initial learning rate")
    g.add_argument("--lr-decay", type=_cli.positive_float, default=d["lr_decay"], help="lr multiplier at each decay")
    g.add_argument(
        "--lr-decay-epoch",
        type=_cli.nonneg_int,
        nargs="+",
        default=None,
        help=f"epochs after which the lr decays (default: {' '.join(map(str, d['lr_decay_epoch']))}, "
        "those beyond --epochs dropped)",
    )
    g.add_argument("--momentum", type=_cli.nonneg_float, default=0.9, help="SGD momentum")
    g.add_argument("--weight-decay", "--wd", type=_cli.nonneg_float, default=d["weight_decay"], help="weight decay")
    g.add_argument("--seed", type=int, default=d["seed"], help="random seed (data order, init, Hessian batches)")


def _add_absa_flags(p, d) -> None:
    """The 'ABSA (Yao et al. 2018)' flags."""
    g = p.add_argument_group("ABSA (Yao et al. 2018)")
    g.add_argument(
        "--method",
        type=_cli.choice_ci(("absa", "sgd")),
        default=d["method"],
        help="absa: adaptive batch size + adversarial training; sgd: fixed accumulation of --large-ratio batches",
    )
    g.add_argument(
        "--large-ratio",
        type=_cli.positive_int,
        default=d["large_ratio"],
        help="absa: the largest number of mini-batches accumulated per step; sgd: the fixed number",
    )
    g.add_argument("--adv-ratio", type=_cli.unit_float, default=0.2, help="initial fraction of FGSM examples (absa)")
    g.add_argument("--eps", type=_cli.unit_float, default=0.005, help="FGSM radius in [0,1] pixel units")
    g.add_argument(
        "--duration",
        type=_cli.positive_int,
        default=10,
        help="epochs without an eigenvalue drop before the batch grows",
    )
    g.add_argument(
        "--hessian-batch-size",
        type=_cli.positive_int,
        default=128,
        help="samples of the fresh, un-augmented batch the top eigenvalue is computed on",
    )
    g.add_argument("--eig-max-iter", type=_cli.positive_int, default=10, help="power iterations per eigenvalue check")
    g.add_argument(
        "--eig-tol", type=_cli.positive_float, default=1e-2, help="relative tolerance of the power iteration"
    )


def _add_eigenvalue_tracking_flags(p, d) -> None:
    """The 'eigenvalue tracking' flags."""
    g = p.add_argument_group("eigenvalue tracking")
    g.add_argument(
        "--track-eigen",
        action="store_true",
        default=bool(d.get("track_eigen", False)),
        help="compute the top Hessian eigenvalue after every epoch (any method) and log/plot it",
    )
    g.add_argument(
        "--eigen-type",
        type=_cli.choice_ci(("approximate", "full")),
        default=d["eigen_type"],
        help="tracking: approximate = one fixed batch of --hessian-batch-size samples drawn once with --seed; "
        "full = the whole --eig-data set (or its first --eig-batches batches)",
    )
    g.add_argument(
        "--eig-data", type=_cli.choice_ci(("train", "test")), default="train", help="tracking: the data set's split"
    )
    g.add_argument(
        "--eig-batches", type=_cli.positive_int, default=None, help="tracking, full: use the first N batches"
    )


def _add_run_flags(p, d) -> None:
    """The 'run' flags."""
    g = p.add_argument_group("run")
    _cli.add_device_arg(p)
    g.add_argument("--save", type=str, default=d["save"], help="checkpoint path, written after every epoch")
    g.add_argument("--resume", type=str, default=None, help="continue the run of this checkpoint")
    g.add_argument("--out-dir", type=str, default=d["out_dir"], help="directory for the log, metrics and plots")
    g.add_argument("--amp", action="store_true", help="bf16 autocast for training on CUDA (Hessians stay float32)")
    g.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="tqdm progress bars (default: when stderr is a terminal)",
    )


def build_parser(defaults=None, prog=None, description=None, fixed_arch=None) -> argparse.ArgumentParser:
    """The training flags; ``defaults`` overrides :data:`TRAIN_DEFAULTS` (train_resnet.py has its own)."""
    d = {**TRAIN_DEFAULTS, **(defaults or {})}
    p = _cli.ArgumentParser(
        prog=prog,
        description=description or __doc__.split("\n\n")[0],
        formatter_class=_cli.DefaultsHelpFormatter,
    )
    _cli.add_version_flag(p)
    _cli.add_data_args(p, name_default=d["name"])
    _add_model_flags(p, d, fixed_arch)
    _add_optimisation_flags(p, d)
    _add_absa_flags(p, d)
    _add_eigenvalue_tracking_flags(p, d)
    _add_run_flags(p, d)
    p.set_defaults(fixed_arch=fixed_arch, default_decay=list(d["lr_decay_epoch"]))
    return p


def validate(parser: argparse.ArgumentParser, args, argv=None) -> argparse.Namespace:
    """Checks that need several flags at once; every failure is ``parser.error`` (exit 2)."""
    if args.fixed_arch is not None:
        args.arch = args.fixed_arch
    if args.lr_decay_epoch is None:
        args.lr_decay_epoch = [e for e in args.default_decay if e <= args.epochs]
    else:
        bad = [e for e in args.lr_decay_epoch if not 1 <= e <= args.epochs]
        if bad:
            parser.error(f"argument --lr-decay-epoch: {bad} outside 1..{args.epochs} (--epochs)")
        if any(b <= a for a, b in zip(args.lr_decay_epoch, args.lr_decay_epoch[1:])):
            given = " ".join(map(str, args.lr_decay_epoch))
            parser.error(
                f"argument --lr-decay-epoch {given}: must increase, each epoch once (the lr decays after each)"
            )
    _cli.check_resnet_depth(parser, args.arch, args.depth)
    _cli.check_device(parser, args.device)
    if args.name != "synthetic" and (args.synthetic_train or args.synthetic_test) and args.resume is None:
        parser.error("--synthetic-train/--synthetic-test apply to --name synthetic only")  # resumed: see _main
    args.explicit = sorted(_cli.explicit_flags(parser, sys.argv[1:] if argv is None else argv))
    return args


def parse_args(argv=None) -> argparse.Namespace:
    parser = build_parser()
    return validate(parser, parser.parse_args(argv), argv)


# -- pieces of a run -----------------------------------------------------------------------------------


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


class EpochSampler(torch.utils.data.Sampler):
    """A permutation per epoch from ``seed`` and the epoch alone: a resumed run sees the same order."""

    def __init__(self, n: int, seed: int):
        self.n, self.seed, self.epoch = n, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed * 100003 + self.epoch)
        return iter(torch.randperm(self.n, generator=g).tolist())

    def __len__(self):
        return self.n


def _loader(dataset, batch_size, sampler=None, num_workers=0, device=None):
    return torch.utils.data.DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        shuffle=False,
        num_workers=num_workers,
        pin_memory=device is not None and device.type == "cuda",
        drop_last=False,
    )


def _hessian_batch(dataset, size: int, seed: int, ctx):
    """``size`` random un-augmented samples chosen by ``seed``; each rank keeps its shard of them."""
    x, y = fixed_batch(dataset, min(size, len(dataset)), seed)
    part = shard(len(y), ctx.rank, ctx.world_size)
    return x[part], y[part]


def _evaluate(model, test_set, args, criterion, ctx) -> dict:
    """Test loss and accuracy; under torchrun each rank takes a contiguous shard and the sums are combined."""
    part = torch.utils.data.Subset(test_set, range(len(test_set))[shard(len(test_set), ctx.rank, ctx.world_size)])
    res = _cli.evaluate_on_ranks(
        getattr(model, "module", model), _loader(part, args.test_batch_size), criterion, ctx.device
    )
    return {"loss": res["loss"], "accuracy": res["accuracy"]}


def _fmt(x, spec=".4f"):
    return "-" if x is None else format(x, spec)


def main(args) -> dict:
    """Run the training described by ``args`` (from :func:`parse_args`); return the final metrics."""
    ctx = init_distributed(args.device)
    try:
        return _main(args, ctx)
    finally:
        ctx.close()


class _Run:
    """A training run's parts, built by :func:`setup` and restored by :func:`restore`."""

    def __init__(self, args, ctx):
        self.args, self.ctx = args, ctx
        self.progress = (sys.stderr.isatty() if args.progress is None else args.progress) and ctx.is_main
        self.state = {"epoch": 0, "history": [], "updates": 0, "best_test_acc": None, "elapsed": 0.0}
        self.epochs_run = 0

    def say(self, *a, **k) -> None:
        if self.ctx.is_main:
            print(*a, **k)


def _main(args, ctx) -> dict:
    run = _Run(args, ctx)
    if not ctx.is_main:
        warnings.simplefilter("ignore")  # the collective computations warn alike on every rank: rank 0 speaks
    ckpt = read_checkpoint(args.resume, purpose="resume") if args.resume else None
    if ckpt is not None:
        resume_settings(ckpt[0], args, set(getattr(args, "explicit", [])), args.resume)
        if ckpt[0]["dataset"] not in DATASETS:
            raise CheckpointError(
                f"cannot resume {args.resume}: its field 'dataset' is not a known data set "
                f"({ckpt[0]['dataset']!r}; train.py trains on {', '.join(DATASETS)})"
            )
        if args.name != "synthetic" and _cli.synthetic_kwargs(args):
            raise _cli.UsageError(f"--synthetic-train/--synthetic-test: {args.resume} was trained on {args.name}")
    check_outputs(run)
    setup(run)
    if ckpt is not None:
        restore(run, ckpt)
    start(run)
    for epoch in range(run.state["epoch"], args.epochs):
        record = train_one_epoch(run, epoch)
        end_epoch(run, record)
    return finish(run)


def check_outputs(run: _Run) -> None:
    """Fail on an unwritable output before any work; remove what a killed run left behind."""
    args = run.args
    if os.path.isdir(args.save):
        raise _cli.UsageError(f"--save {args.save}: is a directory (give the checkpoint's file name)")
    run.out_dir = check_writable_dir(args.out_dir, what="the log and metrics")
    check_writable_dir(os.path.dirname(os.path.abspath(args.save)), what="checkpoints")
    if run.ctx.is_main:
        remove_stale_temporaries(args.save)  # left by a run killed while writing its checkpoint
    run.log_path = os.path.join(run.out_dir, "train_log.jsonl")


def setup(run: _Run) -> None:
    """Data, model, optimiser, ABSA controller, tracker, loaders and the FGSM bounds."""
    args, ctx = run.args, run.ctx
    _seed_everything(args.seed)
    run.info = info = dataset_info(args.name)
    run.train_set, run.plain_set, run.test_set = _cli.rank_zero_first(
        ctx,
        is_distributed() and args.download and args.name != "synthetic",  # --download under torchrun
        lambda: get_datasets(
            args.name, data_dir=args.data_dir, download=args.download, augment=True, seed=args.seed,
            **_cli.synthetic_kwargs(args),
        ),
    )  # fmt: skip
    run.model = get_model(
        args.arch, depth=args.depth, num_classes=info.num_classes, in_channels=info.in_channels,
        input_size=info.input_size,
    ).to(ctx.device)  # fmt: skip
    run.criterion = nn.CrossEntropyLoss()
    run.controller = ABSAController(
        large_ratio_cap=args.large_ratio, base_lr=args.lr, lr_decay=args.lr_decay,
        lr_decay_epochs=args.lr_decay_epoch, epochs=args.epochs, adv_ratio=args.adv_ratio,
        duration=args.duration, method=args.method,
    )  # fmt: skip
    run.optimizer = torch.optim.SGD(
        run.model.parameters(), lr=run.controller.lr(0), momentum=args.momentum, weight_decay=args.weight_decay
    )
    run.tracker = _make_tracker(args, run.criterion, run.plain_set, run.test_set, ctx) if args.track_eigen else None
    run.train_model = run.model
    if is_distributed():
        run.train_model = nn.parallel.DistributedDataParallel(
            run.model, device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None
        )
        run.sampler = torch.utils.data.DistributedSampler(run.train_set, shuffle=True, seed=args.seed, drop_last=False)
    else:
        run.sampler = EpochSampler(len(run.train_set), args.seed)
    run.train_loader = _loader(run.train_set, args.batch_size, run.sampler, args.num_workers, ctx.device)
    run.eps = pixel_eps(args.eps, info.std).to(ctx.device)
    lo, hi = normalized_bounds(info.mean, info.std)
    run.clamp = (lo.to(ctx.device, torch.float32), hi.to(ctx.device, torch.float32))
    # bf16 autocast per forward pass, inside train_epoch (see its docstring for why not around the epoch)
    run.amp_dtype = torch.bfloat16 if args.amp and ctx.device.type == "cuda" else None
    if args.amp and run.amp_dtype is None:
        run.say("--amp: mixed precision is for CUDA devices; training on the CPU in float32")


def _restore_field(path, field: str, load) -> None:
    """``load()`` one part of a checkpoint's training state; a damaged part is a one-line error."""
    try:
        load()
    except (KeyError, ValueError, TypeError, IndexError, AttributeError, RuntimeError) as exc:
        detail = " ".join(str(exc).split())[:120]
        raise CheckpointError(f"cannot resume from {path}: its field {field!r} is damaged ({detail})") from None


def restore(run: _Run, loaded) -> None:
    """Continue from a checkpoint (read and checked against the command line by :func:`_main`)."""
    args, ctx = run.args, run.ctx
    ckpt, spec, state = loaded
    load_state_into(
        run.model, upgrade_state_dict(state, spec.arch), args.resume,
        f"{canonical_arch(args.arch)} for {args.name}", "the checkpoint's weights contradict its own settings",
    )  # fmt: skip
    note = verify_checksum(ckpt, state, args.resume)  # after the fit, whose mismatch says more
    if note is not None:
        run.say(note)
    # the run flags were checked against the checkpoint; only --epochs may have grown
    _restore_field(args.resume, "optimizer", lambda: run.optimizer.load_state_dict(ckpt["optimizer"]))
    _restore_field(args.resume, "absa", lambda: run.controller.load_state_dict(ckpt["absa"], strict=False))
    if run.tracker is not None and ckpt.get("tracker"):
        _restore_field(args.resume, "tracker", lambda: run.tracker.load_state_dict(ckpt["tracker"]))
    _restore_field(args.resume, "rng", lambda: set_rng_state(ckpt["rng"]))
    for k in ("epoch", "history", "updates", "best_test_acc", "elapsed"):
        run.state[k] = ckpt.get(k, run.state[k])
    run.say(f"resuming {args.resume} after epoch {run.state['epoch']}")
    last = run.state["history"][-1] if run.state["history"] else None
    if last and last["batch_size"] != args.batch_size * last["large_ratio"] * ctx.world_size:
        run.say(
            f"note: written by {last['batch_size'] // (args.batch_size * last['large_ratio'])} process(es), "
            f"resumed by {ctx.world_size}: the effective batch (batch size x large ratio x processes) "
            f"changes from {last['batch_size']} to {args.batch_size * last['large_ratio'] * ctx.world_size}"
        )


def start(run: _Run) -> None:
    """The first line of a new run."""
    args, ctx = run.args, run.ctx
    if run.state["epoch"] == 0:
        arch = canonical_arch(args.arch)
        run.say(
            f"training {arch}{args.depth if arch == 'ResNet' else ''} on {args.name} ({len(run.train_set)} train / "
            f"{len(run.test_set)} test), method {args.method}, batch {args.batch_size} x up to {args.large_ratio} "
            f"accumulated x {ctx.world_size} process(es) = effective batch up to "
            f"{args.batch_size * args.large_ratio * ctx.world_size}, device {ctx.device}"
        )


def _eigenvalue_check(run: _Run, epoch: int):
    """ABSA's top eigenvalue on a fresh un-augmented batch, when the controller asks for one."""
    args = run.args
    if not run.controller.needs_eigenvalue(epoch):
        return None
    x, y = _hessian_batch(run.plain_set, args.hessian_batch_size, args.seed * 7919 + epoch, run.ctx)
    res = _quietly(lambda: top_eigenvalue(
        run.model, run.criterion, dataloader=[(x, y)], method="power", max_iter=args.eig_max_iter,
        tol=args.eig_tol, seed=args.seed + epoch,
    ))  # fmt: skip
    return {
        "eigenvalue": float(res.eigenvalues[0]),
        "converged": res.all_converged,
        "residual": float(res.residuals[0]),
    }


def _quietly(solve):
    """``solve()`` without its ConvergenceWarning (source line, library advice) in the training output: the
    epoch record's ``eig_converged`` and ``eig_residual`` carry the verdict, and :func:`_convergence_note`
    prints it as one line with the flags that help."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        return solve()


def _convergence_note(args, record: dict) -> str | None:
    """One line for an epoch whose eigenvalue did not converge, built from the record's fields."""
    if record.get("eig_converged") is not False:
        return None
    eig, residual = record["eigenvalue"], record["eig_residual"]
    relative = f"{residual / abs(eig):.1e} of it" if eig else f"{residual:.1e}"
    return (
        f"note: epoch {record['epoch']}: the top eigenvalue {eig:.4g} is not converged (residual {relative} after "
        f"{args.eig_max_iter} power iterations); raise --eig-max-iter (now {args.eig_max_iter}) or loosen "
        f"--eig-tol (now {args.eig_tol:g})"
    )


def train_one_epoch(run: _Run, epoch: int) -> dict:
    """Train, evaluate, check the eigenvalue and let ABSA decide; the epoch's log record."""
    args, ctx, controller = run.args, run.ctx, run.controller
    t0 = time.time()
    lr = controller.lr(epoch)
    set_lr(run.optimizer, lr)
    ratio, adv = controller.large_ratio, controller.current_adv_ratio(epoch)
    run.sampler.set_epoch(epoch)
    set_augmentation_epoch(run.train_set, epoch)  # crops/flips from (seed, epoch): a resumed run repeats them
    stats = train_epoch(
        run.train_model, run.train_loader, run.optimizer, run.criterion, ratio, adv_ratio=adv, eps=run.eps,
        clamp=run.clamp, device=ctx.device, progress=run.progress, epoch=epoch + 1, autocast_dtype=run.amp_dtype,
    )  # fmt: skip
    t_train = time.time() - t0
    # DDP syncs BatchNorm statistics before each forward, then every rank updates its own copy:
    # evaluate, take the eigenvalue and save one model, rank 0's
    broadcast_buffers(run.model)
    run.state["updates"] += int(stats["optimizer_steps"])  # every rank steps together under DDP
    test = _evaluate(run.model, run.test_set, args, run.criterion, ctx)
    t1 = time.time()
    check = _eigenvalue_check(run, epoch)
    eig = None if check is None else check["eigenvalue"]
    decision = controller.end_of_epoch(epoch, eig)
    # the eigenvalue is collective (bit-identical on every rank): a rank that decided otherwise
    # would dead-lock the next epoch's collectives, so make that an error instead
    assert_same_on_all_ranks([eig, controller.large_ratio], "the eigenvalue and the next batch size")
    metrics = {
        "lr": lr, "batch_size": args.batch_size * ratio * ctx.world_size, "train_loss": stats["loss"],
        "train_acc": stats["accuracy"], "test_loss": test["loss"], "test_acc": test["accuracy"],
    }  # fmt: skip
    if run.tracker is not None:
        tracked = _quietly(lambda: run.tracker.step(run.model, epoch + 1, **metrics))
        if check is None:
            check = {k: tracked[k] for k in ("eigenvalue", "converged", "residual")}
    check = check or {"eigenvalue": None, "converged": None, "residual": None}
    return {
        "epoch": epoch + 1, **metrics, "large_ratio": ratio, "adv_ratio": adv, "updates": run.state["updates"],
        "eigenvalue": check["eigenvalue"], "eig_converged": check["converged"], "eig_residual": check["residual"],
        "decision": decision.reason,
        "next_batch_size": args.batch_size * controller.large_ratio * ctx.world_size,
        "next_lr": controller.lr(epoch + 1),
        "seconds": time.time() - t0, "seconds_train": t_train, "seconds_eigen": time.time() - t1,
        "grew": decision.grew,
    }  # fmt: skip


def _check_finite(run: _Run, record: dict) -> None:
    """Refuse to save a broken model: parameters, buffers (BatchNorm statistics) and the epoch's losses
    must be finite before a checkpoint replaces the previous one."""
    bad = [k for k in ("train_loss", "test_loss") if record[k] is not None and not math.isfinite(record[k])]
    bad += [n for n, t in (*run.model.named_parameters(), *run.model.named_buffers())
            if t.is_floating_point() and not torch.isfinite(t).all()]  # fmt: skip
    if bad:
        raise NonFiniteError(
            f"epoch {record['epoch']}: {', '.join(bad[:3])}{' ...' if len(bad) > 3 else ''} not finite: the training "
            f"diverged (lower --lr); {_kept(run.args.save, run.state['epoch'])}"
        )


def _kept(path, epoch=None) -> str:
    """What a failed epoch or checkpoint write leaves at ``path``: only a checkpoint that exists is claimed
    (``epoch``: the last one saved there, when known)."""
    if not os.path.exists(path):
        return "no checkpoint was written"
    return "the previous checkpoint is kept" if epoch is None else f"the checkpoint of epoch {epoch} is kept"


def _save(run: _Run) -> None:
    """Write the checkpoint, then the epoch log from the checkpoint's own history (rank 0).

    The log is rewritten whole, atomically, after the checkpoint: after any sequence of kills and
    resumes it holds each epoch of the checkpoint once, in strict JSON (NaN/Inf as null).
    """
    args, state = run.args, run.state
    ckpt = make_checkpoint(
        run.model, dataset=args.name, epoch=state["epoch"], args=vars(args), optimizer=run.optimizer.state_dict(),
        absa=run.controller.state_dict(), tracker=run.tracker.state_dict() if run.tracker is not None else None,
        rng=rng_state(), **{k: state[k] for k in ("history", "updates", "best_test_acc", "elapsed")},
    )  # fmt: skip
    try:
        save_checkpoint(ckpt, args.save)
    except WriteError as exc:  # e.g. the disk filled up mid-run: the previous checkpoint is intact
        raise WriteError(f"{exc} ({_kept(args.save)})") from exc
    lines = "".join(json.dumps(jsonable(r), allow_nan=False) + "\n" for r in state["history"])
    atomic_write(run.log_path, lambda f: f.write(lines.encode()), what="epoch log")  # a WriteError: exit 4


def _first_epochs_at_decayed_rates(args) -> list[int]:
    """The (1-based) epochs that run first at each decayed rate: ``--lr-decay-epoch d`` decays after epoch d."""
    return [d + 1 for d in args.lr_decay_epoch if d < args.epochs]


def _decay_note(args, record: dict) -> str:
    """``-> lr X from epoch N`` on the last epoch at the old rate (the figure marks the same epoch N)."""
    if record["epoch"] + 1 not in _first_epochs_at_decayed_rates(args):
        return ""
    return f"  -> lr {record['next_lr']:.4g} from epoch {record['epoch'] + 1}"


def end_epoch(run: _Run, record: dict) -> None:
    """Print the epoch, check the model is finite, save the checkpoint and the log (rank 0)."""
    args, state = run.args, run.state
    grew = record.pop("grew")
    _check_finite(run, record)
    best = state["best_test_acc"]
    state["best_test_acc"] = record["test_acc"] if best is None else max(best, record["test_acc"])
    state["history"].append(record)
    state["epoch"] = record["epoch"]
    state["elapsed"] += record["seconds"]
    run.epochs_run += 1
    if run.ctx.is_main:
        run.say(
            f"epoch {record['epoch']:3d}/{args.epochs}  lr {record['lr']:.4g}  batch {record['batch_size']:5d}  "
            f"train loss {_fmt(record['train_loss'])} acc {_fmt(record['train_acc'], '.3f')}  "
            f"test loss {_fmt(record['test_loss'])} acc {record['test_acc']:.3f}  "
            f"eig {_fmt(record['eigenvalue'], '.4g')}  updates {state['updates']}  {record['seconds']:.1f}s"
            + (f"  -> batch {record['next_batch_size']} ({record['decision']})" if grew else "")
            + _decay_note(args, record)
        )
        note = _convergence_note(args, record)
        if note is not None:
            run.say(note)
        _save(run)
    run.ctx.barrier()


def finish(run: _Run) -> dict:
    """The run's summary: ``metrics.json``, the eigenvalue plot and the last line."""
    args, ctx, state = run.args, run.ctx, run.state
    metrics = {
        "updates": state["updates"],
        "final_test_acc": state["history"][-1]["test_acc"] if state["history"] else None,
        "best_test_acc": state["best_test_acc"],
        "final_batch_size": args.batch_size * run.controller.large_ratio * ctx.world_size,
        "epochs": state["epoch"],
        "wall_time": state["elapsed"],
        "world_size": ctx.world_size,
        "checkpoint": os.path.abspath(args.save),
        "eigenvalues": [r["eigenvalue"] for r in state["history"]],
    }
    if ctx.is_main:
        if run.epochs_run == 0 and os.path.abspath(args.save) != os.path.abspath(args.resume or args.save):
            _save(run)  # resumed with nothing left to train, to a new --save: write it there as promised
        write_json(os.path.join(run.out_dir, "metrics.json"), metrics)
        if run.tracker is not None and run.tracker.history:
            try:
                run.tracker.plot(
                    os.path.join(run.out_dir, "eigen_history.png"),
                    lr_decay_epochs=_first_epochs_at_decayed_rates(args),
                    title=f"{canonical_arch(args.arch)} on {args.name}: top Hessian eigenvalue ({args.eigen_type})",
                )
            except ImportError as exc:
                run.say(f"(no plot: {exc})")
        run.say(
            f"done: {state['updates']} updates, final test acc {_fmt(metrics['final_test_acc'], '.3f')}, "
            f"best {_fmt(metrics['best_test_acc'], '.3f')}, checkpoint {args.save}"
        )
    return metrics


def _make_tracker(args, criterion, plain_set, test_set, ctx):
    """The per-epoch eigenvalue tracker (train_resnet.py and --track-eigen)."""
    source = plain_set if args.eig_data == "train" else test_set
    common = dict(criterion=criterion, method="power", max_iter=args.eig_max_iter, tol=args.eig_tol, seed=args.seed)
    common["out_dir"] = args.out_dir if ctx.is_main else None  # the tracker rewrites its files each epoch
    if args.eigen_type == "approximate":
        # a one-batch "loader", so that under torchrun the ranks' shards of the batch are summed
        return EigenTracker(dataloader=[_hessian_batch(source, args.hessian_batch_size, args.seed, ctx)], **common)
    # --eig-batches N: the first N batches of the whole set whatever the world size, so shard those samples
    # (a rank's shard then has at most N batches: num_batches never cuts it, and stays in the config)
    n = len(source) if args.eig_batches is None else min(len(source), args.eig_batches * args.hessian_batch_size)
    part = torch.utils.data.Subset(source, range(n)[shard(n, ctx.rank, ctx.world_size)])
    return EigenTracker(dataloader=_loader(part, args.hessian_batch_size), num_batches=args.eig_batches, **common)


cli = _cli.entry_point(main, parse_args)

if __name__ == "__main__":
    sys.exit(cli())
