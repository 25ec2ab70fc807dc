"""
The eigenvalue history of an ABSA training run
==============================================

``train.py`` (here through its ``main``, :mod:`hessianflow.cli.train`) trains the C1 network with ABSA
(Yao et al. 2018) on a small slice of the offline synthetic data set. Every epoch it computes the top
Hessian eigenvalue of a fixed batch (``--track-eigen`` keeps measuring it once the batch is at its
largest); the batch doubles (and the learning rate with it) when that eigenvalue has halved since the
reference, or after ``--duration`` epochs. Each epoch's record goes to
``OUT_DIR/train_log.jsonl``, which is what the figure below reads. The same run from a shell::

    python train.py --name synthetic --synthetic-train 256 --synthetic-test 64 --arch c1 --epochs 4 \\
        --batch-size 32 --large-ratio 4 --duration 1 --lr 0.02 --track-eigen --hessian-batch-size 32 \\
        --no-progress --out-dir runs/history --save runs/history/model_param.pkl
"""

# %%
# Train for four epochs
# ---------------------
import json
import tempfile
from pathlib import Path

from hessianflow.cli import train
from hessianflow.plotting import plot_eigen_history

out = Path(tempfile.mkdtemp(prefix="hessianflow-gallery-"))
argv = [
    "--name", "synthetic", "--synthetic-train", "256", "--synthetic-test", "64", "--arch", "c1",
    "--epochs", "4", "--batch-size", "32", "--large-ratio", "4", "--duration", "1", "--lr", "0.02", "--track-eigen",
    "--hessian-batch-size", "32", "--no-progress", "--out-dir", str(out), "--save", str(out / "model_param.pkl"),
]
metrics = train.main(train.parse_args(argv))
print({k: metrics[k] for k in ("updates", "final_test_acc", "final_batch_size", "epochs")})

# %%
# The epoch log
# -------------
# One JSON record per epoch: the eigenvalue, whether its solve converged, the batch size and learning
# rate used, and the controller's decision for the next epoch.
history = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
# the epoch log calls the solve's verdict "eig_converged"; plot_eigen_history reads "converged"
history = [{**r, "converged": r["eig_converged"]} for r in history]
for r in history:
    print(f"epoch {r['epoch']}: eigenvalue {r['eigenvalue']:.4g} (converged: {r['converged']}), "
          f"batch {r['batch_size']} -> {r['next_batch_size']} ({r['decision']}), lr {r['lr']:.3g}")

# %%
# The figure
# ----------
# The top panel is the eigenvalue per epoch (a red cross marks a solve that did not converge within
# ``--eig-max-iter`` power iterations); the bottom panel is the batch-size and learning-rate schedule
# that ABSA chose from it.
_, history_figure = plot_eigen_history(
    history, out / "eigen_history.png", title="C1 on synthetic data: top Hessian eigenvalue under ABSA",
    return_fig=True,
)
