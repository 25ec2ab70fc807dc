"""Hessian analysis of a trained model: top eigenvalues, trace, spectral density, per-layer curvature and the
loss landscape along the top eigenvectors.

HessianFlow's hessian_eig_driver.py, with its flags. Usage::

    python hessian_eig_driver.py --name cifar10 --arch c1 --resume model_param.pkl --eigen-type full
    python hessian_eig_driver.py --resume runs/model_param.pkl --top-k 5 --trace --density --json eig.json
    python hessian_eig_driver.py --resume runs/model_param.pkl --per-layer --landscape 2 --out-dir figures
    python hessian_eig_driver.py --resume runs/model_param.pkl --which SA --operator ggn --data test
    python hessian_eig_driver.py --resume legacy.pkl --arch ResNet --depth 20 --name cifar100   # bare state_dict
    python hessian_eig_driver.py --resume ckpt.pkl --name synthetic --synthetic-train 512 --eigen-type full
    torchrun --nproc_per_node 4 hessian_eig_driver.py --resume runs/model_param.pkl --eigen-type full --trace

Checkpoints of train.py / train_resnet.py carry the model and the data set and need no other flag.
HessianFlow's own files (a bare ``torch.save(model.state_dict())``, with or without DataParallel's
``module.`` prefix) need ``--arch`` (and ``--depth`` for a ResNet, else it is read off the state_dict);
the class count and input shape come from ``--name`` (default cifar10). Files are always loaded with
``torch.load(weights_only=True)``: a checkpoint that would run code when unpickled is refused.

``--eigen-type approximate`` (default) uses one batch of ``--hessian-batch-size`` un-augmented samples
drawn with ``--seed`` (the same batch train.py tracks for the same seed and data); ``full`` the whole
split, or its first ``--num-batches`` batches of ``--hessian-batch-size``. The Hessian is that of the mean
cross-entropy loss in eval mode (BatchNorm running statistics), as in train.py's tracking.

Under ``torchrun`` the processes split the analysed samples (gloo on CPUs, NCCL with one GPU per
process): each takes a contiguous share of the samples one process would use (``full``), or of the
approximate batch, and every curvature product, loss and landscape point is summed over the processes,
so the numbers are those of one process up to the order of the sums, and the same on every process
(the solvers draw the same random vectors from ``--seed``). Rank 0 alone prints and writes.

Figures go to ``--out-dir`` (default: the checkpoint's directory); ``--json`` writes every number printed
plus the settings and versions. Exit status: 0 done, 2 a user error (bad flag, unusable checkpoint,
missing data), 3 a NaN/Inf loss or curvature (under torchrun, which reports any failing process: 1).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
import time
import warnings

import torch
from torch import nn

from ..checkpoint import CheckpointError, check_writable_dir, extract_state_dict, load_checkpoint, versions
from ..models import ARCHS, canonical_arch, get_model
from . import common as _cli

CHECKPOINT_FORMAT = "hessianflow.checkpoint/1"
# Lanczos's relative residual tolerance: the library's 1e-6 is within a few ulps of what float32 products
# can resolve (about 100 eps ~ 1e-5), so it may never be met; 1e-4 still gives eigenvalues to ~1e-8.
LANCZOS_TOL = 1e-4

#: Defaults of HessianFlow's driver where it had the flag (seed 1, batch 128), else of the library.
DEFAULTS = {
    "hessian_batch_size": 128,
    "seed": 1,
    "trace_matvecs": 100,
    "density_runs": 10,
    "density_steps": 90,
    "landscape_radius": 1.0,
    "landscape_points": 21,
}


def build_parser() -> argparse.ArgumentParser:
    d = DEFAULTS
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0].replace("\n", " "),
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="\n\n".join(__doc__.split("\n\n")[1:]),
    )
    _cli.add_version_flag(p)
    _cli.add_data_args(p, name_default=None)
    for action in p._actions:
        if action.dest == "name":
            action.help = "data set (default: the checkpoint's; cifar10 for a bare state_dict)"
        if action.dest in ("synthetic_train", "synthetic_test"):
            action.help += "; a train.py checkpoint on synthetic data defaults to its own sizes"
    g = p.add_argument_group("checkpoint and model")
    g.add_argument("--resume", type=str, required=True, help="the checkpoint (train.py format, or a bare state_dict)")
    g.add_argument(
        "--arch",
        type=_cli.choice_ci(ARCHS),
        default=None,
        help=f"model of a bare state_dict: {', '.join(ARCHS)} (default: the checkpoint's; must match it if given)",
    )
    g.add_argument(
        "--depth",
        type=_cli.positive_int,
        default=None,
        help="ResNet depth 6n+2 of a bare state_dict (default: the checkpoint's, or read off the state_dict)",
    )
    g = p.add_argument_group("what to compute on")
    g.add_argument(
        "--eigen-type",
        type=_cli.choice_ci(("approximate", "full")),
        default="approximate",
        help="approximate: one batch of --hessian-batch-size samples drawn with --seed; "
        "full: the whole split (or its first --num-batches batches) (default: approximate)",
    )
    g.add_argument(
        "--data",
        type=_cli.choice_ci(("train", "test")),
        default="train",
        help="the split: train (un-augmented) or test (default: train)",
    )
    g.add_argument(
        "--hessian-batch-size",
        type=_cli.positive_int,
        default=d["hessian_batch_size"],
        help=f"samples of the approximate batch; full: the loader's batch size (default: {d['hessian_batch_size']})",
    )
    g.add_argument(
        "--num-batches",
        type=_cli.positive_int,
        default=None,
        help="full only: use the first N batches of the split (default: all)",
    )
    g.add_argument(
        "--operator",
        type=_cli.choice_ci(("hessian", "ggn")),
        default="hessian",
        help="hessian, or ggn: the generalised Gauss-Newton matrix, positive semi-definite (default: hessian)",
    )
    g = p.add_argument_group("eigenvalues")
    g.add_argument("--top-k", type=_cli.positive_int, default=1, help="number of eigenvalues (default: 1)")
    g.add_argument(
        "--method",
        type=_cli.choice_ci(("lanczos", "power")),
        default="lanczos",
        help="lanczos, or power: HessianFlow's power iteration (largest magnitude) (default: lanczos)",
    )
    g.add_argument(
        "--which",
        type=_cli.choice_ci(("LA", "SA")),
        default="LA",
        help="LA: the largest eigenvalues, SA: the smallest (most negative); lanczos only (default: LA)",
    )
    g.add_argument(
        "--start",
        type=_cli.choice_ci(("random", "gradient")),
        default="random",
        help="start vector: random (from --seed), or gradient: the loss gradient plus 1%% of a random vector "
        "(top-1 of a ResNet-20 in 5 products instead of 7-9, benchmarks/README.md) (default: random)",
    )
    g.add_argument(
        "--criterion",
        type=_cli.choice_ci(("residual", "eigenvalue")),
        default="residual",
        help="lanczos: what --tol bounds: residual (eigenvectors too), or eigenvalue: each eigenvalue's "
        "relative error (Kato-Temple bound; fewer products) (default: residual)",
    )
    g.add_argument(
        "--tol",
        type=_cli.positive_float,
        default=None,
        help="lanczos: relative residual tolerance (default 1e-4: float32 products carry rounding near 1e-6, "
        "and the eigenvalue error is about tol^2 for a separated eigenvalue); power: relative change "
        "(default 1e-3, HessianFlow's)",
    )
    g.add_argument(
        "--max-iter",
        type=_cli.positive_int,
        default=None,
        help="lanczos: total products (default: lanczos's own, max(150, 30k)); power: products per eigenvalue "
        "(default 100, PyHessian's)",
    )
    g = p.add_argument_group("more analyses")
    g.add_argument("--trace", action="store_true", default=False, help="estimate the trace (with a standard error)")
    g.add_argument(
        "--trace-matvecs",
        type=_cli.positive_int,
        default=d["trace_matvecs"],
        help=f"products per trace estimate, also for --per-layer; at least 4 (default: {d['trace_matvecs']})",
    )
    g.add_argument(
        "--density",
        action="store_true",
        default=False,
        help="spectral density by stochastic Lanczos quadrature, plotted on a log scale (PNG)",
    )
    g.add_argument(
        "--density-runs",
        type=_cli.positive_int,
        default=d["density_runs"],
        help=f"SLQ start vectors (default: {d['density_runs']})",
    )
    g.add_argument(
        "--density-steps",
        type=_cli.positive_int,
        default=d["density_steps"],
        help=f"Lanczos steps per SLQ run (default: {d['density_steps']}, Ghorbani et al. 2019)",
    )
    g.add_argument(
        "--per-layer",
        action="store_true",
        default=False,
        help="top eigenvalue and trace of each layer's diagonal block: a table and a bar plot (PNG)",
    )
    g.add_argument(
        "--layers",
        type=str,
        nargs="+",
        default=None,
        help="per-layer: only the layers named or under these prefixes, e.g. layer3 fc (default: all)",
    )
    g.add_argument(
        "--exact-threshold",
        type=_cli.nonneg_int,
        default=1500,
        help="per-layer: blocks of at most this many parameters are formed densely and diagonalised exactly; "
        "larger ones use lanczos and a trace estimate (default: 1500)",
    )
    g.add_argument(
        "--landscape",
        type=int,
        choices=(1, 2),
        default=None,
        help="loss along the top eigenvector (1: curve) or the top two (2: surface), PNG (default: off)",
    )
    g.add_argument(
        "--landscape-radius",
        type=_cli.positive_float,
        default=d["landscape_radius"],
        help=f"steps from -R to R along the unit eigenvectors, in parameter units (default: {d['landscape_radius']})",
    )
    g.add_argument(
        "--landscape-points",
        type=_cli.positive_int,
        default=d["landscape_points"],
        help=f"points per direction, at least 3; odd includes 0 (default: {d['landscape_points']})",
    )
    g = p.add_argument_group("output and run")
    g.add_argument("--json", type=str, default=None, help="write every number, the settings and versions here")
    g.add_argument("--out-dir", type=str, default=None, help="directory for figures (default: the checkpoint's)")
    _cli.add_device_arg(p)
    g.add_argument(
        "--seed",
        type=int,
        default=d["seed"],
        help="draws the approximate batch and seeds every solver (and the data of a bare state_dict "
        f"on --name synthetic) (default: {d['seed']})",
    )
    g.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="tqdm progress bars (default: when stderr is a terminal)",
    )
    return p


def validate(parser: argparse.ArgumentParser, args) -> argparse.Namespace:
    """Checks that need several flags at once; every failure is ``parser.error`` (exit 2)."""
    if args.method == "power" and args.which != "LA":
        parser.error("argument --which: power iteration finds the largest-magnitude eigenvalues; use --method lanczos")
    if args.max_iter is not None and args.method == "lanczos" and args.max_iter < args.top_k:
        parser.error(f"argument --max-iter: lanczos needs at least --top-k = {args.top_k} products")
    if args.trace_matvecs < 4 and (args.trace or args.per_layer):
        parser.error(f"argument --trace-matvecs: at least 4 products are needed, got {args.trace_matvecs}")
    if (args.layers is not None or args.exact_threshold != 1500) and not args.per_layer:
        parser.error("--layers/--exact-threshold apply to --per-layer only")
    if args.landscape_points < 3:
        parser.error(f"argument --landscape-points: at least 3 points are needed, got {args.landscape_points}")
    if args.num_batches is not None and args.eigen_type != "full":
        parser.error("argument --num-batches: applies to --eigen-type full only")
    if args.depth is not None and (args.depth < 8 or (args.depth - 2) % 6):
        parser.error(f"argument --depth: the CIFAR ResNet has depth 6n+2 (8, 14, 20, 32, ...), got {args.depth}")
    if args.depth is not None and args.arch is not None and args.arch != "ResNet":
        parser.error(f"argument --depth: only ResNet has a depth, not --arch {args.arch}")
    if args.name is not None and args.name != "synthetic" and (args.synthetic_train or args.synthetic_test):
        parser.error("--synthetic-train/--synthetic-test apply to --name synthetic only")
    _cli.check_device(parser, args.device)
    return args


def parse_args(argv=None) -> argparse.Namespace:
    parser = build_parser()
    return validate(parser, parser.parse_args(argv))


# -- loading ---------------------------------------------------------------------------------------------


def _resnet_depth_of(state) -> int | None:
    """The depth 6n+2 of a CIFAR ResNet state_dict, from the number of blocks in its first stage."""
    blocks = {int(m.group(1)) for k in state for m in [re.match(r"layer1\.(\d+)\.", k)] if m}
    return 6 * (max(blocks) + 1) + 2 if blocks else None


def _select_blocks(model, prefixes):
    """The layer blocks named by ``--layers`` (a name or a prefix ending at a dot), all when None."""
    from ..analysis import layer_blocks

    blocks = layer_blocks(model)
    if prefixes is None:
        return blocks
    chosen = [(n, ps) for n, ps in blocks if any(n == p or n.startswith(p.rstrip(".") + ".") for p in prefixes)]
    unknown = [p for p in prefixes if not any(n == p or n.startswith(p.rstrip(".") + ".") for n, _ in blocks)]
    if unknown:
        names = ", ".join(n for n, _ in blocks[:8]) + (", ..." if len(blocks) > 8 else "")
        raise _cli.UsageError(f"--layers {' '.join(unknown)}: no such layer; the model's layers are {names}")
    return chosen


def _model_desc(arch: str, depth) -> str:
    return f"ResNet-{depth}" if arch == "ResNet" else arch


def load_model(args, log):
    """The model of ``args.resume`` and what is known about it.

    Returns ``(model, meta)``; ``meta`` has ``arch``, ``depth``, ``num_classes``, ``in_channels``,
    ``input_size``, ``dataset`` (None for a bare state_dict), ``kind``, ``epoch``, ``train_args`` and
    ``versions``.
    """
    from ..data import dataset_info

    path = args.resume
    ckpt = load_checkpoint(path)  # CheckpointError: missing, corrupt, code-carrying
    full = isinstance(ckpt, dict) and "format" in ckpt
    if full and ckpt["format"] != CHECKPOINT_FORMAT:
        raise CheckpointError(
            f"cannot load checkpoint {path}: unknown format {ckpt['format']!r} (this version reads {CHECKPOINT_FORMAT})"
        )
    state = extract_state_dict(ckpt)
    if full:
        need = {"arch": str, "num_classes": int, "in_channels": int, "dataset": str}
        bad = [k for k, t in need.items() if not isinstance(ckpt.get(k), t)]
        if bad:
            raise CheckpointError(f"cannot load checkpoint {path}: its model description lacks {', '.join(bad)}")
        arch = canonical_arch(ckpt["arch"])
        depth = ckpt.get("depth") if arch == "ResNet" else None
        if args.arch is not None and args.arch != arch:
            raise _cli.UsageError(
                f"--arch {args.arch} does not match {path}, which holds a {_model_desc(arch, depth)} "
                "(--arch is only needed for a bare state_dict; leave it out)"
            )
        if args.depth is not None and arch != "ResNet":
            raise _cli.UsageError(f"--depth applies to ResNet only; {path} holds a {arch}")
        if args.depth is not None and arch == "ResNet" and args.depth != depth:
            raise _cli.UsageError(
                f"--depth {args.depth} does not match {path}, which holds a ResNet-{depth} "
                "(--depth is only needed for a bare state_dict; leave it out)"
            )
        meta = {
            "kind": "train.py checkpoint",
            "arch": arch,
            "depth": depth,
            "num_classes": ckpt["num_classes"],
            "in_channels": ckpt["in_channels"],
            "input_size": ckpt.get("input_size", 32),
            "dataset": ckpt["dataset"],
            "epoch": ckpt.get("epoch"),
            "train_args": ckpt.get("args") if isinstance(ckpt.get("args"), dict) else {},
            "versions": ckpt.get("versions"),
        }
    else:
        if args.arch is None:
            raise _cli.UsageError(
                f"{path} is a bare state_dict without a model description: pass --arch ({', '.join(ARCHS)}) "
                "and --name for the data set it was trained on"
            )
        arch = args.arch
        depth = None
        if arch == "ResNet":
            depth = args.depth
            if depth is None:
                depth = _resnet_depth_of(state) or 20
                log(f"note: --depth not given; ResNet-{depth} read off the state_dict")
        name = args.name or "cifar10"
        if name != "synthetic" and _cli.synthetic_kwargs(args):
            raise _cli.UsageError("--synthetic-train/--synthetic-test apply to --name synthetic only")
        info = dataset_info(name, **_cli.synthetic_kwargs(args))
        meta = {
            "kind": "bare state_dict",
            "arch": arch,
            "depth": depth,
            "num_classes": info.num_classes,
            "in_channels": info.in_channels,
            "input_size": info.input_size,
            "dataset": None,
            "epoch": None,
            "train_args": {},
            "versions": None,
        }
    model = get_model(
        meta["arch"],
        depth=meta["depth"] or 20,
        num_classes=meta["num_classes"],
        in_channels=meta["in_channels"],
        input_size=meta["input_size"],
    )
    desc = f"a {_model_desc(meta['arch'], meta['depth'])} with {meta['num_classes']} classes"
    hint = (
        "the checkpoint's own description is inconsistent with its weights"
        if full
        else "check --arch, --depth and --name"
    )
    _cli.load_state_into(model, state, path, desc, hint)
    return model, meta


def load_data(args, meta, log, ctx=None):
    """The batch or loader to analyse, and a description of it (of all processes' samples together).

    Under torchrun (``ctx`` of more than one process) each rank gets a one-batch list or a loader over its
    contiguous shard of the samples one process would analyse, which the operators and the landscape
    then sum over the ranks.
    """
    from ..data import dataset_info, fixed_batch, get_datasets, subset_loader
    from ..distributed import shard

    rank, world = (0, 1) if ctx is None else (ctx.rank, ctx.world_size)

    ckpt_set = meta["dataset"]
    name = args.name or ckpt_set or "cifar10"
    synth = _cli.synthetic_kwargs(args)
    data_seed = args.seed
    if name == "synthetic" and ckpt_set == "synthetic":
        # regenerate the very data the model was trained on: its sizes and seed are in the checkpoint
        saved = meta["train_args"]
        for key, flag in (("num_train", "synthetic_train"), ("num_test", "synthetic_test")):
            if key not in synth and isinstance(saved.get(flag), int):
                synth[key] = saved[flag]
        if isinstance(saved.get("seed"), int):
            data_seed = saved["seed"]
    if name != "synthetic" and synth:
        raise _cli.UsageError("--synthetic-train/--synthetic-test apply to --name synthetic only")
    info = dataset_info(name, **synth)
    if ckpt_set is not None and name != ckpt_set:
        ours = (info.num_classes, info.in_channels, info.input_size)
        theirs = (meta["num_classes"], meta["in_channels"], meta["input_size"])
        if ours != theirs:
            raise _cli.UsageError(
                f"--name {name} ({ours[0]} classes, {ours[1]}x{ours[2]}x{ours[2]} inputs) does not fit the model of "
                f"{args.resume}, trained on {ckpt_set} ({theirs[0]} classes, {theirs[1]}x{theirs[2]}x{theirs[2]})"
            )
        log(f"note: analysing on {name} a model trained on {ckpt_set}")
    _, plain, test = _cli.rank_zero_first(
        ctx,
        world > 1 and args.download and name != "synthetic",  # --download under torchrun
        lambda: get_datasets(
            name, data_dir=args.data_dir, download=args.download, augment=False, seed=data_seed, **synth
        ),
    )
    dataset = plain if args.data == "train" else test
    n = len(dataset)
    bs = args.hessian_batch_size
    if args.eigen_type == "approximate":
        if bs > n:
            raise _cli.UsageError(f"--hessian-batch-size {bs} exceeds the {n} samples of {name} {args.data}")
        batch = fixed_batch(dataset, bs, seed=args.seed)
        desc = {"num_samples": bs, "batch_size": bs, "num_batches": 1}
        if world > 1:
            # a one-batch "loader": the operators and the landscape then sum the ranks' shards of it
            part = shard(bs, rank, world)
            return name, {"dataloader": [(batch[0][part], batch[1][part])]}, desc, info
        return name, {"data": batch}, desc, info
    if args.num_batches is not None and args.num_batches * bs > n:
        raise _cli.UsageError(
            f"--num-batches {args.num_batches} x --hessian-batch-size {bs} exceeds the {n} samples "
            f"of {name} {args.data}"
        )
    count = n if args.num_batches is None else args.num_batches * bs
    if world > 1:
        # the first `count` samples whatever the number of processes; each rank takes its contiguous share
        # (so a rank holds at most --num-batches batches, the last one maybe partial)
        part = torch.utils.data.Subset(dataset, range(count)[shard(count, rank, world)])
        loader = subset_loader(part, bs, num_workers=args.num_workers)
    else:
        loader = subset_loader(dataset, bs, num_batches=args.num_batches, num_workers=args.num_workers)
    desc = {"num_samples": count, "batch_size": bs, "num_batches": math.ceil(count / bs)}
    return name, {"dataloader": loader}, desc, info


# -- output helpers ----------------------------------------------------------------------------------------


def _num(x) -> str:
    """How every number is printed: 8 significant digits (the JSON holds the same value, unrounded)."""
    if x is None:
        return "-"
    return format(float(x), ".8g")


def _plain(obj):
    """JSON-ready: tensors to lists, NaN/Inf to None, tuples to lists."""
    if isinstance(obj, torch.Tensor):
        return _plain(obj.detach().cpu().tolist())
    if isinstance(obj, dict):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def _write_json(path: str, obj) -> str:
    path = os.path.abspath(path)
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(_plain(obj), f, indent=2, allow_nan=False)
        f.write("\n")
    os.replace(tmp, path)
    return path


def _numbers(obj, skip=("seconds", "settings", "versions", "checkpoint")) -> list[float]:
    """Every number of a result (tensors flattened, booleans as 0/1), in a fixed order; timings and
    the recorded settings left out: what every process must agree on."""
    if isinstance(obj, torch.Tensor):
        return [float(x) for x in obj.detach().cpu().reshape(-1).tolist()]
    if isinstance(obj, dict):
        return [x for k, v in obj.items() if k not in skip for x in _numbers(v, skip)]
    if isinstance(obj, (list, tuple)):
        return [x for v in obj for x in _numbers(v, skip)]
    if isinstance(obj, (bool, int, float)):
        return [float(obj)]
    return []


def _table(header, rows) -> list[str]:
    """Left-aligned first column, right-aligned others."""
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    fmt = lambda r: "  ".join(  # noqa: E731
        str(c).ljust(w) if i == 0 else str(c).rjust(w) for i, (c, w) in enumerate(zip(r, widths))
    )
    return [fmt(header), *[fmt(r) for r in rows]]


# -- main --------------------------------------------------------------------------------------------------


def main(args) -> dict:
    """Run the analyses asked for by ``args`` (from :func:`parse_args`); return every number as a dict.

    Started by torchrun, the processes share the work and return the same numbers (rank 0 alone prints
    and writes the files).
    """
    from ..distributed import init_distributed

    ctx = init_distributed(args.device)
    try:
        if ctx.is_main:
            return _main(args, ctx)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the collective computations warn alike on every rank: rank 0 speaks
            return _main(args, ctx)
    finally:
        ctx.close()


def _main(args, ctx) -> dict:
    from ..analysis import loss_landscape, per_layer
    from ..density import spectral_density
    from ..eigen import ConvergenceWarning, lanczos, power_iteration
    from ..operators import GGNOperator, HessianOperator
    from ..trace import trace

    t_start = time.time()
    progress = (sys.stderr.isatty() if args.progress is None else args.progress) and ctx.is_main
    lines: list[str] = []

    def log(text=""):
        if ctx.is_main:
            print(text, flush=True)
        lines.append(text)

    warned: list[str] = []

    def warn(text):
        log(f"WARNING: {text}")
        warned.append(text)

    # Fail on an unusable output before any work (every rank checks, so that every rank stops).
    figures_wanted = args.density or args.per_layer or args.landscape
    out_dir = args.out_dir or os.path.dirname(os.path.abspath(args.resume))
    if figures_wanted:
        out_dir = check_writable_dir(out_dir)
    if args.json is not None:
        json_dir = os.path.dirname(os.path.abspath(args.json))
        if not os.path.isdir(json_dir):
            raise _cli.UsageError(f"--json {args.json}: the directory {json_dir} does not exist")
        check_writable_dir(json_dir)
    if figures_wanted:
        try:
            import matplotlib  # noqa: F401
        except ImportError as exc:
            raise _cli.UsageError("--density/--per-layer/--landscape need matplotlib: pip install matplotlib") from exc

    device = ctx.device
    model, meta = load_model(args, log)
    model = model.to(device).eval()
    name, source, data_desc, _ = load_data(args, meta, log, ctx)
    criterion = nn.CrossEntropyLoss()
    num_params = sum(p.numel() for p in model.parameters())
    mdesc = _model_desc(meta["arch"], meta["depth"])
    ckpt_name = os.path.basename(args.resume)
    split = f"{name} {args.data}" + (" (un-augmented)" if args.data == "train" else "")
    if args.eigen_type == "approximate":
        data_line = f"{split}, approximate: one batch of {data_desc['num_samples']} samples drawn with seed {args.seed}"
    else:
        data_line = (
            f"{split}, full: {data_desc['num_samples']} samples in {data_desc['num_batches']} batches "
            f"of {data_desc['batch_size']}"
        )
    origin = meta["kind"] + (f", epoch {meta['epoch']}" if meta["epoch"] is not None else "")
    op_name = "Hessian" if args.operator == "hessian" else "generalised Gauss-Newton matrix"
    log(f"checkpoint  {os.path.abspath(args.resume)} ({origin})")
    log(f"model       {mdesc}, {meta['num_classes']} classes, {num_params:,} parameters")
    log(f"data        {data_line}")
    procs = f", {ctx.world_size} processes sharing the samples" if ctx.enabled else ""
    log(f"operator    {op_name} of the mean cross-entropy loss, eval mode, {device}{procs}")
    title = f"{mdesc} · {name} {args.data} · {ckpt_name}"
    subtitle = (
        f"{'GGN' if args.operator == 'ggn' else 'Hessian'}, {args.eigen_type}: "
        f"{data_desc['num_samples']} samples, seed {args.seed}"
    )

    # the loss and accuracy on the analysed data: a check that the weights are the trained ones
    with torch.no_grad():
        batches = [source["data"]] if "data" in source else source["dataloader"]
        total = correct = count = 0
        for x, y in batches:
            if x.shape[0] == 0:  # an empty shard (fewer samples than processes)
                continue
            x, y = x.to(device), y.to(device)
            out = model(x)
            total += float(criterion(out, y)) * x.shape[0]
            correct += int((out.argmax(1) == y).sum())
            count += x.shape[0]
    if ctx.enabled:
        sums = torch.tensor([total, correct, count], dtype=torch.float64, device=device)
        torch.distributed.all_reduce(sums)
        total, correct, count = sums[0].item(), int(sums[1].item()), int(sums[2].item())
    loss_value, accuracy = total / count, correct / count
    if not math.isfinite(loss_value):
        from ..linop import NonFiniteError

        raise NonFiniteError(f"the loss on the analysed data is {loss_value}: the checkpoint's weights are broken")
    log(f"loss        {_num(loss_value)} (accuracy {_num(accuracy)}) on the analysed data")

    Op = HessianOperator if args.operator == "hessian" else GGNOperator
    op = Op(model, criterion, progress=progress, **source)
    result = {
        "settings": {k: v for k, v in vars(args).items()},
        "versions": versions(),
        "checkpoint": {
            "path": os.path.abspath(args.resume),
            "kind": meta["kind"],
            "epoch": meta["epoch"],
            "dataset": meta["dataset"],
            "versions": meta["versions"],
        },
        "model": {
            "arch": meta["arch"],
            "depth": meta["depth"],
            "description": mdesc,
            "num_classes": meta["num_classes"],
            "in_channels": meta["in_channels"],
            "input_size": meta["input_size"],
            "num_parameters": num_params,
        },
        "data": {"name": name, "split": args.data, "eigen_type": args.eigen_type, "seed": args.seed, **data_desc},
        "operator": {"type": args.operator, "size": op.size, "mode": "eval", "device": str(device)},
        "world_size": ctx.world_size,
        "loss": loss_value,
        "accuracy": accuracy,
    }
    seconds = {}

    # -- eigenvalues ---------------------------------------------------------------------------------
    k = args.top_k
    if args.landscape and args.landscape > k:
        k = args.landscape
        log(f"note: --landscape {args.landscape} needs the top {k} eigenvectors; computing k = {k}")
    if k > op.size:
        raise _cli.UsageError(f"--top-k {k} exceeds the {op.size} parameters")
    t0 = time.time()
    v0 = "gradient" if args.start == "gradient" else None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ConvergenceWarning)
        if args.method == "lanczos":
            tol = LANCZOS_TOL if args.tol is None else args.tol
            eig = lanczos(
                op, k=k, which=args.which, max_iter=args.max_iter, tol=tol, seed=args.seed, progress=progress, v0=v0,
                criterion=args.criterion,
            )  # fmt: skip
            max_iter = args.max_iter  # None: lanczos's own default budget
        else:
            tol = 1e-3 if args.tol is None else args.tol
            max_iter = 100 if args.max_iter is None else args.max_iter
            eig = power_iteration(op, k=k, max_iter=max_iter, tol=tol, seed=args.seed, progress=progress, v0=v0)
    for w in caught:
        if not issubclass(w.category, ConvergenceWarning):
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    seconds["eigen"] = time.time() - t0
    which = args.which if args.method == "lanczos" else "LM"
    what = {"LA": "largest", "SA": "smallest", "LM": "largest-magnitude"}[which]
    log()
    log(
        f"eigenvalues {args.method}, the {k} {what} ({which}), tol {tol:g}, "
        f"max-iter {'default' if max_iter is None else max_iter}: "
        f"{eig.num_matvecs} products, {seconds['eigen']:.1f} s"
    )
    rows = [
        (str(i + 1), _num(v), format(float(r), ".2e"), "yes" if c else "NO")
        for i, (v, r, c) in enumerate(zip(eig.eigenvalues.tolist(), eig.residuals.tolist(), eig.converged.tolist()))
    ]
    for line in _table(("i", "eigenvalue", "residual", "converged"), rows):
        log("  " + line)
    if not eig.all_converged:
        bad = [i + 1 for i, c in enumerate(eig.converged.tolist()) if not c]
        warn(
            f"{args.method} did not converge for eigenvalue(s) {bad} within {eig.num_matvecs} products "
            f"(tol {tol:g}); the values are estimates: raise --max-iter or loosen --tol"
        )
    result["eigen"] = {
        **eig.to_dict(),
        "which": which,
        "tol": tol,
        "max_iter": max_iter,
        "all_converged": eig.all_converged,
        "seconds": seconds["eigen"],
    }
    figures = {}

    # -- trace ---------------------------------------------------------------------------------------
    if args.trace:
        t0 = time.time()
        tr = trace(op, num_matvecs=args.trace_matvecs, seed=args.seed + 1)
        seconds["trace"] = time.time() - t0
        log(
            f"trace       {_num(tr.estimate)} ± {_num(tr.stderr)} (standard error; {tr.method}, "
            f"{tr.num_matvecs} products, {seconds['trace']:.1f} s)"
        )
        result["trace"] = {**tr.to_dict(), "seconds": seconds["trace"]}

    stem = os.path.splitext(ckpt_name)[0]
    tag = f"{args.operator}_{args.eigen_type}-{args.data}"

    def figure_path(what):
        return os.path.join(out_dir, f"{stem}_{tag}_{what}.png")

    def draw(plot, *plot_args, path, **plot_kwargs):
        """Rank 0 draws; the others return the path it writes, as the plot functions do."""
        return plot(*plot_args, path=path, **plot_kwargs) if ctx.is_main else path

    # -- density -------------------------------------------------------------------------------------
    if args.density:
        from ..plotting import plot_density

        t0 = time.time()
        dens = spectral_density(
            op, num_runs=args.density_runs, num_steps=args.density_steps, seed=args.seed + 2, progress=progress
        )
        seconds["density"] = time.time() - t0
        lo, hi = dens.support()
        path = draw(
            plot_density, dens, path=figure_path("density"), title=title,
            subtitle=f"{subtitle}; SLQ {args.density_runs} runs x {args.density_steps} steps",
        )  # fmt: skip
        figures["density"] = path
        log(
            f"density     SLQ {dens.num_runs} runs x {args.density_steps} steps ({dens.num_matvecs} products, "
            f"{seconds['density']:.1f} s): support [{_num(lo)}, {_num(hi)}], trace estimate "
            f"{_num(dens.trace_estimate())}"
        )
        result["density"] = {
            **dens.to_dict(),
            "num_runs": dens.num_runs,
            "num_steps": args.density_steps,
            "support": [lo, hi],
            "trace_estimate": dens.trace_estimate(),
            "figure": path,
            "seconds": seconds["density"],
        }

    # -- per layer -----------------------------------------------------------------------------------
    if args.per_layer:
        from ..plotting import plot_per_layer

        blocks = _select_blocks(model, args.layers)
        t0 = time.time()
        op.release()  # its reused graph is not needed while the blocks are computed
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", ConvergenceWarning)
            layers = per_layer(
                model, criterion, **source, top_k=1, trace_matvecs=args.trace_matvecs, seed=args.seed + 3,
                tol=LANCZOS_TOL if args.tol is None or args.method != "lanczos" else args.tol,
                max_iter=args.max_iter if args.method == "lanczos" else None,
                exact_threshold=args.exact_threshold, operator=args.operator, blocks=blocks, progress=progress,
            )  # fmt: skip
        seconds["per_layer"] = time.time() - t0
        log()
        log(f"per layer   top eigenvalue and trace of each layer's diagonal block ({seconds['per_layer']:.1f} s)")
        rows = []
        for r in layers:
            rows.append(
                (
                    r.name,
                    f"{r.size:,}",
                    _num(r.eigenvalue) + ("" if r.all_converged else " (!)"),
                    _num(r.trace),
                    "exact" if r.exact else f"± {_num(r.trace_stderr)}",
                    str(r.num_matvecs),
                )
            )
        for line in _table(("layer", "params", "top eigenvalue", "trace", "stderr", "products"), rows):
            log("  " + line)
        total = sum(r.trace for r in layers)
        total_se = math.sqrt(sum(r.trace_stderr**2 for r in layers))
        log(f"  sum of the block traces = trace of the whole {args.operator}: {_num(total)} ± {_num(total_se)}")
        bad = [r.name for r in layers if not r.all_converged]
        if bad:
            warn(f"per-layer lanczos did not converge for {', '.join(bad)} (marked (!))")
        path = draw(
            plot_per_layer, [r.name for r in layers], [r.eigenvalue for r in layers], [r.trace for r in layers],
            path=figure_path("per_layer"), title=title, subtitle=subtitle,
        )  # fmt: skip
        figures["per_layer"] = path
        result["per_layer"] = {
            "layers": [r.to_dict() for r in layers],
            "trace_sum": total,
            "trace_sum_stderr": total_se,
            "figure": path,
            "seconds": seconds["per_layer"],
        }

    # -- landscape -----------------------------------------------------------------------------------
    if args.landscape:
        from ..plotting import plot_landscape_1d, plot_landscape_2d

        t0 = time.time()
        op.release()
        r, m = args.landscape_radius, args.landscape_points
        alphas = torch.linspace(-r, r, m, dtype=torch.float64)
        dirs = eig.eigenvectors[:, : args.landscape]
        betas = alphas if args.landscape == 2 else None
        losses = loss_landscape(model, criterion, directions=dirs, alphas=alphas, betas=betas, **source)
        seconds["landscape"] = time.time() - t0
        lam = [float(v) for v in eig.eigenvalues[: args.landscape]]
        if not torch.isfinite(losses).all():
            warn("the loss is not finite at some points of the landscape; lower --landscape-radius")
        elif args.landscape == 1:
            figures["landscape"] = draw(
                plot_landscape_1d, alphas, losses, path=figure_path("landscape1d"), title=title,
                subtitle=f"{subtitle}; v₁ with λ₁ = {_num(lam[0])}",
                xlabel=f"step α along the {what} eigenvector v₁ (θ + α·v₁, ‖v₁‖ = 1)",
            )  # fmt: skip
        else:
            figures["landscape"] = draw(
                plot_landscape_2d, alphas, betas, losses, path=figure_path("landscape2d"), title=title,
                subtitle=f"{subtitle}; {what} eigenvalues λ₁ = {_num(lam[0])}, λ₂ = {_num(lam[1])}",
            )  # fmt: skip
        lo_i = int(torch.argmin(losses))
        log()
        log(
            f"landscape   {args.landscape}-D, {m}{'x' + str(m) if args.landscape == 2 else ''} points in "
            f"[-{_num(r)}, {_num(r)}] along the unit eigenvector(s) of {', '.join(_num(v) for v in lam)} "
            f"({seconds['landscape']:.1f} s): loss {_num(float(losses.min()))} to {_num(float(losses.max()))}"
        )
        result["landscape"] = {
            "dims": args.landscape,
            "radius": r,
            "points": m,
            "eigenvalues": lam,
            "alphas": alphas,
            "betas": betas,
            "losses": losses,
            "min_loss": float(losses.min()),
            "max_loss": float(losses.max()),
            "argmin": lo_i,
            "figure": figures.get("landscape"),
            "seconds": seconds["landscape"],
        }

    op.release()
    seconds["total"] = time.time() - t_start
    result["figures"] = figures
    result["warnings"] = warned
    result["converged"] = eig.all_converged and not any("did not converge" in w for w in warned)
    result["seconds"] = seconds
    log()
    for what, path in figures.items():
        log(f"figure      {what}: {path}")
    if args.json is not None:
        result["json"] = os.path.abspath(args.json)
        log(f"json        {result['json']}")
    log(f"done in {seconds['total']:.1f} s")
    if ctx.enabled:
        # Every rank computed the same collective numbers (a rank that had not would have dead-locked or
        # drifted); check it before rank 0 writes them: a RuntimeError on every rank if not.
        from ..distributed import assert_same_on_all_ranks

        nums = _numbers(result)
        assert_same_on_all_ranks(len(nums), "the number of results")
        assert_same_on_all_ranks(nums, "the results")
    if args.json is not None and ctx.is_main:
        _write_json(args.json, result)
    return result


cli = _cli.entry_point(main, parse_args)

if __name__ == "__main__":
    sys.exit(cli())
