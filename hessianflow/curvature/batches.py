"""Batches and losses: how a batch reaches the model and becomes a scalar loss, in one place.

A *batch* is any nesting of dicts, lists, tuples (named tuples included) and tensors; other leaves
(strings, numbers, ``None``) pass through untouched. Three ways make a loss of it (:class:`LossSpec`):

1. ``criterion``: the batch is ``(inputs, targets)`` (a tuple or list; further elements ignored) or a
   dict with one input key and one target key (:data:`INPUT_KEYS`, :data:`TARGET_KEYS`);
   the loss is ``criterion(model(inputs), targets)``.
2. ``loss_fn``: ``loss_fn(model, batch) -> scalar``, for any batch and any model call (a model taking
   ``(x, mask)``, a custom objective). :class:`~hessianflow.curvature.losses.OutputLoss` objects (e.g.
   :func:`~hessianflow.curvature.losses.causal_lm_loss`) also say what the model's output is, for the GGN.
3. neither: the model is called as ``model(**batch)`` (a dict), ``model(*batch)`` (a list or tuple) or
   ``model(batch)``, and its output's ``.loss`` (or ``output["loss"]``) is the loss: a HuggingFace
   model given ``labels``. That loss is a mean (HuggingFace's convention).

The *weight* of a batch says how batch losses combine over a data loader: by default the leading
dimension of its first tensor (found depth-first; the number of samples), or ``batch_weight(batch)``,
e.g. the number of counted tokens of a token-level mean loss. A mean-reduced loss over a loader is
then :math:`L = \\sum_b w_b L_b / \\sum_b w_b`, which is the mean over all samples (or tokens) exactly
when :math:`L_b` is the mean over the :math:`w_b` units of batch :math:`b`; a sum-reduced one is
:math:`\\sum_b L_b`. The reduction of a criterion object is its ``.reduction``; that of a plain
function cannot be known and is never guessed (``reduction=`` must say it over a data loader).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Mapping

import torch

from ..linalg.linop import NonFiniteError
from .losses import CrossEntropyTargets, OutputLoss, count_labels

__all__ = [
    "INPUT_KEYS",
    "TARGET_KEYS",
    "LossSpec",
    "LossModule",
    "move_batch",
    "first_tensor",
    "default_weight",
    "split_batch",
    "split_samples",
    "tensor_leaves",
    "with_tensor_leaves",
    "split_inputs_targets",
    "call_model",
    "model_output_loss",
]

INPUT_KEYS = ("inputs", "input", "x", "image", "images", "pixel_values", "input_ids")
TARGET_KEYS = ("targets", "target", "y", "label", "labels")
REDUCTIONS = ("mean", "sum")

THREE_WAYS = (
    "pass criterion= (criterion(model(inputs), targets)), loss_fn= (loss_fn(model, batch) -> scalar, e.g. "
    "hessianflow.curvature.losses.causal_lm_loss), or a batch for which the model's output has a .loss "
    "(a HuggingFace model given labels)"
)


# ------------------------------------------------------------------------------------------------
# batches
# ------------------------------------------------------------------------------------------------
def _rebuild(batch, items):
    """A container of ``batch``'s type holding ``items`` (a plain dict/list when the type refuses)."""
    if isinstance(batch, Mapping):
        try:
            return type(batch)(items)
        except Exception:  # noqa: BLE001 - e.g. a Mapping type without a dict constructor
            return dict(items)
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):  # a named tuple
        return type(batch)(*items)
    try:
        return type(batch)(items)
    except Exception:  # noqa: BLE001
        return list(items)


def _map(batch, fn):
    """``fn`` applied to every tensor leaf of ``batch``; containers rebuilt, other leaves kept."""
    if isinstance(batch, torch.Tensor):
        return fn(batch)
    if isinstance(batch, Mapping):
        return _rebuild(batch, {k: _map(v, fn) for k, v in batch.items()})
    if isinstance(batch, (list, tuple)):
        return _rebuild(batch, [_map(v, fn) for v in batch])
    return batch


