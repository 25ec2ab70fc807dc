"""The torchrun worker of tests/test_fsdp.py: curvature of FSDP2-sharded models, this rank's part.

    python -m torch.distributed.run --nproc_per_node N tests/dist_fsdp_worker.py OUT_DIR

For each case a model is built from a seed, the global batch drawn, and the model sharded with
``fully_shard`` (per layer or block, then the root); every rank passes its unequal share of the global
batch. Saved to ``OUT_DIR/rank{r}.pt``: this rank's segments of the flat vector, its slices of ``H V``
for fixed global vectors ``V``, the eigen, trace and density results, and the eigenvectors' slices, for the
test to compare with the unsharded model on the whole batch (:func:`references`).
"""

from __future__ import annotations

import os
import sys

import torch
from torch import nn

HERE = os.path.dirname(os.path.abspath(__file__))
for path in (os.path.dirname(HERE), HERE):
    if path not in sys.path:
        sys.path.insert(0, path)

import hessianflow as hf  # noqa: E402
from hessianflow.curvature.losses import causal_lm_loss  # noqa: E402
from hessianflow.distributed import exit_process, init_distributed  # noqa: E402

N = 9  # global batch


def mlp(out=3):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 7), nn.LayerNorm(7), nn.Tanh(), nn.Linear(7, out)).double()


def cases():
    """name -> (make model, its blocks to shard, global batch, operator keywords, dtype)."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(N, 5, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (N,), generator=g)
    y_pad = y.clone()
    y_pad[[1, 2, 6]] = -100  # ignored targets: the mean is over the 6 counted ones
    out = {
        "mlp_ce": (mlp, (x, y), {"criterion": nn.CrossEntropyLoss()}),
        "mlp_ignored": (mlp, (x, y_pad), {"criterion": nn.CrossEntropyLoss()}),
        "mlp_sum_micro": (mlp, (x, y), {"criterion": nn.CrossEntropyLoss(reduction="sum"), "micro_batch_size": 2}),
        # one output row: with 2 or 3 ranks some ranks hold an empty shard of the last layer
        "mlp_mse_empty_shard": (lambda: mlp(1), (x, torch.randn(N, 1, generator=g, dtype=torch.float64)),
                                {"criterion": nn.MSELoss()}),
    }  # fmt: skip
    # a loader on every rank: batches of 2, so the ranks hold 2 or 3 batches of unequal sizes
    out["mlp_loader"] = (mlp, (x, y_pad), {"criterion": nn.CrossEntropyLoss(), "loader": 2})
    if os.environ.get("FSDP_TEST_GPT2") == "1":
        out["gpt2"] = (gpt2, gpt2_batch(), {"loss_fn": causal_lm_loss})
        out["gpt2_own_loss"] = (gpt2, gpt2_batch(), {})  # the model's .loss (HuggingFace's own, float32 logits)
    return out


def gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=23, n_positions=8, n_embd=8, n_layer=2, n_head=2, resid_pdrop=0.0,
                     embd_pdrop=0.0, attn_pdrop=0.0)  # fmt: skip
    return GPT2LMHeadModel(cfg).double().eval()


def gpt2_batch():
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(0, 23, (N, 6), generator=g)
    mask = torch.ones(N, 6, dtype=torch.long)
    for i, n in enumerate([6, 4, 2, 6, 5, 3, 6, 1, 4]):  # right padding
        mask[i, n:] = 0
    labels = ids.masked_fill(mask == 0, -100)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def blocks(model):
    if hasattr(model, "transformer"):
        return list(model.transformer.h)
    return [m for m in model if any(True for _ in m.parameters(recurse=False))]


CUTS = {1: [0, 9], 2: [0, 5, 9], 3: [0, 4, 7, 9], 4: [0, 3, 5, 7, 9]}  # unequal shares of the global batch


def share(batch, rank, world):
    """This rank's share: consecutive samples, unequal between ranks (:data:`CUTS`)."""
    sl = slice(CUTS[world][rank], CUTS[world][rank + 1])
    if isinstance(batch, dict):
        return {k: v[sl] for k, v in batch.items()}
    return tuple(t[sl] for t in batch)


def vectors(size, k=3):
    g = torch.Generator().manual_seed(7)
    return torch.randn(size, k, generator=g, dtype=torch.float64)


def operator(model, batch, kw, kind=None, **more):
    kw = dict(kw)
    crit = kw.pop("criterion", None)
    size = kw.pop("loader", None)
    if size is not None:  # this rank's share as a loader of batches of `size`
        n = len(batch[0])
        loader = [tuple(t[i : i + size] for t in batch) for i in range(0, n, size)]
        return (kind or hf.HessianOperator)(model, crit, dataloader=loader, **kw, **more)
    return (kind or hf.HessianOperator)(model, crit, data=batch, **kw, **more)


GGN_CASES = ("mlp_ce", "mlp_ignored", "mlp_mse_empty_shard", "gpt2")  # the GGN too (analytic CE, MSE, causal LM)
FISHER_CASES = ("mlp_ignored", "mlp_loader", "gpt2")  # the empirical Fisher: one sample at a time over the ranks
LAYER_CASES = ("mlp_ce", "mlp_sum_micro")  # per_layer: dense blocks and Lanczos blocks


def per_layer(model, batch, kw):
    kw = dict(kw)
    kw.pop("loader", None)
    crit = kw.pop("criterion", None)
    res = hf.per_layer(model, crit, data=batch, top_k=2, exact_threshold=30, trace_matvecs=20, seed=0, **kw)
    return [(r.name, r.eigenvalues, r.trace) for r in res]


