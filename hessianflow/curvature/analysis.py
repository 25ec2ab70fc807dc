"""Analyses built on the curvature operators: per-layer curvature and the loss landscape.

* :func:`layer_blocks` splits a model's parameters by the module that owns them.
* :func:`per_layer` gives, for each layer, the top eigenvalue(s) and the trace of its own diagonal
  block of the Hessian (or GGN), the block :math:`H_{\\ell\\ell} = \\nabla^2_{\\theta_\\ell} L`; small
  blocks exactly, large ones with Lanczos and a trace estimator. The traces of the blocks add up to
  the trace of the whole Hessian (the off-diagonal blocks have no diagonal entries). PyHessian and
  HessianFlow only analyse the whole network.
* :func:`loss_landscape` evaluates the loss on a line or a plane through the parameters, e.g. along
  the top eigenvectors (the 1-D and 2-D figures of Yao et al. 2018, §4, and Li et al. 2018 for the
  plane), without ever touching the model's parameters; under ``torch.distributed`` the ranks'
  shards of a loader are combined, as the operators combine their products.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
from torch import nn

from .._modes import model_mode
from .._random import make_generator
from ..distributed import reduce_or_raise
from ..linalg.eigen import lanczos
from ..linalg.linop import NonFiniteError
from ..linalg.trace import trace as _trace
from ..linalg.vectors import space_of
from .batches import LossModule, LossSpec
from .hvp import unflatten
from .objective import Objective
from .operators import EmpiricalFisherOperator, GGNOperator, HessianOperator
from .params import unwrap_model

__all__ = ["LayerResult", "layer_blocks", "per_layer", "loss_landscape"]

_OPERATORS = {"hessian": HessianOperator, "ggn": GGNOperator, "fisher": EmpiricalFisherOperator}


# ------------------------------------------------------------------------------------------------
# layers
# ------------------------------------------------------------------------------------------------
def layer_blocks(model: nn.Module) -> list[tuple[str, list[nn.Parameter]]]:
    """The model's trainable parameters grouped by the module that owns them directly.

    One entry per module with at least one parameter of its own (``recurse=False``) that has
    ``requires_grad``, in the order of ``model.named_modules()`` (the definition order), e.g.
    ``[("conv1", [weight]), ("bn1", [weight, bias]), ..., ("fc", [weight, bias])]``. A parameter
    shared by several modules (tied weights) belongs to the first one. Parameters owned by the root
    module itself are named ``"(root)"``. A ``DataParallel``/``DDP`` wrapper is looked through.

    Raises:
        ValueError: the model has no trainable parameter.

    Example:
        >>> from torch import nn
        >>> from hessianflow.curvature.analysis import layer_blocks
        >>> model = nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.Linear(3, 1, bias=False))
        >>> [(name, [tuple(p.shape) for p in ps]) for name, ps in layer_blocks(model)]
        [('0', [(3, 2), (3,)]), ('2', [(1, 3)])]
    """
    model = unwrap_model(model)
    seen: set[int] = set()
    blocks = []
    for name, module in model.named_modules():
        own = []
        for p in module.parameters(recurse=False):
            if p.requires_grad and id(p) not in seen:
                seen.add(id(p))
                own.append(p)
        if own:
            blocks.append((name or "(root)", own))
    if not blocks:
        raise ValueError("the model has no parameter with requires_grad=True")
    return blocks


@dataclass
class LayerResult:
    """The curvature of one layer's diagonal block (see :func:`per_layer`).

    Attributes:
        name: the module's name (``"layer1.0.conv1"``).
        size: the number of parameters of the block.
        eigenvalues: ``[top_k]`` float64, the block's largest eigenvalues, descending.
        trace: the block's trace (exact, or the estimate).
        trace_stderr: the standard error of an estimated trace; ``0.0`` when exact.
        exact: whether the block was formed densely (eigenvalues and trace exact up to rounding).
        num_matvecs: products with the block spent.
        converged: ``[top_k]`` booleans, Lanczos's convergence flags (all ``True`` when exact).
        residuals: ``[top_k]`` Ritz residual norms (zeros when exact).
        param_names: the full names of the block's parameters.

    Example:
        >>> import torch
        >>> from hessianflow.curvature.analysis import LayerResult
        >>> r = LayerResult("fc", 2, torch.tensor([3.0]), 4.0, 0.0, True, 2, torch.tensor([True]), torch.zeros(1))
        >>> r.eigenvalue, r.all_converged, r.to_dict()["trace"]
        (3.0, True, 4.0)
    """

    name: str
    size: int
    eigenvalues: torch.Tensor
    trace: float
    trace_stderr: float
    exact: bool
    num_matvecs: int
    converged: torch.Tensor
    residuals: torch.Tensor
    param_names: list[str] = field(default_factory=list)

    @property
    def eigenvalue(self) -> float:
        """The block's top eigenvalue."""
        return float(self.eigenvalues[0])

    @property
    def all_converged(self) -> bool:
        return bool(self.converged.all())

    def to_dict(self) -> dict:
        """JSON-ready plain Python values."""
        return {
            "name": self.name,
            "size": int(self.size),
            "eigenvalue": self.eigenvalue,
            "eigenvalues": [float(x) for x in self.eigenvalues.tolist()],
            "residuals": [float(x) for x in self.residuals.tolist()],
            "converged": [bool(x) for x in self.converged.tolist()],
            "trace": float(self.trace),
            "trace_stderr": float(self.trace_stderr),
            "exact": bool(self.exact),
            "num_matvecs": int(self.num_matvecs),
            "param_names": list(self.param_names),
        }


