"""FSDP2-sharded parameters: exact curvature products of a model that no rank holds whole.

A model wrapped with ``torch.distributed.fsdp.fully_shard`` keeps each parameter as a DTensor sharded
along its first dimension (FSDP2's default ``Shard(0)``): rank :math:`r` of :math:`R` stores rows
:math:`[r c, (r + 1) c)` of a parameter with :math:`n_0` rows, :math:`c = \\lceil n_0 / R \\rceil` (the
last ranks' shards shorter or empty). The curvature operators then act on this rank's shards:

- The differentiation variables are the local shards themselves (leaves sharing their storage).
- Every module's own parameters are rebuilt for its forward by a *differentiable* all-gather of the
  shards (``torch.distributed._functional_collectives``; its backward is a reduce-scatter), so a gradient
  w.r.t. a shard is the global gradient's rows of this rank, and differentiating it once more gives the
  Hessian's rows: :math:`(Hv)_r = \\partial_{\\theta_r} \\sum_q g_q^\\top v_q`, each rank holding
  :math:`g_r, v_r`. Every rank runs the same graph on its own data, so the collectives inside the
  backward passes pair up.
- FSDP2's own forward hooks are switched off for the computation (their all-gathers are not
  differentiable twice: a double backward through them fails in torch 2.14, or, with
  ``reshard_after_backward=False``, keeps every full parameter), and restored after it.
- Saved-tensor hooks keep no gathered parameter in the graph: a full parameter that an operation saves
  for its backward is stored as a recipe and gathered again when the backward needs it. A rank holds
  the full parameters of one module at a time in the forward, and of the operations being
  differentiated in the backward.

The loss of every piece of data is weighted by its units before it is differentiated (the pieces are
summed across ranks inside the backward), and the sum divided by the all-reduced total at the end: the
same objective as one device with the global batch (:mod:`~hessianflow.curvature.combine`).
"""

from __future__ import annotations

import collections
import contextlib
import math

import torch
import torch.distributed as dist
from torch import nn

from ..distributed import _collective_device
from ..linalg.sharded_vectors import ShardedVectors

__all__ = ["ShardedParameters", "sharded_parameters"]


def _dtensor_type():
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch without distributed
        return None
    return DTensor


def sharded_parameters(model: nn.Module, params, names) -> ShardedParameters | None:
    """The :class:`ShardedParameters` of ``params`` when they are DTensors, ``None`` when none is.

    Raises:
        ValueError: a mix of sharded and plain parameters, or a sharding other than FSDP2's one-dimensional
            ``Shard(0)`` (HSDP's two-dimensional meshes, ``shard_placement_fn`` on other dimensions).
    """
    DTensor = _dtensor_type()
    if DTensor is None:
        return None
    sharded = [isinstance(p, DTensor) for p in params]
    if not any(sharded):
        return None
    if not all(sharded):
        plain = [n for n, s in zip(names, sharded) if not s]
        raise ValueError(
            f"the chosen parameters mix FSDP2-sharded DTensors and plain tensors (e.g. {plain[0]!r}): shard "
            "every module that owns a chosen parameter (fully_shard on the root covers the rest)"
        )
    return ShardedParameters(model, params, names)


def _gather_fn():
    from torch.distributed import _functional_collectives as funcol

    return getattr(funcol, "all_gather_single_autograd", None) or funcol.all_gather_tensor_autograd


def _fsdp_modules(model: nn.Module) -> list[nn.Module]:
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover - torch without FSDP2
        return []
    return [m for m in model.modules() if isinstance(m, FSDPModule)]


def _hook_ids(handle) -> set[int]:
    handles = getattr(handle, "handles", None)
    if handles is not None:  # a group's hooks
        return {h.id for h in handles}
    return {handle.id} if handle is not None else set()


@contextlib.contextmanager
def _fsdp_hooks_off(modules: list[nn.Module]):
    """FSDP2's forward hooks (unshard before, reshard after) taken out of every FSDP module, put back after.

    The hook dictionaries are swapped for filtered copies and the originals restored, so hooks added
    meanwhile (the gathering hooks of :class:`ShardedParameters`) disappear with them.
    """
    saved = []
    try:
        for m in modules:
            state = m._get_fsdp_state()
            ids = _hook_ids(getattr(state, "_pre_forward_hook_handle", None)) | _hook_ids(
                getattr(state, "_post_forward_hook_handle", None)
            )
            saved.append((m, m._forward_pre_hooks, m._forward_hooks))
            m._forward_pre_hooks = type(m._forward_pre_hooks)(
                (k, v) for k, v in m._forward_pre_hooks.items() if k not in ids
            )
            m._forward_hooks = type(m._forward_hooks)((k, v) for k, v in m._forward_hooks.items() if k not in ids)
        yield
    finally:
        for m, pre, post in saved:
            m._forward_pre_hooks, m._forward_hooks = pre, post


