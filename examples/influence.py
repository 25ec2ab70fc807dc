"""Influence functions (Koh & Liang 2017) with hf.solve: which training points move a test loss most.

The influence of up-weighting a training point z on the loss of a test point is

    I(z, z_test) = -grad L(z_test)^T (H + damping I)^{-1} grad L(z),

H the Hessian of the mean training loss. One solve gives s = (H + damping I)^{-1} grad L(z_test) (MINRES:
the Hessian of a trained network need not be positive definite), and then every training point's score
is a dot product with its own gradient. The Hessian is small here, so the script also solves the system
densely (torch.func.hessian and torch.linalg.solve, independent of hessianflow) and prints both.
Usage::

    python examples/influence.py

Runs in a few seconds on a CPU.
"""

from __future__ import annotations

import os
import sys

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from hessianflow import HessianOperator  # noqa: E402
from hessianflow.linalg.solve import solve  # noqa: E402

DAMPING = 1e-2  # keeps (H + damping I) well conditioned (Koh & Liang use a damping term too)


def make_problem(seed: int = 0):
    """A small MLP trained on a 3-class toy problem, in float64."""
    g = torch.Generator().manual_seed(seed)
    centres = 2.0 * torch.randn(3, 4, generator=g, dtype=torch.float64)
    y = torch.arange(60) % 3
    x = centres[y] + torch.randn(60, 4, generator=g, dtype=torch.float64)
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3)).double()
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    for _ in range(200):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    x_test = centres[1] + 0.5 * (centres[2] - centres[1])  # between two classes: a contested point
    return model, x, y, x_test[None], torch.tensor([1])


def per_sample_gradients(model, x, y) -> torch.Tensor:
    """``[n, p]`` gradients of each sample's loss (torch.func.vmap over torch.func.grad)."""
    params = {k: v.detach() for k, v in model.named_parameters()}

    def loss(ps, xi, yi):
        return nn.functional.cross_entropy(torch.func.functional_call(model, ps, (xi[None],)), yi[None])

    grads = torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0, 0))(params, x, y)
    return torch.cat([g.reshape(x.shape[0], -1) for g in grads.values()], dim=1)


def dense_hessian(model, x, y) -> torch.Tensor:
    """The training loss's Hessian by torch.func.hessian, for the check."""
    names = [k for k, _ in model.named_parameters()]
    shapes = [p.shape for _, p in model.named_parameters()]
    theta = torch.cat([p.detach().reshape(-1) for _, p in model.named_parameters()])

    def f(flat):
        ps, i = {}, 0
        for k, s in zip(names, shapes):
            ps[k] = flat[i : i + s.numel()].view(s)
            i += s.numel()
        return nn.functional.cross_entropy(torch.func.functional_call(model, ps, (x,)), y)

    return torch.func.hessian(f)(theta)


def main() -> dict:
    model, x, y, x_test, y_test = make_problem()
    H = HessianOperator(model, nn.CrossEntropyLoss(), data=(x, y))
    g_test = per_sample_gradients(model, x_test, y_test)[0]
    res = solve(H, g_test, damping=DAMPING, method="minres", tol=1e-10)
    G = per_sample_gradients(model, x, y)  # [60, p]
    scores = -(G @ res.x)  # [60] influence of each training point on the test loss

    Hd = dense_hessian(model, x, y)
    s_dense = torch.linalg.solve(Hd + DAMPING * torch.eye(H.size, dtype=torch.float64), g_test)
    dense = -(G @ s_dense)
    err = float((scores - dense).abs().max() / dense.abs().max())
    eig = torch.linalg.eigvalsh(Hd)

    print(f"model: {H.size} parameters; Hessian eigenvalues in [{eig[0]:.3g}, {eig[-1]:.3g}]")
    print(
        f"solve (minres, damping {DAMPING:g}): converged {res.converged}, relative residual {res.residual:.2e}, "
        f"{res.num_matvecs} products"
    )
    print(f"max |influence - dense| / max |dense| = {err:.2e}")
    print("most influential training points (a positive score raises the test loss when up-weighted):")
    print(f"{'index':>5} {'influence':>14} {'dense solve':>14}")
    order = scores.abs().argsort(descending=True)
    for i in order[:8].tolist():
        print(f"{i:>5} {scores[i].item():>14.6e} {dense[i].item():>14.6e}")
    return {"scores": scores, "dense": dense, "relative_error": err, "solve": res.to_dict()}


if __name__ == "__main__":
    main()
