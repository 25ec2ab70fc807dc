"""Curvature products through ``torch.compile`` (inductor), each compiled graph cross-checked.

The operators' ``compile=True`` replaces the product of :mod:`~hessianflow.curvature.products` by one
compiled function of ``(parameters, vectors, batch)``:

- **Hessian**: forward-over-reverse, ``torch.func.jvp`` of ``torch.func.grad`` of the loss (whatever the
  ``backend``: ``autograd.grad`` with ``create_graph`` cannot be traced by dynamo, so the double-backprop
  graph cannot be compiled; the matrix is the same). A fresh forward per product: nothing is reused.
- **GGN**: ``J v`` by ``torch.func.jvp`` of the model's output, the output Hessian (the softmax
  cross-entropy's analytically, as :class:`~hessianflow.curvature.products.GaussNewton` does, or a
  forward-over-reverse product of the loss of the output), ``J^T`` by ``torch.func.vjp``.
- **Empirical Fisher**: the per-sample gradients (``vmap`` over ``grad``); the products themselves are two
  matrix products and stay eager.

A batched product (``matmat``) is the same function under ``torch.func.vmap`` over the vectors (one graph
per ``k``).

**Cross-checked, never trusted.** A compiled ``torch.func.hessian`` once gave a silently wrong Hessian
(pytorch#190855). So every time dynamo compiles a new graph (the first product, a new batch shape, a new
``k``), that call's result is compared with the eager product of the same vectors; a relative difference
above :data:`CHECK_RTOL` of the dtype, or any error while compiling, sends every later product to the
eager path, with a warning built from :class:`CompileStatus` (which the operator keeps as
``compile_status``: read its fields, not the warning). ``fullgraph=True``: a graph break or dynamo's
recompile limit is an error (hence a fallback), never a silent partly-eager run. ``dynamic=False``: one
graph per input shape (a loader whose last batch is smaller compiles twice). Each operator compiles its
own copy of the function, so operators do not share dynamo's recompile budget (8 graphs per code object).

Timings, warm-up cost and the measured default (``compile=False``): benchmarks/README.md, "Issue 24".
"""

from __future__ import annotations

import contextlib
import functools
import time
import types
import warnings
from dataclasses import asdict, dataclass

import torch

from .batches import LossModule, split_inputs_targets
from .hvp import _JIT_DEPRECATION
from .products import (
    DoubleBackprop,
    EmpiricalFisher,
    FiniteDifference,
    ForwardOverReverse,
    GaussNewton,
    Product,
    _DecomposedMSE,
    _softmax_ce_curvature,
    _softmax_ce_product,
)

__all__ = ["CHECK_RTOL", "CompileStatus", "CheckedCompile", "compile_product", "fuse_cross_entropy"]

#: the largest relative difference (2-norm over all pieces) between a compiled graph's first result and the
#: eager product that is accepted: rounding of a reordered computation, with room for float32's ReLU kinks
#: (a kink crossed by rounding moved float32 products by up to 9e-4 relative: benchmarks/README.md, issue 13)
CHECK_RTOL = {torch.float64: 1e-9, torch.float32: 5e-3, torch.bfloat16: 5e-2, torch.float16: 5e-2}


@dataclass
class CompileStatus:
    """Where a compiled product stands; the operator's ``compile_status``.

    Attributes:
        state: ``"pending"`` (nothing run yet), ``"compiled"`` or ``"fallback"`` (eager from now on).
        reason: why it fell back (``None`` otherwise).
        graphs: graphs dynamo compiled (one per batch shape and per ``k`` of a ``matmat``).
        checks: compiled graphs compared with the eager product.
        max_check_error: the largest relative difference found by those comparisons.
        warmup_seconds: time spent in the calls that compiled a graph (tracing, inductor, the eager check).

    Example:
        >>> CompileStatus().to_dict()["state"]
        'pending'
    """

    state: str = "pending"
    reason: str | None = None
    graphs: int = 0
    checks: int = 0
    max_check_error: float | None = None
    warmup_seconds: float = 0.0

    def to_dict(self) -> dict:
        return asdict(self)


