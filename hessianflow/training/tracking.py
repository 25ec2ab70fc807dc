"""Tracking the top Hessian eigenvalue (and the trace) during training.

HessianFlow (Yao et al. 2018, "Hessian-based analysis of large batch training and robustness to
adversaries") measured the top eigenvalue of the loss Hessian after every epoch: the adaptive batch size
schedule (ABSA) reacts to it, and the eigenvalue history is the figure that shows large-batch training
ending in sharper regions. This module keeps that measurement and its log:

- :func:`top_eigenvalue`: the top eigenpair(s) of a model's Hessian over a batch or a data loader, a thin
  convenience over :class:`~hessianflow.curvature.HessianOperator` and :mod:`hessianflow.linalg.eigen`.
- :class:`EigenTracker`: measures (or is told) the eigenvalue once per epoch, together with the training
  metrics of that epoch, and keeps the history: CSV and JSON files written atomically (their format,
  and :func:`load_history` which reads them, live in :mod:`hessianflow.io.history`), a figure, and a
  ``state_dict`` of plain Python types so that a resumed run keeps its history.

Example::

    tracker = EigenTracker(nn.CrossEntropyLoss(), data=(x_fixed, y_fixed), out_dir="runs/c1")
    for epoch in range(epochs):
        stats = train_epoch(model, ...)
        tracker.step(model, epoch, lr=lr, batch_size=bs, train_loss=stats["loss"])
    tracker.plot("runs/c1/eigen.png", lr_decay_epochs=[30, 60])
"""

from __future__ import annotations

import copy
import math
import numbers
import os
import time

from .._checks import check_int, check_positive, is_int
from ..curvature.batches import LossSpec
from ..curvature.objective import OBJECTIVE_OPTIONS
from ..curvature.operators import HessianOperator
from ..io.history import FIELDS as _FIELDS
from ..io.history import load_history, write_csv, write_json
from ..io.history import plain_value as _plain
from ..linalg.eigen import EigenResult, lanczos, power_iteration
from ..linalg.linop import NonFiniteError
from ..linalg.trace import METHODS as _TRACE_METHODS
from ..linalg.trace import trace as _estimate_trace

__all__ = ["top_eigenvalue", "EigenTracker", "load_history"]

_METHODS = ("power", "lanczos")


def _solve(op, method: str, k: int, max_iter: int, tol: float, seed, v0=None) -> EigenResult:
    if method == "power":
        res = power_iteration(op, k=k, max_iter=max_iter, tol=tol, seed=seed, v0=v0)
    elif method == "lanczos":
        res = lanczos(op, k=k, which="LA", max_iter=max_iter, tol=tol, seed=seed, v0=v0)
    else:  # pragma: no cover - validated by the callers
        raise ValueError(f"method must be one of {_METHODS}, got {method!r}")
    values = res.eigenvalues.detach().cpu().tolist()
    if not all(math.isfinite(v) for v in values):
        raise NonFiniteError(f"the eigensolver returned non-finite eigenvalues {values}")
    return res


# what EigenTracker passes on to the operators (the Objective's keywords besides criterion and data)
_OBJECTIVE_KEYWORDS = ("params", "loss_fn", "reduction", "batch_weight", *OBJECTIVE_OPTIONS)


def _check_method(method: str) -> str:
    if method not in _METHODS:
        raise ValueError(f"method must be one of {_METHODS}, got {method!r}")
    return method


