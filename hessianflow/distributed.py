"""``torch.distributed`` plumbing for the scripts and the operators: started by ``torchrun``.

``torchrun`` sets ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK`` (and the rendezvous variables); a plain
``python script.py`` sets none of them and stays single-process. NCCL is used on GPUs, gloo on CPUs.

What the package does with a process group:

- :class:`~hessianflow.curvature.HessianOperator` (and the GGN) over a loader that holds *this rank's
  shard* of a data set sums the size-weighted shard products over the ranks with one all-reduce, so
  the product is that of the whole data set, and is bit-identical on every rank (an all-reduce hands
  every rank the same sum). Power iteration, Lanczos, SLQ and the trace estimators draw their random
  vectors from a seeded CPU generator, so with the same seed every rank runs the same iteration on the
  same numbers and takes the same data-dependent branches; :func:`assert_same_on_all_ranks` checks it.
- A rank whose local product fails (a NaN loss on its shard, a bad batch) tells the others through a
  small status all-reduce, so every rank raises instead of waiting for ever in the collective.
"""

from __future__ import annotations

import datetime
import math
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from .linalg.linop import NonFiniteError

__all__ = [
    "DistContext",
    "init_distributed",
    "launched_by_torchrun",
    "is_distributed",
    "use_distributed",
    "reduce_or_raise",
    "FallbackOnAllRanks",
    "shard",
    "all_reduce_sum",
    "broadcast_object",
    "broadcast_buffers",
    "assert_same_on_all_ranks",
    "DEFAULT_TIMEOUT_S",
    "TIMEOUT_ENV",
    "exit_process",
]

#: The collective timeout when none is given: long enough for rank 0 to write a large checkpoint
#: while the others wait at a barrier, short enough that a stuck rank does not hold a job for hours
#: (torch's own default is 30 minutes for gloo and NCCL).
DEFAULT_TIMEOUT_S = 600.0
#: Environment variable that overrides :data:`DEFAULT_TIMEOUT_S` (seconds), e.g. for tests.
TIMEOUT_ENV = "HESSIANFLOW_DIST_TIMEOUT"


@dataclass
class DistContext:
    """Where this process stands: ``rank`` of ``world_size``; ``device`` is the one it computes on.

    Example:
        >>> from hessianflow.distributed import DistContext
        >>> ctx = DistContext()  # a plain process
        >>> ctx.is_main, ctx.enabled, ctx.device
        (True, False, device(type='cpu'))
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    initialized_here: bool = False

    @property
    def is_main(self) -> bool:
        """Rank 0: the only process that prints, logs, plots and writes checkpoints."""
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        """More than one process: collectives are needed."""
        return self.world_size > 1

    def barrier(self) -> None:
        """Wait for every rank (a no-op in a single process)."""
        if self.enabled:
            dist.barrier()

    def close(self) -> None:
        """Destroy the process group if this context created it."""
        if self.initialized_here and dist.is_initialized():
            dist.destroy_process_group()
            self.initialized_here = False


def launched_by_torchrun() -> bool:
    """True when the environment torchrun sets is present with more than one process."""
    try:
        return "RANK" in os.environ and int(os.environ.get("WORLD_SIZE", "1")) > 1
    except ValueError:
        return False


def is_distributed() -> bool:
    """An initialised process group with more than one rank.

    Example:
        >>> from hessianflow.distributed import is_distributed
        >>> is_distributed()  # a plain process
        False
    """
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def use_distributed(requested: bool | None, default: bool = True) -> bool:
    """Whether a computation combines the ranks: the one rule for an operator's or a function's ``distributed=``.

    Args:
        requested: ``None``: ``default`` and :func:`is_distributed` (a process group of more than one
            rank); ``True``: on, which needs an initialised process group (one rank allowed);
            ``False``: off.
        default: whether the computation would be distributed when a group exists, e.g. "a loader is
            given" (each rank holding its shard).

    Raises:
        ValueError: ``requested=True`` without an initialised process group.

    Example:
        >>> from hessianflow.distributed import use_distributed
        >>> use_distributed(None), use_distributed(False)  # a plain process: no group
        (False, False)
    """
    if requested is None:
        return bool(default) and is_distributed()
    if requested and not (dist.is_available() and dist.is_initialized()):
        raise ValueError("distributed=True needs an initialised torch.distributed process group (torchrun)")
    return bool(requested)


class FallbackOnAllRanks(Exception):
    """Some rank asked for the slower path (e.g. no batching rule): every rank takes it together."""


def _collective_device(device: torch.device | str) -> torch.device:
    """Where a collective's tensor must live: the computing device under NCCL, the CPU otherwise."""
    return torch.device(device) if dist.get_backend() == "nccl" else torch.device("cpu")


