"""The torchrun worker of tests/test_objective_splits.py: every case's operators over this rank's share.

    python -m torch.distributed.run --nproc_per_node N tests/dist_objective_worker.py OUT_DIR

For each case of ``objective_cases.cases()`` a batch is drawn from a fixed seed, cut into ``world``
consecutive shares of random (unequal, possibly zero) sizes, and this rank's share into a loader of up to
three unequal batches with a random micro-batch size; the dense Hessian, GGN and empirical Fisher over
the ranks are saved to ``OUT_DIR/rank{r}.pt`` for the test to compare with :func:`references`.
"""

from __future__ import annotations

import os
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
for path in (os.path.dirname(HERE), HERE):
    if path not in sys.path:
        sys.path.insert(0, path)

import objective_cases as oc  # noqa: E402

from hessianflow.curvature import EmpiricalFisherOperator, GGNOperator, HessianOperator  # noqa: E402
from hessianflow.distributed import exit_process, init_distributed  # noqa: E402

KINDS = {"H": HessianOperator, "G": GGNOperator, "F": EmpiricalFisherOperator}
N = 9


def _case_batch(name, index):
    make_model, _, make_batch, _ = oc.cases()[name]
    g = torch.Generator().manual_seed(100 + index)
    batch = make_batch(g, N, 0.3)
    return make_model(index % 5), batch, g


def references() -> dict:
    """The whole batch's dense operators, one process, keyed ``"case/kind"``."""
    out = {}
    for i, (name, (_, make_kw, _, kinds)) in enumerate(sorted(oc.cases().items())):
        model, batch, _ = _case_batch(name, i)
        for kind in kinds:
            out[f"{name}/{kind}"] = KINDS[kind](model, **make_kw(), data=batch).to_dense()
    return out


def main(out_dir: str) -> None:
    ctx = init_distributed("cpu")
    if not torch.distributed.is_initialized():  # one process: init_distributed makes no group; a real one
        torch.distributed.init_process_group("gloo")
    try:
        _save(torch.distributed.get_rank(), torch.distributed.get_world_size(), out_dir)
    finally:
        ctx.close()
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def _save(rank: int, world: int, out_dir: str) -> None:
    out, splits = {}, {}
    for i, (name, (_, make_kw, _, kinds)) in enumerate(sorted(oc.cases().items())):
        model, batch, g = _case_batch(name, i)  # the same draws on every rank
        shares = oc.random_split(g, N, world)
        if name == "ce_ignore":
            shares = [N, *[0] * (world - 1)]  # ranks without any data
        mine = oc.pieces(batch, shares)[rank]
        sizes = oc.random_split(g, shares[rank], 3)
        micro = int(torch.randint(1, 4, (1,), generator=g))
        loader = oc.pieces(mine, sizes)
        splits[name] = {"shares": shares, "batches": sizes, "micro": micro}
        for kind in kinds:
            op = KINDS[kind](model, **make_kw(), dataloader=loader, micro_batch_size=micro, distributed=True)
            out[f"{name}/{kind}"] = op.to_dense()
    out["_splits"] = splits
    torch.save(out, os.path.join(out_dir, f"rank{rank}.pt"))


if __name__ == "__main__":
    main(sys.argv[1])
    exit_process(0)  # a torchrun worker: see hessianflow.distributed.exit_process
