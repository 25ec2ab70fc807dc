"""How a curvature matrix times a vector is computed on one piece of data.

Each product is a small object over an :class:`~hessianflow.curvature.objective.Objective` with three
methods and no data loop (the operators loop over the objective's pieces and combine them):

- ``prepare(batch)``: what the products on this batch share (the first-order graph, the per-sample
  gradients...); kept across products when ``reusable`` and the batch is the one unsplit batch;
- ``apply(state, pieces, batched, retain)``: the curvature of the batch's loss times ``pieces`` (a list
  shaped like the parameters, with a leading ``k`` when ``batched``);
- ``gradient(state, batch)``: the batch's loss gradient.

The products: :class:`DoubleBackprop` (Pearlmutter 1994), :class:`ForwardOverReverse` (``torch.func``),
:class:`FiniteDifference` (central differences of two gradients), :class:`GaussNewton` (the GGN, with the
softmax cross-entropy's output Hessian applied analytically) and :class:`EmpiricalFisher`.
"""

from __future__ import annotations

import torch

from ..linalg.linop import NonFiniteError
from .batches import LossModule, split_samples, tensor_leaves, with_tensor_leaves
from .hvp import (
    double_backprop_hmm,
    double_backprop_hvp,
    flatten,
    flatten_batched,
    forward_over_reverse_hvp,
    unflatten,
)

__all__ = [
    "Product",
    "DoubleBackprop",
    "ForwardOverReverse",
    "FiniteDifference",
    "GaussNewton",
    "EmpiricalFisher",
    "HESSIAN_BACKENDS",
]


def _zeros_for_none(grads, like):
    return [t.detach() if t is not None else torch.zeros_like(p) for t, p in zip(grads, like)]


def _require_graph(loss: torch.Tensor) -> torch.Tensor:
    if not loss.requires_grad:
        raise ValueError(
            "the loss does not depend on the chosen parameters (it has no autograd graph): does loss_fn call "
            "the model it is given, without torch.no_grad() or .detach()?"
        )
    return loss


class Product:
    """The interface (see the module docstring); ``run(inputs)`` is how the operator calls the model."""

    #: the derivatives products take, for :func:`~hessianflow.curvature.attention.product_kernels`
    kernels = "double_backprop"
    #: whether the speed paths' double-backward forwards apply (:mod:`~hessianflow.curvature.fast_paths`)
    second_order = True
    #: whether prepare()'s state can be kept across products on one batch
    reusable = True
    #: whether it computes products of an FSDP2-sharded model (:mod:`~hessianflow.curvature.sharded`)
    sharded = False

    def __init__(self, objective, run=None):
        self.obj = objective
        self.run = run

    def loss(self, batch) -> torch.Tensor:
        return _require_graph(self.obj.loss(batch, self.run))

    def prepare(self, batch):  # pragma: no cover - abstract
        raise NotImplementedError

    def apply(self, state, pieces, batched: bool, retain: bool):  # pragma: no cover - abstract
        raise NotImplementedError

    def gradient(self, state, batch):
        """The loss gradient of one batch (``state``: its reused preparation, or ``None``)."""
        g = torch.autograd.grad(self.loss(batch), self.obj.params, allow_unused=True)
        return _zeros_for_none(g, self.obj.params)

    def _functional_loss(self, batch):
        """``loss(params)`` through ``torch.func.functional_call`` (the model's own tensors untouched)."""
        wrapper = LossModule(self.obj.model, self.obj.spec)
        names = ["model." + n for n in self.obj.param_names]
        return lambda ps: torch.func.functional_call(wrapper, dict(zip(names, ps)), (batch,))


