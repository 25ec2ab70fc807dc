"""
Eigenvalues, trace, spectral density, per-layer table and loss landscape
=========================================================================

A small MLP (64-16-4, 1,108 parameters, float64) trained for a moment on the offline synthetic data set,
then analysed with the curvature operator: the top eigenvalues by Lanczos (checked against the dense
Hessian, which is small enough here), the trace by Hutchinson's estimator, the spectral density by
stochastic Lanczos quadrature, the curvature of each layer's diagonal block, and the loss along the top
eigenvector. ``examples/quickstart.py`` is the same analysis as a script that writes the figures to a
directory.
"""

# %%
# A small model and its data
# --------------------------
import tempfile
from collections import OrderedDict
from pathlib import Path

import torch
from torch import nn

import hessianflow as hf
from hessianflow.plotting import plot_landscape_1d, plot_per_layer
from hessianflow.training.data import make_synthetic

out = Path(tempfile.mkdtemp(prefix="hessianflow-gallery-"))  # the PNG files go here
torch.manual_seed(0)
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
    print(f"{sum(p.numel() for p in model.parameters())} parameters, training loss {float(criterion(model(x), y)):.4f}")

# %%
# The top eigenvalues, against the dense Hessian
# ----------------------------------------------
# The operator computes Hessian-vector products; the matrix is never formed. ``tol`` bounds each
# eigenvalue's relative error (see :doc:`/concepts/accuracy`).
H = hf.HessianOperator(model, criterion, data=(x, y))
eig = hf.lanczos(H, k=3, tol=1e-10, seed=0)
print("top-3:", [f"{v:.10g}" for v in eig.eigenvalues.tolist()], f"({eig.num_matvecs} products)")
print("status:", eig.status, "| converged:", eig.all_converged)

dense = hf.exact_hessian(model, criterion, data=(x, y))  # [1108, 1108]: only because the model is tiny
exact = torch.linalg.eigvalsh(dense).flip(0)
print(f"max |lanczos - eigvalsh| = {float((eig.eigenvalues - exact[:3]).abs().max()):.2e}")

# %%
# The trace, with a standard error
# --------------------------------
tr = hf.trace(H, num_matvecs=60, seed=0)
print(f"trace {tr.estimate:.6g} ± {tr.stderr:.2g} ({tr.method}, {tr.num_matvecs} products)")
print(f"exact trace {float(dense.trace()):.6g}")

# %%
# The spectral density
# --------------------
# Stochastic Lanczos quadrature (Lin et al. 2016; Ghorbani et al. 2019): 5 random start vectors, 40
# Lanczos steps each, smoothed with Gaussians and drawn on a log axis.
dens = hf.spectral_density(H, num_runs=5, num_steps=40, seed=0)
_, density_figure = hf.plot_density(dens, out / "density.png", title="MLP on synthetic 8x8: Hessian density",
                                    return_fig=True)

# %%
# Curvature per layer
# -------------------
# The diagonal block of each layer: its top eigenvalue and its trace (exact here: the blocks are small).
# By Cauchy interlacing no block's top eigenvalue exceeds the whole Hessian's.
layers = hf.per_layer(model, criterion, data=(x, y))
print(f"{'layer':<6} {'params':>6} {'top eigenvalue':>15} {'trace':>12}")
for r in layers:
    print(f"{r.name:<6} {r.size:>6} {r.eigenvalue:>15.8g} {r.trace:>12.8g}")
_, per_layer_figure = plot_per_layer(
    [r.name for r in layers], [r.eigenvalue for r in layers], [r.trace for r in layers],
    out / "per_layer.png", title="MLP on synthetic 8x8: curvature per layer", return_fig=True,
)

# %%
# The loss along the top eigenvector
# ----------------------------------
# ``loss_landscape`` evaluates the loss at ``theta + alpha * v1`` without touching the parameters.
alphas = torch.linspace(-1.0, 1.0, 41, dtype=torch.float64)
losses = hf.loss_landscape(model, criterion, (x, y), eig.eigenvectors[:, 0], alphas)
_, landscape_figure = plot_landscape_1d(
    alphas, losses, out / "landscape.png", title="MLP on synthetic 8x8: loss along v1", return_fig=True
)
