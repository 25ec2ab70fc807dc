"""Hessian analysis of a trained model: top eigenvalues, trace, spectral density, per-layer curvature and the
loss landscape along the top eigenvectors.

HessianFlow's hessian_eig_driver.py, with its flags. Usage::

    python hessian_eig_driver.py --name cifar10 --arch c1 --resume model_param.pkl --eigen-type full
    python hessian_eig_driver.py --resume runs/model_param.pkl --top-k 5 --trace --density --json eig.json
    python hessian_eig_driver.py --resume runs/model_param.pkl --per-layer --landscape 2 --out-dir figures
    python hessian_eig_driver.py --resume runs/model_param.pkl --which SA --operator ggn --data test
    python hessian_eig_driver.py --resume runs/model_param.pkl --compare --compare-k 3 --json eig.json
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
missing data), 3 a NaN/Inf loss or curvature, 4 an I/O failure while writing a figure or the JSON
(under torchrun, which reports any failing process: 1).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
import warnings
from dataclasses import asdict

import torch
from torch import nn

from .._checks import is_int
from ..distributed import is_distributed
from ..io import checkpoint_format as cf
from ..io.checkpoint import check_writable_dir, versions, write_json
from ..io.checkpoint_format import ModelSpec
from ..training.models import ARCHS
from . import common as _cli

# Lanczos's tolerance on each eigenvalue's relative error (its default criterion): float32 products cannot
# certify below about 2.4e-5 relative (200 eps, the solvers' noise floor), so 1e-4 is certifiable.
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
    # the approximation audit: compare_curvatures' own defaults
    "compare_k": 5,
    "compare_kinds": ("ggn", "empirical_fisher", "block_diagonal"),
    "mc_samples": 1,
    "compare_runs": 5,
    "compare_steps": 40,
}


def _add_checkpoint_and_model_flags(p, d) -> None:
    """The 'checkpoint and model' flags."""
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


def _add_what_to_compute_on_flags(p, d) -> None:
    """The 'what to compute on' flags."""
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
        "--micro-batch-size",
        type=_cli.positive_int,
        default=None,
        help="run each batch in chunks of at most N samples, one chunk's graph in memory at a time: the same "
        "matrix with less memory per product (default: whole batches)",
    )
    g.add_argument(
        "--operator",
        type=_cli.choice_ci(("hessian", "ggn")),
        default="hessian",
        help="hessian, or ggn: the generalised Gauss-Newton matrix, positive semi-definite (default: hessian)",
    )


def _add_eigenvalues_flags(p, d) -> None:
    """The 'eigenvalues' flags."""
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
        default="eigenvalue",
        help="lanczos: what --tol bounds: eigenvalue: each eigenvalue's relative error (Kato-Temple bound), or "
        "residual: the relative residual (eigenvectors too; more products) (default: eigenvalue)",
    )
    g.add_argument(
        "--tol",
        type=_cli.positive_float,
        default=None,
        help="lanczos: each eigenvalue's relative error, or the relative residual with --criterion residual "
        "(default 1e-4; float32 products certify no better than ~2.4e-5 relative: below that, converged=False); "
        "power: relative change (default 1e-3, HessianFlow's)",
    )
    g.add_argument(
        "--max-iter",
        type=_cli.positive_int,
        default=None,
        help="lanczos: total products (default: lanczos's own, max(150, 30k)); power: products per eigenvalue "
        "(default 100, PyHessian's)",
    )


def _add_more_analyses_flags(p, d) -> None:
    """The 'more analyses' flags."""
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


def _add_compare_flags(p, d) -> None:
    """The approximation audit's flags."""
    from ..curvature.compare import ALL_KINDS

    g = p.add_argument_group("approximation audit")
    g.add_argument(
        "--compare",
        action="store_true",
        default=False,
        help="compare the GGN, the empirical Fisher and the block-diagonal Hessian with the Hessian "
        "(hessianflow.curvature.compare): top-k eigenvalues and their errors, subspace overlap, trace ratio, "
        "W1 between the spectral densities; a table, the JSON's 'compare' section and a figure (PNG)",
    )
    g.add_argument(
        "--compare-k", type=_cli.positive_int, default=d["compare_k"],
        help=f"--compare: top eigenpairs compared (default: {d['compare_k']})",
    )  # fmt: skip
    g.add_argument(
        "--compare-kinds", type=str, nargs="+", default=list(d["compare_kinds"]),
        choices=[k for k in ALL_KINDS if k != "hessian"],
        help=f"--compare: the kinds compared with the Hessian (default: {' '.join(d['compare_kinds'])})",
    )  # fmt: skip
    g.add_argument(
        "--mc-samples", type=_cli.positive_int, default=d["mc_samples"],
        help=f"--compare: the sampled Fisher's targets drawn per sample (default: {d['mc_samples']})",
    )  # fmt: skip
    g.add_argument(
        "--compare-runs", type=_cli.positive_int, default=d["compare_runs"],
        help=f"--compare: SLQ runs per kind (default: {d['compare_runs']})",
    )  # fmt: skip
    g.add_argument(
        "--compare-steps", type=_cli.positive_int, default=d["compare_steps"],
        help=f"--compare: Lanczos steps per SLQ run (default: {d['compare_steps']})",
    )  # fmt: skip


