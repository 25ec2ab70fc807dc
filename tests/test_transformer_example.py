"""examples/transformer_spectrum.py on a tiny GPT-2 configuration, its numbers against a dense Hessian."""

import os
import sys

import pytest
import torch
import torch.nn.functional as F
from dense_reference import hessian_rows, need_transformers

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples"))

import transformer_spectrum as ts  # noqa: E402

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _args(tmp_path, *extra):
    return ts.build_parser().parse_args(
        ["--layers", "1", "--embd", "4", "--heads", "2", "--vocab", "256", "--seq-len", "8", "--batch-size", "2",
         "--dtype", "float64", "--exact-threshold", "300", "--tol", "1e-10", "--trace-matvecs", "40",
         "--density-steps", "20", "--out", str(tmp_path), *extra]
    )  # fmt: skip


def _dense(args):
    """The dense Hessian of the same model and batch, without hessianflow, and its parameter slices."""
    model = ts.build_model(args)
    ids = ts.make_batch(args, model.config.vocab_size)["input_ids"]
    params = list(model.parameters())  # wte once (tied with lm_head)

    def loss():
        logits = model(input_ids=ids).logits
        return F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())

    H = hessian_rows(loss, params)
    offsets, start = {}, 0
    for p in params:
        offsets[id(p)] = slice(start, start + p.numel())
        start += p.numel()
    return model, H, offsets


@pytest.mark.slow  # ~14 s on one thread, 6 s of it importing transformers' GPT-2
def test_example_on_a_text_file_matches_the_dense_hessian(tmp_path):
    need_transformers()
    text = tmp_path / "corpus.txt"
    text.write_bytes(("the curvature of a transformer's loss, byte by byte. " * 4).encode())
    args = _args(tmp_path, "--text", str(text))
    result = ts.main(args)

    model, H, offsets = _dense(args)
    assert result["num_params"] == H.shape[0] == 1308
    lam = torch.linalg.eigvalsh(H)
    scale = float(lam.abs().max())
    top = torch.tensor(result["top_eigenvalues"], dtype=torch.float64)
    assert result["converged"]
    assert float((top - lam.flip(0)[:3]).abs().max()) < 1e-8 * scale
    # the trace is an estimate (XTrace or Hutchinson): within 4 of its standard errors of the exact one
    exact_trace = float(H.trace())
    assert abs(result["trace"] - exact_trace) <= 4 * result["trace_stderr"] + 1e-8 * scale

    # per block: the diagonal block's top eigenvalue and trace (h.0 and ln_f formed densely here)
    names = [b["name"] for b in result["blocks"]]
    assert names == ["embeddings", "h.0", "ln_f"]
    for (name, params), row in zip(ts.transformer_blocks(model), result["blocks"]):
        idx = torch.cat([torch.arange(H.shape[0])[offsets[id(p)]] for p in params])
        block = H[idx][:, idx]
        assert row["size"] == len(idx)
        assert abs(row["top_eigenvalue"] - float(torch.linalg.eigvalsh(block)[-1])) < 1e-6 * scale, name
        if row["exact"]:
            assert abs(row["trace"] - float(block.trace())) < 1e-10 * scale, name
    assert [b["exact"] for b in result["blocks"]] == [False, True, True]

    png = result["density_png"]
    assert os.path.dirname(png) == str(tmp_path)
    with open(png, "rb") as f:
        head = f.read(24)
    assert head[:8] == PNG_SIGNATURE and head[12:16] == b"IHDR"
    width, height = int.from_bytes(head[16:20], "big"), int.from_bytes(head[20:24], "big")
    assert width > 100 and height > 100


def test_example_refuses_a_text_shorter_than_a_sequence(tmp_path):
    need_transformers()
    text = tmp_path / "short.txt"
    text.write_bytes(b"abc")
    with pytest.raises(ValueError, match="fewer than --seq-len"):
        ts.main(_args(tmp_path, "--text", str(text)))


def test_every_flag_has_a_type_default_and_help():
    for action in ts.build_parser()._actions:
        if action.dest == "help":
            continue
        assert action.help, action.dest
        assert action.type is not None or action.choices is not None, action.dest
