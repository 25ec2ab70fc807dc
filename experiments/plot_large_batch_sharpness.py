"""
Large-batch training ends at sharper points (tiny settings)
===========================================================

``experiments/large_batch_sharpness.py`` (Yao et al., NeurIPS 2018, after Keskar et al. 2017) trains the
same model from the same initialisation with a small and a large batch, then computes the top
eigenvalue of the Hessian of the mean loss over the whole training set. Here on 128 digits, two seeds
and two epochs, so the page shows what the experiment writes; the finding at the default settings is in
:doc:`/howto/papers`. The same run from a shell::

    python experiments/large_batch_sharpness.py --num-train 128 --small-batch 16 --large-batch 64 --max-epochs 2 \\
        --seeds 0 1 --track-samples 32 --eval-batch 64 --eig-tol 1e-3 --out-dir runs/sharpness_tiny
"""

# %%
# Train both regimes for each seed
# --------------------------------
import shlex
import tempfile

import large_batch_sharpness  # the script beside this one (its directory is on sys.path when run or built)
import matplotlib.pyplot as plt

flags = "--num-train 128 --small-batch 16 --large-batch 64 --max-epochs 2 --seeds 0 1 --track-samples 32"
argv = [*shlex.split(flags), "--eval-batch", "64", "--eig-tol", "1e-3"]
argv += ["--out-dir", tempfile.mkdtemp(prefix="hessianflow-gallery-")]
out = large_batch_sharpness.main(large_batch_sharpness.parse_args(argv))

# %%
# The summary
# -----------
s = out["summary"]
print(f"large/small top eigenvalue per seed: {[round(q, 3) for q in s['ratios']]}; "
      f"mean {s['ratio_mean']:.3f} ± {s['ratio_std']:.3f}")

# %%
# The figure the experiment wrote
# -------------------------------
# Left: the eigenvalue of a fixed 32-sample subset after every epoch (first seed); right: the final
# whole-training-set eigenvalue per seed and regime.
fig, ax = plt.subplots(figsize=(11, 4.2))
ax.imshow(plt.imread(out["png"]))
ax.set_axis_off()