@contextlib.contextmanager
def _only_grad(model: nn.Module, keep: list[nn.Parameter]):
    """Switch ``requires_grad`` off for every parameter outside ``keep`` (and restore it).

    The first-order graph of a block's products then holds only what leads to that block, so a
    layer near the output does not pay for double backprop through the whole network.
    """
    ids = {id(p) for p in keep}
    changed = [p for p in model.parameters() if p.requires_grad and id(p) not in ids]
    try:
        for p in changed:
            p.requires_grad_(False)
        yield
    finally:
        for p in changed:
            p.requires_grad_(True)


def _dense(op, chunk: int) -> torch.Tensor:
    """The operator as a dense float64 matrix, ``chunk`` columns at a time (a batched product holds
    ``chunk`` copies of the backward graph's activations)."""
    n = op.size
    space = space_of(op, op.dtype)
    eye = space.eye()  # [n, n] (a sharded operator: this rank's rows of it)
    cols = []
    for start in range(0, n, chunk):
        stop = min(n, start + chunk)
        # E^T (A E): the block's columns, whole on every rank even when the operator's vectors are sharded
        cols.append(space.inner(eye, op.matmat(eye[:, start:stop].contiguous())).to(device="cpu", dtype=torch.float64))
    M = torch.cat(cols, dim=1)
    return (M + M.T) / 2