def reduce_or_raise(
    compute: Callable[[], tuple[Sequence[torch.Tensor] | None, float]],
    zeros: Callable[[], Sequence[torch.Tensor]],
    *,
    what: str,
    device: torch.device | str = "cpu",
    fallback: tuple[type[BaseException], ...] = (),
) -> tuple[list[torch.Tensor], float]:
    """This rank's ``compute()``, summed over the ranks; a failure on any rank raises on every rank.

    The one status-plus-payload protocol of the package (the curvature operators' products, the loss
    landscape's losses). Two all-reduces:

    1. a float64 status ``[weight, non-finite failures, failures, fallbacks]`` (exact for integer
       weights such as sample and token counts up to 2**53), so that a rank whose computation raised
       makes *every* rank raise, instead of the others waiting in the payload's all-reduce until the
       timeout;
    2. the payload: ``compute()``'s tensors, flattened into one vector.

    Args:
        compute: this rank's part: ``(tensors or None, weight)``; ``None`` (e.g. an empty shard) counts
            as ``zeros()``.
        zeros: tensors shaped like the payload, for a rank without one.
        what: what the ranks failed to do, for the other ranks' message ("compute their curvature
            products").
        device: the device the computation runs on (the collectives' under NCCL).
        fallback: exception types that mean "take the slower path" rather than "failed": if any rank
            raised one (and none failed), every rank raises :class:`FallbackOnAllRanks`.

    Returns:
        ``(tensors, total weight)``: the sums over the ranks (the tensors ``compute`` returned, updated
        in place, or new ones from ``zeros``), the same on every rank; the weight an ``int`` when whole.

    Raises:
        The rank's own exception on the rank that raised it; on the others :class:`NonFiniteError` when
        every failure was one, ``RuntimeError`` otherwise; :class:`FallbackOnAllRanks`.

    On one process (:func:`is_distributed` false) it is ``compute()`` itself (errors raised as they
    come, a ``fallback`` one as :class:`FallbackOnAllRanks`):

    Example:
        >>> import torch
        >>> from hessianflow.distributed import reduce_or_raise
        >>> reduce_or_raise(lambda: ([torch.ones(2)], 3), lambda: [torch.zeros(2)], what="add")
        ([tensor([1., 1.])], 3)
    """
    if not is_distributed():
        try:
            tensors, weight = compute()
        except fallback as exc:
            raise FallbackOnAllRanks(str(exc)) from exc
        return (list(zeros()) if tensors is None else list(tensors)), weight
    tensors, weight, error, fell_back = None, 0, None, False
    try:
        tensors, weight = compute()
    except fallback as exc:
        fell_back, error = True, exc
    except Exception as exc:  # noqa: BLE001 - re-raised below, after telling the other ranks
        error = exc
    failed = error is not None and not fell_back
    where = _collective_device(device)
    status = torch.tensor(
        [float(weight), int(failed and isinstance(error, NonFiniteError)), int(failed), int(fell_back)],
        dtype=torch.float64,
        device=where,
    )
    dist.all_reduce(status)
    total, nonfinite, failures, fallbacks = status.tolist()
    total = int(total) if total.is_integer() else total
    if failures:
        if failed:
            raise error
        kind = NonFiniteError if int(nonfinite) == int(failures) else RuntimeError
        raise kind(
            f"{int(failures)} other rank(s) failed to {what} (their errors are in their own output); "
            "stopping on this rank too"
        )
    if fallbacks:
        raise FallbackOnAllRanks(str(error) if error is not None else "another rank asked for the fallback path")
    tensors = list(zeros()) if tensors is None else list(tensors)
    flat = torch.cat([t.detach().reshape(-1).to(where) for t in tensors])
    dist.all_reduce(flat)
    offset = 0
    for t in tensors:
        t.copy_(flat[offset : offset + t.numel()].view_as(t))
        offset += t.numel()
    return tensors, total