def move_batch(batch, device, dtype: torch.dtype | None = None, non_blocking: bool = False):
    """``batch`` with every tensor moved to ``device``, recursively; other leaves untouched.

    Floating-point tensors are also cast to ``dtype`` when given (a float64 model is fed float64
    inputs: the curvature is computed in the parameters' precision); integer and boolean tensors (token
    ids, masks, labels) keep theirs.

    Example:
        >>> import torch
        >>> from hessianflow.curvature.batches import move_batch
        >>> batch = move_batch({"x": torch.zeros(2, 3), "ids": torch.tensor([1, 2]), "note": "a"}, "cpu", torch.float64)
        >>> batch["x"].dtype, batch["ids"].dtype, batch["note"]
        (torch.float64, torch.int64, 'a')
    """
    device = torch.device(device)

    def move(t):
        if dtype is not None and t.is_floating_point():
            return t.to(device=device, dtype=dtype, non_blocking=non_blocking)
        return t.to(device=device, non_blocking=non_blocking)

    return _map(batch, move)


def _tensors(batch):
    """The tensor leaves of ``batch``, depth-first in order (dicts in their key order)."""
    if isinstance(batch, torch.Tensor):
        yield batch
    elif isinstance(batch, Mapping):
        for v in batch.values():
            yield from _tensors(v)
    elif isinstance(batch, (list, tuple)):
        for v in batch:
            yield from _tensors(v)


def first_tensor(batch) -> torch.Tensor:
    """The batch's first tensor, depth-first (``ValueError`` when it holds none)."""
    for t in _tensors(batch):
        return t
    raise ValueError(f"the batch holds no tensor (got {_describe(batch)})")


def default_weight(batch) -> int:
    """The leading dimension of the batch's first tensor: its number of samples."""
    t = first_tensor(batch)
    if t.dim() == 0:
        raise ValueError(
            "the batch's first tensor is a scalar: it has no leading (sample) dimension; pass batch_weight="
        )
    return int(t.shape[0])


def split_batch(batch, size: int) -> list:
    """The batch in consecutive chunks of at most ``size`` samples (micro-batches), in order.

    ``n`` is :func:`default_weight` (the first tensor's leading dimension); every tensor leaf with that
    leading dimension is sliced ``[i:i+size]``, other leaves (scalars, tensors of another leading size,
    non-tensors) are shared by all chunks. A batch of at most ``size`` samples comes back as ``[batch]``.

    >>> import torch
    >>> chunks = split_batch({"x": torch.zeros(5, 3), "y": torch.arange(5), "note": "s"}, 2)
    >>> [tuple(c["x"].shape) for c in chunks], [c["y"].tolist() for c in chunks], chunks[0]["note"]
    ([(2, 3), (2, 3), (1, 3)], [[0, 1], [2, 3], [4]], 's')
    """
    n = default_weight(batch)
    if n <= size:
        return [batch]

    def take(i):
        return _map(batch, lambda t: t[i : i + size] if t.dim() > 0 and t.shape[0] == n else t)

    return [take(i) for i in range(0, n, size)]


def split_samples(batch) -> list:
    """The batch's samples: :func:`split_batch` in chunks of one (each sample a batch of one).

    >>> import torch
    >>> [s[1].tolist() for s in split_samples((torch.zeros(3, 2), torch.tensor([7, 8, 9])))]
    [[7], [8], [9]]
    """
    return split_batch(batch, 1)


def _describe(batch) -> str:
    if isinstance(batch, torch.Tensor):
        return f"a tensor of shape {tuple(batch.shape)}"
    if isinstance(batch, Mapping):
        return f"a {type(batch).__name__} with keys {list(batch)[:8]}"
    if isinstance(batch, (list, tuple)):
        return f"a {type(batch).__name__} of {len(batch)} element(s)"
    return f"a {type(batch).__name__}"


