"""Curvature operators of a model's loss: the Hessian and the generalised Gauss-Newton matrix.

Both are :class:`~hessianflow.linop.LinearOperator` s on the flat vector of the chosen parameters, over
one batch (``data=(inputs, targets)``) or a whole data set (``dataloader=...``). Every algorithm in the
package accepts them.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable

import torch
from torch import nn

from .hvp import (
    conv2d_forward,
    double_backprop_hmm,
    double_backprop_hvp,
    flatten,
    flatten_batched,
    forward_over_reverse_hvp,
    unflatten,
)
from .linop import LinearOperator, NonFiniteError

__all__ = ["CurvatureOperator", "HessianOperator", "GGNOperator", "exact_hessian", "resolve_params", "unwrap_model"]


class _NoBatchingRule(Exception):
    """Some rank could not do a batched product: every rank falls back to single products."""


def _batch_norms(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def _affine_forward(m: nn.Module):
    """Eval-mode BatchNorm as the affine map it computes (same function of the same parameters).

    :math:`x \\mapsto x\\,s + (\\beta - \\mu s)` with :math:`s = \\gamma / \\sqrt{\\sigma^2 + \\epsilon}`
    from the running statistics. Its double backward is a few elementwise products instead of the
    generic batch-norm double backward: the reused-graph product of a ResNet-20 was 6-7% faster on
    this project's CPU machine (benchmarks/README.md), with products equal to rounding.
    """

    def forward(inp):
        scale = torch.rsqrt(m.running_var + m.eps)
        if m.weight is not None:
            scale = m.weight * scale
        shift = -m.running_mean * scale
        if m.bias is not None:
            shift = m.bias + shift
        shape = (1, -1) + (1,) * (inp.dim() - 2)
        return inp * scale.view(shape) + shift.view(shape)

    return forward


def unwrap_model(model: nn.Module) -> nn.Module:
    """The module inside ``DataParallel`` / ``DistributedDataParallel`` (curvature products go around
    the wrapper, so DDP's gradient hooks never fire and its reducer is left ready for training)."""
    while isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
        model = model.module
    return model


def resolve_params(model: nn.Module, params=None) -> tuple[list[nn.Parameter], list[str]]:
    """The parameters an operator acts on, and their names, in a stable order without duplicates.

    Args:
        model: the model.
        params: ``None`` (every parameter with ``requires_grad``), or an iterable mixing parameters,
            parameter or module names (``"fc.weight"``, ``"layer1"``) and submodules.
    """
    named = list(model.named_parameters())
    name_of = {id(p): n for n, p in named}
    modules = dict(model.named_modules())
    if params is None:
        chosen = [p for _, p in named if p.requires_grad]
        if not chosen:
            raise ValueError("the model has no parameter with requires_grad=True; pass params= explicitly")
    else:
        if isinstance(params, (str, nn.Module, torch.Tensor)):
            params = [params]
        chosen = []
        for item in params:
            if isinstance(item, str):
                if item in dict(named):
                    chosen.append(dict(named)[item])
                elif item in modules:
                    found = list(modules[item].parameters())
                    if not found:
                        raise ValueError(f"module {item!r} has no parameters")
                    chosen.extend(found)
                else:
                    raise ValueError(
                        f"{item!r} is neither a parameter nor a module of the model; "
                        f"parameters are e.g. {[n for n, _ in named[:5]]}"
                    )
            elif isinstance(item, nn.Module):
                found = list(item.parameters())
                if not found or any(id(p) not in name_of for p in found):
                    raise ValueError(f"module {type(item).__name__} is not a part of the model (or has no parameters)")
                chosen.extend(found)
            elif isinstance(item, torch.Tensor):
                if id(item) not in name_of:
                    raise ValueError("a tensor in params= is not a parameter of the model")
                chosen.append(item)
            else:
                raise ValueError(f"params= takes parameters, names or modules, got {type(item).__name__}")
        if not chosen:
            raise ValueError("params= selects no parameter")
    seen, unique = set(), []
    for p in chosen:
        if id(p) not in seen:
            seen.add(id(p))
            unique.append(p)
    return unique, [name_of[id(p)] for p in unique]


def _split_batch(batch):
    if isinstance(batch, dict):
        keys = [k for k in ("inputs", "input", "x", "image", "images") if k in batch]
        tkeys = [k for k in ("targets", "target", "y", "label", "labels") if k in batch]
        if keys and tkeys:
            return batch[keys[0]], batch[tkeys[0]]
    if isinstance(batch, (list, tuple)) and len(batch) >= 2:
        return batch[0], batch[1]
    raise ValueError("a batch must be (inputs, targets) (further elements are ignored)")


class CurvatureOperator(LinearOperator):
    """Common machinery of :class:`HessianOperator` and :class:`GGNOperator`.

    Args:
        model: the network (a ``DataParallel``/``DDP`` wrapper is looked through).
        criterion: the loss, ``criterion(outputs, targets)``; its ``reduction`` (``"mean"``, the default,
            or ``"sum"``) says how per-batch curvatures combine over a data loader.
        data: one batch ``(inputs, targets)``.
        dataloader: an iterable of batches; the operator is the curvature of the loss over all of its
            samples: batch products are weighted by batch size, a smaller last batch included.
        params: the parameters to differentiate w.r.t. (see :func:`resolve_params`); others are fixed.
        train_mode: run the model in train mode (BatchNorm batch statistics, dropout on). Default
            ``False``: eval mode, the deterministic function whose curvature one usually means. The
            model's modes and ``requires_grad`` flags are restored after every product.
        num_batches: use only the first ``num_batches`` batches of the loader.
        reuse_graph: one batch only: build the first-order graph once and reuse it for every product
            (as PyHessian does), so a product costs one backward pass instead of forward + 2 backward.
            Holds the graph's memory until :meth:`release` or the operator is deleted.
        backend: ``"double_backprop"`` (default) or ``"forward_over_reverse"`` (``torch.func``).
        progress: show a tqdm bar over the batches of a loader.
        allow_tf32: let CUDA convolutions and matrix products of float32 models run in TF32 (10-bit
            mantissa) during products. Default ``False``: products in true float32, whatever the global
            ``torch.backends`` settings (PyTorch enables TF32 for cuDNN convolutions by default). Measured
            on an H200 (benchmarks/gpu_check.py): with TF32 the top eigenvalues of a C1 network differed
            from the CPU's by 1e-3 relative, ten times the accuracy asked of them. No effect on the CPU.
        batched_matmat: compute :meth:`matmat` as one batched backward pass (``is_grads_batched``)
            instead of a loop of products; ``None``: on CUDA devices only (on the CPU the loop was
            measured faster for convolutional networks). Either way a graph whose operations have no
            batching rule falls back to the loop.
        distributed: sum the per-rank products over ``torch.distributed`` (each rank holding its shard
            of the data). ``None``: on when a process group is initialised with more than one rank and
            a loader is given (a one-batch list ``[(x, y)]`` included: a rank's shard of one batch).
            Every rank must then make the same calls with the same vectors (the algorithms do, given
            the same seed); the result equals the one-process product over the union of the shards,
            is the same on every rank, and a failure on one rank raises on all of them. Shards may
            differ in size, or be empty. ``num_batches`` counts per rank, and ``train_mode=True`` uses
            each rank's own batch statistics.
    """

    _backends = ("double_backprop",)

    def __init__(
        self,
        model: nn.Module,
        criterion,
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
    ):
        if (data is None) == (dataloader is None):
            raise ValueError("pass exactly one of data=(inputs, targets) or dataloader=")
        if backend not in self._backends:
            raise ValueError(f"backend must be one of {self._backends}, got {backend!r}")
        if num_batches is not None and int(num_batches) < 1:
            raise ValueError(f"num_batches must be a positive integer, got {num_batches}")
        if not callable(criterion):
            raise ValueError("criterion must be callable as criterion(outputs, targets)")
        self.model = unwrap_model(model)
        self.criterion = criterion
        self.params, self.param_names = resolve_params(self.model, params)
        dtypes = {p.dtype for p in self.params}
        devices = {p.device for p in self.params}
        if len(dtypes) > 1 or len(devices) > 1:
            raise ValueError(f"the chosen parameters mix dtypes {dtypes} or devices {devices}")
        self.reduction = getattr(criterion, "reduction", "mean")
        if self.reduction not in ("mean", "sum"):
            raise ValueError(f"the criterion's reduction must be 'mean' or 'sum', got {self.reduction!r}")
        super().__init__(sum(p.numel() for p in self.params), self.params[0].dtype, self.params[0].device)
        if dataloader is not None and isinstance(dataloader, (list, tuple)) and len(dataloader) == 1:
            # a one-batch "loader" (e.g. a rank's shard of a batch): reuse its graph like data=
            data, dataloader = dataloader[0], None
            single_from_loader = True
        else:
            single_from_loader = False
        self.data = None if data is None else self._to_device(_split_batch(data))
        self.dataloader = dataloader
        self.train_mode = bool(train_mode)
        self.num_batches = None if num_batches is None else int(num_batches)
        self.reuse_graph = bool(reuse_graph) and data is not None
        self.backend = backend
        self.progress = progress
        if distributed is None:
            distributed = (
                (dataloader is not None or single_from_loader)
                and torch.distributed.is_available()
                and torch.distributed.is_initialized()
                and torch.distributed.get_world_size() > 1
            )
        elif distributed and not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            raise ValueError("distributed=True needs an initialised torch.distributed process group (torchrun)")
        self.distributed = bool(distributed)
        self._graph = None
        # matmat as one vmapped backward (is_grads_batched) or a loop of products. Measured on this
        # project's 2-core CPU machine (benchmarks/): per vector, the batched product of a ResNet-20 took
        # 0.80 s against 0.52 s in a loop, and an MLP was at parity; so the default batches on GPUs only.
        self._batched_ok = (self.device.type == "cuda") if batched_matmat is None else bool(batched_matmat)
        self.allow_tf32 = bool(allow_tf32)
        self._nhwc = True  # see _forward
        self.num_samples = None if data is None else int(self.data[0].shape[0])

    # -- model state ---------------------------------------------------------------------------
    @contextlib.contextmanager
    def _prepared(self):
        """Set the mode and ``requires_grad`` for a product, and put both back afterwards."""
        modes = [(m, m.training) for m in self.model.modules()]
        flags = [p.requires_grad for p in self.params]
        # A train-mode BatchNorm normalises by the batch statistics either way; with track_running_stats
        # off it also leaves its running statistics alone (and a reused graph holds no reference to
        # them, which restoring them afterwards would invalidate).
        norms = [m for m in _batch_norms(self.model) if m.track_running_stats] if self.train_mode else []
        # Convolutions with an explicit double backward (hvp._ConvGrad: the same products, cheaper on the
        # CPU, where it was measured; CUDA keeps PyTorch's own until it has been timed there).
        convs = []
        if self.backend == "double_backprop" and self.device.type == "cpu":
            for m in self.model.modules():
                if isinstance(m, nn.Conv2d) and "forward" not in m.__dict__:
                    fwd = conv2d_forward(m)
                    if fwd is not None:
                        convs.append((m, fwd))
        # In eval mode a BatchNorm with running statistics is an affine map: run it as one (cheaper
        # double backward). Not under torch.func (forward-over-reverse), which traces the module's own
        # forward, and not for a module that already has an instance-level forward of its own.
        folded = []
        if not self.train_mode and self.backend == "double_backprop":
            folded = [
                m
                for m in _batch_norms(self.model)
                if m.running_mean is not None and m.running_var is not None and "forward" not in m.__dict__
            ]
        tf32 = None
        if self.device.type == "cuda" and not self.allow_tf32:
            tf32 = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
        try:
            if tf32 is not None:
                torch.backends.cuda.matmul.allow_tf32 = False
                torch.backends.cudnn.allow_tf32 = False
            self.model.train(self.train_mode)
            for m in norms:
                m.track_running_stats = False
            for m in folded:
                m.forward = _affine_forward(m)
            for m, fwd in convs:
                m.forward = fwd
            for p in self.params:
                p.requires_grad_(True)
            yield
        finally:
            for m, mode in modes:
                m.training = mode
            for m in norms:
                m.track_running_stats = True
            for m in folded:
                m.__dict__.pop("forward", None)
            for m, _ in convs:
                m.__dict__.pop("forward", None)
            for p, f in zip(self.params, flags):
                p.requires_grad_(f)
            if tf32 is not None:
                torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32

    def _to_device(self, batch):
        inputs, targets = batch
        if not isinstance(inputs, torch.Tensor) or not isinstance(targets, torch.Tensor):
            raise ValueError("inputs and targets must be tensors")
        kw = {"device": self.device, "non_blocking": True}
        # A float64 model is fed float64 inputs: the curvature is computed in the parameters' precision.
        inputs = inputs.to(dtype=self.dtype, **kw) if inputs.is_floating_point() else inputs.to(**kw)
        targets = targets.to(dtype=self.dtype, **kw) if targets.is_floating_point() else targets.to(**kw)
        return inputs, targets

    def _forward(self, inputs):
        """The model's outputs; image batches on the CPU go in channels-last (NHWC) memory order.

        oneDNN's CPU convolutions work in NHWC: fed NCHW, they reorder every activation and gradient.
        Measured on this project's CPU machine (ResNet-20, batch 64, 1 thread): the reused-graph product
        took 0.435 s instead of 0.479 s. The values are the same tensors up to rounding. A model that
        cannot take it (e.g. ``x.view(n, -1)`` on a non-contiguous activation raises) is run in NCHW
        from then on.
        """
        if self._nhwc and inputs.dim() == 4 and inputs.is_floating_point() and inputs.device.type == "cpu":
            try:
                return self.model(inputs.contiguous(memory_format=torch.channels_last))
            except RuntimeError:
                self._nhwc = False
        return self.model(inputs)

    def _loss(self, inputs, targets, outputs=None):
        """The checked scalar loss of a batch (``outputs``: the model's, when the caller needs them)."""
        loss = self.criterion(self._forward(inputs) if outputs is None else outputs, targets)
        if loss.dim() != 0:
            raise ValueError(f"the criterion must return a scalar, got shape {tuple(loss.shape)}")
        if not torch.isfinite(loss):
            raise NonFiniteError(f"the loss is not finite ({loss.item()}); cannot compute curvature")
        return loss

    # -- the per-batch product, implemented by subclasses ----------------------------------------
    def _batch_graph(self, inputs, targets):  # pragma: no cover - abstract
        raise NotImplementedError

    def _batch_product(self, graph, vecs, batched: bool, retain: bool):  # pragma: no cover - abstract
        raise NotImplementedError

    # -- assembling products -------------------------------------------------------------------
    def release(self):
        """Free the reused first-order graph (it is rebuilt on the next product)."""
        self._graph = None

    def _batches(self):
        """The batches of one pass, each with a flag: is it the single, reusable batch?"""
        if self.data is not None:
            yield self.data, True
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
            yield self._to_device(_split_batch(batch)), False

    def _local_products(self, pieces, batched: bool):
        """This process's size-weighted sum of batch products and its sample count.

        Returns ``(acc, count, single)``: ``single`` is the product of the one reusable batch, returned
        unweighted (``acc`` is then ``None``) when no reduction over batches or ranks follows.
        """
        acc, count = None, 0
        for (inputs, targets), reusable in self._batches():
            n_b = int(inputs.shape[0])
            if n_b == 0:  # e.g. an empty shard on one rank: it still joins the all-reduce
                continue
            with self._prepared():
                graph = None
                if reusable and self.reuse_graph:
                    if self._graph is None:
                        self._graph = self._batch_graph(inputs, targets)
                    graph = self._graph
                if pieces is None:  # the gradient (see gradient())
                    prod = self._batch_gradient(graph, inputs, targets)
                elif graph is not None:
                    prod = self._batch_product(graph, pieces, batched, retain=True)
                else:
                    prod = self._batch_product(self._batch_graph(inputs, targets), pieces, batched, retain=False)
            if reusable and not self.distributed:
                return None, n_b, prod  # one batch: no weighting (and no rounding from it)
            # mean-reduced losses: the whole-data Hessian is the size-weighted mean of batch Hessians
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

    def _batch_gradient(self, graph, inputs, targets):
        """The loss gradient of one batch; ``graph`` is the batch's reused first-order graph or ``None``."""
        loss = self._loss(inputs, targets)
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
        """The products summed over the ranks: two all-reduces, a status and the payload.

        The status (sample count, failed ranks, ranks without a batching rule; int64, so the count is
        exact) comes first, so that a rank whose local products failed makes *every* rank raise
        (instead of the others waiting in the payload's all-reduce until the timeout), and a batched
        product that one rank cannot do makes every rank fall back to single products together.
        """
        import torch.distributed as dist

        acc, count, error, no_batching = None, 0, None, False
        try:
            acc, count, _ = self._local_products(pieces, batched)
        except RuntimeError as exc:
            if batched and self._batched_ok:
                no_batching, error = True, exc  # e.g. no vmap rule for an op's backward: loop instead
            else:
                error = exc
        except Exception as exc:  # noqa: BLE001 - re-raised below, after telling the other ranks
            error = exc
        failed = error is not None and not no_batching
        status = torch.tensor(
            [count, int(failed and isinstance(error, NonFiniteError)), int(failed), int(no_batching)],
            dtype=torch.int64,
            device=self.device if dist.get_backend() == "nccl" else "cpu",
        )
        dist.all_reduce(status)
        total, nonfinite, failures, fallbacks = (int(x) for x in status.tolist())
        if failures:
            if failed:
                raise error
            kind = NonFiniteError if nonfinite == failures else RuntimeError
            raise kind(
                f"{failures} other rank(s) failed to compute their curvature products "
                "(their errors are in their own output); stopping on this rank too"
            )
        if fallbacks:
            raise _NoBatchingRule(str(error) if error is not None else "another rank has no batching rule")
        if acc is None:  # no samples on this rank: it contributes zeros
            acc = [torch.zeros_like(t).detach() for t in (pieces if pieces is not None else self.params)]
        flat = torch.cat([a.reshape(-1) for a in acc])
        dist.all_reduce(flat)
        offset = 0
        for a in acc:
            a.copy_(flat[offset : offset + a.numel()].view_as(a))
            offset += a.numel()
        return acc, total

    def _matvec(self, v):
        return flatten(self._products(unflatten(v, self.params), batched=False), like=self.params)

    def _matmat(self, V):
        k = V.shape[1]
        if self._batched_ok:
            # Distributed, only the all-reduced verdict counts: a communication error (a RuntimeError
            # too) must propagate, not send this rank alone into a loop of collectives.
            fallback = (_NoBatchingRule,) if self.distributed else (RuntimeError,)
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

    .. math:: L(\\theta) = \\frac{1}{N} \\sum_{i=1}^N \\ell(f_\\theta(x_i), y_i)

    over one batch or all samples of a loader (``reduction="sum"`` criteria: the sum). Products use
    double backprop (Pearlmutter 1994) by default, reusing the first-order graph on one batch, or
    forward-over-reverse through ``torch.func`` (``backend="forward_over_reverse"``).

    Example::

        H = HessianOperator(model, nn.CrossEntropyLoss(), data=(x, y))
        Hv = H @ v   # v: flat tensor of H.size
    """

    _backends = ("double_backprop", "forward_over_reverse")

    def __init__(self, model, criterion, data=None, dataloader=None, params=None, **kwargs):
        super().__init__(model, criterion, data=data, dataloader=dataloader, params=params, **kwargs)
        if self.backend == "forward_over_reverse":
            self.reuse_graph = False

    def _batch_graph(self, inputs, targets):
        if self.backend == "forward_over_reverse":
            return (inputs, targets)
        loss = self._loss(inputs, targets)
        grads = torch.autograd.grad(loss, self.params, create_graph=True, allow_unused=True)
        return grads

    def _batch_gradient(self, graph, inputs, targets):
        if graph is None or self.backend == "forward_over_reverse":
            return super()._batch_gradient(graph, inputs, targets)
        # the reused first-order graph is the gradient itself
        return [t.detach() if t is not None else torch.zeros_like(p) for t, p in zip(graph, self.params)]

    def _batch_product(self, graph, pieces, batched, retain):
        if self.backend == "forward_over_reverse":
            return self._fwd_over_rev(graph, pieces, batched)
        if batched:
            return double_backprop_hmm(graph, self.params, pieces, retain_graph=retain)
        return double_backprop_hvp(graph, self.params, pieces, retain_graph=retain)

    def _fwd_over_rev(self, batch, pieces, batched):
        inputs, targets = batch
        model, names = self.model, self.param_names
        buffers = dict(model.named_buffers())

        def loss_fn(ps):
            out = torch.func.functional_call(model, ({**dict(zip(names, ps)), **buffers}), (inputs,))
            return self.criterion(out, targets)

        # (in train mode, _prepared has switched BatchNorm's running statistics off: nothing is mutated)
        if not batched:
            return forward_over_reverse_hvp(loss_fn, self.params, pieces)
        hmm = torch.func.vmap(lambda *t: tuple(forward_over_reverse_hvp(loss_fn, self.params, t)))
        return list(hmm(*pieces))


class GGNOperator(CurvatureOperator):
    """The generalised Gauss-Newton matrix :math:`G = J^\\top H_{\\mathrm{out}} J` (Schraudolph 2002).

    :math:`J` is the Jacobian of the network outputs w.r.t. the parameters and :math:`H_{\\mathrm{out}}`
    the Hessian of the loss w.r.t. the outputs; :math:`G` is positive semi-definite for convex losses
    (cross-entropy, squared error) and equals the Hessian minus the term with the second derivatives
    of the network. Same interface as :class:`HessianOperator`.
    """

    def _batch_graph(self, inputs, targets):
        out = self._forward(inputs)
        loss = self._loss(inputs, targets, outputs=out)
        (g_out,) = torch.autograd.grad(loss, out, create_graph=True)
        # J^T u is linear in the dummy u; differentiating it w.r.t. u gives J v (the double-vjp trick).
        u = torch.zeros_like(out, requires_grad=True)
        jtu = torch.autograd.grad(out, self.params, grad_outputs=u, create_graph=True, allow_unused=True)
        return out, g_out, u, jtu

    def _batch_product(self, graph, pieces, batched, retain):
        out, g_out, u, jtu = graph
        live = [i for i, t in enumerate(jtu) if t is not None and t.requires_grad]
        kw = {"retain_graph": True, "is_grads_batched": batched}
        shape = (pieces[0].shape[0], *out.shape) if batched else out.shape
        if not live:
            return [torch.zeros_like(t) for t in pieces]
        (jv,) = torch.autograd.grad([jtu[i] for i in live], u, grad_outputs=[pieces[i] for i in live], **kw)
        if g_out.requires_grad:
            (hjv,) = torch.autograd.grad(g_out, out, grad_outputs=jv, allow_unused=True, **kw)
            hjv = torch.zeros(shape, dtype=out.dtype, device=out.device) if hjv is None else hjv
        else:  # a loss linear in the outputs has no output curvature
            hjv = torch.zeros(shape, dtype=out.dtype, device=out.device)
        res = torch.autograd.grad(
            out, self.params, grad_outputs=hjv, allow_unused=True, **{**kw, "retain_graph": retain}
        )
        return [r.detach() if r is not None else torch.zeros_like(t) for r, t in zip(res, pieces)]


def exact_hessian(model, criterion, data=None, dataloader=None, params=None, **kwargs) -> torch.Tensor:
    """The dense Hessian ``[n, n]`` (``n`` products, batched: for small models and for testing).

    Takes the same arguments as :class:`HessianOperator`. The result is symmetrised
    (:math:`(H + H^\\top)/2`, which only removes rounding).
    """
    H = HessianOperator(model, criterion, data=data, dataloader=dataloader, params=params, **kwargs)
    n = H.size
    if n > 20000:
        raise ValueError(f"exact_hessian would build a {n} x {n} matrix; use HessianOperator and the solvers")
    dense = H.to_dense()
    return (dense + dense.T) / 2
