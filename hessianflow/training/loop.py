"""The training and test loops: one epoch of gradient accumulation with FGSM examples, and evaluation.

:func:`train_epoch` accumulates ``large_ratio`` mini-batches per optimizer step with a weighted mean (the
mini-batches weighted by the units their loss averages over: samples, counted targets or tokens, the
objective's one declaration in :class:`~hessianflow.curvature.batches.LossSpec`), mixes FGSM examples
into each mini-batch, and refuses to step on a NaN/Inf loss. (HessianFlow's loop dropped every
mini-batch smaller than the batch size, divided each loss by ``large_ratio`` and stepped with a
hand-written copy of SGD.) :func:`evaluate` is the test loop. The ABSA schedule that drives them lives in
:mod:`hessianflow.training.absa`.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch
import torch.nn as nn

from .._checks import check_int, check_positive
from .._modes import model_mode
from ..curvature.batches import LossSpec, move_batch, split_inputs_targets
from ..curvature.params import unwrap_model
from ..linalg.linop import NonFiniteError
from .adversarial import fgsm

__all__ = ["train_epoch", "evaluate", "set_lr"]


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Set the learning rate of every parameter group of ``optimizer`` to ``lr``.

    Example:
        >>> import torch
        >>> from hessianflow.training.loop import set_lr
        >>> opt = torch.optim.SGD(torch.nn.Linear(2, 1).parameters(), lr=0.1)
        >>> set_lr(opt, 0.05)
        >>> opt.param_groups[0]["lr"]
        0.05
    """
    lr = check_positive("lr", lr)
    for group in optimizer.param_groups:
        group["lr"] = lr


def _lookahead(loader: Iterable, max_batches: int | None) -> Iterator[tuple[int, object, bool]]:
    """Yield ``(index, batch, is_last)``: knowing the last batch lets it close the accumulation group."""
    it = iter(loader)
    try:
        current = next(it)
    except StopIteration:
        return
    index = 0
    while True:
        if max_batches is not None and index + 1 >= max_batches:
            yield index, current, True
            return
        try:
            nxt = next(it)
        except StopIteration:
            yield index, current, True
            return
        yield index, current, False
        current, index = nxt, index + 1


class _PerSampleSum:
    """A ``reduction="none"`` criterion as the sum of its per-sample losses (declared ``"sum"``)."""

    reduction = "sum"

    def __init__(self, criterion):
        self.criterion = criterion

    def __call__(self, outputs, targets):
        return self.criterion(outputs, targets).sum()


def _loop_spec(model, criterion, loss_fn, reduction, batch_weight, where: str) -> LossSpec:
    """The loss of the training and test loops, which always combine batches: its reduction must be known,
    and its batches are weighted by the units it averages over (the objective's declaration)."""
    if criterion is not None and getattr(criterion, "reduction", None) == "none":
        criterion = _PerSampleSum(criterion)
    spec = LossSpec(criterion, loss_fn, reduction, batch_weight, model=unwrap_model(model))
    try:
        spec.require_reduction()
    except ValueError as exc:
        raise ValueError(f"{where}: {exc}") from None
    return spec


def _batch_loss(model, spec: LossSpec, batch, summed: bool = True):
    """``(summed loss, weight, outputs, targets)`` of one batch; outputs/targets only for a criterion.

    The summed loss is the batch's loss times its weight for a mean (the sum over its samples or
    weighted units), the loss itself for a sum; ``summed=False`` returns the loss as the loss function
    gave it.
    """
    outputs = targets = None
    if spec.kind == "criterion":
        inputs, targets = split_inputs_targets(batch)
        outputs = model(inputs)
        loss = spec.criterion(outputs, targets)
    else:
        loss = spec.raw_loss(model, batch)
    if not isinstance(loss, torch.Tensor) or loss.dim() != 0:
        shape = tuple(loss.shape) if isinstance(loss, torch.Tensor) else type(loss).__name__
        raise ValueError(f"the loss must be a scalar, got {shape}")
    weight = spec.weight(batch)
    return (loss * weight if summed and spec.reduction == "mean" else loss), weight, outputs, targets


