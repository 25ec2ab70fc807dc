"""
ABSA against fixed small and large batches (tiny settings)
==========================================================

``experiments/absa_vs_baseline.py`` (Yao et al., arXiv:1810.01021) trains the same ResNet-8 three times
on scikit-learn's bundled digits through ``train.py``: a fixed small batch, a fixed large batch, and ABSA,
which grows the batch from the small to the large one as the top Hessian eigenvalue falls. Here each run
has two epochs and ``--target-acc 0`` (the updates to reach any accuracy: one epoch's), so the page shows
what the experiment writes, not its finding; the finding, at the default settings, is in
:doc:`/howto/papers`. The same run from a shell::

    python experiments/absa_vs_baseline.py --epochs 2 --large-ratio 4 --duration 1 --hessian-batch-size 32 \\
        --eval-batch 64 --final-num-batches 1 --target-acc 0.0 --out-dir runs/absa_tiny
"""

# %%
# The three runs and the driver on each final checkpoint
# ------------------------------------------------------
import shlex
import tempfile

import absa_vs_baseline  # the script beside this one (its directory is on sys.path when run or built)
import matplotlib.pyplot as plt

flags = "--epochs 2 --large-ratio 4 --duration 1 --hessian-batch-size 32 --eval-batch 64 --final-num-batches 1"
argv = [*shlex.split(flags), "--target-acc", "0.0", "--out-dir", tempfile.mkdtemp(prefix="hessianflow-gallery-")]
out = absa_vs_baseline.main(absa_vs_baseline.parse_args(argv))

# %%
# The table
# ---------
# Optimizer updates to the target accuracy, the final batch size and the final top eigenvalue of each run.
for run, row in out["table"].items():
    print(f"{run:6s} updates to target {row['updates_to_target']}, final batch {row['final_batch_size']}, "
          f"final top eigenvalue {row['final_top_eigenvalue']:.4g}")
changes = [(c["after_epoch"], c["from"], c["to"], c["rule"]) for c in out["runs"]["absa"]["schedule"]]
print("ABSA's batch changes (after epoch, from, to, rule):", changes)

# %%
# The figure the experiment wrote
# -------------------------------
# Test accuracy against updates; the batch size per epoch with the rule of each change; the eigenvalue checks.
fig, ax = plt.subplots(figsize=(15, 4.2))
ax.imshow(plt.imread(out["png"]))
ax.set_axis_off()
