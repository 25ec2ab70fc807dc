"""Safe, atomic checkpoints.

- :func:`save_checkpoint` writes to a temporary file in the target's directory, flushes and fsyncs
  it, then renames it onto the target (``os.replace`` is atomic on POSIX and Windows) and fsyncs the
  directory: a crash, a full disk or an interrupt leaves either the old checkpoint or the new one,
  never a truncated file.
- :func:`load_checkpoint` always loads with ``torch.load(weights_only=True)``: only tensors and plain
  containers (dict, list, tuple, str, int, float, bool, None) are accepted, so a file crafted to run
  code when unpickled is refused instead of executed. HessianFlow's drivers called ``torch.load``
  without it, on files passed on the command line.
- :func:`rng_state` / :func:`set_rng_state` pack the Python, NumPy, torch and CUDA generator states
  into such plain types, so they fit in a ``weights_only`` checkpoint.
"""

from __future__ import annotations

import errno
import json
import os
import pickle
import platform
import random
import re
import shutil
import tempfile
import warnings
import zipfile
from collections import OrderedDict
from collections.abc import Mapping

import numpy as np
import torch

__all__ = [
    "CheckpointError",
    "WriteError",
    "atomic_write",
    "save_checkpoint",
    "write_json",
    "jsonable",
    "load_checkpoint",
    "versions",
    "rng_state",
    "set_rng_state",
    "extract_state_dict",
    "check_writable_dir",
    "remove_stale_temporaries",
]

_CODE_REFUSAL = (
    "refusing to load: the file contains Python objects that would run code when unpickled "
    "(only tensors and plain containers are allowed)"
)


class CheckpointError(ValueError):
    """A checkpoint could not be written or read; the message names the file and the problem."""


class WriteError(CheckpointError, OSError):
    """A file could not be written; the previous file at its path is intact.

    Both a :class:`CheckpointError` (for code that catches those) and an ``OSError``: an I/O failure,
    which the scripts report with their own exit status (4) when it happens during a run.
    """


def _one_line(text: str, limit: int = 200) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _umask() -> int:
    # There is no way to read the umask without setting it; restore it at once.
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _fsync_dir(directory: str) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # e.g. Windows, where directories cannot be opened
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: str | os.PathLike, write, what: str = "file") -> str:
    """Write a file so that a crash, a full disk or an interrupt leaves the old file or the new one.

    ``write(f)`` writes the content to a binary file object: a temporary file in the target's directory,
    flushed and fsynced, then renamed onto ``path`` (``os.replace``, atomic on POSIX and Windows),
    and the directory fsynced. The one implementation of atomic writes in the package.

    Args:
        path: the target; its directory must exist.
        write: a callable taking the open binary file.
        what: what the file is, for error messages ("checkpoint", "JSON file", ...).

    Returns:
        The absolute path written.

    Raises:
        WriteError: the file could not be written (directory missing or
            unwritable, disk full, ``write`` failed...). The previous file at ``path``, if any, is
            intact and no temporary file is left behind.

    Example:
        >>> import os, tempfile
        >>> from hessianflow.io.checkpoint import atomic_write
        >>> from hessianflow.io.checkpoint import CheckpointError
        >>> path = os.path.join(tempfile.mkdtemp(), "notes.txt")
        >>> _ = atomic_write(path, lambda f: f.write(b"first\\n"), what="notes")
        >>> def broken(f):
        ...     f.write(b"half a file")
        ...     raise RuntimeError("the writer failed")
        >>> try:
        ...     atomic_write(path, broken, what="notes")
        ... except CheckpointError as exc:
        ...     print(str(exc).replace(path, "PATH"))
        cannot save notes PATH: the writer failed
        >>> open(path).read(), os.listdir(os.path.dirname(path))  # the old file, and no temporary one
        ('first\\n', ['notes.txt'])
    """
    path = os.path.abspath(os.fspath(path))
    directory, name = os.path.split(path)
    if os.path.isdir(path):
        raise WriteError(f"cannot save {what} {path}: it is a directory")
    if not os.path.isdir(directory):
        raise WriteError(f"cannot save {what} {path}: the directory {directory} does not exist")
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{name}.", suffix=".tmp")
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        # mkstemp creates the file 0600; give the file the permissions a plain open() would.
        try:
            mode = os.stat(path).st_mode & 0o777 if os.path.exists(path) else 0o666 & ~_umask()
            os.chmod(tmp, mode)
        except OSError:
            pass
        os.replace(tmp, path)
        tmp = None
        _fsync_dir(directory)
    except BaseException as exc:
        cause = _cause(exc, directory) if isinstance(exc, Exception) else None  # before the space is freed
        if tmp is not None:
            try:
                os.remove(tmp)
            except OSError:
                pass
        if isinstance(exc, Exception):
            raise WriteError(f"cannot save {what} {path}: {cause}") from exc
        raise  # KeyboardInterrupt, SystemExit: clean up, then let them through unchanged
    return path


