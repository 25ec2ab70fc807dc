"""The eigenvalue history's file format: what a record holds, and its CSV and JSON files.

:class:`~hessianflow.training.tracking.EigenTracker` measures; this module says how its records are written and
read back, so that a history can be read (:func:`load_history`) without building a tracker.

A record is a flat dict: the standard fields :data:`FIELDS` first, in that order, then the caller's
metrics in order of first appearance. Values are plain Python values (:func:`plain_value`): ``None``,
``bool``, ``int``, finite ``float``, ``str`` or lists of those; a NaN or Inf is refused rather than
written, so a number that reads back is one that was measured.

- CSV (``eigen_history.csv``): a header row, then one row per record; ``None`` is an empty cell, floats
  are written with ``repr`` (the shortest string that reads back as the same float), lists as JSON.
- JSON (``eigen_history.json``): ``{"version": 1, "config": {...}, "history": [...]}``, strict JSON.

Both files are written atomically (:func:`hessianflow.io.checkpoint.atomic_write`): a crash mid-write
leaves the previous file. A failed write raises ``OSError``.
"""

from __future__ import annotations

import csv
import io
import json
import math
import numbers
import os

from ..linalg.linop import NonFiniteError
from .checkpoint import atomic_write

__all__ = ["FIELDS", "VERSION", "plain_value", "write_csv", "write_json", "load_history"]

VERSION = 1  # of the JSON file's layout
# The columns every record has, in this order; metrics follow in order of first appearance.
FIELDS = (
    "epoch",
    "eigenvalue",
    "top_k",
    "residual",
    "converged",
    "trace",
    "trace_stderr",
    "num_matvecs",
    "seconds",
)


def plain_value(name: str, value):
    """``value`` as a plain JSON/CSV-friendly Python value; non-finite numbers are refused.

    Tensors and NumPy scalars of one element become Python numbers; lists and tuples become lists.

    Raises:
        NonFiniteError: a NaN or Inf (a ``ValueError``), named by ``name``.
        ValueError: a tensor of more than one element, or a value of another type.

    Example:
        >>> import torch
        >>> from hessianflow.io.history import plain_value
        >>> plain_value("loss", torch.tensor(0.25)), plain_value("top_k", (2, 1.5))
        (0.25, [2, 1.5])
    """
    if value is None or isinstance(value, (bool, str)):
        return value
    if hasattr(value, "detach"):  # a torch tensor
        if value.numel() != 1:
            raise ValueError(f"metric {name!r} must be a scalar, got a tensor of shape {tuple(value.shape)}")
        value = value.detach().cpu().item()
    elif hasattr(value, "item") and getattr(value, "size", 1) == 1:  # a NumPy scalar or 1-element array
        value = value.item()
    if isinstance(value, bool):
        return value
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        value = float(value)
        if not math.isfinite(value):
            raise NonFiniteError(f"{name} is {value}: refusing to record a non-finite value")
        return value
    if isinstance(value, (list, tuple)):
        return [plain_value(f"{name}[{i}]", v) for i, v in enumerate(value)]
    raise ValueError(f"{name} must be a number, a string, a bool, None or a list of those, got {type(value).__name__}")


# -- CSV cells ---------------------------------------------------------------------------------
def _cell(value) -> str:
    if value is None:
        return ""
    if isinstance(value, list):
        return json.dumps(value, allow_nan=False)
    if isinstance(value, float):
        return repr(value)  # the shortest string that reads back as the same float
    return str(value)


def _parse_cell(text: str):
    if text == "":
        return None
    if text in ("True", "False"):
        return text == "True"
    if text.startswith("["):
        try:
            return json.loads(text)
        except json.JSONDecodeError:
            return text
    try:
        return int(text)
    except ValueError:
        pass
    try:
        value = float(text)
    except ValueError:
        return text
    # Non-finite numbers are never written (they are refused), so "nan" or "inf" was a string.
    return value if math.isfinite(value) else text


