"""Command-line plumbing shared by the three scripts (train, train-resnet, the eigenvalue driver).

Argument types that reject bad values at parse time (argparse's own error and exit status 2), the
common flags, device selection, and :func:`run` which turns a user mistake into a one-line error
instead of a traceback. No algorithm lives here.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

# Exit statuses, documented in the README: 0 success, 2 a user error (bad flag, missing data, unusable
# checkpoint), 3 a numerical fault (NaN/Inf loss or curvature), 4 an I/O failure during the run.
EXIT_USAGE, EXIT_NUMERIC, EXIT_IO = 2, 3, 4
INTERRUPTED = "interrupted; the last finished epoch's checkpoint is kept"


class DefaultsHelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Appends ``(default: ...)`` to a flag's help unless its text already says its default."""

    def _get_help_string(self, action):
        text = action.help or ""
        return text if "(default" in text else super()._get_help_string(action)


def is_main_rank() -> bool:
    """Rank 0 of a torchrun job, or a plain process: the one that reports what every rank sees alike."""
    return os.environ.get("RANK", "0") == "0"


class ArgumentParser(argparse.ArgumentParser):
    """argparse with a one-line error (no usage block: the README promises one line), printed once
    under torchrun, exit status 2."""

    def error(self, message):
        if is_main_rank():
            sys.stderr.write(f"{self.prog}: error: {message} (see {self.prog} --help)\n")
        sys.exit(EXIT_USAGE)


def add_version_flag(parser: argparse.ArgumentParser) -> None:
    """``--version``: the program, hessianflow's and torch's versions (what a bug report needs)."""
    from .._version import __version__

    parser.add_argument(
        "--version",
        action="version",
        version=f"%(prog)s (hessianflow {__version__}, torch {torch.__version__})",
        help="print the versions and exit",
    )


def entry_point(main, parse_args, interrupted: str = INTERRUPTED):
    """A console script: ``sys.exit`` of :func:`run` over the command line."""

    def cli(argv=None) -> int:
        status = run(main, parse_args, argv, interrupted=interrupted)
        if argv is None and "RANK" in os.environ:  # a torchrun worker's command line: see exit_process
            from ..distributed import exit_process

            exit_process(status)
        return status

    return cli


def rank_zero_first(ctx, enabled: bool, fn):
    """``fn()`` on rank 0 first, then on the other ranks (e.g. a ``--download``), so that no two processes
    write the same files. A rank 0 that fails exits, and torchrun then stops the waiting ranks."""
    if enabled and not ctx.is_main:
        ctx.barrier()
    out = fn()
    if enabled and ctx.is_main:
        ctx.barrier()
    return out


def evaluate_on_ranks(model, loader, criterion, device) -> dict:
    """Loss and accuracy of ``model`` over ``loader``, the batches of this process's share of the data,
    summed over the processes of a torchrun job (:func:`hessianflow.training.loop.evaluate` on each).

    Returns ``{"loss", "accuracy", "samples"}`` over all processes; ``accuracy`` is ``None`` when the
    outputs are not class logits, ``loss`` is NaN when no process had a sample.
    """
    from ..distributed import all_reduce_sum
    from ..training.loop import evaluate

    res = evaluate(model, loader, criterion, device)
    have_acc = res["correct"] is not None
    # one all-reduce of the three sums (a no-op outside a process group of more than one rank)
    sums = torch.tensor(
        [res["loss_sum"], res["correct"] if have_acc else 0, res["samples"]], dtype=torch.float64, device=device
    )
    total, correct, count = all_reduce_sum(sums).tolist()
    return {
        "loss": total / count if count else float("nan"),
        "accuracy": (correct / count if count else float("nan")) if have_acc else None,
        "samples": count,
    }


class UsageError(Exception):
    """A mistake in the command line or its inputs: reported in one line, exit status 2."""


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def nonneg_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a non-negative integer, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a non-negative integer, got {value}")
    return value


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a positive finite number, got {text}")
    return value


def nonneg_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a non-negative number, got {text!r}") from None
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a non-negative finite number, got {text}")
    return value


def unit_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1], got {text!r}") from None
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1], got {text}")
    return value


def choice_ci(choices):
    """A case-insensitive choice that returns the canonical spelling."""
    lower = {c.lower(): c for c in choices}

    def parse(text: str) -> str:
        if text.lower() not in lower:
            raise argparse.ArgumentTypeError(f"invalid choice {text!r} (choose from {', '.join(choices)})")
        return lower[text.lower()]

    parse.__name__ = "choice"
    return parse


