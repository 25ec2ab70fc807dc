"""Curvature operators of a model's loss: the Hessian, the generalised Gauss-Newton matrix, the empirical Fisher.

Each is a :class:`~hessianflow.linalg.linop.LinearOperator` on the flat vector of the chosen parameters: an
:class:`~hessianflow.curvature.objective.Objective` (what the matrix is the curvature of, and how its data
splits) times a product (:mod:`~hessianflow.curvature.products`: how one piece's product is computed),
combined over the pieces by :mod:`~hessianflow.curvature.combine`. The classes here only wire those
together and set the model up for products (mode, TF32, speed paths, attention kernels).
"""

from __future__ import annotations

import contextlib
import time
import warnings
from collections.abc import Callable, Iterable

import torch

from ..distributed import FallbackOnAllRanks
from ..linalg.linop import LinearOperator
from .attention import product_kernels
from .combine import WeightedSum, combine_over_ranks
from .compiled import compile_product, fuse_cross_entropy
from .fast_paths import FastPaths
from .fisher import SampledFisher
from .hvp import flatten, flatten_batched, unflatten
from .objective import OBJECTIVE_OPTIONS, Objective, _shuffled
from .products import HESSIAN_BACKENDS, EmpiricalFisher, GaussNewton
from .sharded import aligned_pieces

__all__ = ["CurvatureOperator", "HessianOperator", "GGNOperator", "EmpiricalFisherOperator", "exact_hessian"]

# how products run, as opposed to what they are (the objective's options)
PRODUCT_OPTIONS = (
    "reuse_graph",
    "progress",
    "batched_matmat",
    "allow_tf32",
    "fast_paths",
    "compile",
    "fused_cross_entropy",
)


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