class DoubleBackprop(Product):
    """:math:`Hv = \\nabla_\\theta (g^\\top v)` with :math:`g` built with ``create_graph=True``
    (Pearlmutter 1994); the first-order graph is the state, reused across products on one batch."""

    sharded = True

    def prepare(self, batch):
        return torch.autograd.grad(self.loss(batch), self.obj.params, create_graph=True, allow_unused=True)

    def apply(self, state, pieces, batched, retain):
        if batched:
            return double_backprop_hmm(state, self.obj.params, pieces, retain_graph=retain)
        return double_backprop_hvp(state, self.obj.params, pieces, retain_graph=retain)

    def gradient(self, state, batch):
        if state is None:
            return super().gradient(state, batch)
        return _zeros_for_none(state, self.obj.params)  # the reused first-order graph is the gradient itself


class _DecomposedMSE(torch.overrides.TorchFunctionMode):
    """``F.mse_loss`` as its decomposition ``((input - target) ** 2)`` reduced, for forward-over-reverse.

    In torch 2.14 the forward-mode derivative of ``mse_loss``'s backward with ``reduction="mean"`` fails
    (``ZeroTensors are immutable``, plain ``torch.func`` too: tests/test_objective.py keeps the reduced
    case, and tells when torch fixes it). The decomposition is the same function with the same
    derivatives. Calls with the legacy ``size_average``/``reduce`` arguments or a ``weight`` go through
    unchanged.
    """

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        plain = all(kwargs.get(k) is None for k in ("size_average", "reduce", "weight"))
        if func is torch.nn.functional.mse_loss and len(args) == 2 and plain:
            inputs, targets = torch.broadcast_tensors(*args)
            d = (inputs - targets) ** 2
            reduction = kwargs.get("reduction", "mean")
            return d.mean() if reduction == "mean" else d.sum() if reduction == "sum" else d
        return func(*args, **kwargs)


class ForwardOverReverse(Product):
    """:math:`Hv` as ``torch.func.jvp`` of ``torch.func.grad``; batched over vectors with ``vmap``."""

    kernels = "forward_over_reverse"
    second_order = False
    reusable = False

    def prepare(self, batch):
        return batch

    def apply(self, batch, pieces, batched, retain):
        loss_fn = self._functional_loss(batch)
        # (in train mode, the objective's mode has BatchNorm's running statistics off: nothing is mutated)
        with _DecomposedMSE():
            if not batched:
                return forward_over_reverse_hvp(loss_fn, self.obj.params, pieces)
            hmm = torch.func.vmap(lambda *t: tuple(forward_over_reverse_hvp(loss_fn, self.obj.params, t)))
            return list(hmm(*pieces))