def add_data_args(parser, name_default="cifar10"):
    from ..training.data import DATASETS

    g = parser.add_argument_group("data")
    g.add_argument(
        "--name",
        type=choice_ci(tuple(DATASETS)),
        default=name_default,
        help=f"data set: {', '.join(DATASETS)} (offline, no download: digits, scikit-learn's 1,797 handwritten "
        "digits as 1x16x16 images, needs pip install 'hessianflow[data]'; synthetic, generated) "
        f"(default: {name_default})",
    )
    g.add_argument("--data-dir", type=str, default="./data", help="where the data sets live (default: ./data)")
    g.add_argument("--download", action="store_true", help="download the data set if it is missing (needs a network)")
    g.add_argument("--num-workers", type=nonneg_int, default=0, help="data-loading worker processes (default: 0)")
    g.add_argument(
        "--synthetic-train",
        type=positive_int,
        default=None,
        help="synthetic data only: number of training images (default: the data set's default)",
    )
    g.add_argument(
        "--synthetic-test",
        type=positive_int,
        default=None,
        help="synthetic data only: number of test images (default: the data set's default)",
    )
    return g


def add_device_arg(parser):
    parser.add_argument(
        "--device",
        type=str,
        default="auto",
        help="auto (cuda when available), cpu, cuda or cuda:N (default: auto)",
    )


def check_device(parser, device: str) -> None:
    """Refuse an unusable --device before any work (argparse error, exit 2)."""
    if device == "auto" or device == "cpu":
        return
    if not device.startswith("cuda"):
        parser.error(f"argument --device: expected auto, cpu, cuda or cuda:N, got {device!r}")
    if not torch.cuda.is_available():
        parser.error(f"argument --device: {device} was asked for, but no CUDA GPU is available")
    if ":" in device:
        idx = device.split(":", 1)[1]
        if not idx.isdigit() or int(idx) >= torch.cuda.device_count():
            parser.error(f"argument --device: {device} does not exist ({torch.cuda.device_count()} GPU(s))")


def check_resnet_depth(parser, arch: str, depth: int) -> None:
    """Refuse a CIFAR ResNet depth other than 6n+2 (argparse error, exit 2); the other models have none."""
    from ..training.models import canonical_arch

    if canonical_arch(arch) == "ResNet" and (depth < 8 or (depth - 2) % 6):
        parser.error(f"argument --depth: the CIFAR ResNet has depth 6n+2 (20, 32, 44, 56, 110), got {depth}")


def synthetic_kwargs(args) -> dict:
    kw = {}
    if getattr(args, "synthetic_train", None):
        kw["num_train"] = args.synthetic_train
    if getattr(args, "synthetic_test", None):
        kw["num_test"] = args.synthetic_test
    return kw


def explicit_flags(parser, argv) -> set[str]:
    """The destinations of the flags actually given on the command line (not their defaults)."""
    probe = argparse.ArgumentParser(add_help=False, allow_abbrev=parser.allow_abbrev)
    for action in parser._actions:
        if action.option_strings and action.dest != "help":
            kwargs = {"dest": action.dest, "default": argparse.SUPPRESS}
            if action.nargs == 0:
                kwargs["action"] = "store_const"
                kwargs["const"] = True
            else:
                kwargs["nargs"] = action.nargs
            probe.add_argument(*action.option_strings, **kwargs)
    ns, _ = probe.parse_known_args(argv)
    return set(vars(ns))


def run(main, parse_args, argv=None, interrupted: str = INTERRUPTED) -> int:
    """Parse, run ``main(args)`` and map failures to exit statuses with a one-line message.

    A user mistake (bad flag value, missing data set, unusable checkpoint, unwritable directory) prints
    ``error: ...`` and exits 2 (once under torchrun: every rank meets it alike); a NaN/Inf loss or
    curvature exits 3; an I/O failure mid-run exits 4; Ctrl-C prints ``interrupted`` and exits 130.
    Anything else is a bug and keeps its traceback.
    """
    from ..io.checkpoint import CheckpointError, WriteError
    from ..linalg.linop import NonFiniteError

    try:
        from ..training.data import DataNotFoundError
    except ImportError:  # pragma: no cover
        DataNotFoundError = FileNotFoundError

    prog = os.path.basename(sys.argv[0]) or "hessianflow"
    args = parse_args(argv)
    try:
        main(args)
    except NonFiniteError as exc:
        print(f"{prog}: numerical error: {exc}", file=sys.stderr)
        return EXIT_NUMERIC
    except WriteError as exc:  # a file the run writes as it goes (writability is checked before any work)
        print(f"{prog}: I/O error: {exc}", file=sys.stderr)
        return EXIT_IO
    except (UsageError, CheckpointError, DataNotFoundError) as exc:
        if is_main_rank():
            print(f"{prog}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print(f"{prog}: {interrupted}", file=sys.stderr)
        return 130
    except OSError as exc:
        print(f"{prog}: I/O error: {exc}", file=sys.stderr)
        return EXIT_IO
    return 0