def _add_output_and_run_flags(p, d) -> None:
    """The 'output and run' flags."""
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


def build_parser() -> argparse.ArgumentParser:
    d = DEFAULTS
    p = _cli.ArgumentParser(
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
    _add_checkpoint_and_model_flags(p, d)
    _add_what_to_compute_on_flags(p, d)
    _add_eigenvalues_flags(p, d)
    _add_more_analyses_flags(p, d)
    _add_compare_flags(p, d)
    _add_output_and_run_flags(p, d)
    return p


def validate(parser: argparse.ArgumentParser, args) -> argparse.Namespace:
    """Checks that need several flags at once; every failure is ``parser.error`` (exit 2)."""
    if args.method == "power" and args.which != "LA":
        parser.error("argument --which: power iteration finds the largest-magnitude eigenvalues; use --method lanczos")
    if args.max_iter is not None and args.method == "lanczos" and args.max_iter < args.top_k:
        parser.error(f"argument --max-iter: lanczos needs at least --top-k = {args.top_k} products")
    if args.trace_matvecs < 4 and (args.trace or args.per_layer):
        parser.error(f"argument --trace-matvecs: at least 4 products are needed, got {args.trace_matvecs}")
    compare_flags = ("compare_k", "compare_kinds", "mc_samples", "compare_runs", "compare_steps")
    if not args.compare and any(getattr(args, f) != parser.get_default(f) for f in compare_flags):
        parser.error("--compare-k/--compare-kinds/--mc-samples/--compare-runs/--compare-steps apply to --compare only")
    if args.compare and args.trace_matvecs < 4:
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


def _select_blocks(model, prefixes):
    """The layer blocks named by ``--layers`` (a name or a prefix ending at a dot), all when None."""
    from ..curvature.analysis import layer_blocks

    blocks = layer_blocks(model)
    if prefixes is None:
        return blocks
    chosen = [(n, ps) for n, ps in blocks if any(n == p or n.startswith(p.rstrip(".") + ".") for p in prefixes)]
    unknown = [p for p in prefixes if not any(n == p or n.startswith(p.rstrip(".") + ".") for n, _ in blocks)]
    if unknown:
        names = ", ".join(n for n, _ in blocks[:8]) + (", ..." if len(blocks) > 8 else "")
        raise _cli.UsageError(f"--layers {' '.join(unknown)}: no such layer; the model's layers are {names}")
    return chosen


def load_model(args, log):
    """The model of ``args.resume`` and what is known about it (see :func:`checkpoint_format.load_model`).

    Returns ``(model, meta)``; ``meta`` has ``arch``, ``depth``, ``num_classes``, ``in_channels``,
    ``input_size``, ``dataset`` (None for a bare state_dict), ``kind``, ``epoch``, ``train_args`` and
    ``versions``.
    """
    from ..training.data import DATASETS, dataset_info

    bare_spec = None
    if args.arch is not None:  # used only if the file is a bare state_dict: the data set gives the shapes
        name = args.name or "cifar10"
        info = dataset_info(name, **_cli.synthetic_kwargs(args)) if name == "synthetic" else dataset_info(name)
        bare_spec = ModelSpec(args.arch, info.num_classes, info.in_channels, info.input_size, depth=args.depth)
    model, spec, ckpt = cf.load_model(args.resume, bare_spec, arch=args.arch, depth=args.depth, log=log)
    full = isinstance(ckpt, dict) and "format" in ckpt
    if full and args.name is None and ckpt["dataset"] not in DATASETS:
        raise cf.CheckpointError(
            f"cannot use checkpoint {args.resume}: its field 'dataset' is not a known data set "
            f"({ckpt['dataset']!r}); pass --name ({', '.join(DATASETS)}) to analyse it on one of them"
        )
    meta = {
        **asdict(spec),
        "kind": "train.py checkpoint" if full else "bare state_dict",
        "description": spec.describe(),
        "dataset": ckpt["dataset"] if full else None,
        "epoch": ckpt["epoch"] if full else None,
        "train_args": ckpt.get("args") if full and isinstance(ckpt.get("args"), dict) else {},
        "versions": ckpt.get("versions") if full else None,
    }
    return model, meta


def load_data(args, meta, log, ctx=None):
    """The batch or loader to analyse, and a description of it (of all processes' samples together).

    Under torchrun (``ctx`` of more than one process) each rank gets a one-batch list or a loader over its
    contiguous shard of the samples one process would analyse, which the operators and the landscape
    then sum over the ranks.
    """
    from ..distributed import shard
    from ..training.data import dataset_info, fixed_batch, get_datasets, subset_loader

    rank, world = (0, 1) if ctx is None else (ctx.rank, ctx.world_size)

    ckpt_set = meta["dataset"]
    name = args.name or ckpt_set or "cifar10"
    synth = _cli.synthetic_kwargs(args)
    data_seed = args.seed
    if name == "synthetic" and ckpt_set == "synthetic":
        # regenerate the very data the model was trained on: its sizes and seed are in the checkpoint
        saved = meta["train_args"]
        for key, flag in (("num_train", "synthetic_train"), ("num_test", "synthetic_test")):
            if key not in synth and is_int(saved.get(flag)):
                synth[key] = saved[flag]
        if is_int(saved.get("seed")):
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


class _Run:
    """What every step of an analysis shares: the arguments, the process context, the console, the
    figures and the warnings."""

    def __init__(self, args, ctx):
        self.args, self.ctx = args, ctx
        self.progress = (sys.stderr.isatty() if args.progress is None else args.progress) and ctx.is_main
        self.warnings: list[str] = []
        self.figures: dict[str, str] = {}
        self.out_dir = args.out_dir or os.path.dirname(os.path.abspath(args.resume))
        self.can_plot = True
        self.title = self.subtitle = ""

    def log(self, text: str = "") -> None:
        if self.ctx.is_main:
            print(text, flush=True)

    def warn(self, text: str) -> None:
        self.log(f"WARNING: {text}")
        self.warnings.append(text)

    def figure(self, what: str, plot, *plot_args, key: str | None = None, **plot_kwargs) -> str | None:
        """Draw one figure (rank 0; the others get the path it writes), or None without matplotlib.

        ``what`` ends the file name; ``key`` (default ``what``) names it in the result's ``figures``."""
        if not self.can_plot:
            return None
        stem = os.path.splitext(os.path.basename(self.args.resume))[0]
        tag = f"{self.args.operator}_{self.args.eigen_type}-{self.args.data}"
        path = os.path.join(self.out_dir, f"{stem}_{tag}_{what}.png")
        path = plot(*plot_args, path=path, **plot_kwargs) if self.ctx.is_main else path
        self.figures[key or what] = path
        return path


def check_outputs(run: _Run) -> None:
    """Fail on an unusable output before any work (every rank checks, so that every rank stops).

    Figures need matplotlib, an optional dependency: without it the numbers are still computed and
    written, and a note says how to get the figures.
    """
    args = run.args
    if args.density or args.per_layer or args.landscape or args.compare:
        run.out_dir = check_writable_dir(run.out_dir, what="figures")
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            run.can_plot = False
            run.log("note: no figures (matplotlib is not installed: pip install 'hessianflow[plot]'); numbers only")
    if args.json is not None:
        json_dir = os.path.dirname(os.path.abspath(args.json))
        if not os.path.isdir(json_dir):
            raise _cli.UsageError(f"--json {args.json}: the directory {json_dir} does not exist")
        if os.path.isdir(args.json):
            raise _cli.UsageError(f"--json {args.json}: is a directory (give a file name)")
        check_writable_dir(json_dir, what="the JSON file")


def describe(run: _Run, model, meta, name, data_desc, op) -> dict:
    """Print what is analysed; the result's description sections."""
    args, ctx = run.args, run.ctx
    num_params = sum(p.numel() for p in model.parameters())
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
    run.log(f"checkpoint  {os.path.abspath(args.resume)} ({origin})")
    run.log(f"model       {meta['description']}, {meta['num_classes']} classes, {num_params:,} parameters")
    run.log(f"data        {data_line}")
    procs = f", {ctx.world_size} processes sharing the samples" if is_distributed() else ""
    run.log(f"operator    {op_name} of the mean cross-entropy loss, eval mode, {ctx.device}{procs}")
    run.title = f"{meta['description']} · {name} {args.data} · {os.path.basename(args.resume)}"
    run.subtitle = (
        f"{'GGN' if args.operator == 'ggn' else 'Hessian'}, {args.eigen_type}: "
        f"{data_desc['num_samples']} samples, seed {args.seed}"
    )
    return {
        "settings": dict(vars(args)),
        "versions": versions(),
        "checkpoint": {
            "path": os.path.abspath(args.resume),
            "kind": meta["kind"],
            "epoch": meta["epoch"],
            "dataset": meta["dataset"],
            "versions": meta["versions"],
        },
        "model": {
            **{k: meta[k] for k in ("arch", "depth", "description", "num_classes", "in_channels", "input_size")},
            "num_parameters": num_params,
        },
        "data": {"name": name, "split": args.data, "eigen_type": args.eigen_type, "seed": args.seed, **data_desc},
        "operator": {"type": args.operator, "size": op.size, "mode": "eval", "device": str(ctx.device)},
        "world_size": ctx.world_size,
    }


def check_loss(run: _Run, model, criterion, source) -> dict:
    """The loss and accuracy on the analysed data: a check that the weights are the trained ones."""
    from ..linalg.linop import NonFiniteError

    batches = [source["data"]] if "data" in source else source["dataloader"]
    res = _cli.evaluate_on_ranks(model, batches, criterion, run.ctx.device)
    loss_value, accuracy = res["loss"], res["accuracy"]
    if not math.isfinite(loss_value):
        raise NonFiniteError(f"the loss on the analysed data is {loss_value}: the checkpoint's weights are broken")
    run.log(f"loss        {_num(loss_value)} (accuracy {_num(accuracy)}) on the analysed data")
    return {"loss": loss_value, "accuracy": accuracy}


def _solve_quietly(solve, reasons: list | None = None):
    """Run a solver with its ConvergenceWarnings caught (the driver reports convergence itself); their
    texts are appended to ``reasons`` when it is given."""
    from ..linalg.eigen import ConvergenceWarning

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ConvergenceWarning)
        out = solve()
    for w in caught:
        if not issubclass(w.category, ConvergenceWarning):
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
        elif reasons is not None:
            reasons.append(str(w.message))
    return out