def _columns(history) -> list[str]:
    cols = list(FIELDS)
    for rec in history:
        for key in rec:
            if key not in cols:
                cols.append(key)
    return cols


# -- files -------------------------------------------------------------------------------------
def _write_text(path, text: str, what: str) -> str:
    """Write ``text`` (UTF-8) to ``path`` atomically, creating its directory; return ``path``."""
    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    atomic_write(path, lambda fh: fh.write(text.encode("utf-8")), what=what)
    return path


def write_csv(history: list[dict], path) -> str:
    """Write ``history`` as CSV (one row per record; lists as JSON); return the path.

    Example:
        >>> import os, tempfile
        >>> from hessianflow.io.history import load_history, write_csv
        >>> path = os.path.join(tempfile.mkdtemp(), "h.csv")
        >>> _ = write_csv([{"epoch": 1, "eigenvalue": 2.5, "top_k": [2.5], "lr": 0.1}], path)
        >>> open(path).readline().strip()
        'epoch,eigenvalue,top_k,residual,converged,trace,trace_stderr,num_matvecs,seconds,lr'
        >>> load_history(path)[0]["lr"]
        0.1
    """
    cols = _columns(history)
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(cols)
    for rec in history:
        writer.writerow([_cell(rec.get(c)) for c in cols])
    return _write_text(path, buf.getvalue(), "CSV history")


def write_json(history: list[dict], path, config: dict | None = None) -> str:
    """Write ``{"version", "config", "history"}`` as strict JSON; return the path.

    Example:
        >>> import json, os, tempfile
        >>> from hessianflow.io.history import write_json
        >>> path = os.path.join(tempfile.mkdtemp(), "h.json")
        >>> _ = write_json([{"epoch": 1, "eigenvalue": 2.5}], path, config={"method": "power"})
        >>> json.load(open(path))["config"]
        {'method': 'power'}
    """
    obj = {"version": VERSION, "config": config, "history": history}
    return _write_text(path, json.dumps(obj, indent=1, allow_nan=False) + "\n", "JSON history")


def load_history(path) -> list[dict]:
    """Read a history written by :meth:`EigenTracker.to_csv` or :meth:`EigenTracker.to_json`.

    CSV cells read back as ``None`` (empty), ``bool`` (``True``/``False``), ``int``, ``float`` (written
    with ``repr``, so the same floats), lists (``top_k``, as JSON) or strings, in that order of trial;
    a string metric that looks like a number reads back as the number. Empty CSV cells of a record
    (a column another record has) are dropped unless they are one of the standard fields.

    Example:
        >>> import os, tempfile
        >>> from hessianflow import EigenTracker
        >>> from hessianflow.training.tracking import load_history
        >>> out = tempfile.mkdtemp()
        >>> tracker = EigenTracker(out_dir=out)
        >>> _ = tracker.record(1, 3.0, lr=0.1)
        >>> _ = tracker.record(2, 2.0, lr=0.01, note="decay")
        >>> [(r["epoch"], r["eigenvalue"], r["lr"]) for r in load_history(os.path.join(out, "eigen_history.csv"))]
        [(1, 3.0, 0.1), (2, 2.0, 0.01)]
        >>> load_history(os.path.join(out, "eigen_history.json")) == tracker.history
        True
    """
    path = os.fspath(path)
    if path.endswith(".json"):
        with open(path, encoding="utf-8") as fh:
            obj = json.load(fh)
        history = obj.get("history") if isinstance(obj, dict) else obj
        if not isinstance(history, list) or not all(isinstance(r, dict) for r in history):
            raise ValueError(f"{path}: not an eigenvalue history (expected a list of records)")
        return history
    with open(path, encoding="utf-8", newline="") as fh:
        rows = list(csv.DictReader(fh))
    out = []
    for row in rows:
        rec = {}
        for key, text in row.items():
            value = _parse_cell(text or "")
            if value is not None or key in FIELDS:
                rec[key] = value
        out.append(rec)
    return out
