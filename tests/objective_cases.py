"""Shared cases of the split property tests (tests/test_objective_splits.py and its torchrun worker):
small float64 models, losses whose units differ from the samples, and random ways to split a batch.

A *split* of a batch of ``n`` samples: consecutive pieces (a loader's batches, of unequal sizes, some
possibly empty across ranks) and a micro-batch size; a case's whole-batch operator is the reference.
"""

from __future__ import annotations

import types

import torch
import torch.nn.functional as F
from torch import nn

from hessianflow.curvature.batches import default_weight  # noqa: F401 - the tests' piece sizes
from hessianflow.curvature.losses import causal_lm_loss, seq2seq_loss

DT = torch.float64
CLASSES = 4


def mlp(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, CLASSES)).double()


class TinyLM(nn.Module):
    """Embedding, a tanh layer, a causal running mean, a head: a language model whose Hessian
    ``torch.func.hessian`` gets right (no LayerNorm); ``.logits`` out."""

    def __init__(self, vocab=7, d=3, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.wte = nn.Embedding(vocab, d)
        self.mix = nn.Linear(d, d)
        self.head = nn.Linear(d, vocab, bias=False)
        self.double()

    def forward(self, input_ids, attention_mask=None, labels=None):
        h = torch.tanh(self.mix(self.wte(input_ids)))
        steps = torch.arange(1, h.shape[1] + 1, dtype=h.dtype)[:, None]
        return types.SimpleNamespace(logits=self.head(h.cumsum(1) / steps))


def classification(g: torch.Generator, n: int, ignore: float, ignore_index: int = -100):
    x = torch.randn(n, 3, generator=g, dtype=DT)
    y = torch.randint(0, CLASSES, (n,), generator=g)
    y[torch.rand(n, generator=g) < ignore] = ignore_index
    return x, y


def tokens(g: torch.Generator, n: int, ignore: float, vocab=7, t=5):
    ids = torch.randint(0, vocab, (n, t), generator=g)
    labels = ids.clone()
    labels[torch.rand(n, t, generator=g) < ignore] = -100
    return {"input_ids": ids, "labels": labels}


# name -> (model maker, operator keywords maker, batch maker, the operator kinds that apply)
def cases():
    w = torch.tensor([0.5, 2.0, 1.0, 3.0], dtype=DT)
    return {
        "ce_ignore": (mlp, lambda: {"criterion": nn.CrossEntropyLoss()}, classification, ("H", "G", "F")),
        "ce_weight_ignore": (
            mlp,
            lambda: {"criterion": nn.CrossEntropyLoss(weight=w, ignore_index=1)},
            lambda g, n, p: classification(g, n, p, ignore_index=1),
            ("H", "G", "F"),
        ),
        "ce_smoothing": (
            mlp,
            lambda: {"criterion": nn.CrossEntropyLoss(weight=w, label_smoothing=0.2)},
            classification,
            ("H", "G", "F"),
        ),
        "ce_sum": (mlp, lambda: {"criterion": nn.CrossEntropyLoss(reduction="sum")}, classification, ("H", "G", "F")),
        "mse": (
            mlp,
            lambda: {"criterion": nn.MSELoss()},
            lambda g, n, p: (torch.randn(n, 3, generator=g, dtype=DT), torch.randn(n, CLASSES, generator=g, dtype=DT)),
            ("H", "G", "F"),
        ),
        "nll_fn": (
            mlp,
            lambda: {
                "loss_fn": lambda m, b: F.nll_loss(torch.log_softmax(m(b[0]), -1), b[1], ignore_index=-100),
                "reduction": "mean",
                "batch_weight": lambda b: (b[1] != -100).sum(),
            },
            classification,
            ("H", "F"),
        ),
        "causal_lm": (lambda s: TinyLM(seed=s), lambda: {"loss_fn": causal_lm_loss}, tokens, ("H", "G", "F")),
        "seq2seq": (lambda s: TinyLM(seed=s), lambda: {"loss_fn": seq2seq_loss}, tokens, ("H", "G", "F")),
    }


def random_split(g: torch.Generator, n: int, parts: int) -> list[int]:
    """``parts`` consecutive piece sizes adding up to ``n`` (zeros allowed)."""
    cuts = sorted(torch.randint(0, n + 1, (parts - 1,), generator=g).tolist())
    edges = [0, *cuts, n]
    return [b - a for a, b in zip(edges[:-1], edges[1:])]


def pieces(batch, sizes: list[int]) -> list:
    """The batch in consecutive pieces of ``sizes`` samples (a zero size gives an empty piece)."""
    out, start = [], 0
    n = sum(sizes)
    for s in sizes:
        out.append(_slice(batch, start, start + s, n))
        start += s
    return out


def _slice(batch, a, b, n):
    if isinstance(batch, torch.Tensor):
        return batch[a:b] if batch.dim() > 0 and batch.shape[0] == n else batch
    if isinstance(batch, dict):
        return {k: _slice(v, a, b, n) for k, v in batch.items()}
    return type(batch)(_slice(v, a, b, n) for v in batch)