def references() -> dict:
    """The unsharded model on the whole batch: H V, top-3, trace and density with the workers' seeds."""
    out = {}
    for name, (make, batch, kw) in cases().items():
        H = operator(make(), batch, kw)
        V = vectors(H.size)
        out[name] = {
            "HV": H.matmat(V),
            "dense": H.to_dense() if H.size <= 200 else None,
            "top3": hf.lanczos(H, k=3, seed=0).eigenvalues,
            "trace": hf.trace(H, num_matvecs=30, seed=0, method="hutchinson").estimate,
            "density": hf.spectral_density(H, num_runs=2, num_steps=12, seed=0),
            **more_solvers(H),
        }
        if name in GGN_CASES:
            out[name]["GV"] = operator(make(), batch, kw, hf.GGNOperator).matmat(V)
        if name in FISHER_CASES:
            out[name]["FV"] = operator(make(), batch, kw, hf.EmpiricalFisherOperator).matmat(V)
        if name in LAYER_CASES:
            out[name]["layers"] = per_layer(make(), batch, kw)
    return out


def failures(model_for, local, rank) -> dict:
    """What each rank raises: a non-finite loss on rank 1 only, then rank 1 without any data."""
    make, batch, kw = cases()["mlp_ce"]
    out = {}
    bad = tuple(t.clone() for t in local)
    if rank == 1:
        bad[0][0, 0] = float("nan")
    for what, data in (("nonfinite", bad), ("no_data", local if rank != 1 else None)):
        try:
            if data is None:  # an empty loader on this rank
                H = hf.HessianOperator(model_for(), kw["criterion"], dataloader=[], reduction="mean")
            else:
                H = hf.HessianOperator(model_for(), kw["criterion"], dataloader=[data], reduction="mean")
            H @ torch.ones(H.local_size, dtype=torch.float64)
            out[what] = "no error"
        except Exception as exc:  # noqa: BLE001 - the error is the result
            out[what] = f"{type(exc).__name__}: {exc}"
    return out


def more_solvers(H) -> dict:
    """Power iteration, Hutch++ and the CG solve of (H + 5 I) x = b, through the operator's vector space."""
    b = torch.zeros(H.local_size, dtype=torch.float64) + 1.0
    return {
        "power": hf.power_iteration(H, k=1, max_iter=30, tol=1e-8, seed=0).eigenvalues,
        "hutchpp": hf.trace(H, num_matvecs=12, seed=0, method="hutch++").estimate,
        "solve_norm": float(H.vector_space.norm(hf.solve(H, b, damping=5.0, method="minres", tol=1e-8).x))
        if hasattr(H, "vector_space")
        else float(hf.solve(H, b, damping=5.0, method="minres", tol=1e-8).x.norm()),
    }


def main(out_dir: str, mode: str = "cases") -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    ctx = init_distributed("cpu")
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group("gloo")
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    mesh = init_device_mesh("cpu", (world,))
    results = {}
    try:
        if mode == "failures":
            make, batch, kw = cases()["mlp_ce"]

            def model_for():
                model = make()
                for b in blocks(model):
                    fully_shard(b, mesh=mesh)
                fully_shard(model, mesh=mesh)
                return model

            torch.save(failures(model_for, share(batch, rank, world), rank), os.path.join(out_dir, f"rank{rank}.pt"))
            return
        for name, (make, batch, kw) in cases().items():
            model = make()
            for b in blocks(model):
                fully_shard(b, mesh=mesh)
            fully_shard(model, mesh=mesh)
            local = share(batch, rank, world)
            H = operator(model, local, kw)
            space = H.vector_space
            V = vectors(H.size)
            segments = space.segments or [(0, 0)]
            rows = torch.cat([torch.arange(a, a + n) for a, n in segments])
            HV = H.matmat(V[rows].contiguous())
            eig = hf.lanczos(H, k=3, seed=0)
            tr = hf.trace(H, num_matvecs=30, seed=0, method="hutchinson")
            dens = hf.spectral_density(H, num_runs=2, num_steps=12, seed=0)
            res = {
                "rows": rows,
                "local_size": H.local_size,
                "size": H.size,
                "HV": HV,
                "top3": eig.eigenvalues,
                "converged": eig.converged,
                "vecs": eig.eigenvectors,
                "residuals": eig.residuals,
                "trace": tr.estimate,
                "nodes": dens.nodes,
                "weights": dens.weights,
                **more_solvers(H),
                "params_are_dtensors": all(type(p).__name__ == "DTensor" for p in model.parameters()),
            }
            if name in GGN_CASES:
                res["GV"] = operator(model, local, kw, hf.GGNOperator).matmat(V[rows].contiguous())
            if name in FISHER_CASES:
                res["FV"] = operator(model, local, kw, hf.EmpiricalFisherOperator).matmat(V[rows].contiguous())
            if name in LAYER_CASES:
                res["layers"] = per_layer(model, local, kw)
            if name == "mlp_ce":  # finite differences of a float32 copy, with their error bar
                m32 = make().float()
                for b in blocks(m32):
                    fully_shard(b, mesh=mesh)
                fully_shard(m32, mesh=mesh)
                l32 = tuple(t.float() if t.is_floating_point() else t for t in local)
                F = operator(m32, l32, kw, backend="finite_difference")
                res["fd_HV"] = F.matmat(V[rows].float().contiguous()).double()
                res["fd_error"] = F.product.error
                res["fd_step"] = F.product.step
            results[name] = res
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        ctx.close()
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:])
    exit_process(0)  # a torchrun worker: see hessianflow.distributed.exit_process