def split_inputs_targets(batch):
    """``(inputs, targets)`` of a batch for ``criterion(model(inputs), targets)``."""
    if isinstance(batch, Mapping):
        keys = [k for k in INPUT_KEYS if k in batch]
        tkeys = [k for k in TARGET_KEYS if k in batch]
        if keys and tkeys:
            return batch[keys[0]], batch[tkeys[0]]
    elif isinstance(batch, (list, tuple)) and len(batch) >= 2:
        return batch[0], batch[1]
    raise ValueError(
        f"with a criterion, a batch must be (inputs, targets) (a tuple or list; further elements are "
        f"ignored) or a dict with an input key {INPUT_KEYS} and a target key {TARGET_KEYS}; got "
        f"{_describe(batch)}. For any other batch pass loss_fn=fn(model, batch) instead of the criterion, "
        "or no criterion at all to use the model output's .loss (a HuggingFace model given labels)"
    )


def call_model(model, batch):
    """``model(**batch)`` for a dict, ``model(*batch)`` for a list or tuple, ``model(batch)`` otherwise."""
    if isinstance(batch, Mapping):
        return model(**batch)
    if isinstance(batch, (list, tuple)):
        return model(*batch)
    return model(batch)


def model_output_loss(output):
    """The ``.loss`` (or ``["loss"]``) of a model's output; ``ValueError`` naming the ways when none."""
    loss = getattr(output, "loss", None)
    if loss is None and isinstance(output, Mapping):
        loss = output.get("loss")
    if loss is None:
        raise ValueError(
            f"the model's output ({type(output).__name__}) has no .loss, and neither a criterion nor a "
            f"loss_fn was given: {THREE_WAYS}"
        )
    return loss


def _as_weight(value, what: str):
    """A batch weight as a Python int (integral) or float; non-negative and finite."""
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(f"{what} must be a number, got a tensor of shape {tuple(value.shape)}")
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{what} must be a number, got {type(value).__name__}")
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{what} must be finite and >= 0, got {value}")
    if isinstance(value, numbers.Integral):
        return int(value)
    return float(value)


def check_loss(loss, what: str = "the loss", finite: bool = True) -> torch.Tensor:
    """``loss`` if it is a (``finite``) scalar tensor; ``ValueError`` / :class:`NonFiniteError` otherwise."""
    if not isinstance(loss, torch.Tensor):
        raise ValueError(f"{what} must be a scalar tensor, got {type(loss).__name__}")
    if loss.dim() != 0:
        raise ValueError(
            f"{what} must be a scalar, got shape {tuple(loss.shape)} (a reduction='none' loss? reduce it "
            "to a mean or a sum)"
        )
    if finite and not torch.isfinite(loss):
        raise NonFiniteError(f"the loss is not finite ({loss.item()}); cannot compute curvature")
    return loss


def tensor_leaves(batch) -> list[torch.Tensor]:
    """The batch's tensors, depth-first (the order :func:`with_tensor_leaves` puts them back in)."""
    return list(_tensors(batch))


def with_tensor_leaves(batch, leaves):
    """``batch`` with its tensors replaced, in :func:`tensor_leaves` order, by ``leaves`` (containers of
    every kind rebuilt as :func:`move_batch` rebuilds them: a ``UserDict`` included, which
    ``torch.utils._pytree`` would take for a leaf)."""
    it = iter(leaves)
    return _map(batch, lambda _: next(it))


# ------------------------------------------------------------------------------------------------
# what a mean-reduced loss averages over
# ------------------------------------------------------------------------------------------------
def _class_targets(batch):
    """The integer targets of a criterion batch, or ``None`` for probability (float) targets."""
    _, targets = split_inputs_targets(batch)
    if not isinstance(targets, torch.Tensor) or targets.is_floating_point():
        return None
    return targets


def _criterion_units(crit):
    """``(name, count)`` of the units a mean-reduced criterion divides by, or ``None`` for samples.

    ``nn.CrossEntropyLoss`` and ``nn.NLLLoss`` with class-index targets divide by the number of counted
    targets (``ignore_index`` left out) or, with ``weight=``, by the sum of the counted targets' class
    weights; label smoothing keeps that denominator (torch's ``cross_entropy``). Every other criterion
    (and class-probability targets) averages over elements, a fixed number per sample.
    """
    if not isinstance(crit, (torch.nn.CrossEntropyLoss, torch.nn.NLLLoss)):
        return None
    weight, ignore = crit.weight, crit.ignore_index

    def count(batch):
        targets = _class_targets(batch)
        if targets is None:
            return default_weight(batch)
        kept = targets != ignore
        if weight is None:
            return int(kept.sum())
        w = weight.to(targets.device)[targets.masked_fill(~kept, 0)]
        return float((w * kept).sum())

    return ("class-weighted counted targets" if weight is not None else "counted targets"), count


