"""The rules of ``--resume``: which flags define a run, and how a checkpoint's settings come back.

The scripts' business, not the checkpoint format's: :mod:`hessianflow.io.checkpoint_format` says what a
checkpoint holds; this module says what resuming a training run from one means.
"""

from __future__ import annotations

from collections.abc import Mapping

from ..io.checkpoint import CheckpointError
from ..training.models import canonical_arch

__all__ = ["RUN_FLAGS", "resume_settings"]

#: The flags that define a training run: on ``--resume`` they come from the checkpoint, and a different
#: value on the command line is refused (the others, e.g. ``--device`` or ``--data-dir``, may change
#: between the pieces of a run).
RUN_FLAGS = (
    "name", "arch", "depth", "method", "batch_size", "large_ratio", "lr", "lr_decay", "lr_decay_epoch",
    "weight_decay", "momentum", "adv_ratio", "eps", "duration", "hessian_batch_size", "eig_max_iter",
    "eig_tol", "seed", "track_eigen", "eigen_type", "eig_data", "eig_batches", "synthetic_train",
    "synthetic_test",
)  # fmt: skip


def resume_settings(ckpt: Mapping, args, explicit, path) -> None:
    """Put the run flags of ``ckpt`` into ``args`` (an argparse namespace), refusing contradictions.

    A flag given on the command line (its name in ``explicit``) with another value than the one the run
    was started with is an error: the run would silently change meaning. ``--epochs`` may grow. Without
    ``--save`` the run continues in the file it resumes (so that resuming it again continues from the
    newest epoch), and without ``--out-dir`` in the run's own output directory. A script that trains one
    architecture (``args.fixed_arch``, train_resnet.py) refuses a checkpoint of another.
    """
    saved = ckpt.get("args", {})
    conflicts = [
        f"--{k.replace('_', '-')} {getattr(args, k)!r} (checkpoint: {saved[k]!r})"
        for k in RUN_FLAGS
        if k in explicit and k in saved and getattr(args, k) != saved[k]
    ]
    if conflicts:
        raise CheckpointError(f"resuming {path}, which was run with other settings: " + "; ".join(conflicts))
    fixed = getattr(args, "fixed_arch", None)
    if fixed is not None and canonical_arch(ckpt["arch"]) != canonical_arch(fixed):
        raise CheckpointError(
            f"{path} holds a {ckpt['arch']}, and this script trains a {fixed} only: resume it with train.py"
        )
    for k in RUN_FLAGS:
        if k in saved:
            setattr(args, k, saved[k])
    if "epochs" not in explicit:
        args.epochs = saved.get("epochs", args.epochs)
    if "save" not in explicit:
        args.save = str(path)
    if "out_dir" not in explicit and isinstance(saved.get("out_dir"), str):
        args.out_dir = saved["out_dir"]
    if ckpt["epoch"] > args.epochs:
        raise CheckpointError(f"{path} already holds {ckpt['epoch']} epochs, more than --epochs {args.epochs}")
