"""The weighted combination over the pieces of a split (hessianflow.curvature.combine), without curvature:
plain tensors standing for the pieces' products, checked against the arithmetic they stand for."""

from __future__ import annotations

import pytest
import torch

from hessianflow.curvature.combine import WeightedSum, combine, combine_over_ranks

DT = torch.float64


def pieces(seed=0):
    g = torch.Generator().manual_seed(seed)
    return [
        ([torch.randn(3, generator=g, dtype=DT), torch.randn(2, 2, generator=g, dtype=DT)], u) for u in (3, 0, 5, 1)
    ]


def test_a_mean_is_the_unit_weighted_mean_and_a_sum_the_sum():
    ps = pieces()
    (a, b), units = combine(ps, "mean")
    total = sum(u for _, u in ps)
    assert units == total == 9
    ref_a = sum(u * v[0] for v, u in ps) / total
    ref_b = sum(u * v[1] for v, u in ps) / total
    assert torch.allclose(a, ref_a, rtol=1e-15) and torch.allclose(b, ref_b, rtol=1e-15)
    (a, b), _ = combine(ps, "sum")
    # a piece of zero units contributes nothing, in a sum too (an all-padding batch's loss is 0/0)
    assert torch.allclose(a, sum(v[0] for v, u in ps if u), rtol=1e-15)


def test_the_pieces_are_not_changed_and_the_order_does_not_matter():
    ps = pieces(1)
    kept = [[t.clone() for t in v] for v, _ in ps]
    (a, _), _ = combine(ps, "mean")
    assert all(torch.equal(t, k) for (v, _), kv in zip(ps, kept) for t, k in zip(v, kv))
    (a_rev, _), _ = combine(list(reversed(ps)), "mean")
    assert torch.allclose(a, a_rev, rtol=1e-14)


def test_fractional_units_weight_like_class_weights():
    acc = WeightedSum("mean")
    acc.add([torch.tensor([2.0], dtype=DT)], 0.5)
    acc.add([torch.tensor([8.0], dtype=DT)], 1.5)
    assert acc.result()[0].item() == pytest.approx((0.5 * 2 + 1.5 * 8) / 2.0, rel=1e-15)


def test_no_units_at_all_is_an_error_not_a_nan():
    acc = WeightedSum("mean")
    acc.add([torch.ones(2, dtype=DT)], 0)
    with pytest.raises(ValueError, match="no units"):
        acc.result(lambda: [torch.zeros(2, dtype=DT)])
    with pytest.raises(ValueError, match="reduction"):
        WeightedSum("none")


def test_over_ranks_without_a_group_is_the_local_combination():
    ps = pieces(2)

    def local():
        acc = WeightedSum("mean")
        for v, u in ps:
            acc.add([t.clone() for t in v], u)
        return acc

    got, units = combine_over_ranks(local, lambda: [torch.zeros(3, dtype=DT), torch.zeros(2, 2, dtype=DT)],
                                    reduction="mean", device="cpu")  # fmt: skip
    ref, ref_units = combine(ps, "mean")
    assert units == ref_units and all(torch.equal(a, b) for a, b in zip(got, ref))