class _Recipe:
    """A saved full parameter, stored as how to gather it again: its shard and its view's geometry."""

    __slots__ = ("owner", "index", "source", "size", "stride", "offset")

    def __init__(self, owner, index, source, t):
        self.owner, self.index, self.source = owner, index, source
        self.size, self.stride, self.offset = tuple(t.size()), tuple(t.stride()), t.storage_offset()


class ShardedParameters:
    """The FSDP2-sharded parameters an objective differentiates, as this rank's shards.

    Args:
        model: the model (``fully_shard`` applied to it or its submodules).
        params, names: the chosen parameters (DTensors sharded ``Shard(0)`` over one one-dimensional mesh)
            and their names.

    Attributes:
        locals: this rank's shards, leaves sharing the parameters' storage (the differentiation variables).
        size: the number of entries of all the chosen parameters (the operator's dimension).
        segments: where this rank's entries sit in the flat vector of all the parameters,
            ``(start, length)`` parameter after parameter (the layout of the operator's vectors).
        group, rank, world_size: the process group the parameters are sharded over, and this rank in it.
        scale: the weight of the piece of data being differentiated (set by the operator, read by the loss).
    """

    def __init__(self, model: nn.Module, params, names):
        DTensor = _dtensor_type()
        meshes = {id(p.device_mesh): p.device_mesh for p in params}
        if len(meshes) != 1:
            raise ValueError("the sharded parameters live on more than one device mesh; shard them over one mesh")
        (mesh,) = meshes.values()
        if mesh.ndim != 1:
            raise ValueError(
                f"curvature of a model sharded over a {mesh.ndim}-D mesh (HSDP) is not supported: shard it over "
                "a one-dimensional mesh (fully_shard's default)"
            )
        from torch.distributed.tensor import Shard

        bad = [n for n, p in zip(names, params) if tuple(p.placements) != (Shard(0),)]
        if bad:
            raise ValueError(
                f"parameter {bad[0]!r} is sharded as {params[names.index(bad[0])].placements}: only FSDP2's "
                "Shard(0) (the first dimension) is supported"
            )
        self.model = model
        self.group = mesh.get_group()
        self.world_size = dist.get_world_size(self.group)
        self.rank = dist.get_rank(self.group)
        self.dtensors = list(params)
        self.names = list(names)
        self.shapes = [tuple(p.shape) for p in params]
        self.rows = [math.ceil(s[0] / self.world_size) if s else 1 for s in self.shapes]
        self.locals = []
        self.segments = []
        start = 0
        for p, name, shape, c in zip(params, names, self.shapes, self.rows):
            if not shape:
                raise ValueError(f"parameter {name!r} is a sharded scalar: nothing to shard along its first dimension")
            local = p.to_local()
            lo, hi = min(self.rank * c, shape[0]), min((self.rank + 1) * c, shape[0])
            if tuple(local.shape) != (hi - lo, *shape[1:]):
                raise ValueError(
                    f"parameter {name!r}: this rank holds a shard of shape {tuple(local.shape)}, not rows {lo}:{hi} "
                    f"of {shape} (FSDP2's even Shard(0) layout)"
                )
            self.locals.append(local.detach().requires_grad_(True))
            row = math.prod(shape[1:])
            self.segments.append((start + lo * row, (hi - lo) * row))
            start += math.prod(shape)
        self.size = start
        self.scale = 1.0
        #: the shards the gathers read: the leaves, or shifted copies (:meth:`shifted`)
        self.sources = list(self.locals)
        self._index = {id(p): i for i, p in enumerate(params)}
        self._fsdp = _fsdp_modules(model)
        # every module's own DTensor parameters (chosen or not: all must be whole for the forward)
        self._owners = []
        for m in model.modules():
            own = [(n, p) for n, p in m.named_parameters(recurse=False) if isinstance(p, DTensor)]
            if own:
                self._owners.append((m, own))
        # gathered buffers that saved tensors may be views of: storage pointer -> (buffer, index, shard). The
        # buffers are held (so that no other tensor can reuse their memory while they are listed) only
        # while their module's forward runs, or, gathered again in a backward, for the next few saves.
        self._live = {}
        self._recent = collections.deque()

    # -- gathering --------------------------------------------------------------------------------
    def _gather(self, local: torch.Tensor, shape, c: int) -> torch.Tensor:
        """The whole parameter from the ranks' shards, differentiable when grad mode is on."""
        # padded on every rank, by zero rows where none are missing: the ranks' graphs must be identical, for
        # the autograd engine runs their nodes (and the collectives in them) in the same order only then
        # (F.pad, not torch.cat: cat drops a 1-D empty shard from the graph of its gradient)
        local = torch.nn.functional.pad(local, [0, 0] * (local.dim() - 1) + [0, c - local.shape[0]])
        return _gather_fn()(local.contiguous(), 0, self.group)

    def _gathered(self, i: int | None, p) -> tuple[torch.Tensor, torch.Tensor]:
        """``(padded buffer, whole parameter)`` of a chosen parameter ``i`` (from its leaf) or another one."""
        if i is None:
            with torch.no_grad():
                shape = tuple(p.shape)
                buf = self._finish(self._gather(p.to_local().detach(), shape, math.ceil(shape[0] / self.world_size)))
            return buf, buf[: shape[0]]
        return self._gathered_from(i, self.sources[i])

    #: how many buffers gathered again in a backward stay listed (the saves of the node that asked for one)
    RECENT = 4

    def _gathered_from(self, i: int, source: torch.Tensor, recent: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        buf = self._finish(self._gather(source, self.shapes[i], self.rows[i]))
        key = buf.untyped_storage().data_ptr()
        self._live[key] = (buf, i, source)
        if recent:
            self._recent.append(key)
            while len(self._recent) > self.RECENT:
                self._live.pop(self._recent.popleft(), None)
        return buf, buf[: self.shapes[i][0]]

    @staticmethod
    def _finish(buf):
        # an AsyncCollectiveTensor is waited for (a plain tensor, still in the graph)
        from torch.distributed._functional_collectives import AsyncCollectiveTensor

        return buf.wait() if isinstance(buf, AsyncCollectiveTensor) else buf

    def _pack(self, t):
        try:
            entry = self._live.get(t.untyped_storage().data_ptr())
        except (RuntimeError, NotImplementedError):  # a tensor without storage (a subclass, a fake tensor)
            return t
        if entry is None:
            return t
        return _Recipe(self, entry[1], entry[2], t)

    @staticmethod
    def _unpack(x):
        if not isinstance(x, _Recipe):
            return x
        buf, _ = x.owner._gathered_from(x.index, x.source, recent=True)
        return buf.as_strided(x.size, x.stride, x.offset)

    # -- the computation --------------------------------------------------------------------------
    @contextlib.contextmanager
    def active(self):
        """Inside: the model runs on gathered parameters (FSDP2's hooks off), and saved full parameters
        are gathered again when needed; wraps both the forward and the backward passes of a product."""
        handles = []

        def pre(module, args, own=None):
            for name, p in own:
                i = self._index.get(id(p))
                module._parameters[name] = self._gathered(i, p)[1]

        def post(module, args, output, own=None):
            for name, p in own:
                full = module._parameters[name]
                if full is not p and full is not None:  # no longer listed: its memory may be freed and reused
                    self._live.pop(full.untyped_storage().data_ptr(), None)
                module._parameters[name] = p

        with _fsdp_hooks_off(self._fsdp):
            try:
                for m, own in self._owners:
                    handles.append(m.register_forward_pre_hook(lambda mod, a, own=own: pre(mod, a, own)))
                    handles.append(m.register_forward_hook(lambda mod, a, o, own=own: post(mod, a, o, own)))
                with torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack):
                    yield
            finally:
                for h in handles:
                    h.remove()
                for m, own in self._owners:  # a forward that raised midway left gathered tensors in place
                    for name, p in own:
                        m._parameters[name] = p
                self._live.clear()
                self._recent.clear()

    @contextlib.contextmanager
    def shifted(self, sources: list[torch.Tensor]):
        """Inside: the model's parameters gathered from ``sources`` (this rank's shards of other points,
        e.g. :math:`\\theta \\pm h v` for finite differences) instead of the leaves."""
        saved, self.sources = self.sources, list(sources)
        try:
            yield
        finally:
            self.sources = saved

    def reduce(self, t: torch.Tensor) -> torch.Tensor:
        """``t`` summed over the ranks (a new tensor, on ``t``'s device)."""
        out = t.detach().to(_collective_device(t.device)).clone()
        dist.all_reduce(out, group=self.group)
        return out.to(t.device)

    def sum(self, value: torch.Tensor) -> float:
        """A local partial sum (e.g. of squares) added up over the ranks."""
        return self.total(float(value))

    def vector_space(self, dtype: torch.dtype, device) -> ShardedVectors:
        """The operator's vectors: this rank's entries of every chosen parameter, in ``dtype``."""
        where = _collective_device(device)
        return ShardedVectors(self.size, self.segments, dtype, device, group=self.group, collective_device=where)

    def total(self, value: float) -> float:
        """``value`` summed over the ranks (float64: exact for whole unit counts up to 2**53)."""
        t = torch.tensor([float(value)], dtype=torch.float64, device=_collective_device(self.locals[0].device))
        dist.all_reduce(t, group=self.group)
        total = float(t.item())
        return int(total) if total.is_integer() else total

    def padding_rows(self) -> list[tuple[int, int]]:
        """``(index, local row)`` of the embedding padding rows in this rank's shards (held constant)."""
        from .params import padding_rows

        rows = []
        for i, row in padding_rows(self.model, self.dtensors):
            lo, hi = self.local_rows(i)
            if lo <= row < hi:
                rows.append((i, row - lo))
        return rows

    def local_rows(self, i: int) -> tuple[int, int]:
        """The rows ``[lo, hi)`` of parameter ``i`` this rank holds."""
        c, n0 = self.rows[i], self.shapes[i][0]
        return min(self.rank * c, n0), min((self.rank + 1) * c, n0)


