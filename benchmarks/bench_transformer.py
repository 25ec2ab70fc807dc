"""Cost of curvature products on a GPT-2-style model, as multiples of a gradient, beside hessian-eigenthings.

One row per method, each in a fresh process (so that one row's allocations cannot hide another's peak):

- ``gradient``: forward + backward of the next-token loss (the unit of time and memory);
- ``hf hessian (reused)``: hessianflow's Hessian product with the first-order graph kept (the default
  on one batch); the peak includes building that graph, the time is per further product;
- ``hf hessian (fresh)``: ``reuse_graph=False``: forward, gradient with ``create_graph``, double backward;
- ``hf hessian (micro m)`` / ``hf ggn (micro m)``: ``micro_batch_size=batch/m``: the same product over the
  batch, in ``m`` chunks with one chunk's graph in memory at a time;
- ``hf ggn``: hessianflow's GGN product with :func:`hessianflow.curvature.losses.causal_lm_loss` (the analytic
  softmax cross-entropy Hessian);
- ``he hessian`` / ``he ggn``: hessian-eigenthings 1.0.0a5's HuggingFace path (``hf_lm_loss()``,
  ``hf_lm_forward()`` + ``hf_lm_loss_of_output()``) on the same model and batch. It does not select
  attention kernels: as-is, its products fail on the default ``sdpa`` attention (the row says so), so
  the ``+math`` rows run it inside ``sdpa_kernel(SDPBackend.MATH)``, as a user would have to.

Peak memory: CUDA ``torch.cuda.max_memory_allocated`` minus what was allocated before the call; CPU the
peak resident set size during the first call (sampled every 0.5 ms from ``/proc/self/statm``; glibc's
mmap threshold fixed at 64 KiB so that freed tensors leave the RSS) minus the RSS before it. Times: the
median of ``--repeats`` calls after one warm-up. Not a test: nothing is asserted.

Usage::

    python benchmarks/bench_transformer.py                                  # CPU: 2 layers, 128 wide, batch 4 x 64
    python benchmarks/bench_transformer.py --device cuda --config gpt2-small --dtype float32
    python benchmarks/bench_transformer.py --device cuda --config gpt2-small --dtype bfloat16
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import statistics
import threading
import time

CONFIGS = {
    # CPU: small enough for a 2-core machine, large enough that the products dominate Python overhead
    "small": {"n_layer": 2, "n_embd": 128, "n_head": 4, "vocab_size": 2048, "n_positions": 64,
              "batch": 4, "tokens": 64},
    # the same model on 4x the tokens: activations weigh more against the parameters
    "small-long": {"n_layer": 2, "n_embd": 128, "n_head": 4, "vocab_size": 2048, "n_positions": 128,
                   "batch": 8, "tokens": 128},
    # GPT-2 small (124M parameters), batch 8 x 256 tokens
    "gpt2-small": {"n_layer": 12, "n_embd": 768, "n_head": 12, "vocab_size": 50257, "n_positions": 1024,
                   "batch": 8, "tokens": 256},
    # the test of this script's plumbing
    "tiny": {"n_layer": 1, "n_embd": 16, "n_head": 2, "vocab_size": 64, "n_positions": 16, "batch": 2, "tokens": 16},
}  # fmt: skip
ROWS = ("gradient", "hf hessian (reused)", "hf hessian (fresh)", "hf hessian (micro 2)", "hf hessian (micro 4)",
        "hf hessian (fwd-over-rev)", "hf hessian (finite diff)", "hf ggn", "hf ggn (micro 2)",
        "he hessian", "he hessian +math", "he ggn", "he ggn +math")  # fmt: skip


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", type=str, default="small", choices=sorted(CONFIGS), help="model and batch size")
    p.add_argument("--device", type=str, default="cpu", help="cpu or cuda")
    p.add_argument("--dtype", type=str, default="float32", choices=["float32", "bfloat16", "float64"], help="dtype")
    p.add_argument("--repeats", type=int, default=5, help="timed calls per row (the median is reported)")
    p.add_argument("--threads", type=int, default=1, help="CPU intra-op threads (0: torch's default)")
    p.add_argument("--rows", type=str, default=",".join(ROWS), help="comma-separated rows to run")
    p.add_argument("--json", type=str, default=None, help="also write the results to this JSON file")
    return p


# -- the problem --------------------------------------------------------------------------------


def _setup(cfg_name: str, device: str, dtype_name: str, threads: int):
    import torch
    import transformers

    if threads:
        torch.set_num_threads(threads)
    c = CONFIGS[cfg_name]
    torch.manual_seed(0)
    config = transformers.GPT2Config(
        vocab_size=c["vocab_size"], n_positions=c["n_positions"], n_embd=c["n_embd"], n_layer=c["n_layer"],
        n_head=c["n_head"], resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
    )  # fmt: skip
    model = transformers.GPT2LMHeadModel(config).to(device=device, dtype=getattr(torch, dtype_name)).eval()
    ids = torch.randint(0, c["vocab_size"], (c["batch"], c["tokens"]), device=device)
    return model, {"input_ids": ids, "labels": ids}


def _calls(row: str, model, batch):
    """``(prepare, call)``: ``prepare()`` builds what the row holds between calls, ``call()`` is timed."""
    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel

    import hessianflow as hf
    from hessianflow.curvature.losses import causal_lm_loss

    params = [p for p in model.parameters() if p.requires_grad]
    n = sum(p.numel() for p in params)
    v = torch.randn(n, device=params[0].device, dtype=params[0].dtype)
    if row == "gradient":
        return None, lambda: torch.autograd.grad(causal_lm_loss(model, batch), params)
    if row.startswith("hf "):
        micro = None
        if "(micro " in row:  # "(micro m)": the batch in m chunks (micro_batch_size = batch / m)
            chunks = int(row.split("(micro ")[1].rstrip(")"))
            micro = -(-batch["input_ids"].shape[0] // chunks)
            row = row.split(" (micro")[0] + ("" if row.startswith("hf ggn") else " (fresh)")
        kind = {"hf hessian (reused)": "reused", "hf hessian (fresh)": "fresh", "hf ggn": "ggn",
                "hf hessian (fwd-over-rev)": "forward_over_reverse",
                "hf hessian (finite diff)": "finite_difference"}[row]  # fmt: skip
        Op = hf.GGNOperator if kind == "ggn" else hf.HessianOperator
        backend = kind if kind in ("forward_over_reverse", "finite_difference") else "double_backprop"
        op = Op(
            model, loss_fn=causal_lm_loss, data=batch, reuse_graph=kind == "reused", backend=backend,
            micro_batch_size=micro,
        )  # fmt: skip
        return None, lambda: op @ v
    import hessian_eigenthings as he
    from hessian_eigenthings.loss_fns.huggingface import hf_lm_forward, hf_lm_loss, hf_lm_loss_of_output

    if row.startswith("he hessian"):
        op = he.HessianOperator(model, [batch], hf_lm_loss())
    else:
        op = he.GGNOperator(model, [batch], hf_lm_forward(), hf_lm_loss_of_output())
    if row.endswith("+math"):

        def call():
            with sdpa_kernel(SDPBackend.MATH):
                return op.matvec(v)

        return None, call
    return None, lambda: op.matvec(v)


# -- measuring ------------------------------------------------------------------------------------


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class _PeakRSS:
    """The peak RSS while the ``with`` block runs, sampled by a thread (torch releases the GIL in kernels)."""

    def __enter__(self):
        self.base = self.peak = _rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, _rss())
            time.sleep(0.0005)

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss())
        self.delta = self.peak - self.base


def _sync(device: str):
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _measure(row: str, cfg: str, device: str, dtype: str, repeats: int, threads: int) -> dict:
    import torch

    model, batch = _setup(cfg, device, dtype, threads)
    try:
        # one gradient first, so that lazy initialisation (kernels, thread pools) is not counted as a peak
        _, warm = _calls("gradient", model, batch)
        warm()
        _, call = _calls(row, model, batch)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
            call()
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated() - before
        else:
            with _PeakRSS() as m:
                call()
            peak = m.delta
        times = []
        for _ in range(repeats):
            _sync(device)
            t0 = time.perf_counter()
            call()
            _sync(device)
            times.append(time.perf_counter() - t0)
        return {"row": row, "seconds": statistics.median(times), "peak_bytes": int(peak)}
    except Exception as e:  # a peer that cannot run this model: its error is the result
        return {"row": row, "error": f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"}


def _in_fresh_process(*args) -> dict:
    ctx = mp.get_context("spawn")
    with ctx.Pool(1) as pool:
        return pool.apply(_measure, args)


def main(args) -> dict:
    """Steps: one fresh process per row -> ratios to the gradient row -> the table. Returns the results."""
    os.environ.setdefault("MALLOC_MMAP_THRESHOLD_", "65536")  # inherited by the spawned workers
    rows = [r.strip() for r in args.rows.split(",") if r.strip()]
    if "gradient" not in rows:
        rows.insert(0, "gradient")
    results = [_in_fresh_process(r, args.config, args.device, args.dtype, args.repeats, args.threads) for r in rows]
    grad = next(r for r in results if r["row"] == "gradient")
    for r in results:
        if "error" not in r and "error" not in grad:
            r["time_x_gradient"] = r["seconds"] / grad["seconds"]
            r["memory_x_gradient"] = r["peak_bytes"] / max(grad["peak_bytes"], 1)
    out = {"config": args.config, **CONFIGS[args.config], "device": args.device, "dtype": args.dtype,
           "threads": args.threads, "rows": results}  # fmt: skip
    _print(out)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)
    return out


def _print(out: dict) -> None:
    print(f"config {out['config']} on {out['device']}, {out['dtype']}, threads {out['threads']}")
    print(f"{'row':<26}{'ms':>10}{'x grad':>9}{'peak MiB':>11}{'x grad':>9}")
    for r in out["rows"]:
        if "error" in r:
            print(f"{r['row']:<26}  fails: {r['error']}")
            continue
        tx, mx = r.get("time_x_gradient", float("nan")), r.get("memory_x_gradient", float("nan"))
        print(f"{r['row']:<26}{1e3 * r['seconds']:>10.1f}{tx:>9.2f}{r['peak_bytes'] / 2**20:>11.1f}{mx:>9.2f}")


if __name__ == "__main__":
    main(build_parser().parse_args())
