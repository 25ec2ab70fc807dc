"""Losses of a model on a batch, for the ``loss_fn=`` form of the curvature operators.

A ``loss_fn`` is any ``fn(model, batch) -> scalar``. The helpers here are :class:`OutputLoss` objects:
callable as such a function, and also split into the model's output and a loss of it, which is what
the generalised Gauss-Newton matrix needs (:class:`~hessianflow.curvature.GGNOperator`). They follow
the HuggingFace ``transformers`` conventions (labels ``-100`` are ignored; the loss is the mean over
the counted positions) without importing ``transformers``; hessian-eigenthings 1.0 offers the same
kind of helpers for causal LM and sequence-to-sequence models.

- :func:`causal_lm_loss`: next-token cross-entropy, ``logits[:, :-1]`` against ``labels[:, 1:]``
  (GPT-2, Llama, nanoGPT-style models returning ``.logits``).
- :func:`seq2seq_loss`: decoder cross-entropy, ``logits`` against ``labels`` without a shift (T5, BART:
  the model builds its decoder inputs from the labels).
- :func:`sequence_classification_loss`: the loss ``*ForSequenceClassification`` models compute
  (cross-entropy, mean squared error for one regression label, BCE-with-logits for float multi-labels).

Each declares ``reduction="mean"`` and its *units*, the positions it averages over (counted shifted
labels, counted labels, samples), so that every split of the data is weighted exactly: the mean over all
counted tokens of a loader, whatever its padding.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F

__all__ = [
    "CrossEntropyTargets",
    "OutputLoss",
    "causal_lm_loss",
    "seq2seq_loss",
    "sequence_classification_loss",
    "IGNORE_INDEX",
]

IGNORE_INDEX = -100  # torch's and HuggingFace's default ignore_index


@dataclass(frozen=True)
class CrossEntropyTargets:
    """How a loss is a softmax cross-entropy of the output, for the analytic GGN.

    The loss is ``F.cross_entropy`` of the output's logits along ``class_dim`` against ``targets``
    (shaped like the output without ``class_dim``), positions whose target is ``ignore_index`` left
    out, reduced by ``reduction`` (``"mean"``: over the counted positions).
    """

    targets: torch.Tensor
    class_dim: int
    ignore_index: int = IGNORE_INDEX
    reduction: str = "mean"


@dataclass
class OutputLoss:
    """A loss split as ``loss_of_output(forward(model, batch), batch)``; callable as ``fn(model, batch)``.

    Args:
        forward: ``(model, batch) -> output`` (a tensor, e.g. logits).
        loss_of_output: ``(output, batch) -> scalar loss``.
        reduction: ``"mean"`` or ``"sum"`` over the batch's samples (or weight units), or ``None`` when
            unknown (the operators then ask for ``reduction=`` over a data loader).
        cross_entropy: optional ``(output, batch) -> CrossEntropyTargets`` saying that the loss is a plain
            softmax cross-entropy of the output; lets the GGN apply the output Hessian analytically.
        name: for messages.
        units: optional ``(batch) -> number``: how many units a mean-reduced loss averages over in
            ``batch`` (its counted tokens, say); default: the batch's samples. Every split of the data
            (a loader's batches, micro-batches, ranks, single samples) is weighted by it.

    Example:
        Half the mean squared error of a linear model, whose Hessian is :math:`X^\top X / n`:

        >>> import torch
        >>> import torch.nn.functional as F
        >>> from torch import nn
        >>> from hessianflow import HessianOperator, OutputLoss
        >>> half_mse = OutputLoss(
        ...     forward=lambda model, batch: model(batch[0]),
        ...     loss_of_output=lambda out, batch: 0.5 * F.mse_loss(out, batch[1]),
        ...     reduction="mean",
        ... )
        >>> X = torch.tensor([[1.0, 0.0], [0.0, 2.0]], dtype=torch.float64)
        >>> net = nn.Linear(2, 1, bias=False).double()
        >>> HessianOperator(net, loss_fn=half_mse, data=(X, torch.zeros(2, 1, dtype=torch.float64))).to_dense()
        tensor([[0.5000, 0.0000],
                [0.0000, 2.0000]], dtype=torch.float64)
    """

    forward: Callable
    loss_of_output: Callable
    reduction: str | None = None
    cross_entropy: Callable | None = None
    name: str = "output_loss"
    units: Callable | None = None

    def __call__(self, model, batch):
        return self.loss_of_output(self.forward(model, batch), batch)


def _logits(out):
    logits = getattr(out, "logits", None)
    if logits is None and isinstance(out, Mapping):
        logits = out.get("logits")
    if logits is None and isinstance(out, torch.Tensor):
        logits = out
    if logits is None:
        raise ValueError(f"the model's output has no .logits (got {type(out).__name__})")
    return logits


def _without(batch, key):
    return {k: v for k, v in batch.items() if k != key}


def _lm_labels(batch):
    """``labels`` of a dict batch (``input_ids`` when it has none, as for LM pre-training); a tensor
    batch is its own labels."""
    if isinstance(batch, torch.Tensor):
        return batch
    if not isinstance(batch, Mapping):
        raise ValueError(
            f"a causal LM batch must be a dict with 'input_ids' (and optionally 'labels', "
            f"'attention_mask'), or a tensor of token ids; got {type(batch).__name__}"
        )
    if "labels" in batch:
        return batch["labels"]
    if "input_ids" in batch:
        return batch["input_ids"]
    raise ValueError(f"a causal LM batch needs 'labels' or 'input_ids'; it has keys {sorted(batch)}")


def _upcast(logits):
    # HuggingFace computes the loss of half-precision logits in float32: so do we.
    return logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits


def _causal_forward(model, batch):
    if isinstance(batch, torch.Tensor):
        return _logits(model(batch))
    return _logits(model(**_without(batch, "labels")))


def _causal_loss_of_logits(logits, batch):
    labels = _lm_labels(batch)
    logits = _upcast(logits)
    shifted = logits[..., :-1, :].reshape(-1, logits.shape[-1])  # [B*(T-1), V]
    return F.cross_entropy(shifted, labels[..., 1:].reshape(-1), ignore_index=IGNORE_INDEX)


def count_labels(labels: torch.Tensor, shift: int = 0) -> int:
    """The positions a token-level mean loss averages over: the labels other than ``-100``, from position
    ``shift`` on (1 for a causal LM, whose first label predicts nothing)."""
    return int((labels[..., shift:] != IGNORE_INDEX).sum())


def _causal_units(batch) -> int:
    """The positions :func:`causal_lm_loss` averages over: the counted shifted labels."""
    return count_labels(_lm_labels(batch), 1)


def _counted_labels(batch) -> int:
    """The positions a token-level loss without a shift averages over: labels other than ``-100``."""
    return count_labels(batch["labels"])


def _causal_ce(logits, batch):
    labels = _lm_labels(batch)
    pad = torch.full_like(labels[..., :1], IGNORE_INDEX)
    # the target of position t is label t+1; the last position predicts nothing
    return CrossEntropyTargets(torch.cat([labels[..., 1:], pad], dim=-1), class_dim=-1)


causal_lm_loss = OutputLoss(
    forward=_causal_forward,
    loss_of_output=_causal_loss_of_logits,
    reduction="mean",
    cross_entropy=_causal_ce,
    name="causal_lm_loss",
    units=_causal_units,
)
causal_lm_loss.__doc__ = """Next-token cross-entropy of a causal language model (HuggingFace's ``ForCausalLMLoss``).

.. math:: \\ell = \\frac{1}{|C|} \\sum_{(b, t) \\in C} -\\log \\operatorname{softmax}(z_{b,t})_{y_{b,t+1}},
    \\qquad C = \\{(b, t): y_{b,t+1} \\ne -100\\}

``batch``: a dict with ``input_ids`` (and ``attention_mask`` etc., passed to the model) and
``labels`` (default: ``input_ids``), or a tensor of token ids. The model is called without
``labels`` (so it does not compute a second loss) and must return ``.logits`` (or be a tensor).
Its units are the counted shifted labels: every split of the data (a loader, micro-batches, ranks)
is weighted by them, so the operator is the curvature of the mean over all counted tokens.

Example:
    An embedding table as the smallest "language model" (token ids in, logits ``[B, T, V]`` out):

    >>> import torch
    >>> import torch.nn.functional as F
    >>> from torch import nn
    >>> from hessianflow import causal_lm_loss
    >>> _ = torch.manual_seed(0)
    >>> lm = nn.Embedding(5, 5)
    >>> ids = torch.tensor([[1, 2, 3, 4]])
    >>> loss = causal_lm_loss(lm, ids)
    >>> torch.allclose(loss, F.cross_entropy(lm(ids)[0, :-1], ids[0, 1:]))  # position t predicts t+1
    True
"""


def _seq2seq_forward(model, batch):
    # labels stay in: T5/BART build their decoder inputs from them (shift right)
    return _logits(model(**batch))


def _token_ce_loss(logits, batch):
    logits = _upcast(logits)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch["labels"].reshape(-1), ignore_index=IGNORE_INDEX)


seq2seq_loss = OutputLoss(
    forward=_seq2seq_forward,
    loss_of_output=_token_ce_loss,
    reduction="mean",
    cross_entropy=lambda logits, batch: CrossEntropyTargets(batch["labels"], class_dim=-1),
    name="seq2seq_loss",
    units=_counted_labels,
)
seq2seq_loss.__doc__ = """Decoder cross-entropy of an encoder-decoder model: ``logits`` against ``labels``, no shift.

``batch``: a dict with the encoder inputs and ``labels`` (``-100`` ignored); the model is called with
the whole batch (HuggingFace seq2seq models make ``decoder_input_ids`` from the labels) and its
``.logits`` used; the mean over counted positions.

Example:
    >>> import torch
    >>> import torch.nn.functional as F
    >>> from torch import nn
    >>> from hessianflow import seq2seq_loss
    >>> _ = torch.manual_seed(0)
    >>> emb = nn.Embedding(5, 5)
    >>> model = lambda input_ids, labels: {"logits": emb(input_ids)}  # called with the whole batch
    >>> batch = {"input_ids": torch.tensor([[1, 2, 3, 4]]), "labels": torch.tensor([[2, 0, -100, 1]])}
    >>> counted = [0, 1, 3]  # the label -100 is left out
    >>> ref = F.cross_entropy(emb(batch["input_ids"])[0, counted], batch["labels"][0, counted])
    >>> torch.allclose(seq2seq_loss(model, batch), ref)
    True
"""


def _cls_forward(model, batch):
    return _logits(model(**_without(batch, "labels")))


def _cls_loss(logits, batch):
    labels = batch["labels"]
    if not labels.is_floating_point():
        return F.cross_entropy(_upcast(logits).reshape(-1, logits.shape[-1]), labels.reshape(-1))
    if logits.shape[-1] == 1:
        return F.mse_loss(_upcast(logits).squeeze(-1), labels.to(_upcast(logits).dtype).reshape(logits.shape[:-1]))
    return F.binary_cross_entropy_with_logits(_upcast(logits), labels.to(_upcast(logits).dtype))


def _cls_ce(logits, batch):
    labels = batch["labels"]
    if labels.is_floating_point():
        return None
    return CrossEntropyTargets(labels.reshape(logits.shape[:-1]), class_dim=-1)


sequence_classification_loss = OutputLoss(
    forward=_cls_forward,
    loss_of_output=_cls_loss,
    reduction="mean",
    cross_entropy=_cls_ce,
    name="sequence_classification_loss",
)
sequence_classification_loss.__doc__ = """The loss of a ``*ForSequenceClassification`` model (HuggingFace's choice).

Integer ``labels``: cross-entropy of ``logits [B, C]``; float labels with one output: mean squared
error (regression); float labels with several outputs: BCE-with-logits (multi-label). The mean over
the batch's samples. The model is called without ``labels``.

Example:
    >>> import torch
    >>> import torch.nn.functional as F
    >>> from torch import nn
    >>> from hessianflow import sequence_classification_loss
    >>> _ = torch.manual_seed(0)
    >>> head = nn.Linear(3, 4)
    >>> model = lambda inputs: head(inputs)  # called without the labels
    >>> x, y = torch.randn(6, 3), torch.tensor([0, 1, 2, 3, 0, 1])
    >>> torch.allclose(sequence_classification_loss(model, {"inputs": x, "labels": y}), F.cross_entropy(head(x), y))
    True
"""

# The three losses are instances, which doctest does not collect by itself: their examples run from here.
__test__ = {
    "causal_lm_loss": causal_lm_loss.__doc__,
    "seq2seq_loss": seq2seq_loss.__doc__,
    "sequence_classification_loss": sequence_classification_loss.__doc__,
}
