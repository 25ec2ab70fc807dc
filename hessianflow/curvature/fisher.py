"""The sampled (Monte Carlo) Fisher: the GGN with the output Hessian replaced by sampled score outer products.

For a loss that is the negative log-likelihood of a predictive distribution :math:`q(y \\mid f)` of the
model's output :math:`f`, the output Hessian is the Fisher of that distribution,
:math:`H_{\\mathrm{out}} = \\mathbb{E}_{\\tilde y \\sim q(\\cdot \\mid f)}[g g^\\top]` with
:math:`g = \\nabla_f \\ell(f, \\tilde y)`, so the GGN is the Fisher information matrix and

.. math:: F_M = \\sum_t c_t\\, J_t^\\top \\Big(\\frac1M \\sum_{m=1}^{M} g_{tm} g_{tm}^\\top\\Big) J_t,
          \\qquad \\tilde y_{tm} \\sim q(\\cdot \\mid f_t)

is an unbiased estimate of it whose error falls like :math:`1/\\sqrt{M}` (Martens & Grosse 2015 use it
in K-FAC; Kunstner, Hennig & Balles 2019 for the contrast with the empirical Fisher). :math:`t` runs over
the loss's *positions*: the samples (and any extra output dimensions: a sequence's tokens), each with
its event dimension (the classes; the last output dimension for the squared error and BCE), and
:math:`c_t` is the coefficient the loss gives the position, the same as in the exact GGN: 0 at an
ignored target, :math:`1/\\#\\text{counted}` (cross-entropy, mean) or :math:`1/\\#\\text{elements}`
(``MSELoss``/``BCEWithLogitsLoss``, mean), 1 for a sum. Splits of the data (a loader's batches,
micro-batches, ranks) are weighted by the objective's units exactly as the exact GGN's
(:mod:`~hessianflow.curvature.combine`). The families, as in curvlinops' ``FisherMCLinearOperator``:

- softmax cross-entropy: categorical, :math:`g = p - e_{\\tilde y}`;
- squared error :math:`\\sum (f - y)^2`: the negative log-likelihood of :math:`\\mathcal N(f, \\tfrac12 I)`
  up to a constant, so :math:`\\tilde y = f + z/\\sqrt2`, :math:`g = 2 (f - \\tilde y) = -\\sqrt2 z`,
  :math:`\\mathbb{E}[g g^\\top] = 2I`, the squared error's output Hessian (the *variance convention*:
  1/2, whatever the data's noise);
- BCE with logits: Bernoulli, :math:`g = \\sigma(f) - \\tilde y`, :math:`\\mathbb{E}[g^2] = \\sigma(1-\\sigma)`.

The draws are a fixed function of the seed and the data's order: uniforms are drawn on the CPU from a
generator reset at the start of every product, in sample order (sample-major), so the operator is one
fixed matrix, and a loader's batches or micro-batches of the same samples in the same order draw the
same targets as the whole batch (the same matrix, not only in expectation). A shuffled loader changes
the draws on every pass: the operator is then marked non-deterministic.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .._checks import check_int
from .batches import split_inputs_targets
from .products import GaussNewton, _softmax_ce_curvature

__all__ = ["SampledFisher", "FAMILIES"]

#: the losses with a known predictive distribution, and the distribution's name
FAMILIES = {"cross-entropy": "categorical", "MSELoss": "Gaussian", "BCEWithLogitsLoss": "Bernoulli"}


def _family(spec) -> str:
    """``"categorical"``, ``"gaussian"`` or ``"bernoulli"`` for the loss of ``spec``, or one sentence."""
    crit = spec.criterion if spec.kind == "criterion" else None
    if crit is not None and type(crit) is nn.CrossEntropyLoss:
        return "categorical"
    if crit is not None and type(crit) is nn.MSELoss:
        return "gaussian"
    if crit is not None and type(crit) is nn.BCEWithLogitsLoss:
        if crit.weight is None and crit.pos_weight is None:
            return "bernoulli"
    elif crit is None and getattr(spec.loss_fn, "cross_entropy", None) is not None:
        return "categorical"
    name = type(crit).__name__ if crit is not None else getattr(spec.loss_fn, "name", type(spec.loss_fn).__name__)
    raise ValueError(
        f"mc_samples= draws targets from the model's predictive distribution, which is known for a softmax "
        f"cross-entropy (nn.CrossEntropyLoss or a loss helper that declares it), nn.MSELoss and "
        f"nn.BCEWithLogitsLoss without weight or pos_weight, not for {name}: use the exact GGN (mc_samples=None)"
    )


class SampledFisher(GaussNewton):
    """:math:`J^\\top \\hat H_{\\mathrm{out}} J v` with :math:`\\hat H_{\\mathrm{out}}` the average of
    ``mc_samples`` sampled score outer products (see the module docstring); the state holds the draws.

    Args:
        objective: the :class:`~hessianflow.curvature.objective.Objective`.
        mc_samples: :math:`M`, the targets drawn per position.
        seed: the draws' seed (an int); mixed with the rank in a distributed run.

    Example (logistic regression at :math:`w = 0`, :math:`p = 1/2`: the GGN is :math:`X^\\top X / 4n`; each
    draw's score is :math:`\\pm 1/2`, so the sampled Fisher is exactly the GGN whatever the draws):
        >>> import torch
        >>> from torch import nn
        >>> from hessianflow import GGNOperator
        >>> X = torch.tensor([[1.0, 0.0], [0.0, 2.0], [1.0, 1.0]], dtype=torch.float64)
        >>> y = torch.tensor([[1.0], [0.0], [1.0]], dtype=torch.float64)
        >>> model = nn.Linear(2, 1, bias=False).double()
        >>> with torch.no_grad():
        ...     _ = model.weight.zero_()
        >>> F = GGNOperator(model, nn.BCEWithLogitsLoss(), data=(X, y), mc_samples=1, seed=0)
        >>> type(F.product).__name__, F.product.family
        ('SampledFisher', 'bernoulli')
        >>> torch.allclose(F.to_dense(), X.T @ X / 12)
        True
    """

    #: the draws of a sharded model's ranks are not yet aligned with the gathered forward (issue 20)
    sharded = False

    def __init__(self, objective, mc_samples: int, seed: int = 0, run=None):
        super().__init__(objective, run)
        self.family = _family(objective.spec)
        self.mc_samples = check_int("mc_samples", mc_samples, minimum=1)
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"seed must be an int (the draws are replayed on every pass), got {seed!r}")
        self.seed = seed
        self.restart()

    def restart(self) -> None:
        """Reset the draws' generator: called at the start of every product, so every pass over the data
        draws the same targets."""
        seed = self.seed
        if self.obj.distributed:
            seed += 1_000_003 * torch.distributed.get_rank()  # each rank's samples their own draws
        self._gen = torch.Generator(device="cpu").manual_seed(seed)

    def _uniforms(self, shape) -> torch.Tensor:
        # float64 on the CPU, row-major with the samples leading: chunks of the samples in order draw the
        # same numbers as the whole (the CPU generator fills a tensor serially)
        return torch.rand(shape, generator=self._gen, dtype=torch.float64)

    def prepare(self, batch):
        obj = self.obj
        out = obj.output(batch, self.run)
        with torch.no_grad():
            obj.spec.loss_of_output(out.detach(), batch)  # the checks (a scalar, finite) only
        draws = self._categorical(out, batch) if self.family == "categorical" else self._continuous(out, batch)
        return (out, None, draws, *self._linearisation(out))

    def _categorical(self, out, batch):
        ce = self.obj.spec.cross_entropy(out, batch)
        if ce is None:
            raise ValueError(
                "mc_samples= needs a plain softmax cross-entropy with class-index targets (no class weights, "
                "no label smoothing, no probability targets)"
            )
        p, coef, dim = _softmax_ce_curvature(out, ce)
        last = p.movedim(dim, -1)  # [*positions, C]
        M = self.mc_samples
        u = self._uniforms((*last.shape[:-1], M)).to(p.device)  # [*positions, M]
        cdf = torch.cumsum(last.double(), dim=-1)
        idx = torch.searchsorted(cdf, u).clamp_(max=last.shape[-1] - 1)  # rounding: cdf[-1] may be < u
        counts = torch.zeros(last.shape, dtype=torch.float64, device=p.device).scatter_add_(-1, idx, torch.ones_like(u))
        q = (counts / M).to(p.dtype).movedim(-1, dim)  # the draws' class frequencies, shaped like p
        return "categorical", p, q, coef, dim

    def _continuous(self, out, batch):
        _, targets = split_inputs_targets(batch)
        if not isinstance(targets, torch.Tensor) or targets.shape != out.shape:
            got = tuple(targets.shape) if isinstance(targets, torch.Tensor) else type(targets).__name__
            raise ValueError(
                f"mc_samples= with {type(self.obj.criterion).__name__} needs targets shaped like the output "
                f"{tuple(out.shape)}, got {got}"
            )
        M = self.mc_samples
        work = torch.float32 if out.dtype in (torch.float16, torch.bfloat16) else out.dtype
        f = out.detach().to(torch.float64)
        if self.family == "bernoulli":
            s = torch.sigmoid(f)
            y = (self._uniforms((*out.shape, M)).to(f.device) < s[..., None]).to(torch.float64)
            g = s[..., None] - y  # [*out, M]
        else:  # Box-Muller from two uniforms (1 - u in (0, 1]: no log of 0)
            u = self._uniforms((*out.shape, M, 2)).to(f.device)
            z = torch.sqrt(-2 * torch.log1p(-u[..., 0])) * torch.cos(2 * math.pi * u[..., 1])
            g = math.sqrt(2.0) * z  # 2 (f - y~) for y~ ~ N(f, I/2), up to the sign
        coef = 1.0 / out.numel() if self.obj.criterion.reduction == "mean" else 1.0
        G = g * math.sqrt(coef / M)  # [*out, M]
        if out.dim() < 2:  # no event dimension: each element its own position, a diagonal output Hessian
            return "diagonal", (G * G).sum(dim=-1).to(work)
        if out.shape[-1] <= M:  # the draws' second moment per position, C x C: products cost nothing in M
            return "moment", torch.einsum("...im,...jm->...ij", G, G).to(work)  # [*positions, C, C]
        return "outer", G.movedim(-1, 0).to(work)  # [M, *out]: fewer numbers than the C x C moments

    def _output_product(self, draws, jv):
        if draws[0] == "categorical":
            # sum_m g g^T u / M with g = p - e_y: p (s - q.u) - q (s - u), s = p.u, q the draws' frequencies
            _, p, q, coef, dim = draws
            u = jv.to(p.dtype)
            s = (p * u).sum(dim=dim, keepdim=True)
            h = p * (s - (q * u).sum(dim=dim, keepdim=True))
            h.sub_(q * (s - u)).mul_(coef)
            return h.to(jv.dtype)
        kind, D = draws
        u = jv.to(D.dtype)
        if kind == "diagonal":
            return (D * u).to(jv.dtype)
        if kind == "moment":
            return (D @ u.unsqueeze(-1)).squeeze(-1).to(jv.dtype)
        h = torch.zeros_like(u)
        for g in D:  # one draw at a time: a few output-sized tensors whatever M is
            h.addcmul_(g, (g * u).sum(dim=-1, keepdim=True))
        return h.to(jv.dtype)
