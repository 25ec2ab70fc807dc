"""Issue 24 on the CPU: compiled products and block products (``matmat``) against the eager ones.

Usage::

    python benchmarks/bench_compile.py                                  # ResNet-20 batch 64, k = 2 and 4
    python benchmarks/bench_compile.py --workload mlp --repeats 7       # the float64 MLP of bench_core.py
    python benchmarks/bench_compile.py --batch 16 --repeats 3 --json out.json

Rows (seconds, median of ``--repeats`` interleaved runs after one untimed warm-up, in blocks of >= 0.2 s,
per product, and as a multiple of a gradient): the gradient; the Hessian product eager (graph reused,
fresh, forward-over-reverse) and compiled (``compile=True``); the GGN eager (reused) and compiled;
``matmat`` of ``k`` columns as a loop of products and as one batched pass (``is_grads_batched`` over the
reused graph; ``vmap`` of forward-over-reverse, eager and compiled). The warm-up of each compiled operator
(its first product: tracing, inductor and the eager cross-check) is reported apart, with the graphs it
compiled and the check's relative difference. One torch thread (see benchmarks/README.md, "Threads").
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_core import interleaved, median, mlp_workload, resnet_workload, table  # noqa: E402

import hessianflow as hf  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workload", choices=("resnet", "mlp"), default="resnet", help="model (default resnet)")
    p.add_argument("--batch", type=int, default=64, help="ResNet-20 batch size (default 64)")
    p.add_argument("--ks", type=int, nargs="+", default=[2, 4], help="matmat widths (default 2 4)")
    p.add_argument("--repeats", type=int, default=5, help="timed repeats per row (default 5)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    p.add_argument("--json", default=None, help="write every number here")
    return p


def _warm(name: str, op, v) -> dict:
    t0 = time.perf_counter()
    op @ v
    st = op.compile_status
    return {"operator": name, "first_product_s": time.perf_counter() - t0, **(st.to_dict() if st else {})}


def main(args) -> dict:
    torch.set_num_threads(args.threads)
    w = resnet_workload(args.batch) if args.workload == "resnet" else mlp_workload()
    model, crit, x, y = w.model, w.criterion, w.x, w.y
    params = [p for p in model.parameters() if p.requires_grad]
    data = (x, y)
    g = torch.Generator().manual_seed(1)
    v = torch.randn(w.n, generator=g, dtype=torch.float64).to(params[0].dtype)
    ops = {
        "H reused": hf.HessianOperator(model, crit, data=data, batched_matmat=False),
        "H reused, batched": hf.HessianOperator(model, crit, data=data, batched_matmat=True),
        "H fresh": hf.HessianOperator(model, crit, data=data, reuse_graph=False),
        "H fwd-over-rev": hf.HessianOperator(
            model, crit, data=data, backend="forward_over_reverse", batched_matmat=True
        ),
        "H fwd-over-rev, loop": hf.HessianOperator(model, crit, data=data, backend="forward_over_reverse"),
        "H compiled": hf.HessianOperator(model, crit, data=data, compile=True, batched_matmat=True),
        "H compiled, loop": hf.HessianOperator(model, crit, data=data, compile=True, batched_matmat=False),
        "GGN reused": hf.GGNOperator(model, crit, data=data),
        "GGN compiled": hf.GGNOperator(model, crit, data=data, compile=True),
    }
    warm = [_warm(name, op, v) for name, op in ops.items() if "compiled" in name and "loop" not in name]
    Vs = {k: torch.randn(w.n, k, generator=g, dtype=torch.float64).to(params[0].dtype) for k in args.ks}
    for k, V in Vs.items():  # the compiled matmat's graph for each k, warmed (and checked) untimed
        t0 = time.perf_counter()
        ops["H compiled"].matmat(V)
        warm.append({"operator": f"H compiled, matmat k={k}", "first_product_s": time.perf_counter() - t0,
                     **ops["H compiled"].compile_status.to_dict()})  # fmt: skip
    ops["H compiled, loop"].product.checked = ops["H compiled"].product.checked  # share the k=1 graph
    calls = {"gradient": lambda: torch.autograd.grad(crit(model(x), y), params)}
    calls.update({f"{name} product": (lambda op=op: op @ v) for name, op in ops.items() if "loop" not in name})
    per = {}
    for k, V in Vs.items():
        for name in ("H reused", "H reused, batched", "H fwd-over-rev", "H fwd-over-rev, loop", "H compiled",
                     "H compiled, loop"):  # fmt: skip
            key = f"{name} matmat k={k}"
            calls[key] = lambda op=ops[name], V=V: op.matmat(V)
            per[key] = k
    out = interleaved(calls, args.repeats, warmup=True, min_time=0.2)
    grad_s = median(out["gradient"][0])
    rows, raw = [], {}
    for name, (ts, _, err) in out.items():
        s = median(ts) / per.get(name, 1) if ts else float("nan")
        raw[name] = {"seconds_per_product": s, "all": ts, "error": err}
        rows.append([name, err or f"{s:.4g}", f"{s / grad_s:.2f}" if not err else "", len(ts)])
    res = {
        "workload": w.notes,
        "torch": torch.__version__,
        "threads": args.threads,
        "warmup": warm,
        "table": table(["row (per product)", "seconds", "x gradient", "repeats"], rows),
        "raw": raw,
        "gradient_s": grad_s,
    }
    return res


if __name__ == "__main__":
    a = build_parser().parse_args()
    r = main(a)
    print("\n".join(r["workload"]))
    for wm in r["warmup"]:
        print(wm)
    print(r["table"])
    if a.json:
        with open(a.json, "w") as f:
            json.dump(r, f, indent=2)