def _graphs() -> int:
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def _own_copy(fn):
    """``fn`` with a code object of its own: dynamo caches compiled graphs, and counts recompilations
    against its limit, per code object, so two operators must not share one."""
    if isinstance(fn, types.MethodType):
        return types.MethodType(_own_copy(fn.__func__), fn.__self__)
    copy = types.FunctionType(fn.__code__.replace(), fn.__globals__, fn.__name__, fn.__defaults__, fn.__closure__)
    copy.__kwdefaults__ = fn.__kwdefaults__
    return copy


def _relative_difference(a, b) -> float:
    fa = torch.cat([t.detach().reshape(-1).double() for t in a])
    fb = torch.cat([t.detach().reshape(-1).double() for t in b])
    scale = float(fb.norm())
    diff = float((fa - fb).norm())
    return diff / scale if scale > 0 else diff


class CheckedCompile:
    """``torch.compile(fn)`` whose every new graph is compared with ``reference`` on its first call.

    Both take the same arguments and return a tensor or a sequence of tensors. An error while compiling,
    or a difference above ``rtol`` (default: :data:`CHECK_RTOL` of the result's dtype), makes this and
    every later call return ``reference``'s result, with a warning naming ``what`` and the reason.

    Args:
        fn: the function to compile.
        reference: the eager function it must equal.
        what: for the warning, e.g. ``"HessianOperator's product"``.
        rtol: the accepted relative difference (``None``: by dtype).

    Attributes:
        status: the :class:`CompileStatus`.

    Example (a compiled result that differs from its reference is not returned):
        >>> import torch, warnings
        >>> checked = CheckedCompile(lambda x: x * 2.0, lambda x: x * 2.0 + 1e-3, "an example")
        >>> with warnings.catch_warnings(record=True):
        ...     out = checked(torch.ones(3, dtype=torch.float64))
        >>> out, checked.status.state
        (tensor([2.0010, 2.0010, 2.0010], dtype=torch.float64), 'fallback')
    """

    def __init__(self, fn, reference, what: str, rtol: float | None = None):
        self.fn = torch.compile(_own_copy(fn), fullgraph=True, dynamic=False)
        self.reference = reference
        self.what = what
        self.rtol = rtol
        self.status = CompileStatus()

    def __call__(self, *args):
        if self.status.state == "fallback":
            return self.reference(*args)
        before, start = _graphs(), time.perf_counter()
        try:
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=_JIT_DEPRECATION, category=FutureWarning)
                out = self.fn(*args)
        except Exception as e:  # noqa: BLE001 - any failure to compile means: eager, said loudly
            first = (str(e).strip().splitlines() or [""])[0][:300]
            return self._fall_back(f"compiling failed ({type(e).__name__}: {first})", args)
        new = _graphs() - before
        if not new:
            self.status.state = "compiled" if self.status.state == "pending" else self.status.state
            return out
        self.status.graphs += new
        ref = self.reference(*args)
        many = not isinstance(out, torch.Tensor)
        err = _relative_difference(out if many else [out], ref if many else [ref])
        dtype = (out[0] if many else out).dtype
        rtol = self.rtol if self.rtol is not None else CHECK_RTOL.get(dtype, 5e-2)
        st = self.status
        st.checks += 1
        st.max_check_error = err if st.max_check_error is None else max(st.max_check_error, err)
        st.warmup_seconds += time.perf_counter() - start
        if not err <= rtol:  # (a NaN difference fails too)
            return self._fall_back(
                f"a compiled graph's result differs from the eager product by {err:.3g} relative "
                f"(accepted: {rtol:.1g} for {dtype})",
                args,
                ref,
            )
        st.state = "compiled"
        return out

    def _fall_back(self, reason: str, args, ref=None):
        self.status.state, self.status.reason = "fallback", reason
        warnings.warn(
            f"{self.what}: compile=True fell back to the eager product for good: {reason}",
            RuntimeWarning,
            stacklevel=4,
        )
        return self.reference(*args) if ref is None else ref