class CurvatureOperator(LinearOperator):
    """Common machinery of :class:`HessianOperator`, :class:`GGNOperator` and :class:`EmpiricalFisherOperator`.

    The matrix is the curvature of the objective's loss over all of its data (see
    :class:`~hessianflow.curvature.objective.Objective` for the loss forms and for how splits are
    weighted): one batch (``data=``) or a loader (``dataloader=``), optionally in micro-batches and over
    ``torch.distributed`` ranks, each piece weighted by the units its loss averages over.

    Args:
        model, criterion, data, dataloader, params, loss_fn, reduction, batch_weight: the objective
            (:class:`~hessianflow.curvature.objective.Objective`); or ``objective=`` one built already.
        objective: an :class:`~hessianflow.curvature.objective.Objective` (instead of its keywords).
        **options: the objective's further keywords (``train_mode``, ``num_batches``,
            ``micro_batch_size``, ``distributed``, ``forward_fn``, ``loss_of_output``) and how products run:

            - ``reuse_graph`` (``True``): one batch only: keep the first-order state (graph, per-sample
              gradients) across products, so a product costs one backward pass; held until
              :meth:`release`.
            - ``progress`` (``False``): a tqdm bar over the batches of a loader.
            - ``batched_matmat`` (``None``: CUDA only, where it was measured faster; on the CPU a loop
              was faster for ResNet-20 and batched for a small MLP, benchmarks/README.md "Issue 24"):
              :meth:`matmat` as one batched backward (``is_grads_batched``; ``vmap`` for
              forward-over-reverse and ``compile=True``); an operation without a batching rule falls back
              to a loop. ``"measure"``: the first two ``matmat`` calls of two or more columns run one
              way each, timed per vector (after the first-order graph is built), and the faster way is kept:
              :attr:`matmat_timing` holds the seconds and the ``"choice"``. While batched
              (:attr:`prefers_matmat`), the block Lanczos computes its pending vectors' products together.
            - ``allow_tf32`` (``False``): let CUDA float32 products run in TF32 (10-bit mantissa); by
              default products are true float32 whatever the global ``torch.backends`` settings.
            - ``fast_paths`` (``True``): the speed paths of :mod:`hessianflow.curvature.fast_paths`, the same
              products to rounding; ``False`` runs the model exactly as written.
            - ``compile`` (``False``: measured slower on the CPU, benchmarks/README.md "Issue 24"): the
              product as one ``torch.compile`` function (:mod:`hessianflow.curvature.compiled`), each new
              graph checked against the eager product; a failure falls back to eager with a warning,
              and :attr:`compile_status` says which.
            - ``fused_cross_entropy`` (``False``): a softmax cross-entropy's curvature by the chunked kernel
              of :mod:`hessianflow.curvature.fused_ce` (``"compiled"``: each chunk through ``torch.compile``),
              never a logits-sized softmax kept or a log-softmax double backward: the GGN's output
              Hessian, and the Hessian's loss part (``double_backprop``/``finite_difference``).

    Attributes:
        objective: the :class:`~hessianflow.curvature.objective.Objective`.
        product: the :mod:`~hessianflow.curvature.products` object computing one piece's product.
        num_samples: the total units of the data of the last product (samples, counted targets or
            tokens, what ``batch_weight`` counts; summed over the ranks).
        deterministic: whether two products of one vector give the same result (see
            :meth:`Objective.randomness`); no eigensolver reports convergence when it is ``False``.
    """

    def _setup(self, objective: Objective, product, options: dict) -> None:
        """The parts every operator shares: the objective, its product, and how products run."""
        settings = {
            "reuse_graph": True,
            "progress": False,
            "batched_matmat": None,
            "allow_tf32": False,
            "fast_paths": True,
            "compile": False,
            "fused_cross_entropy": False,
            **options,
        }
        self._fused_ce = fuse_cross_entropy(product, settings["fused_cross_entropy"], settings["compile"])
        if settings["compile"]:
            product = compile_product(product)
        self.objective, self.product = objective, product
        super().__init__(objective.size, objective.dtype, objective.device)
        # a split batch holds one chunk's state at a time: nothing to reuse across products
        single = objective.data is not None and len(objective.chunks(objective.data)) == 1
        self.reuse_graph = bool(settings["reuse_graph"]) and product.reusable and single
        self.progress = bool(settings["progress"])
        self.allow_tf32 = bool(settings["allow_tf32"])
        self._fast = FastPaths(settings["fast_paths"])
        product.run = self._forward
        # matmat as one vmapped backward (is_grads_batched) or a loop of products: batched on GPUs only,
        # where it was measured faster (see benchmarks/README.md).
        batched = settings["batched_matmat"]
        if batched not in (None, True, False, "measure"):
            raise ValueError(f"batched_matmat must be None, True, False or 'measure', got {batched!r}")
        if batched == "measure" and objective.distributed:
            raise ValueError("batched_matmat='measure' times one process; over ranks pass True or False")
        self._batched_ok = (self.device.type == "cuda") if batched is None else bool(batched)
        #: ``batched_matmat="measure"``: seconds per vector of each way, and the ``"choice"`` (else ``None``)
        self.matmat_timing = {} if batched == "measure" else None
        self._state = None
        self._state_fast = None  # whether the reused state was built through the speed paths
        why, self.deterministic = objective.randomness(self.reuse_graph)
        if why is not None:
            warnings.warn(
                f"{type(self).__name__}: {why}"
                + ("" if self.deterministic else "; not a fixed matrix, so no eigensolver will report convergence"),
                RuntimeWarning,
                stacklevel=3,
            )
        self.num_samples = None if objective.data is None else objective.units(objective.data)
        if objective.sharding is not None:
            if not product.sharded:
                raise ValueError(
                    f"{type(self).__name__}: {type(product).__name__.lstrip('_')} products of an FSDP2-sharded model "
                    "are not supported; the Hessian (backend='double_backprop' or 'finite_difference'), the GGN and "
                    "the empirical Fisher are, without compile= or mc_samples="
                )
            work = torch.float32 if self.dtype in (torch.float16, torch.bfloat16) else self.dtype
            #: this rank's slices of the operator's vectors (see hessianflow.linalg.sharded_vectors)
            self.vector_space = objective.sharding.vector_space(work, self.device)
            self._batched_ok = False  # one product at a time: the collectives inside pair up per vector
            # every rank must run the same passes: the first-order graph is reused only if it is on all of them
            self.reuse_graph = objective.sharding.total(int(self.reuse_graph)) == objective.sharding.world_size

    def _objective(self, model, criterion, objective, keywords: dict, options: dict) -> tuple[Objective, dict]:
        """``(objective, the products' options)``: ``objective`` as given, or the :class:`Objective` that
        the keywords and the objective's options build (one, not both); an unknown option is a
        ``TypeError`` naming the valid ones."""
        owner = type(self).__name__
        unknown = sorted(set(options) - set(OBJECTIVE_OPTIONS) - set(PRODUCT_OPTIONS))
        if unknown:
            raise TypeError(
                f"{owner} got unexpected keyword argument(s) {unknown}; besides the objective's keywords "
                f"{list(OBJECTIVE_OPTIONS)} it takes {list(PRODUCT_OPTIONS)}"
            )
        of_objective = {k: v for k, v in options.items() if k in OBJECTIVE_OPTIONS}
        of_products = {k: v for k, v in options.items() if k in PRODUCT_OPTIONS}
        if objective is None:
            return Objective(model, criterion, **keywords, **of_objective), of_products
        given = [
            k for k, v in {"model": model, "criterion": criterion, **keywords, **of_objective}.items() if v is not None
        ]
        if given or not isinstance(objective, Objective):
            raise ValueError(
                f"{owner}: pass objective= (an Objective) or the keywords that build one {given}, not both"
            )
        return objective, of_products

    # -- the objective's parts, by their usual names --------------------------------------------
    model = property(lambda self: self.objective.model)
    params = property(lambda self: self.objective.params)
    param_names = property(lambda self: self.objective.param_names)
    spec = property(lambda self: self.objective.spec)
    criterion = property(lambda self: self.objective.criterion)
    data = property(lambda self: self.objective.data)
    dataloader = property(lambda self: self.objective.dataloader)
    train_mode = property(lambda self: self.objective.train_mode)
    num_batches = property(lambda self: self.objective.num_batches)
    micro_batch_size = property(lambda self: self.objective.micro_batch_size)
    distributed = property(lambda self: self.objective.distributed)
    reduction = property(lambda self: self.objective.reduction)

    @property
    def prefers_matmat(self) -> bool:
        """Whether :meth:`matmat` runs as one batched pass (``batched_matmat``; while ``"measure"`` has not
        chosen yet too, so that the block Lanczos' products take part in the measurement)."""
        measuring = self.matmat_timing is not None and "choice" not in self.matmat_timing
        return bool(self._batched_ok or measuring)

    @property
    def compile_status(self):
        """The :class:`~hessianflow.curvature.compiled.CompileStatus` of a ``compile=True`` operator, else
        ``None``."""
        fused = (getattr(self._fused_ce, "args", None) or [None])[0] or getattr(self.product, "fused", None)
        return getattr(self.product, "status", None) or getattr(fused, "status", None)

    @property
    def fast_paths(self) -> bool:
        """The operator's own switch of the speed paths (see :mod:`hessianflow.curvature.fast_paths`)."""
        return self._fast.on

    @property
    def _nhwc(self) -> bool:
        """Whether image batches are still sent channels-last (see :meth:`FastPaths.run`)."""
        return self._fast.channels_last

    @contextlib.contextmanager
    def _prepared(self):
        """The objective's mode, TF32 off unless allowed, the speed paths (when on) and attention kernels
        with the derivatives products need (MHA's fast path off); all put back afterwards."""
        sharding = self.objective.sharding
        with (
            sharding.active() if sharding is not None else contextlib.nullcontext(),
            self.objective.mode(),
            _tf32_off(self.device, self.allow_tf32),
            self._fast.patched(
                self.model, device=self.device, double_backprop=self.product.second_order, train_mode=self.train_mode
            ),
            product_kernels(self.device, self.product.kernels, self.model),
            self._fused_ce(),
        ):
            yield

    def _forward(self, inputs):
        """The model's outputs (CPU image batches channels-last: :mod:`~hessianflow.curvature.fast_paths`)."""
        return self._fast.run(self.model, inputs)

    # -- assembling products -------------------------------------------------------------------
    def release(self):
        """Free the reused first-order state (it is rebuilt on the next product)."""
        self._state = None

    def _piece(self, batch, single: bool, pieces, batched: bool):
        """One piece's product (or gradient, ``pieces=None``), its state kept when it is the one batch."""
        product = self.product
        with self._prepared():
            state = None
            if single and self.reuse_graph:
                if self._state is None or self._state_fast != self._fast.active():
                    self._state = None  # built with the speed paths switched the other way
                    self._state_fast = self._fast.active()
                    self._state = product.prepare(batch)
                state = self._state
            if pieces is None:
                return product.gradient(state, batch)
            if state is not None:
                return product.apply(state, pieces, batched, retain=True)
            return product.apply(product.prepare(batch), pieces, batched, retain=False)

    def _local(self, pieces, batched: bool):
        """This process's :class:`WeightedSum` of piece products, or ``(None, units, product)`` for the one
        unsplit batch, returned unweighted (no rounding from a weight) when nothing is combined."""
        acc = WeightedSum(self.reduction)
        for batch, single in self.objective.pieces(self.progress):
            units = self.objective.units(batch)
            if units == 0:  # e.g. an empty shard on one rank, or all padding: it still joins the all-reduce
                continue
            prod = self._piece(batch, single, pieces, batched)
            if single and not self.distributed:
                return None, units, prod
            acc.add(prod, units)
        return acc, acc.units, None

    def _products(self, pieces, batched: bool):
        """Curvature times ``pieces`` (split like the parameters; with a leading ``k`` if batched)."""
        hold = self.objective.hold_constant
        if pieces is not None:
            pieces = hold(pieces, batched)

        def zeros():
            return [torch.zeros_like(t).detach() for t in (pieces if pieces is not None else self.params)]

        if self.objective.sharding is not None:
            out, units = self._sharded(pieces, batched)
        elif not self.distributed:
            acc, units, single = self._local(pieces, batched)
            out = single if single is not None else acc.result(zeros)
        else:
            out, units = combine_over_ranks(
                lambda: self._local(pieces, batched)[0],
                zeros,
                reduction=self.reduction,
                device=self.device,
                fallback=(RuntimeError,) if batched and self._batched_ok else (),
            )
        self.num_samples = units
        return hold(out, batched and pieces is not None)

    def _sharded(self, pieces, batched: bool):
        """A sharded model's products: every piece's loss weighted before it is differentiated (the ranks'
        pieces are summed inside the backward's reduce-scatters), then divided by the all-reduced units."""
        sharding, obj = self.objective.sharding, self.objective
        out, units = None, 0
        for batch, single, weight in aligned_pieces(obj, self.progress and sharding.rank == 0):
            units += weight
            sharding.scale = (float(weight) if self.reduction == "mean" else float(weight > 0)) if weight else 0.0
            prod = [t.detach() for t in self._piece(batch, single, pieces, batched)]
            out = prod if out is None else [a.add_(b) for a, b in zip(out, prod)]
        total = sharding.total(units)
        return WeightedSum(self.reduction).finish(out, total, lambda: []), total

    def gradient(self) -> torch.Tensor:
        """The flat gradient of the loss over the operator's data, ``[n]`` (not counted as a product).

        The same data, weighting, model mode, parameters and ranks as the products. On one batch with the
        graph reused it is read off the first-order graph that the products need anyway (free after the
        first product, and it builds that graph otherwise); over a loader it costs one forward and
        backward pass. Its main use is as a start vector for the eigensolvers (``v0="gradient"``):
        gradients lie largely in the span of the top Hessian eigenvectors (Gur-Ari, Roberts & Dyer 2018).
        """
        return flatten(self._products(None, batched=False), like=self.params)

    def _matvec(self, v):
        return flatten(self._products(unflatten(v, self.params), batched=False), like=self.params)

    def _matmat(self, V):
        t = self.matmat_timing
        if t is None or "choice" in t or V.shape[1] < 2:
            return self._matmat_now(V)
        if self.reuse_graph and self._state is None:  # not timed: it builds the first-order graph too
            self._products(None, batched=False)
        way = "batched" if "batched" not in t else "loop"
        self._batched_ok = way == "batched"
        status = self.compile_status
        graphs = status.graphs if status is not None else 0
        start = time.perf_counter()
        out = self._matmat_now(V)
        if status is not None and status.graphs != graphs:  # it compiled a graph: time the next call instead
            return out
        if way == "batched" and not self._batched_ok:  # no batching rule: it fell back to the loop
            t["choice"] = "loop"
        else:
            t[way] = (time.perf_counter() - start) / V.shape[1]
            if way == "loop":
                t["choice"] = "batched" if t["batched"] < t["loop"] else "loop"
        self._batched_ok = t.get("choice", "loop") == "batched"
        return out

    def _matmat_now(self, V):
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
        d = self.objective.describe()
        return (
            f"{type(self).__name__}(size={self.size}, {src}, loss={d['loss']}, {d['reduction']} over "
            f"{d['units']}, params={len(self.params)} tensors, dtype={self.dtype}, device={self.device}, "
            f"train_mode={self.train_mode})"
        )