def per_layer(
    model: nn.Module,
    criterion=None,
    data=None,
    dataloader: Iterable | None = None,
    *,
    top_k: int = 1,
    trace_matvecs: int = 100,
    exact_threshold: int = 1500,
    seed=0,
    tol: float = 1e-4,
    max_iter: int | None = None,
    operator: str = "hessian",
    trace_method: str = "auto",
    blocks: list[tuple[str, list[nn.Parameter]]] | None = None,
    dense_chunk: int = 64,
    progress: bool = False,
    **operator_kwargs,
) -> list[LayerResult]:
    """Top eigenvalue(s) and trace of each layer's diagonal Hessian block.

    For each block :math:`\\theta_\\ell` of :func:`layer_blocks` the operator is restricted to
    :math:`\\theta_\\ell` (``params=`` of :class:`~hessianflow.curvature.HessianOperator`), i.e. the
    block :math:`H_{\\ell\\ell}` with the other parameters held fixed. Since the diagonal of :math:`H`
    is the concatenation of the blocks' diagonals,

    .. math:: \\operatorname{tr} H = \\sum_\\ell \\operatorname{tr} H_{\\ell\\ell},

    while the blocks' top eigenvalues only bound the whole Hessian's from below
    (:math:`\\lambda_{\\max}(H) \\ge \\max_\\ell \\lambda_{\\max}(H_{\\ell\\ell})`, Cauchy interlacing).

    Blocks with at most ``exact_threshold`` parameters are formed densely (``size`` products, in
    chunks of ``dense_chunk`` columns) and diagonalised with ``torch.linalg.eigvalsh`` in float64: exact
    eigenvalues and trace. Larger blocks use :func:`~hessianflow.linalg.eigen.lanczos` (``which="LA"``) and
    a stochastic trace estimator (:func:`~hessianflow.linalg.trace.trace`; ``"auto"`` picks Hutchinson 1989
    or XTrace, Epperly et al. 2024, from the products themselves) with ``trace_matvecs`` products.
    The default threshold 1500 keeps a dense block at 18 MB in float64; forming it costs ``size``
    products (batched, so cheaper per column than Lanczos's), against roughly 100-200 for Lanczos plus
    the trace estimate: worth paying for exact values on the small blocks (biases, BatchNorm, the last
    layer of a CIFAR model).

    Args:
        model: the network.
        criterion: the loss, as for the operators; or ``None`` with ``loss_fn=`` (and ``reduction=``,
            ``batch_weight=``) in ``operator_kwargs``, or neither for the model output's ``.loss``
            (see :class:`~hessianflow.curvature.CurvatureOperator`).
        data: one batch (any form the operators take).
        dataloader: or an iterable of batches (exactly one of the two).
        top_k: eigenvalues per block (capped at each block's size).
        trace_matvecs: products for each estimated trace (at least 4).
        exact_threshold: largest block size computed densely (0: none).
        seed: ``None``, an int or a ``torch.Generator``; one generator serves all blocks in order.
        tol: Lanczos's relative residual tolerance. ``1e-4`` (looser than :func:`lanczos`'s ``1e-6``)
            is enough for a table and a bar plot; the eigenvalue error is about ``tol**2`` relative
            for a separated eigenvalue.
        max_iter: Lanczos's product budget per block (its default when ``None``).
        operator: ``"hessian"``, ``"ggn"`` (the generalised Gauss-Newton blocks) or ``"fisher"`` (the
            empirical Fisher's).
        trace_method: the ``method`` of :func:`~hessianflow.linalg.trace.trace` for estimated traces.
        blocks: the blocks to analyse (default :func:`layer_blocks`), e.g. a subset of them.
        dense_chunk: columns per batched product when a block is formed densely.
        progress: show a tqdm bar over the blocks.
        **operator_kwargs: passed to the operator (``loss_fn``, ``reduction``, ``batch_weight``,
            ``train_mode``, ``num_batches``, ``backend``...).

    Returns:
        One :class:`LayerResult` per block, in model order.

    Example (one linear layer under the squared error: the block is :math:`2 X^\\top X / n`, with
    eigenvalues 3.5352 and 1.1315 and trace 14/3):
        >>> import torch
        >>> from torch import nn
        >>> from hessianflow import per_layer
        >>> X = torch.tensor([[1.0, 0.0], [0.0, 2.0], [1.0, 1.0]], dtype=torch.float64)
        >>> y = torch.zeros(3, 1, dtype=torch.float64)
        >>> model = nn.Sequential(nn.Linear(2, 1, bias=False)).double()
        >>> (r,) = per_layer(model, nn.MSELoss(), data=(X, y), top_k=2)
        >>> r.name, r.exact, [round(x, 4) for x in r.eigenvalues.tolist()], round(r.trace, 4)
        ('0', True, [3.5352, 1.1315], 4.6667)

    Raises:
        ValueError: for an unknown operator, ``top_k < 1``, ``trace_matvecs < 4`` (when a trace must
            be estimated), a negative ``exact_threshold`` or ``dense_chunk < 1``.
    """
    _check_per_layer_args(operator, top_k, exact_threshold, dense_chunk, trace_matvecs, tol, operator_kwargs)
    model_u = unwrap_model(model)
    blocks = layer_blocks(model_u) if blocks is None else list(blocks)
    if not blocks:
        raise ValueError("no blocks to analyse")
    if trace_matvecs < 4 and any(sum(p.numel() for p in ps) > exact_threshold for _, ps in blocks):
        raise ValueError(f"trace_matvecs must be >= 4 to estimate a trace, got {trace_matvecs}")
    gen = make_generator(seed)
    name_of = {id(p): n for n, p in model_u.named_parameters()}
    iterator = blocks
    if progress:
        from tqdm.auto import tqdm

        iterator = tqdm(blocks, desc="per-layer", leave=False)
    results = []
    for name, params in iterator:
        params = list(params)
        if not params or any(id(p) not in name_of for p in params):
            raise ValueError(f"block {name!r}: its parameters must be parameters of the model")
        with _only_grad(model_u, params):
            op = _OPERATORS[operator](
                model_u, criterion, data=data, dataloader=dataloader, params=params, **operator_kwargs
            )
            k = min(top_k, op.size)
            if op.size <= exact_threshold:
                res = _exact_block(op, k, dense_chunk)
            else:
                res = _estimated_block(op, k, tol, max_iter, trace_matvecs, trace_method, gen)
            op.release()
        results.append(
            LayerResult(
                name=name,
                size=op.size,
                num_matvecs=op.num_matvecs,
                param_names=[name_of[id(p)] for p in params],
                **res,
            )
        )
    return results