# the advice that fits each of the solver's verdicts (EigenResult.status); the reason is the solver's own
_ADVICE = {
    "noise_floor": "the values are good to the accuracy reached: loosen --tol to it",
    "nondeterministic": "the operator is not a fixed matrix: analyse in eval mode over a fixed, unshuffled set",
    "unchecked": "the values after the first may be out of place: raise --max-iter",
}


def _why_not_converged(eig) -> tuple[str, str]:
    """The solver's own reason and the advice that fits its status (read from the result's fields)."""
    advice = _ADVICE.get(eig.status, "the values are estimates: raise --max-iter or loosen --tol")
    if eig.status == "noise_floor":
        advice += f" (~{eig.accuracy:.1e})"
    return eig.reason, advice


def eigenvalues(run: _Run, op):
    """The ``--top-k`` eigenpairs (or as many as ``--landscape`` needs); returns ``(result, section)``."""
    from ..linalg.eigen import lanczos, power_iteration

    args = run.args
    k = args.top_k
    if args.landscape and args.landscape > k:
        k = args.landscape
        run.log(f"note: --landscape {args.landscape} needs the top {k} eigenvectors; computing k = {k}")
    if k > op.size:
        raise _cli.UsageError(f"--top-k {k} exceeds the {op.size} parameters")
    t0 = time.time()
    v0 = "gradient" if args.start == "gradient" else None
    if args.method == "lanczos":
        tol, max_iter = (LANCZOS_TOL if args.tol is None else args.tol), args.max_iter  # None: lanczos's own
        eig = _solve_quietly(lambda: lanczos(
            op, k=k, which=args.which, max_iter=max_iter, tol=tol, seed=args.seed, progress=run.progress, v0=v0,
            criterion=args.criterion,
        ))  # fmt: skip
    else:
        tol = 1e-3 if args.tol is None else args.tol
        max_iter = 100 if args.max_iter is None else args.max_iter
        eig = _solve_quietly(
            lambda: power_iteration(op, k=k, max_iter=max_iter, tol=tol, seed=args.seed, progress=run.progress, v0=v0)
        )
    seconds = time.time() - t0
    which = args.which if args.method == "lanczos" else "LM"
    run.log()
    run.log(
        f"eigenvalues {args.method}, the {k} {_WHICH[which]} ({which}), tol {tol:g}, "
        f"max-iter {'default' if max_iter is None else max_iter}: {eig.num_matvecs} products, {seconds:.1f} s"
    )
    rows = [
        (str(i + 1), _num(v), format(float(r), ".2e"), "yes" if c else "NO")
        for i, (v, r, c) in enumerate(zip(eig.eigenvalues.tolist(), eig.residuals.tolist(), eig.converged.tolist()))
    ]
    for line in _table(("i", "eigenvalue", "residual", "converged"), rows):
        run.log("  " + line)
    if not eig.all_converged:
        bad = [i + 1 for i, c in enumerate(eig.converged.tolist()) if not c]
        why, advice = _why_not_converged(eig)
        run.warn(
            f"{args.method} did not converge for eigenvalue(s) {bad} within {eig.num_matvecs} products "
            f"(tol {tol:g})" + (f": {why}" if why else "") + f"; {advice}"
        )
    section = {
        **eig.to_dict(), "which": which, "tol": tol, "max_iter": max_iter, "all_converged": eig.all_converged,
        "seconds": seconds,
    }  # fmt: skip
    return eig, section