def _timeout_s(timeout_s: float | None) -> float:
    if timeout_s is None:
        text = os.environ.get(TIMEOUT_ENV)
        if text is None:
            return DEFAULT_TIMEOUT_S
        try:
            timeout_s = float(text)
        except ValueError:
            raise ValueError(f"{TIMEOUT_ENV}={text!r} is not a number of seconds") from None
    timeout_s = float(timeout_s)
    if not (timeout_s > 0 and math.isfinite(timeout_s)):
        raise ValueError(f"the collective timeout must be a positive number of seconds, got {timeout_s}")
    return timeout_s


def init_distributed(device: str = "auto", timeout_s: float | None = None) -> DistContext:
    """Initialise ``torch.distributed`` from torchrun's environment, or a single-process context.

    Args:
        device: ``"auto"`` (CUDA when available), ``"cuda"`` or ``"cpu"``. Under torchrun on GPUs each
            process takes ``cuda:LOCAL_RANK`` (a ``cuda:N`` given here is then ignored).
        timeout_s: the collective timeout: a rank that stops answering makes the others fail after
            this long instead of hanging for ever. Default: ``$HESSIANFLOW_DIST_TIMEOUT`` or
            :data:`DEFAULT_TIMEOUT_S` (600 s). A rank that *dies* is noticed at once (its sockets close,
            and torchrun stops the other workers).

    Returns:
        The :class:`DistContext`; call :meth:`DistContext.close` at the end.

    Raises:
        ValueError: CUDA asked for but absent, or a bad timeout.

    Example:
        >>> import os
        >>> from hessianflow.distributed import init_distributed
        >>> "RANK" in os.environ  # not started by torchrun
        False
        >>> ctx = init_distributed(device="cpu")
        >>> ctx.rank, ctx.world_size, ctx.initialized_here
        (0, 1, False)
        >>> ctx.close()  # a no-op here
    """
    timeout = _timeout_s(timeout_s)
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError("--device cuda was asked for, but no CUDA GPU is available")
    if not launched_by_torchrun():
        return DistContext(device=torch.device(device))
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    if device.startswith("cuda"):
        torch.cuda.set_device(local_rank)
        dev, backend = torch.device("cuda", local_rank), "nccl"
    else:
        dev, backend = torch.device("cpu"), "gloo"
    created = False
    if not dist.is_initialized():
        dist.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=timeout))
        created = True
    return DistContext(rank=rank, world_size=world, local_rank=local_rank, device=dev, initialized_here=created)