def top_eigenvalue(
    model,
    criterion=None,
    data=None,
    dataloader=None,
    *,
    method: str = "power",
    k: int = 1,
    max_iter: int = 100,
    tol: float = 1e-3,
    seed=0,
    progress: bool = False,
    v0=None,
    **objective,
) -> EigenResult:
    """The top ``k`` eigenpairs of the Hessian of ``criterion(model(x), y)`` over a batch or a loader.

    Builds a :class:`~hessianflow.curvature.HessianOperator` and runs
    :func:`~hessianflow.linalg.eigen.power_iteration` (``method="power"``: the ``k`` eigenvalues of largest
    *magnitude*, the method of HessianFlow and PyHessian) or :func:`~hessianflow.linalg.eigen.lanczos`
    (``method="lanczos"``, ``which="LA"``: the ``k`` *largest* eigenvalues, usually with an order of
    magnitude fewer products for the same accuracy). Near a minimum the two agree; they differ when a
    negative eigenvalue outweighs the largest positive one.

    Args:
        model: the network (its parameters are not changed; its train/eval mode is restored).
        criterion: the loss, ``criterion(outputs, targets)``, mean- or sum-reduced; or ``None``.
        data: one batch (``(inputs, targets)`` with a criterion; any batch otherwise).
        dataloader: or an iterable of batches (the Hessian of the loss over all of its samples).
        method: ``"power"`` or ``"lanczos"``.
        k: the number of eigenpairs.
        max_iter: for power iteration the products per eigenpair, for Lanczos the total number of
            products. Default 100: PyHessian's ``maxIter`` (HessianFlow's ``get_eigen`` used 50).
        tol: for power iteration the relative change of the eigenvalue between iterations; for Lanczos
            a bound on each eigenvalue's relative error (its default ``criterion="eigenvalue"``). Default
            ``1e-3``: PyHessian's and HessianFlow's, which is what their users mean by it.
        seed: the seed of the start vector(s) (an int, a ``torch.Generator`` or ``None``); the default 0
            makes repeated calls reproducible.
        progress: show a progress bar over the loader's batches.
        v0: the start vector: ``None`` (random, from ``seed``), a flat tensor, or ``"gradient"`` (the
            loss gradient plus 1% of a random vector; see :func:`~hessianflow.linalg.eigen.lanczos`).
        **objective: the objective's further keywords, passed on unchanged
            (:class:`~hessianflow.curvature.objective.Objective`): ``params``, ``loss_fn``, ``reduction``,
            ``batch_weight``, ``train_mode``, ``num_batches``, ``micro_batch_size``, ``distributed``.

    Returns:
        the solver's :class:`~hessianflow.linalg.eigen.EigenResult` (``eigenvalues[0]`` is the top one;
        ``converged`` says whether its test passed, and a ``ConvergenceWarning`` is emitted if not).

    Raises:
        NonFiniteError: a NaN/Inf loss, product or eigenvalue (a ``ValueError``).
        ValueError: bad arguments.

    Example:
        Linear least squares, whose Hessian is known in closed form (:math:`2 X^T X / n` for the mean
        squared error):

        >>> import torch
        >>> from torch import nn
        >>> from hessianflow import top_eigenvalue
        >>> _ = torch.manual_seed(0)
        >>> x = torch.randn(64, 3, dtype=torch.float64)
        >>> y = x @ torch.tensor([[1.0], [-2.0], [0.5]], dtype=torch.float64)
        >>> model = nn.Linear(3, 1, bias=False).double()
        >>> res = top_eigenvalue(model, nn.MSELoss(), data=(x, y), method="lanczos", tol=1e-10)
        >>> exact = torch.linalg.eigvalsh(2 * x.T @ x / 64)[-1]
        >>> bool(torch.isclose(res.eigenvalues[0], exact, rtol=1e-8)), bool(res.converged.all())
        (True, True)
    """
    method = _check_method(method)
    k = check_int("k", k, minimum=1)
    max_iter = check_int("max_iter", max_iter, minimum=1)
    tol = check_positive("tol", tol)
    op = HessianOperator(model, criterion, data=data, dataloader=dataloader, progress=progress, **objective)
    try:
        return _solve(op, method, k, max_iter, tol, seed, v0)
    finally:
        op.release()