_WHICH = {"LA": "largest", "SA": "smallest", "LM": "largest-magnitude"}


def trace_estimate(run: _Run, op) -> dict:
    """``--trace``: Hutchinson-type estimate with its standard error."""
    from ..linalg.trace import trace

    t0 = time.time()
    tr = trace(op, num_matvecs=run.args.trace_matvecs, seed=run.args.seed + 1)
    seconds = time.time() - t0
    run.log(
        f"trace       {_num(tr.estimate)} ± {_num(tr.stderr)} (standard error; {tr.method}, "
        f"{tr.num_matvecs} products, {seconds:.1f} s)"
    )
    return {**tr.to_dict(), "seconds": seconds}


def density(run: _Run, op) -> dict:
    """``--density``: stochastic Lanczos quadrature, and its figure."""
    from ..linalg.density import spectral_density
    from ..plotting import plot_density

    args = run.args
    t0 = time.time()
    dens = spectral_density(
        op, num_runs=args.density_runs, num_steps=args.density_steps, seed=args.seed + 2, progress=run.progress
    )
    seconds = time.time() - t0
    lo, hi = dens.support()
    path = run.figure(
        "density", plot_density, dens, title=run.title,
        subtitle=f"{run.subtitle}; SLQ {args.density_runs} runs x {args.density_steps} steps",
    )  # fmt: skip
    run.log(
        f"density     SLQ {dens.num_runs} runs x {args.density_steps} steps ({dens.num_matvecs} products, "
        f"{seconds:.1f} s): support [{_num(lo)}, {_num(hi)}], trace estimate {_num(dens.trace_estimate())}"
    )
    return {
        **dens.to_dict(), "num_runs": dens.num_runs, "num_steps": args.density_steps, "support": [lo, hi],
        "trace_estimate": dens.trace_estimate(), "figure": path, "seconds": seconds,
    }  # fmt: skip


