"""The torchrun worker of tests/test_loss_forms.py's two-rank test: loss_fn, a model's .loss and dict
batches with token weights, summed over the ranks.

    python -m torch.distributed.run --nproc_per_node 2 tests/dist_loss_forms_worker.py OUT_DIR

Rank ``r`` takes the token batches ``r, r + world, ...`` of ``test_loss_forms.token_batches()`` (rank 0
two batches, rank 1 a one-batch list) and saves its products to ``OUT_DIR/forms_rank{r}.pt``.
"""

from __future__ import annotations

import os
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
for path in (os.path.dirname(HERE), HERE):
    if path not in sys.path:
        sys.path.insert(0, path)

from test_loss_forms import TinyLM, counted, token_batches  # noqa: E402

from hessianflow.curvature import EmpiricalFisherOperator, GGNOperator, HessianOperator  # noqa: E402
from hessianflow.curvature.losses import causal_lm_loss  # noqa: E402
from hessianflow.distributed import exit_process, init_distributed  # noqa: E402


def products(rank: int, world: int) -> dict:
    """This rank's operators over its batches (``world=1``: all of them, one process)."""
    model = TinyLM()
    mine = [b for i, b in enumerate(token_batches()) if i % world == rank]
    n = sum(p.numel() for p in model.parameters())
    v = torch.randn(n, generator=torch.Generator().manual_seed(12), dtype=torch.float64)
    out = {}
    H = HessianOperator(model, loss_fn=causal_lm_loss, dataloader=mine, batch_weight=counted)
    out["Hv"] = H @ v
    out["num_samples"] = H.num_samples
    out["Hv_loss"] = HessianOperator(model, dataloader=mine, batch_weight=counted) @ v
    out["Gv"] = GGNOperator(model, loss_fn=causal_lm_loss, dataloader=mine, batch_weight=counted) @ v
    out["Fv"] = EmpiricalFisherOperator(model, loss_fn=causal_lm_loss, dataloader=mine, batch_weight=counted) @ v
    out["grad"] = H.gradient()
    return out


def main(out_dir: str) -> None:
    ctx = init_distributed("cpu")
    try:
        res = products(ctx.rank, ctx.world_size)
        torch.save(res, os.path.join(out_dir, f"forms_rank{ctx.rank}.pt"))
    finally:
        ctx.close()


if __name__ == "__main__":
    main(sys.argv[1])
    exit_process(0)  # a torchrun worker: see hessianflow.distributed.exit_process
