"""The Hessian spectrum of a GPT-2-style language model: top eigenvalues, trace, per-block table, density.

The model is HuggingFace's ``GPT2LMHeadModel``, built from a configuration (random weights) or loaded
from a local directory written by ``save_pretrained``; nothing is downloaded. The tokens are the bytes of
a local text file (byte-level: token id = byte value, vocabulary 256, no tokenizer) or uniform random
tokens. The loss is the next-token cross-entropy (:func:`hessianflow.curvature.losses.causal_lm_loss`, labels =
inputs), and products run through the model's default ``sdpa`` attention (hessianflow selects the math
kernel, which has a double backward; see :mod:`hessianflow.curvature.attention`).

Usage::

    python examples/transformer_spectrum.py                                   # random tokens, tiny model
    python examples/transformer_spectrum.py --text README.md --layers 2 --embd 64 --heads 4
    python examples/transformer_spectrum.py --from-pretrained runs/gpt2-bytes --text data.txt --out figures/

It prints the top-k eigenvalues (Lanczos 1950), the trace (:func:`hessianflow.linalg.trace`), a table with the
top eigenvalue and trace of each transformer block's diagonal Hessian block (:func:`hessianflow.per_layer`),
and writes the spectral density (stochastic Lanczos quadrature, Ghorbani et al. 2019) to
``<out>/transformer_density.png``.
"""

from __future__ import annotations

import argparse
import os
import tempfile

import torch

import hessianflow as hf
from hessianflow.curvature.losses import causal_lm_loss

DTYPES = {"float32": torch.float32, "float64": torch.float64}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--from-pretrained", type=str, default=None, help="a local save_pretrained directory (no download)")
    p.add_argument("--layers", type=int, default=2, help="transformer blocks of a model built from a config")
    p.add_argument("--embd", type=int, default=32, help="embedding width of a model built from a config")
    p.add_argument("--heads", type=int, default=2, help="attention heads of a model built from a config")
    p.add_argument("--vocab", type=int, default=256, help="vocabulary size of a config model (256: bytes)")
    p.add_argument("--text", type=str, default=None, help="a local text file, tokenised as bytes (default: random)")
    p.add_argument("--seq-len", type=int, default=32, help="tokens per sequence")
    p.add_argument("--batch-size", type=int, default=4, help="sequences in the batch")
    p.add_argument("--top-k", type=int, default=3, help="number of top eigenvalues")
    p.add_argument("--tol", type=float, default=1e-6, help="Lanczos residual tolerance (relative)")
    p.add_argument("--trace-matvecs", type=int, default=60, help="products for each trace estimate")
    p.add_argument("--density-runs", type=int, default=3, help="SLQ runs (random start vectors)")
    p.add_argument("--density-steps", type=int, default=40, help="Lanczos steps per SLQ run")
    p.add_argument("--exact-threshold", type=int, default=1500, help="blocks up to this size are formed densely")
    p.add_argument("--dtype", type=str, default="float32", choices=sorted(DTYPES), help="parameter dtype")
    p.add_argument("--device", type=str, default="cpu", help="torch device")
    p.add_argument("--seed", type=int, default=0, help="seed of the weights, the token windows and the solvers")
    p.add_argument("--out", type=str, default=None, help="directory for the density PNG (default: a temp dir)")
    return p


def build_model(args):
    """``GPT2LMHeadModel`` from ``--from-pretrained`` or from a configuration; eval mode, dropout off."""
    import transformers

    if args.from_pretrained:
        model = transformers.GPT2LMHeadModel.from_pretrained(args.from_pretrained, local_files_only=True)
    else:
        torch.manual_seed(args.seed)
        cfg = transformers.GPT2Config(
            vocab_size=args.vocab, n_positions=max(args.seq_len, 8), n_embd=args.embd, n_layer=args.layers,
            n_head=args.heads, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0,
        )  # fmt: skip
        model = transformers.GPT2LMHeadModel(cfg)
    return model.to(device=args.device, dtype=DTYPES[args.dtype]).eval()