def per_layer_analysis(run: _Run, model, criterion, source, blocks) -> dict:
    """``--per-layer``: top eigenvalue and trace of each layer's diagonal block, a table and a figure."""
    from ..curvature.analysis import per_layer
    from ..plotting import plot_per_layer

    args = run.args
    t0 = time.time()
    layers = _solve_quietly(lambda: per_layer(
        model, criterion, **source, top_k=1, trace_matvecs=args.trace_matvecs, seed=args.seed + 3,
        tol=LANCZOS_TOL if args.tol is None or args.method != "lanczos" else args.tol,
        max_iter=args.max_iter if args.method == "lanczos" else None,
        exact_threshold=args.exact_threshold, operator=args.operator, blocks=blocks, progress=run.progress,
        micro_batch_size=args.micro_batch_size,
    ))  # fmt: skip
    seconds = time.time() - t0
    run.log()
    run.log(f"per layer   top eigenvalue and trace of each layer's diagonal block ({seconds:.1f} s)")
    rows = [
        (r.name, f"{r.size:,}", _num(r.eigenvalue) + ("" if r.all_converged else " (!)"), _num(r.trace),
         "exact" if r.exact else f"± {_num(r.trace_stderr)}", str(r.num_matvecs))
        for r in layers
    ]  # fmt: skip
    for line in _table(("layer", "params", "top eigenvalue", "trace", "stderr", "products"), rows):
        run.log("  " + line)
    total = sum(r.trace for r in layers)
    total_se = math.sqrt(sum(r.trace_stderr**2 for r in layers))
    run.log(f"  sum of the block traces = trace of the whole {args.operator}: {_num(total)} ± {_num(total_se)}")
    bad = [r.name for r in layers if not r.all_converged]
    if bad:
        run.warn(f"per-layer lanczos did not converge for {', '.join(bad)} (marked (!))")
    path = run.figure(
        "per_layer", plot_per_layer, [r.name for r in layers], [r.eigenvalue for r in layers],
        [r.trace for r in layers], title=run.title, subtitle=run.subtitle,
    )  # fmt: skip
    return {
        "layers": [r.to_dict() for r in layers], "trace_sum": total, "trace_sum_stderr": total_se,
        "figure": path, "seconds": seconds, "all_converged": not bad,
    }  # fmt: skip


