"""hessianflow's core on a GPU, beside PyHessian, hessian-eigenthings and curvlinops (issue 13, part 4).

NOT RUN YET: written in a session without a GPU (benchmarks/README.md says so). Usage::

    python benchmarks/gpu_bench.py                         # ResNet-20 batch 128 and a GPT-2-style model
    python benchmarks/gpu_bench.py --workload resnet --repeats 5 --json gpu.json
    python benchmarks/gpu_bench.py --compile               # also try torch.compile on the model

Rows per workload, each timed after a warm-up with ``torch.cuda.synchronize`` (median of ``--repeats``):

* a gradient (forward + backward): the unit of time, and its peak memory (``max_memory_allocated``
  after ``reset_peak_memory_stats``, minus the memory held before) the unit of memory;
* one Hessian-vector product with the first-order graph reused, and fresh (hessianflow; PyHessian
  reused; hessian-eigenthings and curvlinops fresh, their design), as multiples of both units;
* top-1 and top-5 (``lanczos(tol=1e-4)``, hessianflow's defaults otherwise; peers: PyHessian's power
  iteration with its defaults, hessian-eigenthings' Lanczos with ``max_iter`` = hessianflow's product
  count, curvlinops + scipy ``eigsh(tol=1e-2)``) in seconds, with products and the eigenvalues;
* a 90-step SLQ run (hessianflow ``spectral_density(num_runs=1, num_steps=90)``, PyHessian ``density(iter=90,
  n_v=1)``, hessian-eigenthings ``spectral_density(lanczos_steps=90)``) in seconds.

Targets (issue 13): a reused product at most 1.6x a gradient, peak memory at most 1.5x a gradient's,
and every row ahead of every peer. ``--compile`` wraps the model in ``torch.compile`` for hessianflow's
rows (double backward through compiled graphs may be unsupported: the error is recorded as the row), and
adds issue 24's rows: ``compile=True`` products and ``matmat`` of k = 2, 4 batched vs a loop (the "whole
matmat" rows: divide by k for a product).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch
from torch import nn

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)

import _peers  # noqa: E402

import hessianflow as hf  # noqa: E402


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def measure(fn, repeats: int) -> dict:
    """Median seconds over ``repeats`` (after one warm-up) and the peak memory above the start, or the error."""
    try:
        fn()
        sync()
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            out = fn()
            sync()
            times.append(time.perf_counter() - t0)
        peak = None
        if torch.cuda.is_available():
            sync()
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            fn()
            sync()
            peak = torch.cuda.max_memory_allocated() - base
        return {"seconds": statistics.median(times), "peak_bytes": peak, "result": out}
    except Exception as exc:  # noqa: BLE001 - a failing row is a result
        return {"error": f"{type(exc).__name__}: {exc}"}


def resnet_workload(device, batch: int):
    from hessianflow.training.data import fixed_batch, get_datasets
    from hessianflow.training.models import get_model

    _, plain, _ = get_datasets("synthetic", augment=False, seed=0, num_train=max(1024, batch), num_test=16)
    torch.manual_seed(0)
    model = get_model("ResNet", depth=20).to(device)
    model.train()
    with torch.no_grad():
        for i in range(8):
            model(fixed_batch(plain, 128, seed=1000 + i)[0].to(device))
    model.eval()
    x, y = fixed_batch(plain, batch, seed=0)
    crit = nn.CrossEntropyLoss()
    return {"name": f"ResNet-20, batch {batch}", "model": model, "crit": crit, "x": x.to(device), "y": y.to(device)}


def transformer_workload(device):
    import transformers

    torch.manual_seed(0)
    config = transformers.GPT2Config(
        vocab_size=8192, n_positions=256, n_embd=256, n_layer=4, n_head=4, resid_pdrop=0.0, embd_pdrop=0.0,
        attn_pdrop=0.0,
    )  # fmt: skip
    model = transformers.GPT2LMHeadModel(config).to(device).eval()
    ids = torch.randint(0, 8192, (8, 256), device=device)
    return {"name": "GPT-2-style (4 layers, d=256, vocab 8192), 8 x 256 tokens", "model": model,
            "batch": {"input_ids": ids, "labels": ids}}  # fmt: skip


def hf_operator(w, reuse=True, model=None, **kw):
    from hessianflow.curvature.losses import causal_lm_loss

    model = model or w["model"]
    if "batch" in w:
        return hf.HessianOperator(model, loss_fn=causal_lm_loss, data=w["batch"], reuse_graph=reuse, **kw)
    return hf.HessianOperator(model, w["crit"], data=(w["x"], w["y"]), reuse_graph=reuse, **kw)


def rows_for(w, peers: dict, repeats: int, compile_model: bool) -> dict:
    from hessianflow.curvature.losses import causal_lm_loss

    model = w["model"]
    params = [p for p in model.parameters() if p.requires_grad]
    n = sum(p.numel() for p in params)
    v = torch.randn(n, generator=torch.Generator().manual_seed(1)).to(params[0])
    image = "batch" not in w

    def grad():
        loss = w["crit"](model(w["x"]), w["y"]) if image else causal_lm_loss(model, w["batch"])
        return torch.autograd.grad(loss, params)

    calls = {"gradient": grad}
    H = hf_operator(w)
    calls["hessianflow HVP, graph reused"] = lambda: H @ v
    calls["hessianflow HVP, fresh"] = lambda: hf_operator(w, reuse=False) @ v
    calls["hessianflow top-1 (tol=1e-4)"] = lambda: hf.lanczos(hf_operator(w), k=1, tol=1e-4, seed=0)
    calls["hessianflow top-5 (tol=1e-4)"] = lambda: hf.lanczos(hf_operator(w), k=5, tol=1e-4, seed=0)
    calls["hessianflow SLQ, 90 steps"] = lambda: hf.spectral_density(
        hf_operator(w), num_runs=1, num_steps=90, seed=0
    )
    if compile_model:
        compiled = torch.compile(model)
        Hc = hf_operator(w, model=compiled)
        calls["hessianflow HVP, graph reused, torch.compile"] = lambda: Hc @ v
        # issue 24: the operator's own compile=True (forward-over-reverse through inductor, each graph checked
        # against the eager product), and block products of k = 2, 4 as one batched pass vs a loop
        Hcc = hf_operator(w, compile=True, batched_matmat=True)
        calls["hessianflow HVP, compile=True"] = lambda: Hcc @ v
        for k in (2, 4):
            Vk = torch.randn(n, k, generator=torch.Generator().manual_seed(k)).to(params[0])
            calls[f"hessianflow matmat k={k}, compile=True (vmap), whole matmat"] = lambda Vk=Vk: Hcc.matmat(Vk)
            for name, b in (("batched", True), ("loop", False)):
                Hk = hf_operator(w, batched_matmat=b)
                calls[f"hessianflow matmat k={k}, graph reused ({name}), whole matmat"] = lambda Hk=Hk, Vk=Vk: (
                    Hk.matmat(Vk)
                )
    if image:
        x, y, crit = w["x"], w["y"], w["crit"]
        if peers["pyhessian"]:
            ph = _peers.pyhessian_hessian(model, crit, x, y)
            vl = [t.view_as(p) for t, p in zip(v.split([p.numel() for p in params]), params)]
            calls["PyHessian HVP, graph reused"] = lambda: _peers.pyhessian_hvp(ph, vl)
            for k in (1, 5):
                calls[f"PyHessian top-{k} (defaults)"] = lambda k=k: _peers.pyhessian_eigenvalues(
                    model, crit, x, y, k, 100, 1e-3, 0
                )
            calls["PyHessian SLQ, 90 steps"] = lambda: _peers.pyhessian_density(model, crit, x, y, 90, 1, 0)
        if peers["hessian_eigenthings"]:
            he = _peers.eigenthings_operator(model, crit, x, y)
            calls["hessian-eigenthings HVP, fresh"] = lambda: he.matvec(v)
            calls["hessian-eigenthings top-1 (max_iter=8)"] = lambda: _peers.eigenthings_lanczos(he, 1, 8, 0)
            calls["hessian-eigenthings top-5 (max_iter=22)"] = lambda: _peers.eigenthings_lanczos(he, 5, 22, 0)
            calls["hessian-eigenthings SLQ, 90 steps"] = lambda: _peers.eigenthings_density(he, 90, 0)
        if peers["curvlinops"]:
            cl, _ = _peers.curvlinops_operator(model, crit, x, y)
            calls["curvlinops HVP, fresh"] = lambda: cl @ v
            calls["curvlinops + eigsh top-5 (tol=1e-2)"] = lambda: _peers.curvlinops_eigsh(
                model, crit, x, y, 5, 1e-2, 0
            )
    out = {}
    for name, fn in calls.items():
        r = measure(fn, repeats if "HVP" in name or name == "gradient" else max(1, repeats // 2))
        res = r.pop("result", None)
        if isinstance(res, hf.EigenResult):
            r["products"], r["eigenvalues"] = res.num_matvecs, res.eigenvalues.tolist()
        out[name] = r
        print(f"  {name}: {r}", flush=True)
    g = out["gradient"]
    for r in out.values():
        if "seconds" in r and "seconds" in g:
            r["x_gradient_time"] = r["seconds"] / g["seconds"]
            if r.get("peak_bytes") and g.get("peak_bytes"):
                r["x_gradient_memory"] = r["peak_bytes"] / g["peak_bytes"]
    H.release()
    return out


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workload", choices=("resnet", "transformer", "all"), default="all", help="which model(s)")
    p.add_argument("--batch", type=int, default=128, help="ResNet-20 batch size (default 128)")
    p.add_argument("--repeats", type=int, default=5, help="timed repeats of the product rows (default 5)")
    p.add_argument("--compile", action="store_true", help="also time a product through torch.compile(model)")
    p.add_argument("--json", type=str, default=None, help="write the numbers to this JSON file")
    args = p.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    peers = {name: _peers.load(name)[0] is not None for name in _peers.PEERS}
    info = {
        "torch": torch.__version__,
        "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
        "peers": {n: (_peers.version(n) if ok else None) for n, ok in peers.items()},
        "command": sys.argv,
    }
    print(info, flush=True)
    results = {"info": info}
    names = ("resnet", "transformer") if args.workload == "all" else (args.workload,)
    for name in names:
        try:
            w = resnet_workload(device, args.batch) if name == "resnet" else transformer_workload(device)
        except ImportError as exc:
            results[name] = {"error": str(exc)}
            continue
        print(f"\n{w['name']} on {info['device']}", flush=True)
        results[name] = {"name": w["name"], "rows": rows_for(w, peers, args.repeats, args.compile)}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1, default=str)
    return results


if __name__ == "__main__":
    main()