def _counted_labels(shift: int):
    def count(batch):
        labels = batch["labels"] if isinstance(batch, Mapping) else None
        if labels is None:
            raise ValueError("a HuggingFace model's token-level .loss needs a dict batch with 'labels'")
        return count_labels(labels, shift)

    return count


def _huggingface_units(model):
    """``(name, count)`` of the units a HuggingFace model's ``.loss`` averages over, or ``None`` for a model
    that is not one (its loss's meaning cannot be known).

    Causal LMs (``*ForCausalLM``, ``*LMHeadModel``): the counted shifted labels; masked LMs, token
    classifiers and encoder-decoders (T5, BART): the counted labels; other heads: the samples. Labels
    ``-100`` are never counted, as in HuggingFace's losses.
    """
    import sys

    tr = sys.modules.get("transformers")
    if tr is None or model is None or not isinstance(model, getattr(tr, "PreTrainedModel", ())):
        return None
    name = type(model).__name__
    if getattr(getattr(model, "config", None), "is_encoder_decoder", False):
        return "counted labels", _counted_labels(0)
    if name.endswith(("ForCausalLM", "LMHeadModel")):
        return "counted shifted labels", _counted_labels(1)
    if name.endswith(("ForMaskedLM", "ForTokenClassification")):
        return "counted labels", _counted_labels(0)
    return "samples", default_weight