def landscape(run: _Run, model, criterion, source, eig) -> dict:
    """``--landscape 1|2``: the loss along the top eigenvector(s), and its figure."""
    from ..curvature.analysis import loss_landscape
    from ..plotting import plot_landscape_1d, plot_landscape_2d

    args = run.args
    dims, r, m = args.landscape, args.landscape_radius, args.landscape_points
    which = _WHICH[args.which if args.method == "lanczos" else "LM"]
    t0 = time.time()
    alphas = torch.linspace(-r, r, m, dtype=torch.float64)
    betas = alphas if dims == 2 else None
    dirs = eig.eigenvectors[:, :dims]
    losses = loss_landscape(model, criterion, directions=dirs, alphas=alphas, betas=betas, **source)
    seconds = time.time() - t0
    lam = [float(v) for v in eig.eigenvalues[:dims]]
    path = None
    if not torch.isfinite(losses).all():
        run.warn("the loss is not finite at some points of the landscape; lower --landscape-radius")
    elif dims == 1:
        path = run.figure(
            "landscape1d", plot_landscape_1d, alphas, losses, key="landscape", title=run.title,
            subtitle=f"{run.subtitle}; v₁ with λ₁ = {_num(lam[0])}",
            xlabel=f"step α along the {which} eigenvector v₁ (θ + α·v₁, ‖v₁‖ = 1)",
        )  # fmt: skip
    else:
        path = run.figure(
            "landscape2d", plot_landscape_2d, alphas, betas, losses, key="landscape", title=run.title,
            subtitle=f"{run.subtitle}; {which} eigenvalues λ₁ = {_num(lam[0])}, λ₂ = {_num(lam[1])}",
        )  # fmt: skip
    run.log()
    run.log(
        f"landscape   {dims}-D, {m}{'x' + str(m) if dims == 2 else ''} points in [-{_num(r)}, {_num(r)}] along the "
        f"unit eigenvector(s) of {', '.join(_num(v) for v in lam)} ({seconds:.1f} s): "
        f"loss {_num(float(losses.min()))} to {_num(float(losses.max()))}"
    )
    return {
        "dims": dims, "radius": r, "points": m, "eigenvalues": lam, "alphas": alphas, "betas": betas,
        "losses": losses, "min_loss": float(losses.min()), "max_loss": float(losses.max()),
        "argmin": int(torch.argmin(losses)), "figure": path, "seconds": seconds,
    }  # fmt: skip


