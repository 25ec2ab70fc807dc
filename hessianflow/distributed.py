"""``torch.distributed`` plumbing for the scripts and the operators: started by ``torchrun``.

``torchrun`` sets ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK`` (and the rendezvous variables); a plain
``python script.py`` sets none of them and stays single-process. NCCL is used on GPUs, gloo on CPUs.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

__all__ = ["DistContext", "init_distributed", "launched_by_torchrun", "shard", "all_reduce_sum", "broadcast_object"]


@dataclass
class DistContext:
    """Where this process stands: ``rank`` of ``world_size``; ``device`` is the one it computes on."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    initialized_here: bool = False

    @property
    def is_main(self) -> bool:
        """Rank 0: the only process that prints, logs, plots and writes checkpoints."""
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def close(self) -> None:
        """Destroy the process group if this context created it."""
        if self.initialized_here and dist.is_initialized():
            dist.destroy_process_group()
            self.initialized_here = False


def launched_by_torchrun() -> bool:
    """True when the environment torchrun sets is present with more than one process."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ and int(os.environ["WORLD_SIZE"]) > 1


def init_distributed(device: str = "auto", timeout_s: float = 600.0) -> DistContext:
    """Initialise ``torch.distributed`` from torchrun's environment, or a single-process context.

    Args:
        device: ``"auto"`` (CUDA when available), ``"cuda"`` or ``"cpu"``. Under torchrun on GPUs each
            process takes ``cuda:LOCAL_RANK``.
        timeout_s: the collective timeout: a rank that dies makes the others fail after this long
            instead of hanging for ever (torch's default is 10 to 30 minutes).

    Returns:
        The :class:`DistContext`.
    """
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
        dist.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=timeout_s))
        created = True
    return DistContext(rank=rank, world_size=world, local_rank=local_rank, device=dev, initialized_here=created)


def shard(n: int, rank: int, world_size: int) -> slice:
    """The contiguous slice of ``range(n)`` that ``rank`` owns (the first ``n % world_size`` get one more)."""
    base, extra = divmod(n, world_size)
    start = rank * base + min(rank, extra)
    return slice(start, start + base + (1 if rank < extra else 0))


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """In-place sum over ranks (a no-op without an initialised group of more than one process)."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t)
    return t


def broadcast_object(obj, src: int = 0):
    """The object of rank ``src`` on every rank (identity when not distributed)."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        box = [obj]
        dist.broadcast_object_list(box, src=src)
        return box[0]
    return obj