# ------------------------------------------------------------------------------------------------
# the loss specification
# ------------------------------------------------------------------------------------------------
class LossSpec:
    """Which loss of which batch: a criterion, a ``loss_fn``, or the model output's ``.loss``.

    Args:
        criterion: ``criterion(outputs, targets)``; batches ``(inputs, targets)``.
        loss_fn: ``loss_fn(model, batch) -> scalar``; any batch.
        reduction: ``"mean"`` or ``"sum"``: how the loss reduces over a batch's samples (or weight
            units). Default: the criterion's ``.reduction``; a ``loss_fn``'s ``.reduction`` attribute
            (the :mod:`hessianflow.curvature.losses` helpers declare ``"mean"``); ``"mean"`` for a model's
            ``.loss``. Otherwise unknown (``None``): fine for one batch, refused over a data loader.
        batch_weight: ``batch_weight(batch) -> number``, the units the loss averages over in ``batch``;
            default: derived from the loss where its meaning is known (:attr:`units_name`): the counted
            (class-weighted) targets of ``nn.CrossEntropyLoss`` / ``nn.NLLLoss``, the units an
            :class:`~hessianflow.curvature.losses.OutputLoss` declares (the loss helpers' counted tokens), a
            HuggingFace model's counted (shifted) labels; otherwise the samples (:func:`default_weight`).
        forward_fn, loss_of_output: a split loss, ``loss_of_output(forward_fn(model, batch), batch)``
            (together, instead of ``loss_fn``); what the GGN needs with batches other than
            ``(inputs, targets)``.
        model: the model whose ``.loss`` is the loss (neither a criterion nor a ``loss_fn``): a
            HuggingFace model declares its reduction and units; another model's ``.loss`` has an unknown
            reduction (``reduction=`` declares it).

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from hessianflow.curvature.batches import LossSpec
        >>> spec = LossSpec(nn.MSELoss(reduction="sum"))
        >>> spec.kind, spec.reduction, spec.weight((torch.zeros(4, 2), torch.zeros(4, 1)))
        ('criterion', 'sum', 4)
        >>> float(spec.loss(nn.Identity(), (torch.ones(4, 1), torch.zeros(4, 1))))
        4.0
    """

    def __init__(
        self,
        criterion=None,
        loss_fn: Callable | None = None,
        reduction: str | None = None,
        batch_weight: Callable | None = None,
        forward_fn: Callable | None = None,
        loss_of_output: Callable | None = None,
        model=None,
    ):
        if (forward_fn is None) != (loss_of_output is None):
            raise ValueError("forward_fn= and loss_of_output= go together (the GGN needs both)")
        if forward_fn is not None:
            if loss_fn is not None:
                raise ValueError("pass loss_fn= or forward_fn= with loss_of_output=, not both")
            loss_fn = OutputLoss(forward_fn, loss_of_output, reduction=getattr(loss_of_output, "reduction", None))
        if criterion is not None and loss_fn is not None:
            raise ValueError("pass a criterion or a loss_fn, not both")
        for name, fn in (("criterion", criterion), ("loss_fn", loss_fn), ("batch_weight", batch_weight)):
            if fn is not None and not callable(fn):
                raise ValueError(f"{name} must be callable, got {type(fn).__name__}")
        if reduction is not None and reduction not in REDUCTIONS:
            raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
        self.criterion, self.loss_fn, self.batch_weight = criterion, loss_fn, batch_weight
        units = None
        if criterion is not None:
            self.kind = "criterion"
            declared = getattr(criterion, "reduction", None)
            if declared is not None and declared not in REDUCTIONS:
                raise ValueError(f"the criterion's reduction must be 'mean' or 'sum', got {declared!r}")
            if declared is not None and reduction is not None and declared != reduction:
                raise ValueError(f"reduction={reduction!r} contradicts the criterion's reduction {declared!r}")
            units = _criterion_units(criterion)
        elif loss_fn is not None:
            self.kind = "loss_fn"
            declared = getattr(loss_fn, "reduction", None)
            count = getattr(loss_fn, "units", None)
            units = None if count is None else (f"the units {getattr(loss_fn, 'name', 'loss_fn')} counts", count)
        else:
            self.kind = "model_loss"
            units = _huggingface_units(model)
            declared = "mean" if units is not None else None  # HuggingFace's .loss is a mean
        if declared is None and batch_weight is not None:
            declared = "mean"  # batch_weight= counts the units of a mean: a declaration of one
        self.reduction = reduction if reduction is not None else declared
        if batch_weight is not None:
            units = ("batch_weight", batch_weight)
        #: what a mean-reduced loss averages over, for messages and results ("samples", "counted targets", ...)
        self.units_name, self._units = units if units is not None else ("samples", default_weight)

    # -- the pieces ------------------------------------------------------------------------------
    @property
    def has_output(self) -> bool:
        """Whether the model's output and a loss of it are known separately (what the GGN needs)."""
        return self.kind == "criterion" or isinstance(self.loss_fn, OutputLoss)

    def require_reduction(self, where: str = "over a data loader") -> None:
        """Raise unless the reduction is known (it must be, to combine several batches, ranks or chunks)."""
        if self.reduction is None:
            what = {
                "criterion": "criterion has no .reduction attribute",
                "loss_fn": "loss has no declared one",
                "model_loss": "model's .loss is not a HuggingFace model's, so its meaning is unknown",
            }[self.kind]
            raise ValueError(
                f"{where} the loss's reduction must be known, and this {what}: pass "
                "reduction='mean' (the loss is the mean over a batch's samples, or over the units that "
                "batch_weight= counts) or reduction='sum'; it is not guessed"
            )

    def check_batch(self, batch) -> None:
        """Fail early on a batch this loss cannot take."""
        if self.kind == "criterion":
            split_inputs_targets(batch)

    def weight(self, batch):
        """The batch's weight (an int or a float): the number of units its loss averages over
        (:attr:`units_name`), which weights it in any combination of batches, chunks, ranks or samples."""
        if self._units is default_weight:
            return default_weight(batch)
        what = "batch_weight(batch)" if self.batch_weight is not None else f"the {self.units_name} of a batch"
        return _as_weight(self._units(batch), what)

    def output(self, model, batch, run: Callable | None = None):
        """The model's output on ``batch`` (``run(inputs)`` replaces ``model(inputs)`` for a criterion)."""
        if self.kind == "criterion":
            inputs, _ = split_inputs_targets(batch)
            return (run or model)(inputs)
        if isinstance(self.loss_fn, OutputLoss):
            return self.loss_fn.forward(model, batch)
        if self.kind == "loss_fn":
            raise ValueError(
                "the GGN needs the model's output and a loss of it, and a plain loss_fn(model, batch) is "
                "one function: pass forward_fn=(model, batch) -> output and loss_of_output=(output, batch) "
                "-> loss, a hessianflow.curvature.losses.OutputLoss, or a criterion with (inputs, targets) batches"
            )
        raise ValueError(
            "the GGN needs the model's output and a loss of it, and a model output's .loss hides the "
            "loss's form: pass loss_fn=hessianflow.curvature.losses.causal_lm_loss (or seq2seq_loss, "
            "sequence_classification_loss), forward_fn= with loss_of_output=, or a criterion"
        )

    def loss_of_output(self, output, batch, finite: bool = True) -> torch.Tensor:
        """The checked scalar (``finite``) loss of the model's ``output`` on ``batch``."""
        if self.kind == "criterion":
            _, targets = split_inputs_targets(batch)
            loss = self.criterion(output, targets)
        else:
            loss = self.loss_fn.loss_of_output(output, batch)
        return check_loss(loss, "the criterion's value" if self.kind == "criterion" else "the loss", finite)

    def loss(self, model, batch, run: Callable | None = None, finite: bool = True) -> torch.Tensor:
        """The checked scalar loss of ``model`` on ``batch`` (not checked to be finite if not ``finite``)."""
        if self.kind == "criterion" or isinstance(self.loss_fn, OutputLoss):
            return self.loss_of_output(self.output(model, batch, run), batch, finite)
        if self.kind == "loss_fn":
            return check_loss(self.loss_fn(model, batch), "loss_fn(model, batch)", finite)
        return check_loss(model_output_loss(call_model(model, batch)), "the model's .loss", finite)

    def raw_loss(self, model, batch):
        """The loss without checks (traceable by ``torch.func.vmap``: no data-dependent branches)."""
        if self.kind == "criterion":
            inputs, targets = split_inputs_targets(batch)
            return self.criterion(model(inputs), targets)
        if self.kind == "loss_fn":
            return self.loss_fn(model, batch)
        return model_output_loss(call_model(model, batch))

    def cross_entropy(self, output, batch) -> CrossEntropyTargets | None:
        """How the loss is a plain softmax cross-entropy of ``output``, or ``None`` when it is not one."""
        if self.kind == "criterion":
            crit = self.criterion
            if type(crit) is not torch.nn.CrossEntropyLoss or crit.weight is not None or crit.label_smoothing != 0:
                return None
            _, targets = split_inputs_targets(batch)
            if not isinstance(output, torch.Tensor) or output.dim() < 2 or targets.is_floating_point():
                return None
            if targets.shape != output.shape[:1] + output.shape[2:]:
                return None
            return CrossEntropyTargets(targets, class_dim=1, ignore_index=crit.ignore_index, reduction=crit.reduction)
        fn = getattr(self.loss_fn, "cross_entropy", None)
        if fn is None:
            return None
        return fn(output, batch)

    def __repr__(self):
        fn = self.criterion if self.kind == "criterion" else self.loss_fn
        return (
            f"LossSpec({self.kind}, {getattr(fn, 'name', type(fn).__name__)}, reduction={self.reduction!r}, "
            f"units={self.units_name!r})"
        )


class LossModule(torch.nn.Module):
    """The loss of a batch as a module around the model, so ``torch.func.functional_call`` can swap the
    model's parameters (``"model." + name``) under any loss form, a ``loss_fn`` calling the model too.

    The unchecked :meth:`LossSpec.raw_loss` (traceable by ``torch.func``). Used by the operators'
    ``torch.func`` paths and by :func:`~hessianflow.curvature.analysis.loss_landscape`.
    """

    def __init__(self, model: torch.nn.Module, spec: LossSpec):
        super().__init__()
        self.model = model
        self.spec = spec

    def forward(self, batch):
        return self.spec.raw_loss(self.model, batch)