class FiniteDifference(Product):
    """:math:`Hv \approx (g(\theta + h v) - g(\theta - h v)) / 2h`, two first-order gradients.

    For setups where a double backward is impractical (sharded parameters, custom kernels with a backward
    but no double backward): gradients at parameters shifted without touching the model's own tensors
    (``torch.func.functional_call``), ``h = step * max(1, ||theta||) / ||v||``. The error is
    :math:`O(h^2)` (the third derivative) plus rounding :math:`O(u / h)`, where :math:`u` is the precision
    the model *actually computes in*: a float64 model whose norms run in float32 (Llama's RMSNorm, T5's
    layer norm) rounds like float32, and the textbook step :math:`\\epsilon_{64}^{1/3}` is then far too
    small (measured 4e-4 and 2.5e-3 relative error on such models).

    So the step is measured, not assumed: on the first product, a fixed random probe is differenced at a
    ladder of steps four times apart from :math:`\\epsilon^{1/3}` of the dtype upwards, and the step whose
    result changes least at the next rung is kept (the Richardson-style choice of numdifftools and of
    Dennis & Schnabel 1983, §5.6). That change, relative to the product, is :attr:`error`: an estimate of
    the products' relative error (between 1/15 and 4/3 of it would be the truncation- and
    rounding-dominated extremes), which the eigensolvers read as the products' noise. An explicit
    ``step`` is used as given, with its error measured the same way.
    """

    kernels = "finite_difference"
    second_order = False
    reusable = False
    sharded = True
    #: the ladder: how many rungs, and the ratio between them
    RUNGS, RATIO = 7, 4.0

    def __init__(self, objective, run=None, step: float | None = None):
        super().__init__(objective, run)
        if objective.dtype in (torch.bfloat16, torch.float16):
            name = str(objective.dtype).removeprefix("torch.")
            raise ValueError(
                f"finite-difference products of a {name} model are refused: its rounding unit "
                f"{torch.finfo(objective.dtype).eps:g} puts the best step near 0.2 of the parameters' scale, where no "
                "error can be measured; compute the products of a float32 copy, or use backend='double_backprop'"
            )
        if step is not None and not (isinstance(step, (int, float)) and 0 < step < 1):
            raise ValueError(f"fd_step must be a number in (0, 1), got {step!r}")
        self.fixed = step is not None
        self.step = float(step) if step is not None else torch.finfo(objective.dtype).eps ** (1 / 3)
        self.error: float | None = None  # measured on the first product

    def prepare(self, batch):
        return batch

    def apply(self, batch, pieces, batched, retain):
        if self.error is None:
            self._calibrate(batch)
        if batched:  # one pair of gradients per vector
            cols = [self._one(batch, [p[j] for p in pieces], self.step) for j in range(pieces[0].shape[0])]
            return [torch.stack(c) for c in zip(*cols)]
        return self._one(batch, pieces, self.step)

    def _calibrate(self, batch) -> None:
        """Choose the step (unless fixed) and measure the error on a fixed random probe."""
        g = torch.Generator().manual_seed(0)
        probe = [torch.randn(p.shape, generator=g, dtype=torch.float64).to(p) for p in self.obj.params]
        if self.fixed:
            steps = [self.step, self.step * self.RATIO]
        else:
            steps = [h for h in (self.step * self.RATIO**k for k in range(self.RUNGS + 1)) if h < 0.5]
        D = [torch.cat([t.reshape(-1).double() for t in self._one(batch, probe, h)]) for h in steps]
        changes = [self._norm(D[i] - D[i + 1]) / max(self._norm(D[i]), 1e-300) for i in range(len(D) - 1)]
        best = min(range(len(changes)), key=changes.__getitem__)
        self.step, self.error = steps[best], changes[best]

    def _norm(self, pieces) -> float:
        """The norm of a vector given as pieces (this rank's, summed over the ranks when sharded)."""
        pieces = [pieces] if isinstance(pieces, torch.Tensor) else pieces
        sq = sum(torch.sum(t.detach().double() ** 2) for t in pieces)
        sharding = self.obj.sharding
        return (sharding.sum(sq) if sharding is not None else float(sq)) ** 0.5

    def _loss_at(self, batch):
        """``loss(params)`` at other parameter values: a functional call, or a sharded model's gathers
        reading the shifted shards."""
        sharding = self.obj.sharding
        if sharding is None:
            return self._functional_loss(batch)

        def loss_of(ps):
            with sharding.shifted(ps):
                return self.obj.loss(batch, self.run)

        return loss_of

    def _one(self, batch, pieces, step):
        params = self.obj.params
        vnorm = self._norm(pieces)
        if vnorm == 0:
            return [torch.zeros_like(p) for p in params]
        scale = max(1.0, self._norm(params))
        h = step * scale / vnorm
        loss_of = self._loss_at(batch)

        def grad_at(sign):
            ps = [(p.detach() + (sign * h) * v).requires_grad_(True) for p, v in zip(params, pieces)]
            loss = loss_of(ps)
            if loss.dim() != 0:
                raise ValueError(f"the loss must be a scalar, got shape {tuple(loss.shape)}")
            if not torch.isfinite(loss):
                raise NonFiniteError(f"the loss is not finite ({loss.item()}) at a finite-difference point")
            return _zeros_for_none(torch.autograd.grad(_require_graph(loss), ps, allow_unused=True), ps)

        plus, minus = grad_at(1.0), grad_at(-1.0)
        return [(a - b) / (2 * h) for a, b in zip(plus, minus)]