def _default_device(model: nn.Module):
    for p in model.parameters():
        return p.device
    return None


def _correct(outputs, targets) -> int | None:
    if (
        isinstance(outputs, torch.Tensor)
        and outputs.dim() == 2
        and targets.dim() == 1
        and not targets.is_floating_point()
    ):
        return int((outputs.argmax(dim=1) == targets).sum().item())
    return None


@dataclass
class _Tally:
    """The running sums of a loop: the summed loss, the samples (or units), the correct predictions
    (accuracy only while every batch has class logits)."""

    loss: float = 0.0
    samples: int | float = 0
    correct: int = 0
    have_acc: bool = True

    def add(self, loss_sum: float, weight, outputs, targets) -> None:
        self.loss += loss_sum
        self.samples += weight
        c = None if outputs is None else _correct(outputs, targets)
        if c is None:
            self.have_acc = False
        else:
            self.correct += c

    def mean_loss(self) -> float:
        return self.loss / self.samples if self.samples else float("nan")

    def accuracy(self) -> float | None:
        return (self.correct / self.samples if self.samples else float("nan")) if self.have_acc else None


def _autocast(device, dtype: torch.dtype | None):
    """A fresh ``torch.autocast`` for one forward pass (``None``: full precision)."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast((device if device is not None else torch.device("cpu")).type, dtype=dtype)


def _with_fgsm(attack_model, batch, adv_ratio: float, eps, criterion, clamp, amp) -> tuple[object, int]:
    """``batch`` with its first ``round(adv_ratio * B)`` inputs replaced by FGSM examples; and that count."""
    if not (isinstance(batch, (list, tuple)) and isinstance(batch[0], torch.Tensor)):
        raise ValueError(
            "adversarial training (adv_ratio > 0) needs (inputs, targets) batches of tensors, "
            f"got a {type(batch).__name__}"
        )
    inputs, targets = split_inputs_targets(batch)
    k_adv = round(adv_ratio * int(targets.shape[0]))
    if k_adv > 0:
        with _autocast(*amp):
            adv = fgsm(attack_model, inputs[:k_adv], targets[:k_adv], eps, criterion=criterion, clamp=clamp)
        batch = (torch.cat([adv, inputs[k_adv:]]), targets, *batch[2:])
    return batch, k_adv


def _forward_backward(model, spec: LossSpec, batch, amp, defer_sync: bool):
    """One micro-batch's summed loss (forward under autocast) and, when finite, its backward; under
    DDP's ``no_sync`` when the step does not end here. ``(loss value, weight, outputs, targets)``."""
    sync = model.no_sync() if defer_sync and hasattr(model, "no_sync") else contextlib.nullcontext()
    with sync:
        with _autocast(*amp):
            loss_sum, b, outputs, targets = _batch_loss(model, spec, batch)
        value = loss_sum.item()
        if math.isfinite(value):
            loss_sum.backward()
    return value, b, outputs, targets


def _step(optimizer, params, group_samples) -> bool:
    """Divide the accumulated gradients by the group's samples and step, unless a gradient is not
    finite; whether the step was taken."""
    grads = [p.grad for p in params if p.grad is not None]
    for g in grads:
        g.div_(group_samples)
    if not all(bool(torch.isfinite(g).all()) for g in grads):
        return False
    optimizer.step()
    return True


def _progress_bar(progress: bool, loader, max_batches, epoch):
    if not progress:
        return None
    from tqdm.auto import tqdm

    total = len(loader) if hasattr(loader, "__len__") else None
    if total is not None and max_batches is not None:
        total = min(total, max_batches)
    return tqdm(total=total, desc=f"epoch {epoch}" if epoch is not None else "train", leave=False)


def _show(bar, tally: _Tally) -> None:
    if bar is None:
        return
    bar.update(1)
    if tally.samples:
        postfix = {"loss": f"{tally.mean_loss():.4f}"}
        if tally.have_acc:
            postfix["acc"] = f"{tally.accuracy():.3f}"
        bar.set_postfix(postfix, refresh=False)


