"""Set a model's train/eval mode and ``requires_grad`` flags for a block, and put back exactly what was there.

The one home of this rule (ABSA's loops, the adversarial attacks, the curvature operators and the loss
landscape all use it). Two details make it exact:

- The flags are read before anything is changed and restored in ``finally``, so an exception raised
  inside the block, or by ``model.train`` itself half-way through the module tree, still restores them.
- Each module's ``training`` attribute is set directly on the way back, module by module: a single
  ``model.train(flag)`` would overwrite children whose mode differed from their parent's (a frozen
  BatchNorm in a training network, a dropout left in train mode for MC dropout in an evaluated one),
  and a module's own override of ``train`` (which may raise, or do more than set the flag) is not run
  a second time.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator

import torch
from torch import nn

__all__ = ["model_mode"]


@contextlib.contextmanager
def model_mode(
    model: nn.Module,
    train: bool | None,
    *,
    requires_grad: Iterable[torch.Tensor] | None = None,
) -> Iterator[nn.Module]:
    """Run a block with ``model.train(train)`` and ``requires_grad=True`` on ``requires_grad``; restore both.

    Args:
        model: the module whose mode (and every submodule's) is set and restored.
        train: ``True`` / ``False`` calls ``model.train(train)`` (which recurses, and runs any override
            of ``train`` a module defines); ``None`` leaves the modes as they are, but still restores
            every submodule's flag afterwards, whatever the block changed.
        requires_grad: parameters (leaf tensors) to switch ``requires_grad`` on for the block, e.g. the
            parameters a curvature operator differentiates; each gets its own flag back afterwards.
            ``None``: no parameter flag is touched.

    Yields:
        ``model``.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from hessianflow._modes import model_mode
        >>> model = nn.Sequential(nn.Linear(2, 2), nn.Dropout(0.5))
        >>> model[1].eval()  # a mixed model: the container trains, the dropout does not
        Dropout(p=0.5, inplace=False)
        >>> model[0].weight.requires_grad_(False)
        Parameter containing:...
        >>> with model_mode(model, False, requires_grad=model.parameters()):
        ...     print(model.training, model[0].weight.requires_grad)
        False True
        >>> model.training, model[1].training, model[0].weight.requires_grad
        (True, False, False)
    """
    modes = [(m, m.training) for m in model.modules()]
    params = [] if requires_grad is None else list(requires_grad)
    flags = [p.requires_grad for p in params]
    try:
        if train is not None:
            model.train(train)
        for p in params:
            p.requires_grad_(True)
        yield model
    finally:
        for m, flag in modes:
            m.training = flag
        for p, flag in zip(params, flags):
            p.requires_grad_(flag)