class _OutputModule(torch.nn.Module):
    """The model's output on a batch as a module, for ``torch.func.functional_call`` (the GGN's ``J``)."""

    def __init__(self, model: torch.nn.Module, spec):
        super().__init__()
        self.model = model
        self.spec = spec

    def forward(self, batch):
        return self.spec.output(self.model, batch)


class _CompiledProduct(Product):
    """A product whose ``apply`` is one checked compiled function of ``(params, pieces, batch, batched)``;
    gradients and the eager reference come from the product it replaces."""

    kernels = "forward_over_reverse"
    second_order = False
    reusable = False

    def __init__(self, eager: Product, what: str):
        super().__init__(eager.obj, eager.run)
        self.eager = eager
        self.names = ["model." + n for n in self.obj.param_names]
        self.checked = CheckedCompile(self._function, self._reference, what)

    @property
    def status(self) -> CompileStatus:
        return self.checked.status

    def prepare(self, batch):
        return batch

    def gradient(self, state, batch):
        return self.eager.gradient(None, batch)

    def apply(self, batch, pieces, batched, retain):
        params = tuple(p.detach() for p in self.obj.params)
        return list(self.checked(params, tuple(pieces), batch, batched))

    def _reference(self, params, pieces, batch, batched):
        eager = self.eager
        return eager.apply(eager.prepare(batch), list(pieces), batched, retain=False)

    def _function(self, params, pieces, batch, batched):  # pragma: no cover - abstract
        raise NotImplementedError

    def _call(self, module, params, batch):
        return torch.func.functional_call(module, dict(zip(self.names, params)), (batch,))


class _CompiledHessian(_CompiledProduct):
    def __init__(self, eager: Product):
        super().__init__(eager, "HessianOperator's product")
        self.loss_module = LossModule(self.obj.model, self.obj.spec)

    def _function(self, params, pieces, batch, batched):
        def hvp(*v):
            with _DecomposedMSE():  # see products._DecomposedMSE: forward-mode through mse_loss's backward
                grad = torch.func.grad(lambda ps: self._call(self.loss_module, ps, batch))
                return torch.func.jvp(grad, (params,), (v,))[1]

        return torch.func.vmap(hvp)(*pieces) if batched else hvp(*pieces)


class _CompiledGGN(_CompiledProduct):
    def __init__(self, eager: GaussNewton):
        super().__init__(eager, "GGNOperator's product")
        self.output_module = _OutputModule(self.obj.model, self.obj.spec)

    def _loss_of_output(self, out, batch):
        spec = self.obj.spec
        if spec.kind == "criterion":  # the unchecked loss (the checks branch on data)
            return spec.criterion(out, split_inputs_targets(batch)[1])
        return spec.loss_fn.loss_of_output(out, batch)

    def _function(self, params, pieces, batch, batched):
        def f(ps):
            return self._call(self.output_module, ps, batch)

        out = f(params)
        ce = None if self.eager.analytic_cross_entropy is False else self.obj.spec.cross_entropy(out, batch)
        if ce is None and self.eager.analytic_cross_entropy:
            raise ValueError("analytic_cross_entropy=True, but the loss is not a plain softmax cross-entropy")

        def ggn(*v):
            _, jv = torch.func.jvp(f, (params,), (v,))
            if ce is not None:
                hjv = _softmax_ce_product(*_softmax_ce_curvature(out, ce), jv)
            else:
                with _DecomposedMSE():
                    grad = torch.func.grad(lambda o: self._loss_of_output(o, batch))
                    hjv = torch.func.jvp(grad, (out.detach(),), (jv,))[1]
            _, vjp = torch.func.vjp(f, params)
            return vjp(hjv)[0]

        return torch.func.vmap(ggn)(*pieces) if batched else ggn(*pieces)