def compare(run: _Run, model, criterion, source) -> dict:
    """``--compare``: :func:`~hessianflow.curvature.compare.compare_curvatures` on the analysed data, its
    table, and its figure."""
    from ..curvature.compare import compare_curvatures, plot_comparison

    args = run.args
    tol = LANCZOS_TOL if args.tol is None or args.method != "lanczos" else args.tol
    t0 = time.time()
    res = _solve_quietly(lambda: compare_curvatures(
        model, criterion, **source, kinds=tuple(args.compare_kinds), k=args.compare_k, seed=args.seed + 4,
        tol=tol, trace_matvecs=args.trace_matvecs, num_runs=args.compare_runs, num_steps=args.compare_steps,
        mc_samples=args.mc_samples, micro_batch_size=args.micro_batch_size, progress=run.progress,
    ))  # fmt: skip
    seconds = time.time() - t0
    run.log()
    run.log(f"compare     {', '.join(res.kinds)} against the Hessian, top {args.compare_k} ({seconds:.1f} s)")
    for line in res.table().splitlines():
        run.log("  " + line)
    bad = [kind for kind, kc in res.kinds.items() if not kc.converged]
    if bad:
        run.warn(f"compare: lanczos did not converge for {', '.join(bad)}")
    path = run.figure("compare", plot_comparison, res, title=run.title)
    return {
        "kinds": res.to_dict(), "table": res.table(), "k": args.compare_k, "mc_samples": args.mc_samples,
        "num_matvecs": {kd: kc.num_matvecs for kd, kc in res.kinds.items()}, "figure": path, "seconds": seconds,
        "all_converged": not bad,
    }  # fmt: skip


def finish(run: _Run, result: dict, t_start: float) -> dict:
    """Convergence, timings, the JSON file (after every rank agreed on the numbers)."""
    result["figures"] = run.figures
    result["warnings"] = run.warnings
    result["converged"] = all(sec.get("all_converged", True) for sec in result.values() if isinstance(sec, dict))
    result["seconds"] = {k: v["seconds"] for k, v in result.items() if isinstance(v, dict) and "seconds" in v}
    result["seconds"]["total"] = time.time() - t_start
    run.log()
    for what, path in run.figures.items():
        run.log(f"figure      {what}: {path}")
    if run.args.json is not None:
        result["json"] = os.path.abspath(run.args.json)
        run.log(f"json        {result['json']}")
    run.log(f"done in {result['seconds']['total']:.1f} s")
    if is_distributed():
        # Every rank computed the same collective numbers (a rank that had not would have dead-locked or
        # drifted); check it before rank 0 writes them: a RuntimeError on every rank if not.
        from ..distributed import assert_same_on_all_ranks

        nums = _numbers(result)
        assert_same_on_all_ranks(len(nums), "the number of results")
        assert_same_on_all_ranks(nums, "the results")
    if run.args.json is not None and run.ctx.is_main:
        write_json(run.args.json, result)  # checked before any work: a failure now is I/O (WriteError, exit 4)
    return result


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
    from ..curvature import GGNOperator, HessianOperator

    t_start = time.time()
    run = _Run(args, ctx)
    check_outputs(run)
    model, meta = load_model(args, run.log)
    model = model.to(ctx.device).eval()
    blocks = _select_blocks(model, args.layers) if args.per_layer else None  # a bad --layers fails before work
    name, source, data_desc, _ = load_data(args, meta, run.log, ctx)
    criterion = nn.CrossEntropyLoss()
    op = (HessianOperator if args.operator == "hessian" else GGNOperator)(
        model, criterion, progress=run.progress, micro_batch_size=args.micro_batch_size, **source
    )
    result = describe(run, model, meta, name, data_desc, op)
    result.update(check_loss(run, model, criterion, source))
    eig, result["eigen"] = eigenvalues(run, op)
    if args.trace:
        result["trace"] = trace_estimate(run, op)
    if args.density:
        result["density"] = density(run, op)
    op.release()  # the per-layer blocks and the landscape do not need its reused graph
    if args.per_layer:
        result["per_layer"] = per_layer_analysis(run, model, criterion, source, blocks)
    if args.landscape:
        result["landscape"] = landscape(run, model, criterion, source, eig)
    if args.compare:
        result["compare"] = compare(run, model, criterion, source)
    return finish(run, result, t_start)


cli = _cli.entry_point(main, parse_args, interrupted="interrupted; nothing written (the JSON comes at the end)")

if __name__ == "__main__":
    sys.exit(cli())
