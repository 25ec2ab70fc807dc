"""
How far are the GGN, the empirical Fisher and a block-diagonal Hessian from the Hessian?
=========================================================================================

:func:`hessianflow.compare_curvatures` builds each approximation on the same model, loss and data, and
reports its top-``k`` eigenvalues against the Hessian's, the overlap of the top eigenspaces, the trace
ratio and the Wasserstein-1 distance between the spectral densities (what each column means:
:doc:`/compare_curvatures`). :func:`hessianflow.curvature.compare.plot_comparison` draws the top
eigenvalues and the densities side by side. Here on a small MLP (float64) trained on the offline
synthetic data set.
"""

# %%
# A small model, trained for a moment
# -----------------------------------
import tempfile
from pathlib import Path

import matplotlib.pyplot as plt
import torch
from torch import nn

import hessianflow as hf
from hessianflow.curvature.compare import plot_comparison
from hessianflow.training.data import make_synthetic

torch.manual_seed(0)
data = make_synthetic(num_train=256, num_test=16, num_classes=4, image_size=8, channels=1, seed=0)
x = ((data["train_images"] - 0.5) / 0.25).double().flatten(1)  # [256, 64]
y = data["train_targets"]
model = nn.Sequential(nn.Linear(64, 16), nn.Tanh(), nn.Linear(16, 4)).double()
criterion = nn.CrossEntropyLoss()
opt = torch.optim.Adam(model.parameters(), lr=0.01)
for _ in range(100):
    opt.zero_grad()
    criterion(model(x), y).backward()
    opt.step()
model.zero_grad(set_to_none=True)

# %%
# The audit
# ---------
# One seed for every random vector, so every kind sees the same start vectors.
res = hf.compare_curvatures(model, criterion, data=(x, y), k=3, seed=0, trace_matvecs=40, num_runs=3)
print(res.table())

# %%
# The figure
# ----------
# ``plot_comparison`` writes a PNG; shown here as written.
png = plot_comparison(res, Path(tempfile.mkdtemp(prefix="hessianflow-gallery-")) / "compare.png",
                      title="MLP on synthetic 8x8: approximations of the Hessian")
fig, ax = plt.subplots(figsize=(10, 4.5))
ax.imshow(plt.imread(png))
ax.set_axis_off()