class _CompiledFisher(EmpiricalFisher):
    """The empirical Fisher with its per-sample gradients (``vmap`` of ``grad``) compiled and checked."""

    def __init__(self, eager: EmpiricalFisher):
        super().__init__(eager.obj, eager.run, per_sample=eager.per_sample)
        self.loss_module = LossModule(self.obj.model, self.obj.spec)  # built once: dynamo cannot trace its creation
        self.names = ["model." + n for n in self.obj.param_names]
        self.checked = CheckedCompile(
            self._compiled_grads, super()._vmap_grads, "EmpiricalFisherOperator's per-sample gradients"
        )

    @property
    def status(self) -> CompileStatus:
        return self.checked.status

    def _functional_loss(self, batch):
        return lambda ps: torch.func.functional_call(self.loss_module, dict(zip(self.names, ps)), (batch,))

    def _compiled_grads(self, batch, n):
        return EmpiricalFisher._vmap_grads(self, batch, n)

    def _vmap_grads(self, batch, n):
        return self.checked(batch, n)


def compile_product(product: Product) -> Product:
    """The compiled counterpart of an operator's product (see the module docstring).

    Raises ``ValueError`` for a product with nothing to compile: finite differences (two gradients, no
    second-order function to trace) and the empirical Fisher with ``per_sample="loop"``.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from hessianflow import HessianOperator
        >>> data = (torch.ones(2, 1), torch.zeros(2, 1))
        >>> H = HessianOperator(nn.Linear(1, 1), nn.MSELoss(), data=data, backend="finite_difference")
        >>> compile_product(H.product)
        Traceback (most recent call last):
        ...
        ValueError: compile=True compiles a second-order product; backend='finite_difference' has none
    """
    if isinstance(product, FiniteDifference):
        raise ValueError("compile=True compiles a second-order product; backend='finite_difference' has none")
    if isinstance(product, (DoubleBackprop, ForwardOverReverse)):
        return _CompiledHessian(product)
    if isinstance(product, GaussNewton):
        return _CompiledGGN(product)
    if isinstance(product, EmpiricalFisher):
        if product.per_sample == "loop":
            raise ValueError("compile=True compiles the vmap per-sample gradients; per_sample='loop' has none")
        return _CompiledFisher(product)
    raise ValueError(f"compile=True: no compiled form of {type(product).__name__}")


def fuse_cross_entropy(product: Product, fused, compile: bool):
    """The operators' ``fused_cross_entropy=`` (``False``, ``True`` or ``"compiled"``) on ``product``: the
    GGN's kernel is set on it; for the Hessian, a context (entered around every product) in which a plain
    ``F.cross_entropy`` is :func:`~hessianflow.curvature.fused_ce.fused_cross_entropy`. Returns that
    context's factory (a null context when off or for the GGN).

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from hessianflow import GGNOperator
        >>> data = (torch.ones(2, 3), torch.tensor([0, 2]))
        >>> G = GGNOperator(nn.Linear(3, 3), nn.CrossEntropyLoss(), data=data, fused_cross_entropy=True)
        >>> type(G.product.fused).__name__  # the GGN's output Hessian by the chunked kernel
        'FusedSoftmaxCE'
    """
    from .fused_ce import FusedCrossEntropyMode, FusedSoftmaxCE

    if fused not in (False, True, "compiled"):
        raise ValueError(f"fused_cross_entropy must be False, True or 'compiled', got {fused!r}")
    if not fused:
        return contextlib.nullcontext
    if compile:
        raise ValueError(
            "fused_cross_entropy= is for the eager products; compile=True compiles the whole product "
            "(its cross-entropy included) through torch.func, which the fused autograd.Function does not support"
        )
    kernel = FusedSoftmaxCE(compiled=fused == "compiled")
    if isinstance(product, GaussNewton) and type(product)._output_product is not GaussNewton._output_product:
        raise ValueError(
            "fused_cross_entropy= is for the exact GGN; the sampled Fisher (mc_samples=) has its own output product"
        )
    if isinstance(product, GaussNewton):
        product.fused = kernel
        return contextlib.nullcontext
    if isinstance(product, (DoubleBackprop, FiniteDifference)):
        return functools.partial(FusedCrossEntropyMode, kernel)
    raise ValueError(
        "fused_cross_entropy= applies to the GGN and to the Hessian's double_backprop and finite_difference "
        f"backends, not to {type(product).__name__}"
    )