def _check_epoch_args(large_ratio, adv_ratio, max_batches, non_finite) -> tuple[int, float, int | None]:
    """:func:`train_epoch`'s plain arguments, checked: ``(large_ratio, adv_ratio, max_batches)``."""
    large_ratio = check_int("large_ratio", large_ratio, minimum=1)
    adv_ratio = float(adv_ratio)
    if not 0.0 <= adv_ratio <= 1.0:
        raise ValueError(f"adv_ratio must lie in [0, 1], got {adv_ratio}")
    if max_batches is not None:
        max_batches = check_int("max_batches", max_batches, minimum=1)
    if non_finite not in ("raise", "skip"):
        raise ValueError(f"non_finite must be 'raise' or 'skip', got {non_finite!r}")
    return large_ratio, adv_ratio, max_batches


def train_epoch(
    model: nn.Module,
    loader: Iterable,
    optimizer: torch.optim.Optimizer,
    criterion=None,
    large_ratio: int = 1,
    *,
    loss_fn=None,
    reduction: str | None = None,
    batch_weight=None,
    adv_ratio: float = 0.0,
    eps=0.0,
    clamp=None,
    device=None,
    progress: bool = False,
    max_batches: int | None = None,
    non_finite: str = "raise",
    epoch: int | None = None,
    autocast_dtype: torch.dtype | None = None,
) -> dict:
    """One epoch of training with gradient accumulation and FGSM examples (HessianFlow's ABSA loop).

    Every ``large_ratio`` mini-batches make one optimizer step whose gradient is the gradient of the
    *mean* loss over all samples of those mini-batches: each micro-batch's summed loss is
    back-propagated and the accumulated gradient is divided by the number of samples before the step,

    .. math::
        g = \\frac{1}{\\sum_i b_i} \\sum_i \\nabla \\sum_{j \\in \\text{batch } i} \\ell_j ,

    so a smaller last mini-batch is weighted by its size, and an incomplete last group (fewer than
    ``large_ratio`` mini-batches at the end of the epoch) still steps with its own correct mean.
    (HessianFlow dropped every mini-batch smaller than the batch size and divided each loss by
    ``large_ratio``.) The caller's optimizer (e.g. ``torch.optim.SGD`` with momentum and weight decay)
    makes the step, after which the gradients are cleared with ``zero_grad(set_to_none=True)``.

    Adversarial training: the first ``round(adv_ratio * B)`` samples (Python's ``round``; HessianFlow
    truncated with ``int``) of each mini-batch are replaced by :func:`~hessianflow.training.adversarial.fgsm`
    examples made in eval mode (so BatchNorm statistics are not polluted, as in HessianFlow); the
    model is back in train mode for the forward/backward.

    With a ``DistributedDataParallel`` model, micro-batches that do not end a step run under
    ``model.no_sync()`` so the gradients are all-reduced once per step; the FGSM gradient is taken
    through ``model.module``. The gradient is then the mean over each rank's samples, averaged over
    ranks.

    Args:
        model: the network, returning logits.
        loader: an iterable of mini-batches: ``(inputs, targets)`` with a criterion; any batch (dicts,
            lists, tuples of tensors, moved to ``device`` recursively) with ``loss_fn`` or without either.
        optimizer: the optimizer over the model's parameters.
        criterion: the loss, e.g. ``nn.CrossEntropyLoss()`` (reduction ``"mean"``, ``"sum"`` or
            ``"none"`` all give the per-sample mean described above; a class-weighted mean is
            treated as a plain mean, i.e. multiplied by the mini-batch size). A criterion without a
            ``.reduction`` attribute needs ``reduction=``.
        large_ratio: the number of mini-batches accumulated per optimizer step (>= 1; default 1).
        loss_fn: instead of a criterion, ``loss_fn(model, batch) -> scalar``; it needs ``reduction=``
            (unless it declares one, as the :mod:`hessianflow.curvature.losses` helpers do). Without a criterion
            and a ``loss_fn``, the model output's ``.loss`` (``model(**batch)``: HuggingFace), a mean.
        reduction: ``"mean"`` or ``"sum"``: how the loss reduces over a mini-batch. Never guessed: a
            sum-reduced function treated as a mean would step ``B`` times too far.
        batch_weight: ``batch_weight(batch) -> number``: the units a mean-reduced loss averages over
            (default: the batch's samples, the leading dimension of its first tensor), e.g. counted
            tokens; the step's gradient is then that of the mean over all units of its mini-batches,
            and ``samples`` counts those units.
        adv_ratio: the fraction of each mini-batch replaced by FGSM examples, in ``[0, 1]``. Only for
            a criterion with ``(inputs, targets)`` batches (image classification, as in the paper).
        eps, clamp: the FGSM radius and the valid data range, in the model's input space (see
            :func:`~hessianflow.training.adversarial.fgsm`).
        device: where to move each batch; default: the device of the model's first parameter.
        progress: show a tqdm progress bar (on stderr).
        max_batches: stop after this many mini-batches (for quick runs and tests).
        non_finite: ``"raise"``: a NaN/Inf loss or gradient raises :class:`NonFiniteError` before the
            optimizer step, after clearing the partly accumulated gradients, so the weights are those
            of the last good step; ``"skip"``: drop that mini-batch (or that step) and go on,
            counting it in ``skipped``.
        epoch: the epoch number, only for error messages and the progress bar.
        autocast_dtype: mixed precision, e.g. ``torch.bfloat16``: each forward pass (training and
            FGSM) runs under its own ``torch.autocast`` on the batches' device; backward passes and
            the optimizer step run outside it. (One autocast context around several optimizer steps
            would be wrong: autocast caches the low-precision copies of the weights until the context
            exits, so later forwards would use the weights of the first step.) ``None``: full precision.

    Returns:
        A dict: ``loss`` (mean per-sample training loss, on the inputs actually trained on),
        ``accuracy`` (fraction in [0, 1], ``None`` when the outputs are not class logits),
        ``samples``, ``optimizer_steps``, ``micro_batches``, ``skipped``, ``adversarial_samples``.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from hessianflow import train_epoch
        >>> _ = torch.manual_seed(0)
        >>> model = nn.Linear(4, 3)
        >>> x, y = torch.randn(20, 4), torch.randint(0, 3, (20,))
        >>> batches = [(x[i : i + 5], y[i : i + 5]) for i in range(0, 20, 5)]
        >>> opt = torch.optim.SGD(model.parameters(), lr=0.1)
        >>> out = train_epoch(model, batches, opt, nn.CrossEntropyLoss(), large_ratio=2)  # 2 batches a step
        >>> out["samples"], out["micro_batches"], out["optimizer_steps"], out["skipped"]
        (20, 4, 2, 0)
    """
    large_ratio, adv_ratio, max_batches = _check_epoch_args(large_ratio, adv_ratio, max_batches, non_finite)
    device = _default_device(model) if device is None else torch.device(device)
    spec = _loop_spec(model, criterion, loss_fn, reduction, batch_weight, "train_epoch")
    use_adv = adv_ratio > 0 and bool((torch.as_tensor(eps) != 0).any())
    if use_adv and spec.kind != "criterion":
        raise ValueError(
            "adversarial training (adv_ratio > 0) makes FGSM examples of (inputs, targets) image batches "
            "with a criterion; it is not defined for loss_fn= or a model's .loss: pass adv_ratio=0"
        )
    # FGSM through DDP would make its reducer expect a parameter backward; go around the wrapper.
    ddp = isinstance(model, nn.parallel.DistributedDataParallel)
    attack_model = model.module if ddp else model
    params = [p for group in optimizer.param_groups for p in group["params"]]
    where = f"epoch {epoch}, " if epoch is not None else ""

    amp = (device, autocast_dtype)
    tally = _Tally()
    steps = micro = skipped = adv_samples = 0
    group_samples = group_batches = 0
    bar = _progress_bar(progress, loader, max_batches, epoch)

    def fail(message: str) -> None:
        optimizer.zero_grad(set_to_none=True)
        raise NonFiniteError(message)

    optimizer.zero_grad(set_to_none=True)
    try:
        with model_mode(model, True):
            for index, batch, is_last in _lookahead(loader, max_batches):
                if device is not None:
                    batch = move_batch(batch, device, non_blocking=True)
                k_adv = 0
                if use_adv:
                    batch, k_adv = _with_fgsm(attack_model, batch, adv_ratio, eps, criterion, clamp, amp)
                ends_step = is_last or group_batches + 1 >= large_ratio
                value, b, outputs, targets = _forward_backward(model, spec, batch, amp, defer_sync=not ends_step)
                if not math.isfinite(value):
                    if non_finite == "raise":
                        fail(
                            f"non-finite training loss ({value / max(b, 1)}) at {where}mini-batch {index}; "
                            "the optimizer step was not taken, the weights are those of the last good step"
                        )
                    skipped += 1
                else:
                    micro += 1
                    adv_samples += k_adv
                    group_samples += b
                    tally.add(value, b, outputs, targets)
                group_batches += 1

                if ends_step:
                    if group_samples > 0:
                        if _step(optimizer, params, group_samples):
                            steps += 1
                        elif non_finite == "raise":
                            fail(
                                f"non-finite gradient at {where}mini-batch {index} (finite loss); the "
                                "optimizer step was not taken, the weights are those of the last good step"
                            )
                        else:
                            skipped += 1
                    optimizer.zero_grad(set_to_none=True)
                    group_samples = group_batches = 0
                _show(bar, tally)
    finally:
        if bar is not None:
            bar.close()

    return {
        "loss": tally.mean_loss(),
        "accuracy": tally.accuracy(),
        "samples": tally.samples,
        "optimizer_steps": steps,
        "micro_batches": micro,
        "skipped": skipped,
        "adversarial_samples": adv_samples,
    }


