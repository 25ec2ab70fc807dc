"""Seeded random vectors, the same on every device.

Vectors are drawn on the CPU from a ``torch.Generator`` and then moved, so that a seed gives the same
numbers on a CPU and a GPU run (and on every rank of a distributed run).
"""

from __future__ import annotations

import torch

__all__ = ["make_generator", "randn", "rademacher"]


def make_generator(seed=None) -> torch.Generator:
    """Return a CPU generator: ``seed`` may be ``None`` (fresh entropy), an int, or a Generator."""
    if isinstance(seed, torch.Generator):
        return seed
    g = torch.Generator(device="cpu")
    if seed is None:
        g.seed()
    else:
        g.manual_seed(int(seed))
    return g


def randn(shape, generator: torch.Generator, dtype=torch.float64, device="cpu") -> torch.Tensor:
    """Standard normal samples drawn on the CPU in float64, then cast and moved."""
    return torch.randn(shape, generator=generator, dtype=torch.float64).to(device=device, dtype=dtype)


def rademacher(shape, generator: torch.Generator, dtype=torch.float64, device="cpu") -> torch.Tensor:
    """Random signs (+1/-1 with equal probability), drawn on the CPU, then cast and moved."""
    bits = torch.randint(0, 2, shape, generator=generator, dtype=torch.int64)
    return (2 * bits - 1).to(device=device, dtype=dtype)