class HessianOperator(CurvatureOperator):
    """The Hessian :math:`H = \\nabla^2_\\theta L(\\theta)` of the objective's loss w.r.t. the chosen parameters.

    .. math:: L(\\theta) = \\frac{1}{U} \\sum_b u_b L_b(\\theta), \\qquad U = \\sum_b u_b

    over the pieces :math:`b` of the data (one batch, a loader's batches, micro-batches, ranks),
    :math:`L_b` the loss of piece :math:`b` and :math:`u_b` the units it averages over (samples, counted
    targets or tokens: see :class:`~hessianflow.curvature.objective.Objective`); ``reduction="sum"``:
    :math:`L = \\sum_b L_b`. Products by double backprop (Pearlmutter 1994) by default, reusing the
    first-order graph on one batch; by forward-over-reverse through ``torch.func``
    (``backend="forward_over_reverse"``); or by central differences of two gradients
    (``backend="finite_difference"``, step ``fd_step``, default :math:`\\epsilon^{1/3}` relative): no second
    derivatives at all, approximate. An embedding's padding row is held constant (zero rows and columns)
    in every backend.

    Args:
        model, criterion, data, dataloader, params, loss_fn, reduction, batch_weight, objective, **options:
            see :class:`CurvatureOperator`.
        backend: ``"double_backprop"``, ``"forward_over_reverse"`` or ``"finite_difference"``.
        fd_step: the finite-difference step relative to the parameters' scale, in (0, 1).

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

    def __init__(
        self,
        model=None,
        criterion=None,
        *,
        data=None,
        dataloader: Iterable | None = None,
        params=None,
        loss_fn: Callable | None = None,
        reduction: str | None = None,
        batch_weight: Callable | None = None,
        backend: str = "double_backprop",
        fd_step: float | None = None,
        objective: Objective | None = None,
        **options,
    ):
        if backend not in HESSIAN_BACKENDS:
            raise ValueError(f"backend must be one of {tuple(HESSIAN_BACKENDS)}, got {backend!r}")
        if fd_step is not None and backend != "finite_difference":
            raise ValueError("fd_step= is the finite-difference step: it needs backend='finite_difference'")
        keywords = dict(data=data, dataloader=dataloader, params=params, loss_fn=loss_fn, reduction=reduction,
                        batch_weight=batch_weight)  # fmt: skip
        obj, of_products = self._objective(model, criterion, objective, keywords, options)
        product = HESSIAN_BACKENDS[backend](obj, **({"step": fd_step} if backend == "finite_difference" else {}))
        self.backend = backend
        self._setup(obj, product, of_products)

    @property
    def fd_step(self) -> float | None:
        """The finite-difference step (``backend="finite_difference"``; measured on the first product
        unless ``fd_step=`` fixed it), else ``None``."""
        return getattr(self.product, "step", None)

    @property
    def product_noise(self) -> float | None:
        """The products' measured relative error (finite differences, after the first product), else
        ``None`` (exact products: their rounding is measured by the solvers themselves)."""
        return getattr(self.product, "error", None)


class GGNOperator(CurvatureOperator):
    """The generalised Gauss-Newton matrix :math:`G = J^\\top H_{\\mathrm{out}} J` (Schraudolph 2002).

    :math:`J` is the Jacobian of the network outputs w.r.t. the parameters and :math:`H_{\\mathrm{out}}`
    the Hessian of the loss w.r.t. the outputs; :math:`G` is positive semi-definite for convex losses
    (cross-entropy, squared error) and equals the Hessian minus the term with the second derivatives
    of the network. The same objective, weighting and splits as :class:`HessianOperator`.

    The GGN needs the model's *output* and a *loss of it*, which it gets from:

    - a ``criterion``: output ``model(inputs)``, loss ``criterion(output, targets)``;
    - ``forward_fn=(model, batch) -> output`` with ``loss_of_output=(output, batch) -> loss``, or a
      :class:`~hessianflow.curvature.losses.OutputLoss` as ``loss_fn`` (the same two functions), e.g.
      :func:`~hessianflow.curvature.losses.causal_lm_loss` for a HuggingFace causal LM. A plain ``loss_fn`` or a
      model's ``.loss`` hides the output and is refused.

    **Softmax cross-entropy** (an ``nn.CrossEntropyLoss`` criterion, mean or sum, without class weights
    or label smoothing, with class-index targets; or an ``OutputLoss`` that declares ``cross_entropy``,
    as the :mod:`hessianflow.curvature.losses` helpers do): the output Hessian is applied analytically,

    .. math:: H_{\\mathrm{out}} u = c_t \\left(p_t \\odot u_t - p_t (p_t^\\top u_t)\\right)

    per position :math:`t`, with :math:`p_t` the softmax of the logits and :math:`c_t` 0 at ignored
    positions (``ignore_index``, ``-100``) and :math:`1/\\#\\mathrm{counted}` (mean) or 1 (sum)
    elsewhere, instead of a double backward through ``log_softmax`` (which keeps several logits-sized
    tensors per product: what makes the GGN costly at a language model's vocabulary size).

    **Sampled Fisher** (``mc_samples=M``): the output Hessian replaced by the average of :math:`M`
    outer products of the loss's output gradients for targets drawn from the model's predictive
    distribution (categorical for the cross-entropy, Gaussian of variance 1/2 for ``MSELoss``, Bernoulli
    for ``BCEWithLogitsLoss``), an unbiased estimate of this matrix converging like :math:`1/\\sqrt M`,
    weighted over positions and splits exactly as the exact GGN; ``seed=`` fixes the draws, so the
    operator is one fixed matrix (:mod:`~hessianflow.curvature.fisher`).

    Args:
        model, criterion, data, dataloader, params, loss_fn, reduction, batch_weight, objective, **options:
            see :class:`CurvatureOperator`.
        analytic_cross_entropy: ``None`` (analytic where it applies), ``False`` (the autograd path),
            ``True`` (require the analytic one).
        mc_samples: ``None`` (the exact GGN) or the number of targets drawn per position (the sampled
            Fisher; curvlinops' ``FisherMCLinearOperator`` defaults to 1).
        seed: the sampled Fisher's draws (an int; ignored by the exact GGN).

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

    The sampled Fisher of the same loss: :math:`\\frac{2}{3} X^\\top \\operatorname{diag}(z_i^2) X`
    for standard normal :math:`z_i`, whose mean is the GGN:

        >>> F = GGNOperator(model, nn.MSELoss(), data=(X, y), mc_samples=20000, seed=0)
        >>> torch.allclose(F.to_dense(), 2 * X.T @ X / 3, rtol=0.05)
        True
    """

    backend = "double_backprop"

    def __init__(
        self,
        model=None,
        criterion=None,
        *,
        data=None,
        dataloader: Iterable | None = None,
        params=None,
        loss_fn: Callable | None = None,
        reduction: str | None = None,
        batch_weight: Callable | None = None,
        analytic_cross_entropy: bool | None = None,
        mc_samples: int | None = None,
        seed: int = 0,
        objective: Objective | None = None,
        **options,
    ):
        keywords = dict(data=data, dataloader=dataloader, params=params, loss_fn=loss_fn, reduction=reduction,
                        batch_weight=batch_weight)  # fmt: skip
        obj, of_products = self._objective(model, criterion, objective, keywords, options)
        if mc_samples is None:
            product = GaussNewton(obj, analytic_cross_entropy=analytic_cross_entropy)
        elif analytic_cross_entropy is not None:
            raise ValueError("analytic_cross_entropy= is the exact GGN's option; the sampled Fisher has none")
        else:
            product = SampledFisher(obj, mc_samples, seed)
        self._setup(obj, product, of_products)
        if mc_samples is not None and self.deterministic and obj.dataloader is not None and _shuffled(obj.dataloader):
            self.deterministic = False  # the targets are drawn in the data's order
            warnings.warn(
                "GGNOperator: mc_samples= draws targets in the data's order and the loader is shuffled: not a "
                "fixed matrix, so no eigensolver will report convergence",
                RuntimeWarning,
                stacklevel=2,
            )

    @property
    def analytic_cross_entropy(self) -> bool | None:
        return getattr(self.product, "analytic_cross_entropy", None)

    @property
    def mc_samples(self) -> int | None:
        """The targets drawn per position (the sampled Fisher), or ``None`` (the exact GGN)."""
        return getattr(self.product, "mc_samples", None)

    def _products(self, pieces, batched: bool):
        restart = getattr(self.product, "restart", None)
        if restart is not None:  # the sampled Fisher: the same draws on every pass
            restart()
        return super()._products(pieces, batched)


class EmpiricalFisherOperator(CurvatureOperator):
    """The empirical Fisher matrix: per-sample gradient outer products (Kunstner, Hennig & Balles 2019).

    .. math::
        F = \\frac{1}{U} \\sum_i \\nabla_\\theta s_i \\, \\nabla_\\theta s_i^\\top, \\qquad
        s_i = u_i\\, \\ell_i(\\theta), \\quad U = \\sum_i u_i

    for a mean-reduced loss, and :math:`F = \\sum_i \\nabla s_i \\nabla s_i^\\top` with
    :math:`s_i = \\ell_i` for a sum-reduced one, the sums running over every sample :math:`i` of the
    batch or of the loader. **A sample** is a leading-dimension slice: slice ``i:i+1`` of every tensor
    of the batch whose leading dimension is that of the batch's first tensor, in any container (other
    leaves are shared; see :func:`~hessianflow.curvature.batches.split_samples`); :math:`\\ell_i` is the loss of
    that one-sample batch and :math:`u_i` its units (1; its counted targets, 0 when its target is
    ignored; its class weight; its counted tokens), so that :math:`s_i` is the sample's share of the
    summed loss. With plain samples this is the usual :math:`\\frac1N \\sum_i g_i g_i^\\top`. Samples of
    zero units are left out.

    Args:
        model, criterion, data, dataloader, params, loss_fn, reduction, batch_weight, objective, **options:
            see :class:`CurvatureOperator`.
        per_sample: ``"vmap"`` (``torch.func.vmap`` over ``torch.func.grad``), ``"loop"`` (one backward
            pass per sample), or ``"auto"``: the first, falling back to the second for a model or loss
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

    backend = "double_backprop"

    def __init__(
        self,
        model=None,
        criterion=None,
        *,
        data=None,
        dataloader: Iterable | None = None,
        params=None,
        loss_fn: Callable | None = None,
        reduction: str | None = None,
        batch_weight: Callable | None = None,
        per_sample: str = "auto",
        objective: Objective | None = None,
        **options,
    ):
        keywords = dict(data=data, dataloader=dataloader, params=params, loss_fn=loss_fn, reduction=reduction,
                        batch_weight=batch_weight)  # fmt: skip
        obj, of_products = self._objective(model, criterion, objective, keywords, options)
        self._setup(obj, EmpiricalFisher(obj, per_sample=per_sample), of_products)

    @property
    def per_sample(self) -> str:
        return self.product.per_sample


def exact_hessian(model, criterion=None, **kwargs) -> torch.Tensor:
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
    H = HessianOperator(model, criterion, **kwargs)
    n = H.size
    if n > 20000:
        raise ValueError(f"exact_hessian would build a {n} x {n} matrix; use HessianOperator and the solvers")
    dense = H.to_dense()
    return (dense + dense.T) / 2
