"""Which parameters an operator acts on: names, modules, glob patterns, regular expressions.

One function, :func:`resolve_params`, turns a user's ``params=`` into a list of distinct parameter tensors
in a stable order; the rest of the package only ever sees that list.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Set

import torch
from torch import nn

__all__ = ["resolve_params", "unwrap_model", "padding_rows"]


def unwrap_model(model: nn.Module) -> nn.Module:
    """The module inside ``DataParallel`` / ``DistributedDataParallel`` (curvature products go around
    the wrapper, so DDP's gradient hooks never fire and its reducer is left ready for training)."""
    while isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
        model = model.module
    return model


def _matches(pattern, name: str) -> bool:
    if isinstance(pattern, re.Pattern):
        return pattern.fullmatch(name) is not None
    if pattern.startswith("re:"):
        return re.fullmatch(pattern[3:], name) is not None
    return fnmatch.fnmatchcase(name, pattern)


def _is_pattern(item) -> bool:
    if isinstance(item, re.Pattern):
        return True
    return isinstance(item, str) and (item.startswith("re:") or any(c in item for c in "*?["))


def _check_item(item) -> None:
    """One sentence for an entry ``params=`` cannot take, before any matching."""
    if isinstance(item, str):
        if not item.strip():
            raise ValueError("params= got an empty name: pass None for every parameter, or names/patterns")
        if item.startswith("re:"):
            try:
                re.compile(item[3:])
            except re.error as e:
                raise ValueError(f"params= pattern {item!r} is not a valid regular expression: {e}") from None
    elif not isinstance(item, (nn.Module, torch.Tensor, re.Pattern)):
        raise ValueError(
            "params= takes parameters, modules, names, glob patterns or regular expressions (or a list of "
            f"them), got {type(item).__name__}"
        )


def resolve_params(model: nn.Module, params=None) -> tuple[list[nn.Parameter], list[str]]:
    """The parameters an operator acts on, and their names, in a stable order without duplicates.

    Args:
        model: the model.
        params: ``None`` (every parameter with ``requires_grad``), or an iterable (or one) of:
            parameters; submodules; parameter or module names (``"fc.weight"``, ``"layer1"``); glob
            patterns (``"transformer.h.*.attn.*"``, ``fnmatch`` rules: ``*`` also crosses dots); regular
            expressions, as ``re.compile(...)`` objects or strings prefixed ``"re:"``
            (``"re:transformer\\.h\\.[01]\\..*"``), which must match the *whole* name
            (``re.fullmatch``). A pattern selects every parameter whose name matches it and every
            parameter of a module whose name matches it. A string is a pattern when it starts with
            ``"re:"`` or contains ``*``, ``?`` or ``[``. A ``set`` (whose iteration order depends on
            hashing) selects in the model's parameter order.

    Tied parameters (GPT-2's ``transformer.wte.weight`` and ``lm_head.weight``) are one tensor: they are
    chosen once, under their first name, whichever of their names selects them.

    Raises:
        ValueError: a name or a pattern that selects nothing (the message lists some names), an invalid
            regular expression, an empty name, an object that is not a parameter or a module of the
            model, or an empty selection.

    Example:
        >>> from torch import nn
        >>> from hessianflow.curvature.params import resolve_params
        >>> model = nn.Sequential(nn.Linear(2, 2), nn.ReLU(), nn.Linear(2, 1))
        >>> resolve_params(model, ["2", "0.bias"])[1]  # a module's parameters, then one parameter
        ['2.weight', '2.bias', '0.bias']
        >>> resolve_params(model, "*.weight")[1]
        ['0.weight', '2.weight']
    """
    named = list(model.named_parameters())  # one entry per tensor: tied weights once
    name_of = {id(p): n for n, p in named}
    if params is None:
        chosen = [p for _, p in named if p.requires_grad]
        if not chosen:
            raise ValueError("the model has no parameter with requires_grad=True; pass params= explicitly")
    else:
        in_model_order = isinstance(params, Set)
        if isinstance(params, (str, nn.Module, torch.Tensor, re.Pattern)):
            params = [params]
        try:
            items = list(params)
        except TypeError:
            _check_item(params)  # one sentence naming the type
            raise
        for item in items:
            _check_item(item)
        chosen = [p for item in items for p in _selected(model, item, named, name_of)]
        if not chosen:
            raise ValueError("params= selects no parameter")
        if in_model_order:
            order = {id(p): i for i, (_, p) in enumerate(named)}
            chosen.sort(key=lambda p: order[id(p)])
    seen, unique = set(), []
    for p in chosen:
        if id(p) not in seen:
            seen.add(id(p))
            unique.append(p)
    return unique, [name_of[id(p)] for p in unique]


def _selected(model: nn.Module, item, named, name_of) -> list[nn.Parameter]:
    """The parameters one entry of ``params=`` selects (see :func:`resolve_params`), duplicates included."""
    if isinstance(item, str) and not _is_pattern(item):
        by_name = dict(model.named_parameters(remove_duplicate=False))  # all names, a tied weight's too
        modules = dict(model.named_modules(remove_duplicate=False))
        if item in by_name:
            return [by_name[item]]
        if item in modules:
            found = list(modules[item].parameters())
            if not found:
                raise ValueError(f"module {item!r} has no parameters")
            return found
        raise ValueError(
            f"{item!r} is neither a parameter nor a module of the model; "
            f"parameters are e.g. {[n for n, _ in named[:5]]}"
        )
    if _is_pattern(item):
        return _pattern_selected(model, item, named)
    if isinstance(item, nn.Module):
        found = list(item.parameters())
        if not found or any(id(p) not in name_of for p in found):
            raise ValueError(f"module {type(item).__name__} is not a part of the model (or has no parameters)")
        return found
    if id(item) not in name_of:
        raise ValueError("a tensor in params= is not a parameter of the model")
    return [item]


def _pattern_selected(model: nn.Module, pattern, named) -> list[nn.Parameter]:
    """Every parameter whose name, or whose module's name, matches ``pattern``, in model order."""
    found = [p for n, p in model.named_parameters(remove_duplicate=False) if _matches(pattern, n)]
    for m_name, m in model.named_modules(remove_duplicate=False):
        if m_name and _matches(pattern, m_name):
            found.extend(m.parameters())
    if not found:
        shown = pattern.pattern if isinstance(pattern, re.Pattern) else pattern
        raise ValueError(
            f"the pattern {shown!r} matches no parameter or module name; parameters are e.g. "
            f"{[n for n, _ in named[:8]]}"
        )
    order = {id(p): i for i, (_, p) in enumerate(named)}
    return sorted(found, key=lambda p: order[id(p)])  # model order within a pattern


def padding_rows(model: nn.Module, params: list[torch.Tensor]) -> list[tuple[int, int]]:
    """``(index in params, row)`` of every embedding padding row among the chosen parameters.

    ``nn.Embedding(padding_idx=p)`` defines the gradient of row ``p`` as zero while its forward still uses
    the row: the loss is not a function whose Hessian the three backends agree on. hessianflow holds the
    row constant (it is not a variable): its rows and columns of every curvature matrix are zero, in
    every backend (double backprop already gives that; forward-over-reverse and finite differences do
    once the row is masked in and out).
    """
    index = {id(p): i for i, p in enumerate(params)}
    rows = []
    for m in model.modules():
        pad = getattr(m, "padding_idx", None)
        if isinstance(m, (nn.Embedding, nn.EmbeddingBag)) and pad is not None and id(m.weight) in index:
            rows.append((index[id(m.weight)], int(pad) % m.weight.shape[0]))
    return rows