def agree(sharding: ShardedParameters, error: BaseException | None, what: str) -> None:
    """One status all-reduce: if any rank failed, every rank raises (the failing one its own error).

    Called where every rank stands at the same point of the same graph (a piece's loss computed, its
    backward not begun), so that a rank's failure there never leaves the others waiting in a collective.
    """
    from ..linalg.linop import NonFiniteError

    status = torch.tensor(
        [float(error is not None), float(isinstance(error, NonFiniteError))],
        dtype=torch.float64,
        device=_collective_device(sharding.locals[0].device),
    )
    dist.all_reduce(status, group=sharding.group)
    failures, nonfinite = (int(x) for x in status.tolist())
    if failures:
        if error is not None:
            raise error
        kind = NonFiniteError if nonfinite == failures else RuntimeError
        raise kind(
            f"{failures} other rank(s) failed to {what} (their errors are in their own output); stopping here too"
        )


def aligned_pieces(objective, progress: bool = False):
    """The objective's pieces of data on every rank in step: ``(batch, single, units)``.

    A sharded product runs collectives inside every piece's forward and backward, so every rank must
    differentiate the same number of pieces. Before each piece the ranks all-reduce whether they still
    have one; a rank that has run out takes its last piece again with ``units=0`` (differentiated with
    weight 0, it adds nothing). A rank that has no piece at all while others do, or that failed to read
    its next piece, makes every rank raise.
    """
    sharding = objective.sharding
    where = _collective_device(sharding.locals[0].device)
    pieces = iter(objective.pieces(progress))
    last = None
    while True:
        piece, error, units = None, None, 0
        try:
            piece = next(pieces, None)
            if piece is not None:
                units = objective.units(piece[0])
        except Exception as exc:  # noqa: BLE001 - raised below on this rank, after telling the others
            error = exc
        empty = piece is None and last is None and error is None
        status = torch.tensor(
            [float(piece is not None), float(error is not None), float(empty)], dtype=torch.float64, device=where
        )
        dist.all_reduce(status, group=sharding.group)
        have, failures, empties = (int(x) for x in status.tolist())
        if failures:
            if error is not None:
                raise error
            raise RuntimeError(f"{failures} other rank(s) failed to read their data; stopping here too")
        if not have:
            return
        if empties:
            raise ValueError(
                f"{empties} rank(s) of a sharded model hold no data: every rank needs at least one batch (its "
                "part of the global batch); give each rank a non-empty share"
            )
        if piece is None:
            yield last[0], False, 0
        else:
            last = piece
            yield piece[0], piece[1], units