#: HessianOperator's ``backend=`` names
HESSIAN_BACKENDS = {
    "double_backprop": DoubleBackprop,
    "forward_over_reverse": ForwardOverReverse,
    "finite_difference": FiniteDifference,
}


def checked_class_dim(logits: torch.Tensor, ce) -> int:
    """The class dimension of a cross-entropy's ``logits`` as a negative index (so that it also serves a
    batched ``[k, *logits.shape]`` vector), after checking the targets' shape and the reduction."""
    dim = ce.class_dim if ce.class_dim < 0 else ce.class_dim - logits.dim()
    expected = logits.shape[: logits.dim() + dim] + logits.shape[logits.dim() + dim + 1 :]
    if tuple(ce.targets.shape) != tuple(expected):
        raise ValueError(
            f"cross-entropy targets of shape {tuple(ce.targets.shape)} do not fit logits of shape "
            f"{tuple(logits.shape)} with classes along dim {ce.class_dim}"
        )
    if ce.reduction not in ("mean", "sum"):
        raise ValueError(f"the cross-entropy's reduction must be 'mean' or 'sum', got {ce.reduction!r}")
    return dim


def _softmax_ce_curvature(logits: torch.Tensor, ce) -> tuple[torch.Tensor, torch.Tensor, int]:
    """``(p, coef, dim)`` of the cross-entropy's output Hessian ``coef * (diag(p) - p p^T)`` per position.

    ``p`` is the softmax of ``logits`` along the class dimension ``dim`` (negative, so the same ``dim``
    serves a batched ``[k, *logits.shape]`` vector); ``coef`` is 0 at ignored positions and ``1/count``
    (mean over the counted positions) or 1 (sum) elsewhere, broadcastable against ``p``.
    """
    dim = checked_class_dim(logits, ce)
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


class GaussNewton(Product):
    """:math:`J^\\top H_{\\mathrm{out}} J v` (Schraudolph 2002): :math:`Jv` by the double-vjp trick, the
    output Hessian analytically for a softmax cross-entropy or by a double backward otherwise."""

    sharded = True
    #: the chunked kernel of :mod:`~hessianflow.curvature.fused_ce` for the analytic cross-entropy (the
    #: operators' ``fused_cross_entropy=``); ``None``: the softmax kept, :func:`_softmax_ce_product`
    fused = None

    def __init__(self, objective, run=None, analytic_cross_entropy: bool | None = None):
        super().__init__(objective, run)
        if not objective.spec.has_output:
            objective.spec.output(None, None)  # raises: says what the GGN needs
        self.analytic_cross_entropy = analytic_cross_entropy

    def prepare(self, batch):
        obj = self.obj
        out = obj.output(batch, self.run)
        ce = None if self.analytic_cross_entropy is False else obj.spec.cross_entropy(out, batch)
        if ce is None and self.analytic_cross_entropy:
            raise ValueError("analytic_cross_entropy=True, but the loss is not a plain softmax cross-entropy")
        g_out = hout = None
        sharding = obj.sharding
        if ce is not None:
            with torch.no_grad():  # the checks (a scalar, finite) only
                if sharding is None:
                    obj.spec.loss_of_output(out.detach(), batch)
                else:
                    obj.weighted(lambda finite: obj.spec.loss_of_output(out.detach(), batch, finite))
            hout = _softmax_ce_curvature(out, ce) if self.fused is None else self.fused.prepare(out, ce)
            if sharding is not None:  # weighted like the loss (a mean's 1/count becomes the piece's weight)
                first, coef, dim = hout
                hout = first, torch.nan_to_num(coef * sharding.scale), dim
        else:
            if sharding is None:
                loss = obj.spec.loss_of_output(out, batch)
            else:
                loss = obj.weighted(lambda finite: obj.spec.loss_of_output(out, batch, finite))
            (g_out,) = torch.autograd.grad(_require_graph(loss), out, create_graph=True)
        return (out, g_out, hout, *self._linearisation(out))

    def _linearisation(self, out):
        """``(u, J^T u)``: J^T u is linear in the dummy u; differentiating it w.r.t. u gives J v (the
        double-vjp trick). u is a zero scalar expanded to the output's shape: no logits-sized tensor is
        held for it."""
        u = torch.zeros((), dtype=out.dtype, device=out.device, requires_grad=True).expand(out.shape)
        return u, torch.autograd.grad(out, self.obj.params, grad_outputs=u, create_graph=True, allow_unused=True)

    def _output_product(self, hout, jv):
        """The analytic output Hessian times ``J v``: the fused kernel over ``J v``'s own storage, or
        :func:`_softmax_ce_product` (the sampled Fisher overrides it)."""
        if self.fused is not None:
            return self.fused.apply(*hout, jv, out=jv)
        return _softmax_ce_product(*hout, jv)

    def apply(self, state, pieces, batched, retain):
        out, g_out, hout, u, jtu = state
        live = [i for i, t in enumerate(jtu) if t is not None and t.requires_grad]
        kw = {"retain_graph": True, "is_grads_batched": batched}
        shape = (pieces[0].shape[0], *out.shape) if batched else out.shape
        if not live:
            return [torch.zeros_like(t) for t in pieces]
        (jv,) = torch.autograd.grad([jtu[i] for i in live], u, grad_outputs=[pieces[i] for i in live], **kw)
        if hout is not None:
            hjv = self._output_product(hout, jv)
            del jv
        elif g_out.requires_grad:
            (hjv,) = torch.autograd.grad(g_out, out, grad_outputs=jv, allow_unused=True, **kw)
            hjv = torch.zeros(shape, dtype=out.dtype, device=out.device) if hjv is None else hjv
        else:  # a loss linear in the outputs has no output curvature
            hjv = torch.zeros(shape, dtype=out.dtype, device=out.device)
        res = torch.autograd.grad(
            out, self.obj.params, grad_outputs=hjv, allow_unused=True, **{**kw, "retain_graph": retain}
        )
        return [r.detach() if r is not None else torch.zeros_like(t) for r, t in zip(res, pieces)]