def make_batch(args, vocab_size: int) -> dict:
    """``{"input_ids", "labels"}``, ``[batch, seq_len]``: byte windows of ``--text`` or random tokens."""
    g = torch.Generator().manual_seed(args.seed)
    if args.text is None:
        ids = torch.randint(0, vocab_size, (args.batch_size, args.seq_len), generator=g)
    else:
        with open(args.text, "rb") as f:
            data = torch.tensor(list(f.read()), dtype=torch.long)
        if data.numel() < args.seq_len:
            raise ValueError(f"{args.text} has {data.numel()} bytes, fewer than --seq-len {args.seq_len}")
        if vocab_size < 256:
            raise ValueError(f"byte-level tokens need a vocabulary of 256, the model has {vocab_size}")
        starts = torch.randint(0, data.numel() - args.seq_len + 1, (args.batch_size,), generator=g)
        ids = torch.stack([data[s : s + args.seq_len] for s in starts.tolist()])
    ids = ids.to(args.device)
    return {"input_ids": ids, "labels": ids}


def transformer_blocks(model) -> list[tuple[str, list]]:
    """Per-block parameter groups: the embeddings (``wte`` tied with ``lm_head``), each block, ``ln_f``."""
    tr = model.transformer
    blocks = [("embeddings", [tr.wte.weight, tr.wpe.weight])]
    blocks += [(f"h.{i}", list(block.parameters())) for i, block in enumerate(tr.h)]
    return blocks + [("ln_f", list(tr.ln_f.parameters()))]


def main(args) -> dict:
    """Steps: model -> batch -> top-k -> trace -> per-block table -> density plot. Returns the numbers."""
    model = build_model(args)
    batch = make_batch(args, model.config.vocab_size)
    H = hf.HessianOperator(model, loss_fn=causal_lm_loss, data=batch)
    top = hf.lanczos(H, k=args.top_k, tol=args.tol, seed=args.seed)
    tr = hf.trace(H, num_matvecs=args.trace_matvecs, seed=args.seed)
    layers = hf.per_layer(
        model, data=batch, loss_fn=causal_lm_loss, blocks=transformer_blocks(model), top_k=1,
        trace_matvecs=args.trace_matvecs, exact_threshold=args.exact_threshold, seed=args.seed, tol=args.tol,
    )  # fmt: skip
    density = hf.spectral_density(H, num_runs=args.density_runs, num_steps=args.density_steps, seed=args.seed)
    out = args.out or tempfile.mkdtemp(prefix="transformer_spectrum_")
    os.makedirs(out, exist_ok=True)
    png = hf.plot_density(density, os.path.join(out, "transformer_density.png"), title=f"GPT-2-style, {H.size} params")
    result = {
        "num_params": H.size,
        "tokens": list(batch["input_ids"].shape),
        "top_eigenvalues": top.eigenvalues.tolist(),
        "converged": bool(top.all_converged),
        "trace": tr.estimate,
        "trace_stderr": tr.stderr,
        "trace_method": tr.method,
        "blocks": [
            {"name": r.name, "size": r.size, "top_eigenvalue": r.eigenvalue, "trace": r.trace, "exact": r.exact}
            for r in layers
        ],
        "density_png": png,
    }
    _print(result)
    return result


def _print(result: dict) -> None:
    print(f"parameters: {result['num_params']}, tokens {result['tokens']}")
    print("top eigenvalues:", ", ".join(f"{v:.6g}" for v in result["top_eigenvalues"]))
    print(f"trace: {result['trace']:.6g} +- {result['trace_stderr']:.2g} ({result['trace_method']})")
    print(f"{'block':<12}{'params':>8}{'top eigenvalue':>18}{'trace':>14}")
    for b in result["blocks"]:
        print(f"{b['name']:<12}{b['size']:>8}{b['top_eigenvalue']:>18.6g}{b['trace']:>14.6g}")
    print("density:", result["density_png"])


if __name__ == "__main__":
    main(build_parser().parse_args())