def _check_per_layer_args(operator, top_k, exact_threshold, dense_chunk, trace_matvecs, tol, operator_kwargs):
    if operator not in _OPERATORS:
        raise ValueError(f"operator must be one of {tuple(_OPERATORS)}, got {operator!r}")
    checks = (("top_k", top_k, 1), ("exact_threshold", exact_threshold, 0), ("dense_chunk", dense_chunk, 1))
    for name, value, lo in checks:
        if isinstance(value, bool) or not isinstance(value, int) or value < lo:
            raise ValueError(f"{name} must be an integer >= {lo}, got {value!r}")
    if isinstance(trace_matvecs, bool) or not isinstance(trace_matvecs, int) or trace_matvecs < 1:
        raise ValueError(f"trace_matvecs must be a positive integer, got {trace_matvecs!r}")
    if not (isinstance(tol, (int, float)) and math.isfinite(tol) and tol > 0):
        raise ValueError(f"tol must be a positive finite number, got {tol!r}")
    if "params" in operator_kwargs:
        raise ValueError("per_layer chooses the parameters of each block itself; pass blocks= instead of params=")


def _exact_block(op, k: int, dense_chunk: int) -> dict:
    """A small block formed densely: ``eigvalsh`` in float64, exact eigenvalues and trace."""
    M = _dense(op, dense_chunk)
    return dict(
        eigenvalues=torch.linalg.eigvalsh(M).flip(0)[:k],  # descending
        trace=float(M.diagonal().sum()),
        trace_stderr=0.0,
        exact=True,
        converged=torch.ones(k, dtype=torch.bool),
        residuals=torch.zeros(k, dtype=torch.float64),
    )


def _estimated_block(op, k: int, tol, max_iter, trace_matvecs: int, trace_method: str, gen) -> dict:
    """A large block: Lanczos's top ``k`` eigenvalues and a stochastic trace estimate."""
    eig = lanczos(op, k=k, which="LA", tol=tol, max_iter=max_iter, seed=gen)
    tr = _trace(op, num_matvecs=trace_matvecs, seed=gen, method=trace_method)
    return dict(
        eigenvalues=eig.eigenvalues.detach().to(device="cpu", dtype=torch.float64),
        trace=float(tr.estimate),
        trace_stderr=float(tr.stderr),
        exact=False,
        converged=eig.converged.detach().cpu(),
        residuals=eig.residuals.detach().to(device="cpu", dtype=torch.float64),
    )


# ------------------------------------------------------------------------------------------------
# loss landscape
# ------------------------------------------------------------------------------------------------
def _directions(directions, count: int, n: int, dtype, device) -> list[torch.Tensor]:
    if isinstance(directions, torch.Tensor):
        if directions.dim() == 1:
            dirs = [directions]
        elif directions.dim() == 2:
            dirs = list(directions.unbind(dim=1))  # [n, k] columns, as EigenResult.eigenvectors
        else:
            raise ValueError(f"directions must be [n] or [n, k], got shape {tuple(directions.shape)}")
    elif isinstance(directions, (list, tuple)):
        dirs = list(directions)
    else:
        raise ValueError(f"directions must be a tensor or a list of flat tensors, got {type(directions).__name__}")
    if len(dirs) != count:
        what = "a 1-D curve (betas=None) takes one direction" if count == 1 else "a 2-D grid takes two directions"
        raise ValueError(f"{what}, got {len(dirs)}; slice the eigenvectors, e.g. result.eigenvectors[:, :{count}]")
    out = []
    for d in dirs:
        if not isinstance(d, torch.Tensor) or d.dim() != 1 or d.shape[0] != n:
            shape = tuple(d.shape) if isinstance(d, torch.Tensor) else type(d).__name__
            raise ValueError(f"each direction must be a flat vector of length {n} (the parameters), got {shape}")
        if not torch.isfinite(d).all():
            raise ValueError("a direction contains NaN or Inf")
        out.append(d.detach().to(device=device, dtype=dtype))
    return out