def _cause(exc: Exception, directory: str) -> str:
    """The reason a write failed, in words: torch's serializer reports a full disk as an internal
    "unexpected pos" error with no errno, so a nearly full file system is named as the cause."""
    if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
        return f"no space left on device ({_one_line(exc)})"
    try:
        free = shutil.disk_usage(directory).free
    except OSError:
        free = None
    if free is not None and free < _NEARLY_FULL:
        return f"no space left on device ({free:,} bytes free in {directory}; {_one_line(exc, 120)})"
    return _one_line(exc)


_NEARLY_FULL = 1 << 20  # bytes: below this, a failed write is put down to a full disk


def save_checkpoint(obj, path: str | os.PathLike) -> str:
    """Atomically write ``obj`` with ``torch.save`` to ``path`` (see :func:`atomic_write`).

    The object should contain only what :func:`load_checkpoint` accepts (tensors, state dicts, plain
    containers, numbers, strings, None): anything else would be refused when loading.

    Args:
        obj: the checkpoint, e.g. ``{"state_dict": ..., "optimizer": ..., "epoch": ..., "args": ...}``.
        path: the target file; its directory must exist (see :func:`check_writable_dir`).

    Returns:
        The absolute path written.

    Raises:
        CheckpointError: the file could not be written; the previous one is intact.

    Example:
        >>> import os, tempfile, torch
        >>> from hessianflow.io.checkpoint import load_checkpoint, save_checkpoint
        >>> path = os.path.join(tempfile.mkdtemp(), "ckpt.pt")
        >>> _ = save_checkpoint({"epoch": 3, "w": torch.ones(2)}, path)
        >>> load_checkpoint(path)
        {'epoch': 3, 'w': tensor([1., 1.])}
    """
    return atomic_write(path, lambda f: torch.save(obj, f), what="checkpoint")


def jsonable(obj):
    """``obj`` with tensors as lists, tuples as lists, keys as strings and NaN/Inf as None (strict JSON)."""
    if isinstance(obj, torch.Tensor):
        return jsonable(obj.detach().cpu().tolist())
    if isinstance(obj, Mapping):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, float) and not np.isfinite(obj):
        return None
    return obj


def write_json(path: str | os.PathLike, obj) -> str:
    """Atomically write :func:`jsonable` ``(obj)`` as strict, indented JSON (see :func:`atomic_write`,
    which raises :class:`WriteError` on failure).

    Example:
        >>> import json, os, tempfile, torch
        >>> from hessianflow.io.checkpoint import write_json
        >>> path = os.path.join(tempfile.mkdtemp(), "metrics.json")
        >>> _ = write_json(path, {"loss": float("nan"), "w": torch.tensor([1.5, 2.0]), "shape": (2, 3)})
        >>> json.load(open(path))  # strict JSON: NaN as null, tensors and tuples as lists
        {'loss': None, 'w': [1.5, 2.0], 'shape': [2, 3]}
    """
    text = json.dumps(jsonable(obj), indent=2, allow_nan=False) + "\n"
    return atomic_write(path, lambda f: f.write(text.encode()), what="JSON file")