def shard(n: int, rank: int, world_size: int) -> slice:
    """The contiguous slice of ``range(n)`` that ``rank`` owns (the first ``n % world_size`` get one more).

    The slices of ranks ``0 .. world_size - 1`` partition ``range(n)`` in order; a rank may get an empty
    one when ``n < world_size``.

    Example:
        >>> from hessianflow.distributed import shard
        >>> [shard(5, rank, 2) for rank in range(2)]
        [slice(0, 3, None), slice(3, 5, None)]
        >>> shard(1, 1, 2)  # fewer samples than ranks: an empty shard
        slice(1, 1, None)
    """
    for name, value, low in (("n", n, 0), ("world_size", world_size, 1), ("rank", rank, 0)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
    if rank >= world_size:
        raise ValueError(f"rank {rank} is not below world_size {world_size}")
    base, extra = divmod(n, world_size)
    start = rank * base + min(rank, extra)
    return slice(start, start + base + (1 if rank < extra else 0))


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """In-place sum over ranks (a no-op without an initialised group of more than one process)."""
    if is_distributed():
        dist.all_reduce(t)
    return t


def broadcast_object(obj, src: int = 0):
    """The object of rank ``src`` on every rank (identity when not distributed)."""
    if is_distributed():
        box = [obj]
        dist.broadcast_object_list(box, src=src)
        return box[0]
    return obj


def broadcast_buffers(module: torch.nn.Module, src: int = 0) -> int:
    """Copy ``module``'s buffers (BatchNorm running statistics, ...) from rank ``src`` to every rank.

    ``DistributedDataParallel`` broadcasts the buffers *before* each forward, and every rank then
    updates them with its own batch: after training, the ranks' running statistics differ by their
    last batch. An eval-mode Hessian, an evaluation or a checkpoint after training must see one model,
    so call this first. Returns the number of buffers sent (0 when not distributed).

    Example:
        >>> from torch import nn
        >>> from hessianflow.distributed import broadcast_buffers
        >>> broadcast_buffers(nn.BatchNorm1d(3))  # a plain process: nothing to send
        0
    """
    if not is_distributed():
        return 0
    buffers = list(module.buffers())
    with torch.no_grad():
        for b in buffers:
            dist.broadcast(b, src=src)
    return len(buffers)


def assert_same_on_all_ranks(values, what: str = "value") -> None:
    """Raise on every rank if ``values`` (numbers or ``None``) are not bit-identical across the ranks.

    A rank that took a different decision (an eigenvalue, a batch size) would run a different number
    of collectives and dead-lock the others; this turns that into an error on every rank. ``None``
    and NaN compare equal to themselves. A no-op when not distributed (one small all-gather otherwise).

    Raises:
        RuntimeError: the ranks disagree (the message lists every rank's values).
    """
    if not is_distributed():
        return
    if not isinstance(values, (list, tuple)):
        values = [values]
    nums = [float("nan") if v is None else float(v) for v in values]
    # Compare bit patterns, so that -0.0 vs 0.0 or two NaNs are judged exactly.
    mine = torch.tensor(nums + [float(v is None) for v in values], dtype=torch.float64).view(torch.int64)
    backend = dist.get_backend()
    if backend == "nccl":
        mine = mine.cuda()
    gathered = [torch.empty_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, mine)
    if any(not torch.equal(g, gathered[0]) for g in gathered):
        shown = [g.cpu().view(torch.float64)[: len(nums)].tolist() for g in gathered]
        raise RuntimeError(f"the ranks disagree on {what}: " + "; ".join(f"rank {r}: {v}" for r, v in enumerate(shown)))


def exit_process(status: int = 0):
    """End a ``torchrun`` worker that has finished, with ``status``, skipping interpreter finalization.

    With torch 2.14 a gloo worker can abort *after* its work, at interpreter finalization, with
    "terminate called without an active exception" (SIGABRT), although its process group was destroyed:
    seen in 3 of roughly 190 worker processes over two of this project's CI runs, never locally, each after
    the run had printed its last line (pytorch/pytorch#190489 reports the same message for a group that
    is not destroyed). torchrun then reports the whole job as failed. Call this last: standard output,
    standard error and ``logging`` are flushed, files written by then are closed, and the process leaves
    through ``os._exit``.
    """
    import logging

    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed stream: nothing left to flush
            pass
    logging.shutdown()
    os._exit(int(status))
