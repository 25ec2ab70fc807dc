"""The weighted sum over the pieces of a split: batches, micro-batches, ranks (and, next, shards).

A mean-reduced loss over data split into pieces :math:`b` (each holding :math:`u_b` of the units the loss
averages over: samples, counted targets, counted tokens...) is

.. math:: L = \\frac{1}{U} \\sum_b u_b L_b, \\qquad U = \\sum_b u_b,

exactly when :math:`L_b` is the mean over the :math:`u_b` units of piece :math:`b`; a sum-reduced one is
:math:`\\sum_b L_b`. Every curvature matrix (and the gradient) is linear in the loss, so it combines the
same way. This module does that sum and knows nothing of curvature: it is tested on plain tensors. The
units come from the objective's one declaration (:class:`~hessianflow.curvature.batches.LossSpec`); a piece of
zero units contributes zero (it is never evaluated: an all-padding batch's loss is ``0/0``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import torch

from ..distributed import reduce_or_raise

__all__ = ["WeightedSum", "combine", "combine_over_ranks"]


class WeightedSum:
    """:math:`\\sum_b u_b X_b` (mean) or :math:`\\sum_b X_b` (sum) over pieces, with :math:`U = \\sum_b u_b`.

    Args:
        reduction: ``"mean"`` or ``"sum"``.

    Example:
        >>> import torch
        >>> acc = WeightedSum("mean")
        >>> acc.add([torch.tensor([1.0])], 1)
        >>> acc.add([torch.tensor([4.0])], 3)
        >>> acc.result()  # (1 * 1 + 3 * 4) / 4
        [tensor([3.2500])]
    """

    def __init__(self, reduction: str):
        if reduction not in ("mean", "sum"):
            raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
        self.reduction = reduction
        self.values: list[torch.Tensor] | None = None
        self.units = 0

    def add(self, values: Sequence[torch.Tensor], units) -> None:
        """Add one piece's ``values`` (its own mean, or sum) holding ``units`` units (skipped when 0)."""
        if units == 0:
            return
        weight = float(units) if self.reduction == "mean" else 1.0
        if self.values is None:
            self.values = [weight * t for t in values]
        else:
            for a, t in zip(self.values, values):
                a.add_(t, alpha=weight)
        self.units += units

    def finish(self, values: list[torch.Tensor] | None, units, zeros: Callable[[], Sequence[torch.Tensor]]):
        """The combination of already summed ``values`` over ``units`` (e.g. after an all-reduce)."""
        if units == 0:
            raise ValueError("the data held no units to average over (no samples, or every target ignored)")
        values = list(zeros()) if values is None else values
        if self.reduction == "mean":
            for a in values:
                a.div_(units)
        return values

    def result(self, zeros: Callable[[], Sequence[torch.Tensor]] | None = None) -> list[torch.Tensor]:
        """The combined values: divided by the total units for a mean."""
        return self.finish(self.values, self.units, zeros or (lambda: []))


def combine(pieces: Iterable[tuple[Sequence[torch.Tensor], float]], reduction: str, zeros=None):
    """``(combined values, total units)`` of ``(values, units)`` pieces (see :class:`WeightedSum`)."""
    acc = WeightedSum(reduction)
    for values, units in pieces:
        acc.add(values, units)
    return acc.result(zeros), acc.units


def combine_over_ranks(local: Callable[[], WeightedSum], zeros, *, reduction: str, device, fallback=()):
    """Every rank's :class:`WeightedSum` summed over ``torch.distributed`` and combined once.

    Unnormalised sums and units travel in one status-plus-payload exchange
    (:func:`~hessianflow.distributed.reduce_or_raise`): a rank that failed makes every rank raise, and a
    rank without data (an empty shard) joins with zeros. Returns ``(values, total units)``, the same on
    every rank.
    """

    def compute():
        acc = local()
        return acc.values, acc.units

    values, units = reduce_or_raise(
        compute, zeros, what="compute their curvature products", device=device, fallback=fallback
    )
    return WeightedSum(reduction).finish(values, units, zeros), units