class EmpiricalFisher(Product):
    """:math:`\\frac{1}{W} \\sum_i \\nabla s_i \\nabla s_i^\\top` over a batch's samples, :math:`s_i = w_i \\ell_i`
    the sample's share of the summed loss (:math:`w_i` its units); the state is the ``[n, size]`` matrix
    of the weighted per-sample gradients, by ``torch.func.vmap`` or one backward pass per sample."""

    kernels = "first_order"  # per-sample gradients: any attention kernel has a backward

    def __init__(self, objective, run=None, per_sample: str = "auto"):
        if per_sample not in ("auto", "vmap", "loop"):
            raise ValueError(f"per_sample must be 'auto', 'vmap' or 'loop', got {per_sample!r}")
        super().__init__(objective, run)
        self.per_sample = per_sample

    sharded = True

    def prepare(self, batch):
        if self.obj.sharding is not None:
            return self._prepare_sharded(batch)
        obj = self.obj
        samples = split_samples(batch)
        mean = obj.reduction == "mean"
        # a sample's weight is its units (its counted targets or tokens; 0 for one wholly ignored): the
        # same declaration that weights batches, chunks and ranks
        weights = [obj.units(s) for s in samples] if mean else [1.0] * len(samples)
        total = sum(weights)
        if mean and abs(total - obj.units(batch)) > 1e-9 * max(1.0, abs(total)):
            raise ValueError(
                f"the units must add up over a batch's samples for the empirical Fisher: the samples' "
                f"{obj.spec.units_name} sum to {total}, the batch's are {obj.units(batch)}"
            )
        keep = [i for i, w in enumerate(weights) if w != 0]
        G = None
        if self.per_sample != "loop":
            try:
                G = self._vmap_grads(batch, len(samples))[keep]
            except Exception:
                if self.per_sample == "vmap":
                    raise
        if G is None:
            G = torch.stack([self._sample_grad(samples[i]) for i in keep])  # [n_kept, size]
        G = G * torch.tensor([weights[i] for i in keep], dtype=G.dtype, device=G.device)[:, None]
        if not torch.isfinite(G).all():
            raise NonFiniteError("a per-sample gradient is not finite; cannot compute the empirical Fisher")
        return G, (1.0 / total if mean else 1.0)

    def _sample_grad(self, sample) -> torch.Tensor:
        g = torch.autograd.grad(self.loss(sample), self.obj.params, allow_unused=True)
        return flatten([t.detach() if t is not None else None for t in g], like=self.obj.params)

    def _vmap_grads(self, batch, n: int) -> torch.Tensor:
        """``[n, size]`` per-sample gradients of the raw loss by ``vmap(grad(...))``.

        The batch's tensors are found and put back by the package's own traversal
        (:func:`~hessianflow.curvature.batches.tensor_leaves`), which sees into every mapping (a ``UserDict``
        too), so every tensor with the batch's leading dimension is split into samples."""
        leaves = tensor_leaves(batch)
        idx = [i for i, t in enumerate(leaves) if t.dim() > 0 and t.shape[0] == n]
        if not idx:
            raise ValueError("no batched tensor for vmap")

        def loss(ps, *sliced):
            current = list(leaves)
            for i, t in zip(idx, sliced):
                current[i] = t.unsqueeze(0)
            return self._functional_loss(with_tensor_leaves(batch, current))(ps)

        detached = tuple(p.detach() for p in self.obj.params)
        per_sample = torch.func.vmap(torch.func.grad(loss), in_dims=(None, *[0] * len(idx)))
        grads = per_sample(detached, *[leaves[i] for i in idx])
        return torch.cat([g.reshape(n, -1) for g in grads], dim=1)

    def _prepare_sharded(self, batch):
        """A sharded model's weighted per-sample gradients, this rank's columns of them: ``[N, local]`` over
        the ``N`` samples of every rank's piece.

        A backward through the gathered parameters sums every rank's loss, so the samples are differentiated
        one at a time across the ranks: at the step of rank ``q``'s sample ``j``, rank ``q`` weights it by
        its units and every other rank weights a sample of its own by 0. Every rank then holds its slice of
        that one sample's gradient: ``N`` forward and backward passes per rank for ``N`` samples in all.
        The division by the total units is the operator's (after the all-reduce of the units).
        """
        obj, sh = self.obj, self.obj.sharding
        own = split_samples(batch) if sh.scale != 0 else []  # a rank's stand-in piece adds no samples
        weights = [obj.units(x) for x in own] if obj.reduction == "mean" else [1.0] * len(own)
        count = torch.zeros(sh.world_size, dtype=torch.float64)
        count[sh.rank] = len(own)
        counts = sh.reduce(count)  # every rank's number of samples in this piece
        stand_in = own[0] if own else split_samples(batch)[0]
        rows, piece_scale = [], sh.scale
        try:
            for q, n in enumerate(int(c) for c in counts.tolist()):
                for j in range(n):
                    mine = q == sh.rank
                    sh.scale = float(weights[j]) if mine else 0.0
                    g = torch.autograd.grad(self.loss(own[j] if mine else stand_in), obj.params, allow_unused=True)
                    rows.append(flatten(_zeros_for_none(g, obj.params), like=obj.params))
        finally:
            sh.scale = piece_scale
        return torch.stack(rows) if rows else torch.zeros(0, sum(p.numel() for p in obj.params)), 1.0

    def apply(self, state, pieces, batched, retain):
        G, scale = state
        sh = self.obj.sharding
        # G v sums over the entries: this rank's part, then (sharded) the sum over the ranks
        gv = (lambda t: t) if sh is None else sh.reduce
        if batched:
            V = flatten_batched(pieces, pieces[0].shape[0])  # [size, k]
            return unflatten((G.T @ gv(G @ V)) * scale, self.obj.params)
        return unflatten((G.T @ gv(G @ flatten(pieces))) * scale, self.obj.params)
