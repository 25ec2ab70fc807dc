"""The objective: which loss, of which data, in which parameters and mode, averaged over which units.

One :class:`Objective` says what every curvature operator of a model means:

.. math:: L(\\theta) = \\frac{1}{U} \\sum_{\\text{units } u} \\ell_u(\\theta) \\quad (\\text{mean}), \\qquad
          L(\\theta) = \\sum_u \\ell_u(\\theta) \\quad (\\text{sum}),

the units being what the loss averages over: samples, counted targets (``ignore_index`` left out),
class-weighted targets (``weight=``), counted tokens (a language model's shifted labels). The
declaration is made once, from the loss itself where the library can know its meaning (criteria, the loss
helpers, a HuggingFace model's ``.loss``: :class:`~hessianflow.curvature.batches.LossSpec`), or by ``reduction=``
and ``batch_weight=`` for a plain function. Every way of splitting the data (a loader's batches,
``micro_batch_size=`` chunks, ``torch.distributed`` ranks, the empirical Fisher's single samples) weights
its pieces by the units they hold (:mod:`~hessianflow.curvature.combine`), so no split changes the matrix;
a split whose pieces cannot be weighted (an unknown reduction) is refused with one sentence.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable

import torch
from torch import nn

from .._checks import check_int
from .._modes import model_mode
from ..distributed import use_distributed
from ..linalg.linop import NonFiniteError
from .batches import LossSpec, move_batch, split_batch
from .params import padding_rows, resolve_params, unwrap_model
from .sharded import agree, sharded_parameters

__all__ = ["Objective", "OBJECTIVE_OPTIONS"]

# the keyword arguments that build an Objective besides model, criterion, data, dataloader, params,
# loss_fn, reduction and batch_weight (what functions taking "the objective's keywords" accept)
OBJECTIVE_OPTIONS = ("forward_fn", "loss_of_output", "train_mode", "num_batches", "micro_batch_size", "distributed")


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


def _changing_samples(loader, num_batches: int | None) -> str | None:
    """Why a loader may hand out a different set of samples on each pass, or ``None``.

    A shuffled order alone changes nothing but rounding; a shuffled loader that drops its last partial
    batch, stops after ``num_batches``, or samples with replacement or by weight sees other samples on
    every pass (two products of one vector differed by 21% with ``drop_last=True``).
    """
    from torch.utils.data import RandomSampler, WeightedRandomSampler

    samplers = _samplers(loader)
    if any(isinstance(s, WeightedRandomSampler) for s in samplers):
        return "the loader samples by weight, a new draw on every pass"
    if any(isinstance(s, RandomSampler) and (s.replacement or s._num_samples is not None) for s in samplers):
        return "the loader samples with replacement (or a subset), a new draw on every pass"
    if not _shuffled(loader):
        return None
    batch_sampler = getattr(loader, "batch_sampler", None)
    if num_batches is not None and hasattr(loader, "__len__") and num_batches < len(loader):
        return f"the loader is shuffled and only its first {num_batches} batches are used: other samples every pass"
    size = getattr(batch_sampler, "batch_size", None)
    if getattr(batch_sampler, "drop_last", False) and size and len(samplers[-1]) % size:
        return "the loader is shuffled and drops its last partial batch: other samples are left out every pass"
    return None


class Objective:
    """The loss, the data, the parameters and the mode, with what the loss averages over.

    Args:
        model: the network (a ``DataParallel``/``DDP`` wrapper is looked through).
        criterion: ``criterion(model(inputs), targets)`` on ``(inputs, targets)`` batches.
        data: one batch (any nesting of dicts, lists, tuples and tensors).
        dataloader: an iterable of batches; the objective is the loss over all of their units.
        params: the parameters to differentiate w.r.t. (:func:`~hessianflow.curvature.params.resolve_params`).
            FSDP2-sharded ones (``fully_shard``) make it a function of this rank's shards, each rank passing
            its part of the global batch (:mod:`~hessianflow.curvature.sharded`).
        loss_fn: ``loss_fn(model, batch) -> scalar`` instead of a criterion (e.g.
            :func:`~hessianflow.curvature.losses.causal_lm_loss`); neither: the model output's ``.loss``.
        reduction: ``"mean"`` or ``"sum"``; read off a criterion, a loss helper or a HuggingFace model,
            declared here for anything else. Needed whenever the data is split.
        batch_weight: ``batch_weight(batch) -> number``, the units a mean-reduced loss averages over in a
            batch; default: derived from the loss (see :class:`~hessianflow.curvature.batches.LossSpec`).
        forward_fn, loss_of_output: a split loss ``loss_of_output(forward_fn(model, batch), batch)``.
        train_mode: run the model in train mode (BatchNorm batch statistics, dropout). Default ``False``.
        num_batches: use only the first ``num_batches`` batches of the loader (per rank).
        micro_batch_size: evaluate every batch in consecutive chunks of at most this many samples
            (one chunk's graph in memory at a time), weighted by their units: the same objective.
        distributed: sum over ``torch.distributed`` ranks, each holding its share of the data. ``None``:
            on for a loader when a process group of more than one rank is initialised.

    Raises:
        ValueError: both or neither of ``data`` and ``dataloader``; a split of a loss whose reduction is
            unknown; micro-batches with train-mode BatchNorm (each chunk would have its own statistics);
            parameters of mixed dtypes or devices.

    Example (a cross-entropy with an ignored target averages over the two counted ones):
        >>> import torch
        >>> from torch import nn
        >>> from hessianflow.curvature.objective import Objective
        >>> batch = (torch.zeros(3, 2), torch.tensor([0, -100, 2]))
        >>> obj = Objective(nn.Linear(2, 3), nn.CrossEntropyLoss(), data=batch)
        >>> obj.reduction, obj.spec.units_name, obj.units(obj.data)
        ('mean', 'counted targets', 2)
    """

    def __init__(
        self,
        model: nn.Module,
        criterion=None,
        *,
        data=None,
        dataloader: Iterable | None = None,
        params=None,
        loss_fn: Callable | None = None,
        reduction: str | None = None,
        batch_weight: Callable | None = None,
        forward_fn: Callable | None = None,
        loss_of_output: Callable | None = None,
        train_mode: bool = False,
        num_batches: int | None = None,
        micro_batch_size: int | None = None,
        distributed: bool | None = None,
    ):
        if (data is None) == (dataloader is None):
            raise ValueError("pass exactly one of data=batch or dataloader=")
        if not isinstance(model, nn.Module):
            raise ValueError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        self.num_batches = None if num_batches is None else check_int("num_batches", num_batches, minimum=1)
        self.micro_batch_size = (
            None if micro_batch_size is None else check_int("micro_batch_size", micro_batch_size, minimum=1)
        )
        self.model = unwrap_model(model)
        self.criterion = criterion
        self.spec = LossSpec(criterion, loss_fn, reduction, batch_weight, forward_fn, loss_of_output, model=self.model)
        self.params, self.param_names = resolve_params(self.model, params)
        #: FSDP2-sharded parameters (:mod:`~hessianflow.curvature.sharded`): the objective is then a function
        #: of this rank's shards, and every rank holds its part of the global batch
        self.sharding = sharded_parameters(self.model, self.params, self.param_names)
        if self.sharding is not None:
            self.params = self.sharding.locals
        dtypes = {p.dtype for p in self.params}
        devices = {p.device for p in self.params}
        if len(dtypes) > 1 or len(devices) > 1:
            raise ValueError(f"the chosen parameters mix dtypes {dtypes} or devices {devices}")
        self.dtype, self.device = self.params[0].dtype, self.params[0].device
        # A loader given as a list of one batch is a loader (over ranks: this rank's share of the data);
        # it is held like data= only so that its first-order graph can be reused across products.
        single_loader = isinstance(dataloader, (list, tuple)) and len(dataloader) == 1
        if single_loader:
            data, dataloader = dataloader[0], None
        if data is not None:
            self.spec.check_batch(data)
        self.data = None if data is None else self.to_device(data)
        self.dataloader = dataloader
        self.train_mode = bool(train_mode)
        self.distributed = use_distributed(distributed, default=dataloader is not None or single_loader)
        if self.sharding is not None:
            if distributed is False:
                raise ValueError("a sharded model's data is split over its ranks: distributed=False cannot apply")
            self.distributed = True
        if self.splits or single_loader:  # a loader is a loader, even of one batch
            self.spec.require_reduction("over a data loader" if single_loader else self._split_name())
        if self.micro_batch_size is not None and self.train_mode and _batch_norms(self.model):
            raise ValueError(
                "micro_batch_size with train_mode=True and BatchNorm layers: each chunk would be normalised by its "
                "own statistics, a different function from the whole batch's; use eval mode or whole batches"
            )
        # one unsplit batch: the reduction does not change the objective (the batch's own loss)
        self.reduction = self.spec.reduction or "mean"
        #: embedding padding rows among the parameters, held constant (see params.padding_rows)
        self.held_constant = (
            padding_rows(self.model, self.params) if self.sharding is None else self.sharding.padding_rows()
        )

    # -- what the objective is ------------------------------------------------------------------
    @property
    def size(self) -> int:
        """The number of parameters it is a function of (all ranks' entries of sharded ones)."""
        if self.sharding is not None:
            return self.sharding.size
        return sum(p.numel() for p in self.params)

    @property
    def splits(self) -> bool:
        """Whether its data comes in pieces to combine (a loader, ranks or micro-batches)."""
        return self.dataloader is not None or self.distributed or self.micro_batch_size is not None

    def _split_name(self) -> str:
        if self.dataloader is not None:
            return "over a data loader"
        if self.distributed:
            return "over several ranks"
        return "to combine micro-batches (micro_batch_size=)"

    def units(self, batch):
        """The number of units the loss averages over in ``batch`` (its weight in every combination)."""
        return self.spec.weight(batch)

    def describe(self) -> dict:
        """What the objective is, for results and JSON: the loss, its reduction and its units."""
        fn = self.criterion if self.spec.kind == "criterion" else self.spec.loss_fn
        if fn is None:
            loss = type(self.model).__name__ + ".loss"
        else:  # a helper's name, a function's own name, or a criterion's class
            loss = getattr(fn, "name", None) or getattr(fn, "__name__", None) or type(fn).__name__
        return {"loss": loss, "reduction": self.reduction, "units": self.spec.units_name, "size": self.size}

    def randomness(self, reuse_graph: bool) -> tuple[str | None, bool]:
        """Why two products with the same vector may differ: ``(reason or None, deterministic)``.

        In train mode a dropout module draws a new mask at every forward: the operator is a random matrix
        (two products of a C1-like network with the same vector differed by 24%). With the first-order
        graph reused (one batch) the mask is drawn once, so the products are of one fixed matrix, the
        Hessian for that mask. BatchNorm in train mode normalises by the batch statistics, so over a
        shuffled loader the matrix changes from pass to pass (0.85% measured); a loader that sees other
        samples on every pass changes it in any mode (:func:`_changing_samples`).
        """
        if self.dataloader is not None:
            why = _changing_samples(self.dataloader, self.num_batches)
            if why is not None:
                return why, False
        if not self.train_mode:
            return None, True
        drops = [m for m in self.model.modules() if isinstance(m, nn.modules.dropout._DropoutNd) and m.p > 0]
        if drops and not reuse_graph:
            return f"{len(drops)} dropout module(s) draw a new mask at every product", False
        if _batch_norms(self.model) and self.dataloader is not None and _shuffled(self.dataloader):
            return "BatchNorm uses the batch statistics of a shuffled loader, whose batches change every pass", False
        if drops:
            return f"{len(drops)} dropout module(s): the products are of the Hessian for one random mask", True
        return None, True

    # -- its data, in pieces ----------------------------------------------------------------------
    def to_device(self, batch):
        """``batch`` on the parameters' device, floating-point tensors in their dtype."""
        return move_batch(batch, self.device, dtype=self.dtype, non_blocking=True)

    def chunks(self, batch) -> list:
        """``batch`` as the micro-batches it is evaluated in (``[batch]`` without ``micro_batch_size``)."""
        return [batch] if self.micro_batch_size is None else split_batch(batch, self.micro_batch_size)

    def pieces(self, progress: bool = False):
        """This process's pieces of data, each ``(batch, single)``: ``single`` for the one unsplit batch
        of ``data=`` (whose first-order graph can be kept across products)."""
        if self.data is not None:
            chunks = self.chunks(self.data)
            for chunk in chunks:
                yield chunk, len(chunks) == 1
            return
        batches = self.dataloader
        if progress:
            from tqdm.auto import tqdm

            total = self.num_batches
            if total is None and hasattr(batches, "__len__"):
                total = len(batches)
            batches = tqdm(batches, total=total, desc="curvature product", leave=False)
        for b, batch in enumerate(batches):
            if self.num_batches is not None and b >= self.num_batches:
                break
            self.spec.check_batch(batch)
            for chunk in self.chunks(self.to_device(batch)):
                yield chunk, False

    # -- the loss ---------------------------------------------------------------------------------
    def loss(self, batch, run: Callable | None = None) -> torch.Tensor:
        """The checked scalar loss of a batch (``run(inputs)`` replaces ``model(inputs)``); for a sharded
        model, times the weight of the piece being differentiated (:attr:`ShardedParameters.scale`)."""
        if self.sharding is None:
            return self.spec.loss(self.model, batch, run=run)
        return self.weighted(lambda finite: self.spec.loss(self.model, batch, run=run, finite=finite))

    def weighted(self, compute: Callable[[bool], torch.Tensor]) -> torch.Tensor:
        """A sharded model's loss of a piece, ``compute(finite)``, times the piece's weight
        (:attr:`ShardedParameters.scale`), once every rank knows that every rank's loss is finite.

        A piece of no units (all padding) or a rank's stand-in has weight 0 and its ``0/0`` loss is taken
        as 0; the operations are the same on every rank either way (the ranks' graphs must be identical:
        see :mod:`~hessianflow.curvature.sharded`).
        """
        scale, error, loss = self.sharding.scale, None, None
        try:
            loss = compute(scale != 0)
            loss = torch.where(torch.isfinite(loss), loss, torch.zeros_like(loss)) * scale
        except NonFiniteError as exc:  # the forward is complete on every rank: tell them before any backward
            error = exc
        agree(self.sharding, error, "compute a finite loss")
        return loss

    def output(self, batch, run: Callable | None = None) -> torch.Tensor:
        """The model's output on a batch (for the GGN: the criterion's input, or ``forward_fn``'s value)."""
        out = self.spec.output(self.model, batch, run=run)
        if not isinstance(out, torch.Tensor):
            raise ValueError(f"the GGN needs the model's output as one tensor, got {type(out).__name__}")
        return out

    @contextlib.contextmanager
    def mode(self):
        """The model in the objective's mode with ``requires_grad`` on its parameters; both restored after
        (train-mode BatchNorm running statistics left untouched)."""
        norms = [m for m in _batch_norms(self.model) if m.track_running_stats] if self.train_mode else []
        with model_mode(self.model, self.train_mode, requires_grad=self.params), _running_stats_frozen(norms):
            yield

    def hold_constant(self, pieces: list[torch.Tensor], batched: bool) -> list[torch.Tensor]:
        """``pieces`` (split like the parameters) with the held-constant rows zeroed, copied where needed."""
        if not self.held_constant:
            return pieces
        pieces = list(pieces)
        for i, row in self.held_constant:
            t = pieces[i].clone()
            (t[:, row] if batched else t[row]).zero_()
            pieces[i] = t
        return pieces


def _samplers(loader) -> list:
    """A ``DataLoader``'s sampler and its batch sampler's sampler (those it has)."""
    inner = getattr(getattr(loader, "batch_sampler", None), "sampler", None)
    return [s for s in (getattr(loader, "sampler", None), inner) if s is not None]


def _shuffled(loader) -> bool:
    """Whether a ``DataLoader`` draws its samples in a new random order on every pass."""
    from torch.utils.data import RandomSampler, SubsetRandomSampler

    return any(isinstance(smp, (RandomSampler, SubsetRandomSampler)) for smp in _samplers(loader))
