"""Quickstart: the Hessian of a small network, in a few seconds on a CPU.

Trains a small MLP on the offline synthetic data set (8x8 grey images, 4 classes), then computes the top
Hessian eigenvalues with Lanczos (and checks them against the dense Hessian, which is small enough
here), the trace, the spectral density, the per-layer curvature and the loss along the top eigenvector.
Usage::

    python examples/quickstart.py              # figures into a new temporary directory
    python examples/quickstart.py figures/     # figures into figures/

For a trained checkpoint of c1, c2 or a ResNet, hessian_eig_driver.py does all of this from the command
line.
"""

from __future__ import annotations

import os
import sys
import tempfile
from collections import OrderedDict

import torch
from torch import nn

# the data layer (utils.py) lives next to the scripts, one directory up
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from hessianflow.curvature import HessianOperator, exact_hessian  # noqa: E402
from hessianflow.curvature.analysis import loss_landscape, per_layer  # noqa: E402
from hessianflow.linalg.density import spectral_density  # noqa: E402
from hessianflow.linalg.eigen import lanczos  # noqa: E402
from hessianflow.linalg.trace import trace  # noqa: E402
from hessianflow.plotting import plot_density, plot_landscape_1d, plot_per_layer  # noqa: E402
from hessianflow.training.data import make_synthetic  # noqa: E402


def main(out_dir: str) -> dict:
    os.makedirs(out_dir, exist_ok=True)
    torch.manual_seed(0)

    # -- a small model, trained for a moment (float64: the dense check below is then exact to ~1e-12)
    data = make_synthetic(num_train=512, num_test=64, num_classes=4, image_size=8, channels=1, seed=0)
    x = ((data["train_images"] - 0.5) / 0.25).double()  # [512, 1, 8, 8]
    y = data["train_targets"]
    model = nn.Sequential(
        OrderedDict(flatten=nn.Flatten(), fc1=nn.Linear(64, 16), act=nn.Tanh(), fc2=nn.Linear(16, 4))
    ).double()
    criterion = nn.CrossEntropyLoss()
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    for _ in range(150):
        opt.zero_grad()
        criterion(model(x), y).backward()
        opt.step()
    model.zero_grad(set_to_none=True)
    with torch.no_grad():
        loss = float(criterion(model(x), y))
        acc = float((model(x).argmax(1) == y).double().mean())
    n = sum(p.numel() for p in model.parameters())
    print(f"model: MLP 64-16-4, {n} parameters; training loss {loss:.4f}, accuracy {acc:.3f}")

    # -- the Hessian as an operator: products only, never the matrix
    H = HessianOperator(model, criterion, data=(x, y))
    eig = lanczos(H, k=3, tol=1e-10, seed=0)  # tol bounds each eigenvalue's relative error
    values = ", ".join(f"{v:.10g}" for v in eig.eigenvalues)
    print(f"top-3 eigenvalues (lanczos, {eig.num_matvecs} products): {values}")
    print("  residuals: " + ", ".join(f"{r:.1e}" for r in eig.residuals) + f"; converged: {eig.all_converged}")

    # ... which a model this small lets us check against the dense Hessian
    dense = exact_hessian(model, criterion, data=(x, y))  # [n, n]
    exact = torch.linalg.eigvalsh(dense).flip(0)
    err = float((eig.eigenvalues - exact[:3]).abs().max())
    print(f"dense check: max |lanczos - eigvalsh| = {err:.2e}; smallest eigenvalue {float(exact[-1]):.6g}")

    # -- the trace, with a standard error
    tr = trace(H, num_matvecs=60, seed=0)
    print(
        f"trace: {tr.estimate:.8g} ± {tr.stderr:.3g} ({tr.method}, {tr.num_matvecs} products); "
        f"exact {float(dense.trace()):.10g}"
    )

    # -- the spectral density (stochastic Lanczos quadrature), on a log scale
    dens = spectral_density(H, num_runs=5, num_steps=40, seed=0)
    title = "MLP on synthetic 8x8"
    density_png = plot_density(dens, os.path.join(out_dir, "density.png"), title=f"{title}: Hessian density")

    # -- per layer: the diagonal blocks (small enough here to be formed exactly)
    layers = per_layer(model, criterion, data=(x, y))
    print(f"{'layer':<6} {'params':>6} {'top eigenvalue':>15} {'trace':>12}")
    for r in layers:
        print(f"{r.name:<6} {r.size:>6} {r.eigenvalue:>15.8g} {r.trace:>12.8g}")
    print(f"sum of the layer traces: {sum(r.trace for r in layers):.10g}")
    layers_png = plot_per_layer(
        [r.name for r in layers], [r.eigenvalue for r in layers], [r.trace for r in layers],
        os.path.join(out_dir, "per_layer.png"), title=f"{title}: curvature per layer",
    )  # fmt: skip

    # -- the loss along the top eigenvector (the parameters are not touched)
    alphas = torch.linspace(-1.0, 1.0, 41, dtype=torch.float64)
    losses = loss_landscape(model, criterion, (x, y), eig.eigenvectors[:, 0], alphas)
    landscape_png = plot_landscape_1d(
        alphas, losses, os.path.join(out_dir, "landscape.png"), title=f"{title}: loss along v1"
    )
    for path in (density_png, layers_png, landscape_png):
        print(f"figure: {path}")
    return {"eigen": eig, "trace": tr, "layers": layers, "dense_error": err}


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else tempfile.mkdtemp(prefix="hessianflow-quickstart-"))
