"""Curvature operators of a model's loss: the Hessian and the generalised Gauss-Newton matrix.

Both are :class:`~hessianflow.linop.LinearOperator` s on the flat vector of the chosen parameters, over
one batch (``data=(inputs, targets)``) or a whole data set (``dataloader=...``). Every algorithm in the
package accepts them.
"""

from __future__ import annotations

import contextlib
import fnmatch
import re
import warnings
from collections.abc import Callable, Iterable

import torch
from torch import nn

from ._checks import check_int
from ._modes import model_mode
from .attention import product_kernels
from .batches import LossModule, LossSpec, move_batch, split_batch, split_samples
from .distributed import FallbackOnAllRanks, reduce_or_raise, use_distributed
from .fast_paths import FastPaths
from .hvp import (
    double_backprop_hmm,
    double_backprop_hvp,
    flatten,
    flatten_batched,
    forward_over_reverse_hvp,
    unflatten,
)
from .linop import LinearOperator, NonFiniteError

__all__ = [
    "CurvatureOperator",
    "HessianOperator",
    "GGNOperator",
    "EmpiricalFisherOperator",
    "exact_hessian",
    "resolve_params",
    "unwrap_model",
]


def _batch_norms(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


@contextlib.contextmanager
def _running_stats_frozen(norms: list[nn.Module]):
    """``track_running_stats=False`` on train-mode BatchNorms for a block: the batch statistics normalise
    either way, and the running ones are left alone (a reused graph holds no reference to them, which
    restoring them afterwards would invalidate)."""
    try:
        for m in norms:
            m.track_running_stats = False
        yield
    finally:
        for m in norms:
            m.track_running_stats = True


@contextlib.contextmanager
def _tf32_off(device: torch.device, allow_tf32: bool):
    """True float32 CUDA matrix products and convolutions for a block (an accuracy setting, not a speed
    path): PyTorch enables TF32 for cuDNN convolutions by default."""
    if device.type != "cuda" or allow_tf32:
        yield
        return
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    try:
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def _randomness(model: nn.Module, train_mode: bool, dataloader, reuse_graph: bool) -> tuple[str | None, bool]:
    """Why two products with the same vector may differ: ``(reason or None, deterministic)``.

    In train mode a dropout module draws a new mask at every forward: the operator is a random matrix
    (two products of a C1-like network with the same vector differed by 24%). With the first-order graph
    reused (one batch) the mask is drawn once, so the products are of one fixed matrix, the Hessian for
    that mask, but a different one each time the graph is rebuilt. BatchNorm in train mode normalises by
    the batch statistics, so over a shuffled loader the batches, and the matrix, change from pass to pass
    (0.85% measured).
    """
    if not train_mode:
        return None, True
    drops = [m for m in model.modules() if isinstance(m, nn.modules.dropout._DropoutNd) and m.p > 0]
    if drops and not reuse_graph:
        return f"{len(drops)} dropout module(s) draw a new mask at every product", False
    if _batch_norms(model) and dataloader is not None and _shuffled(dataloader):
        return "BatchNorm uses the batch statistics of a shuffled loader, whose batches change every pass", False
    if drops:
        return f"{len(drops)} dropout module(s): the products are of the Hessian for one random mask", True
    return None, True


def _shuffled(loader) -> bool:
    """Whether a ``DataLoader`` draws its samples in a new random order on every pass."""
    from torch.utils.data import RandomSampler

    samplers = (getattr(loader, "sampler", None), getattr(getattr(loader, "batch_sampler", None), "sampler", None))
    return any(isinstance(smp, RandomSampler) for smp in samplers)


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
            ``"re:"`` or contains ``*``, ``?`` or ``[``.

    Tied parameters (GPT-2's ``transformer.wte.weight`` and ``lm_head.weight``) are one tensor: they are
    chosen once, under their first name, whichever of their names selects them.

    Raises:
        ValueError: a name or a pattern that selects nothing (the message lists some names), an object
            that is not a parameter or a module of the model, or an empty selection.

    Example:
        >>> from torch import nn
        >>> from hessianflow.operators import resolve_params
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
        if isinstance(params, (str, nn.Module, torch.Tensor, re.Pattern)):
            params = [params]
        chosen = [p for item in params for p in _selected(model, item, named, name_of)]
        if not chosen:
            raise ValueError("params= selects no parameter")
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
    if isinstance(item, torch.Tensor):
        if id(item) not in name_of:
            raise ValueError("a tensor in params= is not a parameter of the model")
        return [item]
    raise ValueError(
        f"params= takes parameters, modules, names, glob patterns or regular expressions, got {type(item).__name__}"
    )


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


class CurvatureOperator(LinearOperator):
    """Common machinery of :class:`HessianOperator`, :class:`GGNOperator` and :class:`EmpiricalFisherOperator`.

    The loss of a batch is given one of three ways (:class:`~hessianflow.batches.LossSpec`):

    - ``criterion`` (positional, as before): batches ``(inputs, targets)`` (or a dict with an input and
      a target key), loss ``criterion(model(inputs), targets)``;
    - ``loss_fn=fn``: ``fn(model, batch) -> scalar`` for any batch (any nesting of dicts, lists, tuples
      and tensors), e.g. :func:`hessianflow.losses.causal_lm_loss`;
    - neither: ``model(**batch)`` (a dict), ``model(*batch)`` (a list or tuple) or ``model(batch)``, and
      the output's ``.loss`` (a HuggingFace model given ``labels``; a mean). HuggingFace computes that
      loss from ``logits.float()``, i.e. in float32 even for a float64 model (measured on a tiny GPT-2:
      products 4e-8 relative from the float64 loss); :func:`hessianflow.losses.causal_lm_loss` keeps the
      model's precision.

    Every tensor of a batch is moved to the parameters' device (floating-point ones also cast to their
    dtype), recursively; other leaves are untouched.

    Args:
        model: the network (a ``DataParallel``/``DDP`` wrapper is looked through).
        criterion: the loss, ``criterion(outputs, targets)``; its ``reduction`` (``"mean"`` or
            ``"sum"``) says how per-batch curvatures combine over a data loader.
        data: one batch.
        dataloader: an iterable of batches; the operator is the curvature of the loss over all of its
            samples: a mean-reduced loss's batch products are weighted by the batch weight (the sample
            count, a smaller last batch included, or ``batch_weight``) and divided by the total weight;
            a sum-reduced loss's are summed.
        params: the parameters to differentiate w.r.t. (names, modules, glob patterns, regular
            expressions: see :func:`resolve_params`); others are fixed.
        train_mode: run the model in train mode (BatchNorm batch statistics, dropout on). Default
            ``False``: eval mode, the deterministic function whose curvature one usually means. The
            model's modes and ``requires_grad`` flags are restored after every product.
        num_batches: use only the first ``num_batches`` batches of the loader.
        reuse_graph: one batch only: build the first-order graph once and reuse it for every product
            (as PyHessian does), so a product costs one backward pass instead of forward + 2 backward.
            Holds the graph's memory until :meth:`release` or the operator is deleted.
        backend: ``"double_backprop"`` (default), ``"forward_over_reverse"`` (``torch.func``), or, for
            :class:`HessianOperator`, ``"finite_difference"`` (central differences of two gradients;
            ``fd_step=``): no second derivatives at all, for FSDP-sharded models or kernels without a
            double backward; approximate (see :meth:`HessianOperator._finite_difference`).
        progress: show a tqdm bar over the batches of a loader.
        allow_tf32: let CUDA convolutions and matrix products of float32 models run in TF32 (10-bit
            mantissa) during products. Default ``False``: products in true float32, whatever the global
            ``torch.backends`` settings (PyTorch enables TF32 for cuDNN convolutions by default). How far
            TF32 moves the eigenvalues: see benchmarks/README.md. No effect on the CPU.
        batched_matmat: compute :meth:`matmat` as one batched backward pass (``is_grads_batched``)
            instead of a loop of products; ``None``: on CUDA devices only (on the CPU the loop was
            measured faster for convolutional networks). Either way a graph whose operations have no
            batching rule falls back to the loop.
        distributed: sum the per-rank products over ``torch.distributed`` (each rank holding its shard
            of the data). ``None``: on when a process group is initialised with more than one rank and
            a loader is given (a one-batch list ``[(x, y)]`` included: a rank's shard of one batch).
            Every rank must then make the same calls with the same vectors (the algorithms do, given
            the same seed); the result equals the one-process product over the union of the shards
            (batch weights, token counts included, summed over the ranks), is the same on every rank,
            and a failure on one rank raises on all of them. Shards may differ in size, or be empty.
            ``num_batches`` counts per rank, and ``train_mode=True`` uses each rank's own batch
            statistics.
        loss_fn: ``loss_fn(model, batch) -> scalar loss``, instead of a criterion.
        reduction: ``"mean"`` or ``"sum"``, the loss's reduction over a batch's samples (or over the
            units ``batch_weight`` counts). Needed over a data loader when it cannot be read off the
            loss (a plain function, or a criterion without ``.reduction``): it is never guessed. A
            criterion's ``.reduction`` and the :mod:`hessianflow.losses` helpers' declared ``"mean"`` are
            used otherwise; a model's ``.loss`` counts as a mean.
        batch_weight: ``batch_weight(batch) -> number``, the weight of a batch in a mean over a loader;
            default: the leading dimension of the batch's first tensor (found depth-first). For a
            token-level mean loss with padding (labels ``-100``),
            ``batch_weight=lambda b: (b["labels"][:, 1:] != -100).sum()`` makes the operator the
            curvature of the mean over all counted tokens (a causal LM's shifted labels).
        forward_fn, loss_of_output: a split loss (together, instead of ``loss_fn``):
            ``loss_of_output(forward_fn(model, batch), batch)``; see :class:`GGNOperator`.
        micro_batch_size: run every batch (``data=`` or a loader's) in consecutive chunks of at most this
            many samples, one chunk's graph in memory at a time, and combine the chunks' products as a
            loader's batches are combined (weighted by ``batch_weight``, or summed). The peak memory of a
            product is then that of a chunk, for the same operator, at the cost of smaller (less
            efficient) passes and of the reused graph (off when a batch is split). The operator is
            unchanged when the batch's loss is the weight-weighted mean of its chunks' losses (a mean over
            samples; a token mean with ``batch_weight`` counting the tokens) or their sum; so the loss's
            reduction must be known (as over a loader), and train-mode BatchNorm (statistics of the whole
            batch) is refused. Default ``None``: whole batches.
        fast_paths: take the speed paths of :mod:`hessianflow.fast_paths` (convolutions with an explicit
            double backward and channels-last image batches on the CPU, eval-mode BatchNorm as an affine
            map), each where it was measured faster; the same products to rounding. ``False`` runs the
            model exactly as written (no module patched), e.g. to debug it; so does the global switch
            (``hessianflow.fast_paths.enabled(False)``, ``HESSIANFLOW_FAST_PATHS=0``).

    Attributes:
        num_samples: the total weight of the data of the last product (samples, or what
            ``batch_weight`` counts; summed over the ranks).
        spec: the :class:`~hessianflow.batches.LossSpec`.
    """

    _backends = ("double_backprop",)

    @property
    def _kernel_backend(self) -> str:
        """The kind of derivatives products take, for :func:`~hessianflow.attention.product_kernels`."""
        return self.backend

    def __init__(
        self,
        model: nn.Module,
        criterion=None,
        data=None,
        dataloader: Iterable | None = None,
        params=None,
        train_mode: bool = False,
        num_batches: int | None = None,
        reuse_graph: bool = True,
        backend: str = "double_backprop",
        progress: bool = False,
        distributed: bool | None = None,
        batched_matmat: bool | None = None,
        allow_tf32: bool = False,
        *,
        loss_fn: Callable | None = None,
        reduction: str | None = None,
        batch_weight: Callable | None = None,
        forward_fn: Callable | None = None,
        loss_of_output: Callable | None = None,
        micro_batch_size: int | None = None,
        fast_paths: bool = True,
    ):
        if (data is None) == (dataloader is None):
            raise ValueError("pass exactly one of data=batch or dataloader=")
        if backend not in self._backends:
            raise ValueError(f"backend must be one of {self._backends}, got {backend!r}")
        if num_batches is not None and int(num_batches) < 1:
            raise ValueError(f"num_batches must be a positive integer, got {num_batches}")
        self.spec = LossSpec(criterion, loss_fn, reduction, batch_weight, forward_fn, loss_of_output)
        self.model = unwrap_model(model)
        self.criterion = criterion
        self.params, self.param_names = resolve_params(self.model, params)
        dtypes = {p.dtype for p in self.params}
        devices = {p.device for p in self.params}
        if len(dtypes) > 1 or len(devices) > 1:
            raise ValueError(f"the chosen parameters mix dtypes {dtypes} or devices {devices}")
        super().__init__(sum(p.numel() for p in self.params), self.params[0].dtype, self.params[0].device)
        if dataloader is not None and isinstance(dataloader, (list, tuple)) and len(dataloader) == 1:
            # a one-batch "loader" (e.g. a rank's shard of a batch): reuse its graph like data=
            data, dataloader = dataloader[0], None
            single_from_loader = True
        else:
            single_from_loader = False
        if data is not None:
            self.spec.check_batch(data)
        self.data = None if data is None else self._to_device(data)
        self.dataloader = dataloader
        self.train_mode = bool(train_mode)
        self.num_batches = None if num_batches is None else int(num_batches)
        self.micro_batch_size = (
            None if micro_batch_size is None else check_int("micro_batch_size", micro_batch_size, minimum=1)
        )
        if self.data is not None:
            # a split batch holds one chunk's graph at a time: nothing to reuse across products
            reuse_graph = reuse_graph and len(self._chunks(self.data)) == 1
        self.reuse_graph = bool(reuse_graph) and data is not None
        self.backend = backend
        self.progress = progress
        self.distributed = use_distributed(distributed, default=dataloader is not None or single_from_loader)
        # batches, ranks or chunks combine: how depends on the reduction
        if self.dataloader is not None:
            self.spec.require_reduction("over a data loader")
        elif self.distributed:
            self.spec.require_reduction("over several ranks")
        elif self.micro_batch_size is not None:
            self.spec.require_reduction("to combine micro-batches (micro_batch_size=)")
        if self.micro_batch_size is not None and self.train_mode and _batch_norms(self.model):
            raise ValueError(
                "micro_batch_size with train_mode=True and BatchNorm layers: each chunk would be normalised by its "
                "own statistics, a different function from the whole batch's; use eval mode or whole batches"
            )
        # one batch: the reduction does not change the operator (the batch's own loss)
        self.reduction = self.spec.reduction or "mean"
        self._graph = None
        self._graph_fast = None  # whether the reused graph was built through the speed paths
        # matmat as one vmapped backward (is_grads_batched) or a loop of products: batched on GPUs only,
        # where it was measured faster (see benchmarks/README.md).
        self._batched_ok = (self.device.type == "cuda") if batched_matmat is None else bool(batched_matmat)
        self.allow_tf32 = bool(allow_tf32)
        self._fast = FastPaths(fast_paths)
        why, self.deterministic = _randomness(self.model, self.train_mode, self.dataloader, self.reuse_graph)
        if why is not None:
            warnings.warn(
                f"{type(self).__name__}(train_mode=True): {why}"
                + ("" if self.deterministic else "; not a fixed matrix, so no eigensolver will report convergence"),
                RuntimeWarning,
                stacklevel=2,
            )
        self.num_samples = None if self.data is None else self.spec.weight(self.data)

    # -- model state ---------------------------------------------------------------------------
    @property
    def fast_paths(self) -> bool:
        """The operator's own switch of the speed paths (see :mod:`hessianflow.fast_paths`)."""
        return self._fast.on

    @property
    def _nhwc(self) -> bool:
        """Whether image batches are still sent channels-last (see :meth:`FastPaths.run`)."""
        return self._fast.channels_last

    @contextlib.contextmanager
    def _prepared(self):
        """Set the mode and ``requires_grad`` for a product, and put both back afterwards; TF32 off
        unless allowed, the speed paths (when on) and attention kernels with the derivatives products
        need (and MHA's fast path off)."""
        norms = [m for m in _batch_norms(self.model) if m.track_running_stats] if self.train_mode else []
        second_order = self.backend == "double_backprop"
        with (
            model_mode(self.model, self.train_mode, requires_grad=self.params),
            _running_stats_frozen(norms),
            _tf32_off(self.device, self.allow_tf32),
            self._fast.patched(
                self.model, device=self.device, double_backprop=second_order, train_mode=self.train_mode
            ),
            product_kernels(self.device, self._kernel_backend, self.model),
        ):
            yield

    def _to_device(self, batch):
        return move_batch(batch, self.device, dtype=self.dtype, non_blocking=True)

    def _forward(self, inputs):
        """The model's outputs (image batches on the CPU in channels-last order, see :mod:`~hessianflow.fast_paths`)."""
        return self._fast.run(self.model, inputs)

    def _loss(self, batch):
        """The checked scalar loss of a batch."""
        return self.spec.loss(self.model, batch, run=self._forward)

    def _output(self, batch):
        """The model's output on a batch (for the GGN: the criterion's input, or ``forward_fn``'s value)."""
        out = self.spec.output(self.model, batch, run=self._forward)
        if not isinstance(out, torch.Tensor):
            raise ValueError(f"the GGN needs the model's output as one tensor, got {type(out).__name__}")
        return out

    # -- the per-batch product, implemented by subclasses ----------------------------------------
    def _batch_graph(self, batch):  # pragma: no cover - abstract
        raise NotImplementedError

    def _batch_product(self, graph, vecs, batched: bool, retain: bool):  # pragma: no cover - abstract
        raise NotImplementedError

    # -- assembling products -------------------------------------------------------------------
    def release(self):
        """Free the reused first-order graph (it is rebuilt on the next product)."""
        self._graph = None

    def _batches(self):
        """The batches (or micro-batches) of one pass, each with a flag: is it the single, reusable batch?"""
        if self.data is not None:
            chunks = self._chunks(self.data)
            for chunk in chunks:
                yield chunk, len(chunks) == 1
            return
        batches = self.dataloader
        if self.progress:
            from tqdm.auto import tqdm

            total = self.num_batches
            if total is None and hasattr(batches, "__len__"):
                total = len(batches)
            batches = tqdm(batches, total=total, desc="curvature product", leave=False)
        for b, batch in enumerate(batches):
            if self.num_batches is not None and b >= self.num_batches:
                break
            self.spec.check_batch(batch)
            for chunk in self._chunks(self._to_device(batch)):
                yield chunk, False

    def _chunks(self, batch) -> list:
        """``batch`` as the micro-batches products run on (``[batch]`` without ``micro_batch_size``)."""
        return [batch] if self.micro_batch_size is None else split_batch(batch, self.micro_batch_size)

    def _local_products(self, pieces, batched: bool):
        """This process's weighted sum of batch products and its total weight.

        Returns ``(acc, count, single)``: ``single`` is the product of the one reusable batch, returned
        unweighted (``acc`` is then ``None``) when no reduction over batches or ranks follows.
        """
        acc, count = None, 0
        for batch, reusable in self._batches():
            n_b = self.spec.weight(batch)
            if n_b == 0:  # e.g. an empty shard on one rank, or all padding: it still joins the all-reduce
                continue
            with self._prepared():
                graph = None
                if reusable and self.reuse_graph:
                    if self._graph is None or self._graph_fast != self._fast.active():
                        self._graph = None  # built with the speed paths switched the other way
                        self._graph_fast = self._fast.active()
                        self._graph = self._batch_graph(batch)
                    graph = self._graph
                if pieces is None:  # the gradient (see gradient())
                    prod = self._batch_gradient(graph, batch)
                elif graph is not None:
                    prod = self._batch_product(graph, pieces, batched, retain=True)
                else:
                    prod = self._batch_product(self._batch_graph(batch), pieces, batched, retain=False)
            if reusable and not self.distributed:
                return None, n_b, prod  # one batch: no weighting (and no rounding from it)
            # mean-reduced losses: the whole-data Hessian is the weight-weighted mean of batch Hessians
            weight = float(n_b) if self.reduction == "mean" else 1.0
            if acc is None:
                acc = [weight * t for t in prod]
            else:
                for a, t in zip(acc, prod):
                    a.add_(t, alpha=weight)
            count += n_b
        return acc, count, None

    def gradient(self) -> torch.Tensor:
        """The flat gradient of the loss over the operator's data, ``[n]`` (not counted as a product).

        The same data, weighting (a loader's batches by size), model mode, parameters and ranks as the
        products. On one batch with the graph reused it is read off the first-order graph that the
        products need anyway (free after the first product, and it builds that graph otherwise);
        over a loader it costs one forward and backward pass. Its main use is as a start vector for
        the eigensolvers (``v0="gradient"``): gradients lie largely in the span of the top Hessian
        eigenvectors (Gur-Ari, Roberts & Dyer 2018).
        """
        grads = self._products(None, batched=False)
        return flatten(grads, like=self.params)

    def _batch_gradient(self, graph, batch):
        """The loss gradient of one batch; ``graph`` is the batch's reused first-order graph or ``None``."""
        loss = self._loss(batch)
        g = torch.autograd.grad(loss, self.params, allow_unused=True)
        return [t.detach() if t is not None else torch.zeros_like(p) for t, p in zip(g, self.params)]

    def _products(self, pieces, batched: bool):
        """Curvature times ``pieces`` (split like the parameters; with a leading ``k`` if batched)."""
        if not self.distributed:
            acc, count, single = self._local_products(pieces, batched)
            if single is not None:
                return single
        else:
            acc, count = self._reduced_products(pieces, batched)
        if count == 0:
            raise ValueError("the data loader yielded no samples")
        if acc is None:
            acc = [torch.zeros_like(t) for t in (pieces if pieces is not None else self.params)]
        self.num_samples = count
        if self.reduction == "mean":
            for a in acc:
                a.div_(count)
        return acc

    def _reduced_products(self, pieces, batched: bool):
        """The products summed over the ranks (:func:`~hessianflow.distributed.reduce_or_raise`): a rank
        whose local products failed makes every rank raise, and a batched product that one rank cannot
        do (a ``RuntimeError``: no batching rule) makes every rank fall back to single products together."""

        def local():
            acc, count, _ = self._local_products(pieces, batched)
            return acc, count

        return reduce_or_raise(
            local,
            lambda: [torch.zeros_like(t).detach() for t in (pieces if pieces is not None else self.params)],
            what="compute their curvature products",
            device=self.device,
            fallback=(RuntimeError,) if batched and self._batched_ok else (),
        )

    def _matvec(self, v):
        return flatten(self._products(unflatten(v, self.params), batched=False), like=self.params)

    def _matmat(self, V):
        k = V.shape[1]
        if self._batched_ok:
            # Distributed, only the all-reduced verdict counts: a communication error (a RuntimeError
            # too) must propagate, not send this rank alone into a loop of collectives.
            fallback = (FallbackOnAllRanks,) if self.distributed else (RuntimeError,)
            try:
                return flatten_batched(self._products(unflatten(V, self.params), batched=True), k)
            except fallback:
                # An operation without a batching rule (vmap over the backward): loop instead, from now on.
                self._batched_ok = False
        return super()._matmat(V)

    def __repr__(self):
        src = "one batch" if self.data is not None else "a data loader"
        return (
            f"{type(self).__name__}(size={self.size}, {src}, params={len(self.params)} tensors, "
            f"dtype={self.dtype}, device={self.device}, train_mode={self.train_mode})"
        )


class HessianOperator(CurvatureOperator):
    """The Hessian :math:`H = \\nabla^2_\\theta L(\\theta)` of the loss w.r.t. the chosen parameters.

    .. math:: L(\\theta) = \\frac{1}{W} \\sum_b w_b L_b(\\theta), \\qquad W = \\sum_b w_b

    over one batch or all batches :math:`b` of a loader, :math:`L_b` the loss of batch :math:`b` and
    :math:`w_b` its weight (its number of samples, or ``batch_weight``); ``reduction="sum"``:
    :math:`L = \\sum_b L_b`. Products use double backprop (Pearlmutter 1994) by default, reusing the
    first-order graph on one batch, or forward-over-reverse through ``torch.func``
    (``backend="forward_over_reverse"``). The loss: a criterion, ``loss_fn=``, or the model output's
    ``.loss`` (see :class:`CurvatureOperator`).

    Other loss forms::

        H = HessianOperator(gpt2, data={"input_ids": ids, "labels": ids})          # the output's .loss
        H = HessianOperator(gpt2, loss_fn=causal_lm_loss, dataloader=loader,
                            batch_weight=lambda b: (b["labels"][:, 1:] != -100).sum())

    Example (linear least squares: :math:`H = 2 X^\\top X / n`):
        >>> import torch
        >>> from torch import nn
        >>> X = torch.tensor([[1.0, 0.0], [0.0, 2.0], [1.0, 1.0]], dtype=torch.float64)
        >>> y = torch.zeros(3, 1, dtype=torch.float64)
        >>> model = nn.Linear(2, 1, bias=False).double()
        >>> from hessianflow import HessianOperator
        >>> H = HessianOperator(model, nn.MSELoss(), data=(X, y))
        >>> H @ torch.tensor([1.0, 0.0], dtype=torch.float64)  # the first column of 2 X^T X / 3
        tensor([1.3333, 0.6667], dtype=torch.float64)
        >>> torch.allclose(H.to_dense(), 2 * X.T @ X / 3)
        True
    """

    _backends = ("double_backprop", "forward_over_reverse", "finite_difference")

    def __init__(self, model, criterion=None, data=None, dataloader=None, params=None, *, fd_step=None, **kwargs):
        super().__init__(model, criterion, data=data, dataloader=dataloader, params=params, **kwargs)
        if self.backend != "double_backprop":
            self.reuse_graph = False
        if fd_step is not None and not (isinstance(fd_step, (int, float)) and 0 < fd_step < 1):
            raise ValueError(f"fd_step must be a number in (0, 1), got {fd_step!r}")
        # Central differences: truncation error ~ h^2, rounding ~ eps / h, balanced at h ~ eps^(1/3)
        # (relative to the parameters' scale): 6e-6 in float64, 5e-3 in float32.
        self.fd_step = float(fd_step) if fd_step is not None else torch.finfo(self.dtype).eps ** (1 / 3)

    def _batch_graph(self, batch):
        if self.backend != "double_backprop":
            return batch
        loss = self._loss(batch)
        grads = torch.autograd.grad(loss, self.params, create_graph=True, allow_unused=True)
        return grads

    def _batch_gradient(self, graph, batch):
        if graph is None or self.backend != "double_backprop":
            return super()._batch_gradient(graph, batch)
        # the reused first-order graph is the gradient itself
        return [t.detach() if t is not None else torch.zeros_like(p) for t, p in zip(graph, self.params)]

    def _batch_product(self, graph, pieces, batched, retain):
        if self.backend == "forward_over_reverse":
            return self._fwd_over_rev(graph, pieces, batched)
        if self.backend == "finite_difference":
            if batched:  # one pair of gradients per vector
                cols = [self._finite_difference(graph, [p[j] for p in pieces]) for j in range(pieces[0].shape[0])]
                return [torch.stack(c) for c in zip(*cols)]
            return self._finite_difference(graph, pieces)
        if batched:
            return double_backprop_hmm(graph, self.params, pieces, retain_graph=retain)
        return double_backprop_hvp(graph, self.params, pieces, retain_graph=retain)

    def _fwd_over_rev(self, batch, pieces, batched):
        wrapper = LossModule(self.model, self.spec)
        names = ["model." + n for n in self.param_names]

        def loss_fn(ps):
            return torch.func.functional_call(wrapper, dict(zip(names, ps)), (batch,))

        # (in train mode, _prepared has switched BatchNorm's running statistics off: nothing is mutated)
        if not batched:
            return forward_over_reverse_hvp(loss_fn, self.params, pieces)
        hmm = torch.func.vmap(lambda *t: tuple(forward_over_reverse_hvp(loss_fn, self.params, t)))
        return list(hmm(*pieces))

    def _finite_difference(self, batch, pieces):
        """:math:`Hv \\approx (g(\\theta + h v) - g(\\theta - h v)) / 2h`, two first-order gradients.

        For setups where a double backward is impractical (sharded parameters under FSDP, custom kernels
        with a backward but no double backward): only gradients are taken, at parameters shifted without
        touching the model's own tensors (``torch.func.functional_call``). ``h = fd_step * max(1,
        ||theta||) / ||v||``; the error is O(h^2) (the third derivative) plus rounding O(eps / h).
        """
        wrapper = LossModule(self.model, self.spec)
        names = ["model." + n for n in self.param_names]
        vnorm = torch.sqrt(sum(torch.sum(v.double() ** 2) for v in pieces)).item()
        if vnorm == 0:
            return [torch.zeros_like(p) for p in self.params]
        scale = max(1.0, torch.sqrt(sum(torch.sum(p.detach().double() ** 2) for p in self.params)).item())
        h = self.fd_step * scale / vnorm

        def grad_at(sign):
            ps = [(p.detach() + (sign * h) * v).requires_grad_(True) for p, v in zip(self.params, pieces)]
            loss = torch.func.functional_call(wrapper, dict(zip(names, ps)), (batch,))
            if loss.dim() != 0:
                raise ValueError(f"the loss must be a scalar, got shape {tuple(loss.shape)}")
            if not torch.isfinite(loss):
                raise NonFiniteError(f"the loss is not finite ({loss.item()}) at a finite-difference point")
            g = torch.autograd.grad(loss, ps, allow_unused=True)
            return [t if t is not None else torch.zeros_like(p) for t, p in zip(g, ps)]

        plus, minus = grad_at(1.0), grad_at(-1.0)
        return [(a - b) / (2 * h) for a, b in zip(plus, minus)]


def _softmax_ce_curvature(logits: torch.Tensor, ce) -> tuple[torch.Tensor, torch.Tensor, int]:
    """``(p, coef, dim)`` of the cross-entropy's output Hessian ``coef * (diag(p) - p p^T)`` per position.

    ``p`` is the softmax of ``logits`` along the class dimension ``dim`` (negative, so the same ``dim``
    serves a batched ``[k, *logits.shape]`` vector); ``coef`` is 0 at ignored positions and ``1/count``
    (mean over the counted positions) or 1 (sum) elsewhere, broadcastable against ``p``.
    """
    dim = ce.class_dim if ce.class_dim < 0 else ce.class_dim - logits.dim()
    expected = logits.shape[: logits.dim() + dim] + logits.shape[logits.dim() + dim + 1 :]
    if tuple(ce.targets.shape) != tuple(expected):
        raise ValueError(
            f"cross-entropy targets of shape {tuple(ce.targets.shape)} do not fit logits of shape "
            f"{tuple(logits.shape)} with classes along dim {ce.class_dim}"
        )
    if ce.reduction not in ("mean", "sum"):
        raise ValueError(f"the cross-entropy's reduction must be 'mean' or 'sum', got {ce.reduction!r}")
    work = torch.float32 if logits.dtype in (torch.float16, torch.bfloat16) else logits.dtype
    p = torch.softmax(logits.detach().to(work), dim=dim)
    mask = (ce.targets != ce.ignore_index).to(work).unsqueeze(dim)
    if ce.reduction == "mean":
        mask = mask / mask.sum()
    return p, mask, dim


def _softmax_ce_product(p, coef, dim, u):
    """``coef * (diag(p) - p p^T) u`` along ``dim``: three tensors the size of the logits at most."""
    h = p * u.to(p.dtype)  # [.., V, ..]
    s = h.sum(dim=dim, keepdim=True)  # [.., 1, ..]
    h.addcmul_(p, s, value=-1)
    h.mul_(coef)
    return h.to(u.dtype)


class GGNOperator(CurvatureOperator):
    """The generalised Gauss-Newton matrix :math:`G = J^\\top H_{\\mathrm{out}} J` (Schraudolph 2002).

    :math:`J` is the Jacobian of the network outputs w.r.t. the parameters and :math:`H_{\\mathrm{out}}`
    the Hessian of the loss w.r.t. the outputs; :math:`G` is positive semi-definite for convex losses
    (cross-entropy, squared error) and equals the Hessian minus the term with the second derivatives
    of the network. Same interface and whole-data weighting as :class:`HessianOperator`.

    The GGN needs the model's *output* and a *loss of it*, which it gets from:

    - a ``criterion``: output ``model(inputs)``, loss ``criterion(output, targets)``;
    - ``forward_fn=(model, batch) -> output`` with ``loss_of_output=(output, batch) -> loss``, or a
      :class:`~hessianflow.losses.OutputLoss` as ``loss_fn`` (the same two functions), e.g.
      :func:`~hessianflow.losses.causal_lm_loss` for a HuggingFace causal LM: output
      ``model(**batch).logits`` (without ``labels``), loss the shifted cross-entropy recomputed from the
      logits. A plain ``loss_fn`` or a model's ``.loss`` hides the output and is refused.

    **Softmax cross-entropy** (an ``nn.CrossEntropyLoss`` criterion, mean or sum, without class weights
    or label smoothing, with class-index targets; or an ``OutputLoss`` that declares ``cross_entropy``,
    as the :mod:`hessianflow.losses` helpers do): the output Hessian is applied analytically,

    .. math:: H_{\\mathrm{out}} u = c_t \\left(p_t \\odot u_t - p_t (p_t^\\top u_t)\\right)

    per position :math:`t`, with :math:`p_t` the softmax of the logits and :math:`c_t` 0 at ignored
    positions (``ignore_index``, ``-100``) and :math:`1/\\#\\mathrm{counted}` (mean) or 1 (sum)
    elsewhere, instead of a double backward through ``log_softmax`` (which keeps several logits-sized
    tensors per product: what makes the GGN costly at a language model's vocabulary size).
    ``analytic_cross_entropy=False`` forces the autograd path, ``True`` requires the analytic one.

    Example (a linear model: :math:`J = X`, and the GGN of the squared error is :math:`2 X^\\top X / n`):
        >>> import torch
        >>> from torch import nn
        >>> X = torch.tensor([[1.0, 0.0], [0.0, 2.0], [1.0, 1.0]], dtype=torch.float64)
        >>> y = torch.zeros(3, 1, dtype=torch.float64)
        >>> model = nn.Linear(2, 1, bias=False).double()
        >>> from hessianflow import GGNOperator
        >>> G = GGNOperator(model, nn.MSELoss(), data=(X, y))
        >>> torch.allclose(G.to_dense(), 2 * X.T @ X / 3)
        True
    """

    def __init__(self, model, criterion=None, data=None, dataloader=None, params=None, *,
                 analytic_cross_entropy: bool | None = None, **kwargs):  # fmt: skip
        super().__init__(model, criterion, data=data, dataloader=dataloader, params=params, **kwargs)
        if not self.spec.has_output:
            self.spec.output(None, None)  # raises: says what the GGN needs
        self.analytic_cross_entropy = analytic_cross_entropy

    def _batch_graph(self, batch):
        out = self._output(batch)
        ce = None if self.analytic_cross_entropy is False else self.spec.cross_entropy(out, batch)
        if ce is None and self.analytic_cross_entropy:
            raise ValueError("analytic_cross_entropy=True, but the loss is not a plain softmax cross-entropy")
        g_out = hout = None
        if ce is not None:
            with torch.no_grad():
                self.spec.loss_of_output(out.detach(), batch)  # the checks (a scalar, finite) only
            hout = _softmax_ce_curvature(out, ce)
        else:
            loss = self.spec.loss_of_output(out, batch)
            (g_out,) = torch.autograd.grad(loss, out, create_graph=True)
        # J^T u is linear in the dummy u; differentiating it w.r.t. u gives J v (the double-vjp trick).
        # u is a zero scalar expanded to the output's shape: no logits-sized tensor is held for it.
        u = torch.zeros((), dtype=out.dtype, device=out.device, requires_grad=True).expand(out.shape)
        jtu = torch.autograd.grad(out, self.params, grad_outputs=u, create_graph=True, allow_unused=True)
        return out, g_out, hout, u, jtu

    def _batch_product(self, graph, pieces, batched, retain):
        out, g_out, hout, u, jtu = graph
        live = [i for i, t in enumerate(jtu) if t is not None and t.requires_grad]
        kw = {"retain_graph": True, "is_grads_batched": batched}
        shape = (pieces[0].shape[0], *out.shape) if batched else out.shape
        if not live:
            return [torch.zeros_like(t) for t in pieces]
        (jv,) = torch.autograd.grad([jtu[i] for i in live], u, grad_outputs=[pieces[i] for i in live], **kw)
        if hout is not None:
            hjv = _softmax_ce_product(*hout, jv)
            del jv
        elif g_out.requires_grad:
            (hjv,) = torch.autograd.grad(g_out, out, grad_outputs=jv, allow_unused=True, **kw)
            hjv = torch.zeros(shape, dtype=out.dtype, device=out.device) if hjv is None else hjv
        else:  # a loss linear in the outputs has no output curvature
            hjv = torch.zeros(shape, dtype=out.dtype, device=out.device)
        res = torch.autograd.grad(
            out, self.params, grad_outputs=hjv, allow_unused=True, **{**kw, "retain_graph": retain}
        )
        return [r.detach() if r is not None else torch.zeros_like(t) for r, t in zip(res, pieces)]


class EmpiricalFisherOperator(CurvatureOperator):
    """The empirical Fisher matrix: per-sample gradient outer products (Kunstner, Hennig & Balles 2019).

    .. math::
        F = \\frac{1}{W} \\sum_i \\nabla_\\theta s_i \\, \\nabla_\\theta s_i^\\top, \\qquad
        s_i = w_i\\, \\ell_i(\\theta), \\quad W = \\sum_i w_i

    for a mean-reduced loss, and :math:`F = \\sum_i \\nabla s_i \\nabla s_i^\\top` with
    :math:`s_i = \\ell_i` for a sum-reduced one, the sums running over every sample :math:`i` of the
    batch or of the loader. **A sample** is a leading-dimension slice: slice ``i:i+1`` of every tensor
    of the batch whose leading dimension is that of the batch's first tensor (other leaves are shared;
    see :func:`~hessianflow.batches.split_samples`); :math:`\\ell_i` is the loss of that one-sample
    batch (the same criterion, ``loss_fn`` or ``.loss``) and :math:`w_i` its weight (1, or
    ``batch_weight`` of the sample, e.g. its counted tokens, so that :math:`s_i` is the sample's share
    of the summed loss). With the default weights this is the usual
    :math:`\\frac1N \\sum_i g_i g_i^\\top`. ``batch_weight`` must then add up over a batch's samples.
    Samples of weight 0 (all padding) are left out.

    The per-sample gradients of a batch (``[n, size]``, kept for reuse on one batch) are computed with
    ``torch.func.vmap`` over ``torch.func.grad`` (``per_sample="vmap"``) or one backward pass per
    sample (``"loop"``); ``"auto"`` tries the first and falls back to the second for a model or loss
    that vmap cannot trace (e.g. data-dependent control flow).

    Example (squared error of a linear model: :math:`g_i = 2 (w^\\top x_i - y_i)\\, x_i`):
        >>> import torch
        >>> from torch import nn
        >>> X = torch.tensor([[1.0, 0.0], [0.0, 2.0], [1.0, 1.0]], dtype=torch.float64)
        >>> y = torch.zeros(3, 1, dtype=torch.float64)
        >>> model = nn.Linear(2, 1, bias=False).double()
        >>> from hessianflow import EmpiricalFisherOperator
        >>> with torch.no_grad():
        ...     _ = model.weight.fill_(1.0)
        >>> F = EmpiricalFisherOperator(model, nn.MSELoss(), data=(X, y))
        >>> g = 2 * (X @ torch.ones(2, dtype=torch.float64))[:, None] * X  # [n, 2] per-sample gradients
        >>> torch.allclose(F.to_dense(), g.T @ g / 3)
        True
    """

    def __init__(self, model, criterion=None, data=None, dataloader=None, params=None, *,
                 per_sample: str = "auto", **kwargs):  # fmt: skip
        if per_sample not in ("auto", "vmap", "loop"):
            raise ValueError(f"per_sample must be 'auto', 'vmap' or 'loop', got {per_sample!r}")
        super().__init__(model, criterion, data=data, dataloader=dataloader, params=params, **kwargs)
        self.per_sample = per_sample

    @property
    def _kernel_backend(self) -> str:
        return "first_order"  # per-sample gradients: any attention kernel has a backward

    def _batch_graph(self, batch):
        samples = split_samples(batch)
        mean = self.reduction == "mean"
        weights = [self.spec.weight(s) for s in samples] if mean else [1.0] * len(samples)
        total = sum(weights)
        if mean and abs(total - self.spec.weight(batch)) > 1e-9 * max(1.0, abs(total)):
            raise ValueError(
                f"batch_weight must add up over a batch's samples for the empirical Fisher: the samples' "
                f"weights sum to {total}, the batch's is {self.spec.weight(batch)}"
            )
        keep = [i for i, w in enumerate(weights) if w != 0]
        G = None
        if self.per_sample != "loop":
            try:
                G = self._vmap_grads(batch, len(samples))
            except Exception:
                if self.per_sample == "vmap":
                    raise
        if G is None:
            G = torch.stack([self._sample_grad(samples[i]) for i in keep])  # [n_kept, size]
        else:
            G = G[keep]
        G = G * torch.tensor([weights[i] for i in keep], dtype=G.dtype, device=G.device)[:, None]
        if not torch.isfinite(G).all():
            raise NonFiniteError("a per-sample gradient is not finite; cannot compute the empirical Fisher")
        return G, (1.0 / total if mean else 1.0)

    def _sample_grad(self, sample) -> torch.Tensor:
        g = torch.autograd.grad(self._loss(sample), self.params, allow_unused=True)
        return flatten([t.detach() if t is not None else None for t in g], like=self.params)

    def _vmap_grads(self, batch, n: int) -> torch.Tensor:
        """``[n, size]`` per-sample gradients of the raw loss by ``vmap(grad(...))``."""
        from torch.utils._pytree import tree_flatten, tree_unflatten

        leaves, treedef = tree_flatten(batch)
        idx = [i for i, t in enumerate(leaves) if isinstance(t, torch.Tensor) and t.dim() > 0 and t.shape[0] == n]
        if not idx:
            raise ValueError("no batched tensor for vmap")
        wrapper = LossModule(self.model, self.spec)
        names = ["model." + name for name in self.param_names]

        def loss(ps, *sliced):
            current = list(leaves)
            for i, t in zip(idx, sliced):
                current[i] = t.unsqueeze(0)
            return torch.func.functional_call(wrapper, dict(zip(names, ps)), (tree_unflatten(current, treedef),))

        detached = tuple(p.detach() for p in self.params)
        per_sample = torch.func.vmap(torch.func.grad(loss), in_dims=(None, *[0] * len(idx)))
        grads = per_sample(detached, *[leaves[i] for i in idx])
        return torch.cat([g.reshape(n, -1) for g in grads], dim=1)

    def _batch_product(self, graph, pieces, batched, retain):
        G, scale = graph
        if batched:
            k = pieces[0].shape[0]
            V = flatten_batched(pieces, k)  # [size, k]
            return unflatten((G.T @ (G @ V)) * scale, self.params)
        v = flatten(pieces)
        return unflatten((G.T @ (G @ v)) * scale, self.params)


def exact_hessian(model, criterion=None, data=None, dataloader=None, params=None, **kwargs) -> torch.Tensor:
    """The dense Hessian ``[n, n]`` (``n`` products, batched: for small models and for testing).

    Takes the same arguments as :class:`HessianOperator`. The result is symmetrised
    (:math:`(H + H^\\top)/2`, which only removes rounding).

    Example (logistic regression at :math:`w = 0`: :math:`H = X^\\top \\operatorname{diag}(p(1-p)) X / n`
    with :math:`p = 1/2`):
        >>> import torch
        >>> from torch import nn
        >>> from hessianflow import exact_hessian
        >>> X = torch.tensor([[1.0, 0.0], [0.0, 2.0], [1.0, 1.0]], dtype=torch.float64)
        >>> y = torch.tensor([[1.0], [0.0], [1.0]], dtype=torch.float64)
        >>> model = nn.Linear(2, 1, bias=False).double()
        >>> with torch.no_grad():
        ...     _ = model.weight.zero_()
        >>> exact_hessian(model, nn.BCEWithLogitsLoss(), data=(X, y))
        tensor([[0.1667, 0.0833],
                [0.0833, 0.4167]], dtype=torch.float64)
    """
    H = HessianOperator(model, criterion, data=data, dataloader=dataloader, params=params, **kwargs)
    n = H.size
    if n > 20000:
        raise ValueError(f"exact_hessian would build a {n} x {n} matrix; use HessianOperator and the solvers")
    dense = H.to_dense()
    return (dense + dense.T) / 2