def remove_stale_temporaries(path: str | os.PathLike) -> list[str]:
    """Delete the temporary files that killed writes of ``path`` left behind (``.NAME.*.tmp`` beside it).

    A process killed inside :func:`save_checkpoint` cannot clean up; the next run calls this before it
    writes again. Returns the paths removed.
    """
    path = os.path.abspath(os.fspath(path))
    directory, name = os.path.split(path)
    removed = []
    if not os.path.isdir(directory):
        return removed
    pattern = re.compile(r"^\." + re.escape(name) + r"\.[^/]+\.tmp$")
    for entry in os.listdir(directory):
        if pattern.match(entry):
            try:
                os.remove(os.path.join(directory, entry))
                removed.append(os.path.join(directory, entry))
            except OSError:
                pass
    return removed


def load_checkpoint(path: str | os.PathLike, map_location="cpu"):
    """Load a checkpoint with ``torch.load(path, map_location=..., weights_only=True)``.

    Never falls back to an unrestricted unpickler: a file that would need to run code is refused and
    its payload never runs.

    Args:
        path: the checkpoint file (a full checkpoint dict, or a bare legacy state_dict).
        map_location: passed to ``torch.load``; default ``"cpu"``.

    Raises:
        CheckpointError: with a one-line message naming the file and the problem: missing, a
            directory, unreadable, truncated or corrupt, or containing Python objects that would run
            code when unpickled.

    Example:
        >>> import os, tempfile, torch
        >>> from hessianflow.io.checkpoint import load_checkpoint, save_checkpoint
        >>> from hessianflow.io.checkpoint import CheckpointError
        >>> path = os.path.join(tempfile.mkdtemp(), "ckpt.pt")
        >>> _ = save_checkpoint({"epoch": 3, "w": torch.zeros(2)}, path)
        >>> load_checkpoint(path)["epoch"]
        3
        >>> class Payload:  # a pickle that would call print() when loaded
        ...     def __reduce__(self):
        ...         return (print, ("this never runs",))
        >>> torch.save({"epoch": 4, "x": Payload()}, path)
        >>> try:
        ...     load_checkpoint(path)
        ... except CheckpointError as exc:
        ...     print("refusing to load" in str(exc))
        True
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise CheckpointError(f"cannot load checkpoint {path}: no such file")
    if os.path.isdir(path):
        raise CheckpointError(f"cannot load checkpoint {path}: it is a directory, not a file")
    if os.path.getsize(path) == 0:
        raise CheckpointError(f"cannot load checkpoint {path}: the file is empty (truncated or corrupt)")
    try:
        with warnings.catch_warnings():
            # torch's notes on raw pickles (protocol, legacy format) are not the user's concern: the
            # file either loads safely or is refused below in one line
            warnings.simplefilter("ignore", UserWarning)
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        text = str(exc)
        match = re.search(r"GLOBAL\s+([\w.]+)", text) or re.search(r"[Uu]nsupported global:?\s*([\w.]+)", text)
        if match:
            raise CheckpointError(f"cannot load checkpoint {path}: {_CODE_REFUSAL}; found {match.group(1)}") from exc
        detail = re.search(r"WeightsUnpickler error:\s*(.+)", text)
        detail = _one_line(detail.group(1) if detail else text, 120)
        raise CheckpointError(
            f"cannot load checkpoint {path}: the file is truncated, corrupt or not a torch checkpoint "
            f"(unpickling error: {detail})"
        ) from exc
    except PermissionError as exc:
        raise CheckpointError(f"cannot load checkpoint {path}: permission denied") from exc
    except (EOFError, zipfile.BadZipFile) as exc:
        raise CheckpointError(
            f"cannot load checkpoint {path}: the file is truncated, corrupt or not a torch checkpoint "
            f"({type(exc).__name__})"
        ) from exc
    except Exception as exc:
        # torch reports damaged archives as RuntimeError ("PytorchStreamReader failed ..."), OSError
        # (EINVAL while seeking), KeyError or UnicodeDecodeError, depending on where the damage is.
        raise CheckpointError(
            f"cannot load checkpoint {path}: the file is truncated, corrupt or not a torch checkpoint "
            f"({type(exc).__name__}: {_one_line(exc, 120)})"
        ) from exc


def versions() -> dict:
    """The versions of the software a checkpoint was written with (plain ``str``, or None).

    Example:
        >>> import torch
        >>> from hessianflow.io.checkpoint import versions
        >>> v = versions()
        >>> sorted(v), v["torch"] == torch.__version__
        (['cuda', 'hessianflow', 'numpy', 'python', 'torch', 'torchvision'], True)
    """
    from .._version import __version__

    try:
        import torchvision

        tv = torchvision.__version__
    except Exception:  # torchvision is optional for the library itself
        tv = None
    # str(): torch.__version__ is a TorchVersion, which a weights_only load refuses.
    return {
        "hessianflow": str(__version__),
        "torch": str(torch.__version__),
        "torchvision": None if tv is None else str(tv),
        "numpy": str(np.__version__),
        "python": platform.python_version(),
        "cuda": None if torch.version.cuda is None else str(torch.version.cuda),
    }


def rng_state() -> dict:
    """The states of Python's ``random``, NumPy's global generator, torch's CPU and CUDA generators.

    Everything is packed into types ``torch.load(weights_only=True)`` accepts: tensors, lists, ints,
    floats, strings and None.

    Example:
        >>> import random, torch
        >>> from hessianflow.io.checkpoint import rng_state, set_rng_state
        >>> state = rng_state()
        >>> a = (random.random(), torch.rand(2))
        >>> set_rng_state(state)
        >>> b = (random.random(), torch.rand(2))
        >>> a[0] == b[0] and torch.equal(a[1], b[1])
        True
    """
    py_version, py_internal, py_gauss = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state(legacy=True)
    cuda = None
    if torch.cuda.is_available():
        cuda = [s.clone() for s in torch.cuda.get_rng_state_all()]
    return {
        "python": [int(py_version), [int(x) for x in py_internal], py_gauss],
        "numpy": {
            "name": str(np_name),
            "keys": torch.from_numpy(np.asarray(np_keys, dtype=np.int64)),
            "pos": int(np_pos),
            "has_gauss": int(np_has_gauss),
            "cached_gaussian": float(np_gauss),
        },
        "torch": torch.get_rng_state().clone(),
        "cuda": cuda,
    }


def set_rng_state(state: Mapping) -> None:
    """Restore the generator states saved by :func:`rng_state` (after a ``weights_only`` load).

    CUDA states are restored for as many devices as both the state and this machine have; when the
    state has CUDA states and this machine no CUDA, they are skipped with a warning.

    Example:
        >>> import numpy as np
        >>> from hessianflow.io.checkpoint import rng_state, set_rng_state
        >>> state = rng_state()
        >>> first = np.random.rand()
        >>> set_rng_state(state)  # e.g. of a checkpoint loaded with weights_only=True
        >>> np.random.rand() == first
        True
    """
    try:
        py_version, py_internal, py_gauss = state["python"]
        random.setstate((int(py_version), tuple(int(x) for x in py_internal), py_gauss))
        n = state["numpy"]
        keys = n["keys"]
        keys = keys.numpy() if isinstance(keys, torch.Tensor) else np.asarray(keys)
        np.random.set_state(
            (
                n["name"],
                keys.astype(np.uint32),
                int(n["pos"]),
                int(n["has_gauss"]),
                float(n["cached_gaussian"]),
            )
        )
        torch.set_rng_state(state["torch"].cpu().to(torch.uint8))
    except (KeyError, TypeError, ValueError, RuntimeError) as exc:
        raise ValueError(f"not a valid rng_state() dict: {_one_line(exc)}") from exc
    cuda = state.get("cuda")
    if cuda:
        if not torch.cuda.is_available():
            warnings.warn("the saved CUDA generator states were not restored: CUDA is not available", stacklevel=2)
            return
        for i, s in enumerate(cuda[: torch.cuda.device_count()]):
            torch.cuda.set_rng_state(s.cpu().to(torch.uint8), device=i)


_PREFIXES = ("module.", "_orig_mod.")


def extract_state_dict(ckpt) -> OrderedDict:
    """The model's state_dict from a checkpoint, in any of the forms this project has written.

    Accepts a full checkpoint dict (the state under ``"state_dict"`` or ``"model"``) or a bare legacy
    state_dict (a mapping of names to tensors, as HessianFlow's ``torch.save(model.state_dict())``
    wrote). The ``module.`` prefixes of ``DataParallel``/``DistributedDataParallel`` (and the
    ``_orig_mod.`` prefix of ``torch.compile``) are stripped when every key carries them.

    Raises:
        CheckpointError: no state_dict found.

    Example:
        >>> import torch
        >>> from hessianflow.io.checkpoint import extract_state_dict
        >>> saved = {"epoch": 2, "state_dict": {"module.fc.weight": torch.zeros(1), "module.fc.bias": torch.zeros(1)}}
        >>> list(extract_state_dict(saved))  # DataParallel's prefix stripped
        ['fc.weight', 'fc.bias']
    """
    if not isinstance(ckpt, Mapping):
        raise CheckpointError(f"expected a checkpoint dict or a state_dict, got {type(ckpt).__name__}")
    state = None
    for key in ("state_dict", "model"):
        if isinstance(ckpt.get(key), Mapping):
            state = ckpt[key]
            break
    if state is None:
        if ckpt and all(isinstance(v, torch.Tensor) for v in ckpt.values()):
            state = ckpt
        else:
            keys = ", ".join(repr(k) for k in list(ckpt)[:10])
            raise CheckpointError(
                f"no model state_dict in the checkpoint: expected a 'state_dict' or 'model' entry, or a "
                f"mapping of parameter names to tensors; found keys {keys or '(none)'}"
            )
    state = OrderedDict(state)
    changed = True
    while changed and state:
        changed = False
        for prefix in _PREFIXES:
            if all(isinstance(k, str) and k.startswith(prefix) for k in state):
                state = OrderedDict((k[len(prefix) :], v) for k, v in state.items())
                changed = True
    return state


def check_writable_dir(path: str | os.PathLike, what: str = "files") -> str:
    """Create ``path`` if needed and check that a file can be written in it.

    Meant to run before any work, so that a long run does not fail at its first output. ``what`` names
    the outputs in the error message ("checkpoints", "figures", ...).

    Returns:
        The absolute path of the directory.

    Raises:
        CheckpointError: the directory cannot be created or written to.

    Example:
        >>> import os, tempfile
        >>> from hessianflow.io.checkpoint import check_writable_dir
        >>> out = check_writable_dir(os.path.join(tempfile.mkdtemp(), "runs", "c1"), what="checkpoints")
        >>> os.path.isdir(out), os.listdir(out)  # created, and the test file removed
        (True, [])
    """
    path = os.path.abspath(os.fspath(path))
    if os.path.exists(path) and not os.path.isdir(path):
        raise CheckpointError(f"cannot write {what} to {path}: it exists and is not a directory")
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as exc:
        raise CheckpointError(f"cannot create the directory {path} for {what}: {_one_line(exc)}") from exc
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(dir=path, prefix=".write-test.", suffix=".tmp")
        with os.fdopen(fd, "wb") as f:
            f.write(b"hessianflow write test\n")
            f.flush()
            os.fsync(f.fileno())
    except OSError as exc:
        raise CheckpointError(f"cannot write {what} to {path}: {_one_line(exc)}") from exc
    finally:
        if tmp is not None:
            try:
                os.remove(tmp)
            except OSError:
                pass
    return path