def _steps(values, name: str) -> torch.Tensor:
    t = torch.as_tensor(values, dtype=torch.float64).detach().cpu()
    if t.dim() != 1 or t.numel() == 0:
        raise ValueError(f"{name} must be a non-empty 1-D sequence of numbers, got shape {tuple(t.shape)}")
    if not torch.isfinite(t).all():
        raise ValueError(f"{name} contains NaN or Inf")
    return t


def loss_landscape(
    model: nn.Module,
    criterion=None,
    data=None,
    directions=None,
    alphas=None,
    betas=None,
    *,
    dataloader: Iterable | None = None,
    **objective,
) -> torch.Tensor:
    """The loss on a line or a plane through the parameters.

    .. math::
        L(\\alpha) = L(\\theta + \\alpha d_1), \\qquad L(\\alpha, \\beta) = L(\\theta + \\alpha d_1 + \\beta d_2)

    with flat directions over the same parameters, in the same order, as the operators use (e.g. the
    columns of :attr:`EigenResult.eigenvectors`; they are used as given, not normalised). Along a unit
    eigenvector :math:`v` with eigenvalue :math:`\\lambda`,
    :math:`L(\\alpha) = L(0) + \\alpha\\, g^\\top v + \\tfrac12 \\lambda \\alpha^2 + O(\\alpha^3)`.

    The model is evaluated in eval mode under ``torch.no_grad`` with
    ``torch.func.functional_call`` on perturbed copies of the parameters, so its parameters are never
    modified (not even temporarily) and its modes are restored afterwards. Inputs are cast to the
    parameters' dtype and device, as the operators do.

    Args:
        model: the network (a ``DataParallel``/``DDP`` wrapper is looked through).
        criterion: the loss; with ``reduction="mean"`` the loss over a loader is the weighted mean of
            the batch losses (weights: sample counts or ``batch_weight``), with ``"sum"`` their sum.
            ``None``: ``loss_fn=`` or the model output's ``.loss``, as for the operators.
        data: one batch (any form the operators take).
        directions: one flat ``[n]`` vector (or ``[n, 1]``) for a curve; two (``[n, 2]`` or a pair of
            ``[n]`` vectors) for a surface.
        alphas: the steps along ``d1`` (1-D).
        betas: the steps along ``d2``; ``None`` for a curve.
        dataloader: instead of ``data``, an iterable of batches.
        **objective: the objective's further keywords (:class:`~hessianflow.curvature.objective.Objective`):
            ``params`` (the parameters the directions live on; default every parameter with
            ``requires_grad``), ``loss_fn``, ``reduction``, ``batch_weight``, ``num_batches``,
            ``micro_batch_size`` and ``distributed`` (combine the ranks' losses over
            ``torch.distributed``, each rank holding its share of the data: the same loss over the union
            of the shares on every rank; shards may be empty, and a failure on one rank raises on all).
            The pieces of the data are weighted by the units the loss averages over, as for the operators.

    Returns:
        float64 CPU tensor of losses, ``[len(alphas)]`` or ``[len(alphas), len(betas)]``.

    Raises:
        ValueError: for both or neither of ``data``/``dataloader``, a direction of the wrong length or
            count, empty or non-finite steps, an empty loader (distributed: no samples on any rank), or
            ``distributed=True`` without a process group.
        NonFiniteError: a NaN or infinite loss at a point (as every other entry point).

    Example (a linear model at :math:`w = 0` under the squared error with zero targets, along
    :math:`d = e_1`: :math:`L(\\alpha) = \\alpha^2 \\|X e_1\\|^2 / n = 2 \\alpha^2 / 3`):
        >>> import torch
        >>> from torch import nn
        >>> from hessianflow import loss_landscape
        >>> X = torch.tensor([[1.0, 0.0], [0.0, 2.0], [1.0, 1.0]], dtype=torch.float64)
        >>> y = torch.zeros(3, 1, dtype=torch.float64)
        >>> model = nn.Linear(2, 1, bias=False).double()
        >>> with torch.no_grad():
        ...     _ = model.weight.zero_()
        >>> d = torch.tensor([1.0, 0.0], dtype=torch.float64)
        >>> loss_landscape(model, nn.MSELoss(), data=(X, y), directions=d, alphas=[0.0, 1.0, 2.0])
        tensor([0.0000, 0.6667, 2.6667], dtype=torch.float64)
    """
    if directions is None or alphas is None:
        raise ValueError("loss_landscape needs directions and alphas")
    if objective.get("train_mode"):
        raise ValueError("loss_landscape evaluates the model in eval mode; train_mode=True is not supported")
    obj = Objective(model, criterion, data=data, dataloader=dataloader, **objective)
    model, spec, chosen, names = obj.model, obj.spec, obj.params, obj.param_names
    dirs = _directions(directions, 1 if betas is None else 2, obj.size, obj.dtype, obj.device)
    a = _steps(alphas, "alphas")
    b = None if betas is None else _steps(betas, "betas")
    distributed, reduction = obj.distributed, obj.reduction
    device = obj.device

    def batches():
        return (batch for batch, _ in obj.pieces())

    grid = [(float(x),) for x in a] if b is None else [(float(x), float(y)) for x in a for y in b]

    def local():
        """This rank's ``[points, 2]`` table: the (weighted) loss sum and the weight at each point."""
        with model_mode(model, False), torch.no_grad():
            at = _perturbed_loss(model, spec, chosen, names, dirs)
            sums = [_loss_sum(at(c), obj, batches(), reduction) for c in grid]
        if not distributed and any(count == 0 for _, count in sums):
            raise ValueError("the data loader yielded no samples")
        return [torch.tensor(sums, dtype=torch.float64)], 0

    if distributed:
        zeros = lambda: [torch.zeros(len(grid), 2, dtype=torch.float64)]  # noqa: E731
        (table,), _ = reduce_or_raise(local, zeros, what="evaluate the loss landscape", device=device)
    else:
        (table,), _ = local()
    totals, counts = table.cpu().unbind(dim=1)
    if distributed and counts[0] == 0:
        raise ValueError("the data loader yielded no samples on any rank")
    out = totals / counts if reduction == "mean" else totals
    return out if b is None else out.view(len(a), len(b))