class EigenTracker:
    """Measure and log the top Hessian eigenvalue (and optionally the trace) once per epoch.

    The Hessian is taken over a fixed batch (``data=(x, y)``, HessianFlow's choice: the same samples
    every epoch, so the changes are the model's and not the batch's) or over a data loader
    (``dataloader=``, optionally its first ``num_batches`` batches).

    Each call of :meth:`step` appends a record

    ``{"epoch", "eigenvalue", "top_k", "residual", "converged", "trace", "trace_stderr", "num_matvecs",
    "seconds", **metrics}``

    where ``eigenvalue`` is ``top_k[0]``, ``residual`` its residual norm ``||Hv - λv||``, ``converged``
    whether every requested eigenpair passed the solver's test (a not converged solve is recorded, with
    ``False``, and the solver warns), ``num_matvecs`` the Hessian-vector products spent (eigenvalues and
    trace), ``seconds`` the wall time, and ``metrics`` whatever the caller adds (``lr``, ``batch_size``,
    ``train_loss``, ``test_acc``, ...: numbers, strings, bools or ``None``). :meth:`record` appends an
    eigenvalue computed elsewhere (the ABSA controller computes its own).

    The same ``seed`` is used at every step: the eigensolver starts from the same vector and the trace
    uses the same probes each epoch (common random numbers), so that epoch-to-epoch differences are the
    model's and not the estimator's noise.

    Args:
        criterion: the loss, ``criterion(outputs, targets)``; or ``None`` (``loss_fn=``, or the model
            output's ``.loss``).
        data: a fixed batch (``(inputs, targets)`` with a criterion; any batch otherwise).
        dataloader: or an iterable of batches.
        top_k: the number of top eigenvalues per step (``eigenvalue`` is the first).
        method: ``"power"`` (default, HessianFlow's) or ``"lanczos"``; see :func:`top_eigenvalue`.
        max_iter: see :func:`top_eigenvalue` (default 100, PyHessian's).
        tol: see :func:`top_eigenvalue` (default ``1e-3``, PyHessian's and HessianFlow's).
        trace: also estimate the trace of the Hessian at each step.
        trace_matvecs: products spent on the trace (default 100: PyHessian's ``maxIter`` for
            ``trace()``), with ``trace_method`` (see :func:`hessianflow.linalg.trace.trace`; default
            ``"hutchinson"``, Hutchinson 1989, which reports a standard error).
        seed: an int or ``None`` (fresh randomness each step).
        out_dir: if given, ``eigen_history.csv`` and ``eigen_history.json`` are rewritten there
            (atomically) after every record, so a crash loses nothing logged.
        **objective: the objective's further keywords, passed on unchanged to every step's operator
            (:class:`~hessianflow.curvature.objective.Objective`): ``params``, ``loss_fn``, ``reduction``,
            ``batch_weight``, ``train_mode`` (default eval mode), ``num_batches``, ``micro_batch_size``,
            ``distributed``.

    Epochs must increase from record to record (after :meth:`load_state_dict` too): one record per
    epoch, in order, is what the history files and the plot assume.

    Example:
        >>> import os, tempfile, torch
        >>> from torch import nn
        >>> from hessianflow import EigenTracker
        >>> _ = torch.manual_seed(0)
        >>> x, y = torch.randn(32, 3, dtype=torch.float64), torch.randn(32, 1, dtype=torch.float64)
        >>> model = nn.Linear(3, 1).double()
        >>> out = tempfile.mkdtemp()
        >>> tracker = EigenTracker(nn.MSELoss(), data=(x, y), method="lanczos", tol=1e-10, out_dir=out)
        >>> rec = tracker.step(model, 1, lr=0.1)
        >>> xb = torch.cat([x, torch.ones(32, 1, dtype=torch.float64)], dim=1)  # the bias is a parameter too
        >>> abs(rec["eigenvalue"] - torch.linalg.eigvalsh(2 * xb.T @ xb / 32)[-1].item()) < 1e-8, rec["lr"]
        (True, 0.1)
        >>> _ = tracker.record(2, eigenvalue=1.5, lr=0.01)  # an eigenvalue computed elsewhere
        >>> len(tracker.history), sorted(os.listdir(out))
        (2, ['eigen_history.csv', 'eigen_history.json'])
    """

    def __init__(
        self,
        criterion=None,
        data=None,
        dataloader=None,
        *,
        top_k: int = 1,
        method: str = "power",
        max_iter: int = 100,
        tol: float = 1e-3,
        trace: bool = False,
        trace_matvecs: int = 100,
        trace_method: str = "hutchinson",
        seed: int | None = 0,
        out_dir=None,
        **objective,
    ):
        if data is not None and dataloader is not None:
            raise ValueError("pass at most one of data=(inputs, targets) or dataloader=")
        if criterion is not None and not callable(criterion):
            raise ValueError("criterion must be callable as criterion(outputs, targets)")
        unknown = sorted(set(objective) - set(_OBJECTIVE_KEYWORDS))
        if unknown:
            raise TypeError(f"EigenTracker got unexpected keyword argument(s) {unknown}")
        LossSpec(criterion, objective.get("loss_fn"), objective.get("reduction"), objective.get("batch_weight"))
        if seed is not None and not is_int(seed):
            raise ValueError(f"seed must be an int or None (it is saved in state_dict), got {seed!r}")
        self.criterion = criterion
        self.data = data
        self.dataloader = dataloader
        num_batches = objective.get("num_batches")
        self.num_batches = None if num_batches is None else check_int("num_batches", num_batches, minimum=1)
        self.train_mode = bool(objective.get("train_mode", False))
        #: the objective's keywords besides the criterion and the data (see Objective), passed on unchanged
        self.objective = {**objective, "num_batches": self.num_batches, "train_mode": self.train_mode}
        self.top_k = check_int("top_k", top_k, minimum=1)
        self.method = _check_method(method)
        self.max_iter = check_int("max_iter", max_iter, minimum=1)
        self.tol = check_positive("tol", tol)
        self.trace = bool(trace)
        self.trace_matvecs = check_int("trace_matvecs", trace_matvecs, minimum=1)
        if trace_method not in _TRACE_METHODS:
            raise ValueError(f"trace_method must be one of {_TRACE_METHODS}, got {trace_method!r}")
        self.trace_method = trace_method
        self.seed = None if seed is None else int(seed)
        self.out_dir = None if out_dir is None else os.fspath(out_dir)
        self.history: list[dict] = []

    # -- measuring -----------------------------------------------------------------------------
    def step(self, model, epoch, **metrics) -> dict:
        """Compute the top eigenvalue(s) (and the trace, if asked) of ``model`` and append a record.

        Args:
            model: the network at the end of ``epoch``.
            epoch: the epoch number (greater than the last recorded one).
            **metrics: further values to record (``lr=``, ``batch_size=``, ``train_loss=``, ...);
                they may not use the names of the standard fields.

        Returns:
            the record appended (a copy).

        Raises:
            NonFiniteError: a NaN/Inf loss, product, eigenvalue, trace or metric: nothing is recorded.
            ValueError: no data source, a non-increasing epoch or a reserved metric name.
        """
        if self.data is None and self.dataloader is None:
            raise ValueError("this tracker has no data (pass data= or dataloader=); use record() instead")
        reserved = sorted(set(metrics) & set(_FIELDS))
        if reserved:
            raise ValueError(f"metric names {reserved} are reserved for the tracker's own fields")
        epoch = self._check_epoch(epoch)
        clean = {k: _plain(k, v) for k, v in metrics.items()}
        start = time.perf_counter()
        op = HessianOperator(model, self.criterion, data=self.data, dataloader=self.dataloader, **self.objective)
        try:
            res = _solve(op, self.method, self.top_k, self.max_iter, self.tol, self.seed)
            tr = None
            if self.trace:
                # A different stream from the eigensolver's start vector.
                trace_seed = None if self.seed is None else self.seed + 1
                tr = _estimate_trace(op, num_matvecs=self.trace_matvecs, seed=trace_seed, method=self.trace_method)
        finally:
            op.release()
        seconds = time.perf_counter() - start
        values = [float(v) for v in res.eigenvalues.detach().cpu().tolist()]
        rec = {
            "epoch": epoch,
            "eigenvalue": values[0],
            "top_k": values,
            "residual": float(res.residuals[0]),
            "converged": bool(res.converged.all()),
            "trace": None,
            "trace_stderr": None,
            "num_matvecs": int(res.num_matvecs),
            "seconds": seconds,
        }
        if tr is not None:
            rec["trace"] = _plain("trace", tr.estimate)
            stderr = getattr(tr, "stderr", None)
            rec["trace_stderr"] = None if stderr is None else _plain("trace_stderr", stderr)
            rec["num_matvecs"] += int(tr.num_matvecs)
        rec.update(clean)
        return self._append(rec)

    def record(self, epoch, eigenvalue=None, **metrics) -> dict:
        """Append a record with an eigenvalue computed elsewhere (or none: metrics only).

        Args:
            epoch: the epoch number (greater than the last recorded one).
            eigenvalue: the top eigenvalue, or ``None`` when it was not measured this epoch.
            **metrics: further values; the standard fields (``top_k``, ``residual``, ``converged``,
                ``trace``, ``trace_stderr``, ``num_matvecs``, ``seconds``) may be given too.

        Returns:
            the record appended (a copy).

        Raises:
            NonFiniteError: a NaN/Inf eigenvalue or metric (nothing is recorded).
        """
        epoch = self._check_epoch(epoch)
        ev = _plain("eigenvalue", eigenvalue)
        if ev is not None and (isinstance(ev, (bool, str, list))):
            raise ValueError(f"eigenvalue must be a number or None, got {eigenvalue!r}")
        ev = None if ev is None else float(ev)
        clean = {k: _plain(k, v) for k, v in metrics.items()}
        rec = {field: None for field in _FIELDS}
        rec.update(epoch=epoch, eigenvalue=ev, top_k=[] if ev is None else [ev])
        rec.update(clean)
        return self._append(rec)

    def _check_epoch(self, epoch):
        if isinstance(epoch, bool) or not isinstance(epoch, numbers.Real) or not math.isfinite(float(epoch)):
            raise ValueError(f"epoch must be a finite number, got {epoch!r}")
        epoch = int(epoch) if isinstance(epoch, numbers.Integral) else float(epoch)
        if self.history and not epoch > self.history[-1]["epoch"]:
            raise ValueError(
                f"epoch {epoch} is not after the last recorded epoch {self.history[-1]['epoch']} "
                "(one record per epoch, in order)"
            )
        return epoch

    def _append(self, rec: dict) -> dict:
        self.history.append(rec)
        if self.out_dir is not None:
            self.save()
        return copy.deepcopy(rec)

    # -- convenience ---------------------------------------------------------------------------
    @property
    def eigenvalues(self) -> list:
        """The ``eigenvalue`` of every record (``None`` where none was measured)."""
        return [rec.get("eigenvalue") for rec in self.history]

    @property
    def last(self) -> dict | None:
        """The last record (a copy), or ``None``."""
        return copy.deepcopy(self.history[-1]) if self.history else None

    # -- files ---------------------------------------------------------------------------------
    def to_csv(self, path) -> str:
        """Write the history as CSV (see :mod:`hessianflow.io.history`); return the path."""
        return write_csv(self.history, path)

    def to_json(self, path) -> str:
        """Write ``{"version", "config", "history"}`` as JSON (see :mod:`hessianflow.io.history`); return the path."""
        return write_json(self.history, path, config=self._config())

    def save(self) -> dict:
        """Write ``eigen_history.csv`` and ``eigen_history.json`` into ``out_dir``; return their paths."""
        if self.out_dir is None:
            raise ValueError("this tracker has no out_dir; use to_csv(path) / to_json(path)")
        return {
            "csv": self.to_csv(os.path.join(self.out_dir, "eigen_history.csv")),
            "json": self.to_json(os.path.join(self.out_dir, "eigen_history.json")),
        }

    def plot(self, path, lr_decay_epochs=None, title=None, subtitle=None) -> str:
        """Plot the eigenvalue history with :func:`hessianflow.plotting.plot_eigen_history`."""
        from ..plotting import plot_eigen_history

        if subtitle is None:
            subtitle = f"{self.method}, top-{self.top_k}, tol {self.tol:g}" + (
                f", {self.num_batches} batch(es)" if self.num_batches else ""
            )
        return plot_eigen_history(self.history, path, lr_decay_epochs=lr_decay_epochs, title=title, subtitle=subtitle)

    # -- checkpointing -------------------------------------------------------------------------
    def _config(self) -> dict:
        return {
            "method": self.method,
            "top_k": self.top_k,
            "max_iter": self.max_iter,
            "tol": self.tol,
            "trace": self.trace,
            "trace_matvecs": self.trace_matvecs,
            "trace_method": self.trace_method,
            "seed": self.seed,
            "num_batches": self.num_batches,
            "train_mode": self.train_mode,
            "source": "data" if self.data is not None else ("dataloader" if self.dataloader is not None else None),
        }

    def state_dict(self) -> dict:
        """The configuration and the history as plain Python types (fit for ``weights_only`` loading)."""
        return {"version": 1, "config": self._config(), "history": copy.deepcopy(self.history)}

    def load_state_dict(self, state: dict, strict: bool = True) -> None:
        """Restore the history of a :meth:`state_dict`.

        Args:
            state: a dict from :meth:`state_dict`.
            strict: refuse a state whose configuration (method, top-k, tolerance, seed, data source,
                ...) differs from this tracker's, so that one history does not silently mix two kinds
                of measurement; ``False`` takes the history only.
        """
        if not isinstance(state, dict) or state.get("version") != 1:
            raise ValueError("not an EigenTracker state_dict (missing or unknown 'version')")
        if strict:
            saved, mine = state.get("config", {}), self._config()
            diff = {k: (saved.get(k), v) for k, v in mine.items() if saved.get(k) != v}
            if diff:
                detail = ", ".join(f"{k}: saved {a!r} vs {b!r}" for k, (a, b) in diff.items())
                raise ValueError(f"the saved tracker configuration differs from this tracker's ({detail})")
        history = state.get("history")
        if not isinstance(history, list) or not all(isinstance(r, dict) and "epoch" in r for r in history):
            raise ValueError("malformed EigenTracker state_dict: 'history' must be a list of records with 'epoch'")
        epochs = [r["epoch"] for r in history]
        if any(b <= a for a, b in zip(epochs, epochs[1:])):
            raise ValueError(f"malformed EigenTracker state_dict: epochs are not increasing ({epochs})")
        self.history = copy.deepcopy(history)

    def __repr__(self) -> str:
        last = self.history[-1] if self.history else None
        tail = f", last epoch {last['epoch']}: {last['eigenvalue']}" if last else ""
        return f"EigenTracker(method={self.method!r}, top_k={self.top_k}, {len(self.history)} records{tail})"