def evaluate(
    model: nn.Module,
    loader: Iterable,
    criterion=None,
    device=None,
    max_batches: int | None = None,
    *,
    loss_fn=None,
    reduction: str | None = None,
    batch_weight=None,
) -> dict:
    """Mean loss and accuracy over ``loader`` in eval mode without gradients; the mode is restored.

    The loss forms, ``reduction`` and ``batch_weight`` are those of :func:`train_epoch` (batches of any
    form are moved to ``device`` recursively; a loss whose reduction is not declared needs
    ``reduction=``). Each batch's loss is taken to a Python float before it is weighted, so the sums
    are float64 whatever the model's dtype. Batches of weight 0 (an empty shard) are skipped.

    Returns:
        A dict: ``loss`` (mean per sample, each mini-batch weighted by its size), ``accuracy``
        (fraction in [0, 1], ``None`` when the outputs are not class logits), ``samples`` (the total
        weight), and the sums they are made of: ``loss_sum`` (``loss * samples``) and ``correct``
        (``None`` without accuracy), e.g. to be summed over processes.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from hessianflow import evaluate
        >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
        <torch._C.Generator object at ...>
        >>> model = nn.Linear(4, 3)
        >>> x, y = torch.randn(10, 4), torch.randint(0, 3, (10,))
        >>> out = evaluate(model, [(x[:6], y[:6]), (x[6:], y[6:])], nn.CrossEntropyLoss())
        >>> round(out["loss"], 4) == round(nn.functional.cross_entropy(model(x), y).item(), 4), out["samples"]
        (True, 10)
    """
    if max_batches is not None:
        max_batches = check_int("max_batches", max_batches, minimum=1)
    device = _default_device(model) if device is None else torch.device(device)
    spec = _loop_spec(model, criterion, loss_fn, reduction, batch_weight, "evaluate")
    tally = _Tally()
    with model_mode(model, False), torch.no_grad():
        for index, batch in enumerate(loader):
            if max_batches is not None and index >= max_batches:
                break
            if device is not None:
                batch = move_batch(batch, device)
            if spec.weight(batch) == 0:
                continue
            loss, b, outputs, targets = _batch_loss(model, spec, batch, summed=False)
            tally.add(loss.item() * b if spec.reduction == "mean" else loss.item(), b, outputs, targets)
    return {
        "loss": tally.mean_loss(),
        "accuracy": tally.accuracy(),
        "samples": tally.samples,
        "loss_sum": tally.loss,
        "correct": tally.correct if tally.have_acc else None,
    }