def _perturbed_loss(model: nn.Module, spec: LossSpec, chosen, names: list[str], dirs: list[torch.Tensor]):
    """``at(coefs)``: the loss of a batch at :math:`\\theta + \\sum_i c_i d_i`, as a function of the
    batch, through ``torch.func.functional_call`` on perturbed copies (the model's own parameters are
    never touched)."""
    base = [p.detach() for p in chosen]
    fixed = {k: v for k, v in model.named_parameters() if k not in set(names)}
    fixed.update(dict(model.named_buffers()))
    wrapper = LossModule(model, spec)
    d_pieces = [unflatten(d, base) for d in dirs]

    def at(coefs):
        perturbed = {}
        for i, (name, p) in enumerate(zip(names, base)):
            q = p
            for c, dp in zip(coefs, d_pieces):
                if c != 0.0:
                    q = q + c * dp[i]
            perturbed[name] = q
        state = {"model." + k: v for k, v in {**fixed, **perturbed}.items()}
        return lambda batch: torch.func.functional_call(wrapper, state, (batch,))

    return at


def _loss_sum(loss_of, obj: Objective, batches, reduction: str) -> tuple[float, float]:
    """``(sum of the batch losses, weighted by their units for a mean, total units)`` over a pass."""
    total, count = 0.0, 0
    for batch in batches:
        nb = obj.units(batch)
        if nb == 0:
            continue
        loss = loss_of(batch)
        if not isinstance(loss, torch.Tensor) or loss.dim() != 0:
            shape = tuple(loss.shape) if isinstance(loss, torch.Tensor) else type(loss).__name__
            raise ValueError(f"the loss must be a scalar, got {shape}")
        if not torch.isfinite(loss):
            raise NonFiniteError(f"the loss is not finite ({float(loss)}) on the loss landscape")
        total += float(loss) * (nb if reduction == "mean" else 1.0)
        count += nb
    return total, count
