"""
The Hessian spectrum of a GPT-2-style language model
====================================================

``examples/transformer_spectrum.py`` on a tiny HuggingFace ``GPT2LMHeadModel`` (2 blocks, width 32,
random weights: nothing is downloaded) and byte-level tokens of this project's README (token id = byte
value, no tokenizer). It prints the top eigenvalues (Lanczos), the trace, a table of each block's
diagonal Hessian block, and writes the spectral density. The loss is the next-token cross-entropy
:func:`hessianflow.causal_lm_loss`; products run through the model's default ``sdpa`` attention, for
which hessianflow selects the math kernel (the only one with a double backward). The same run from a
shell::

    python examples/transformer_spectrum.py --text README.md --seq-len 32 --batch-size 4 --trace-matvecs 30 \\
        --density-runs 2 --density-steps 30 --tol 1e-4

``--tol 1e-4`` because the model is float32: the products' rounding limits each eigenvalue to a few
``1e-5`` relative here, so the script's default ``1e-6`` would end with ``converged=False`` and a warning
saying the accuracy reached (see :doc:`/concepts/accuracy`).
"""

# %%
# Run the example's ``main`` with its own parser
# ----------------------------------------------
import shlex
import tempfile
from pathlib import Path

import matplotlib.pyplot as plt
import transformer_spectrum  # the script beside this one (its directory is on sys.path when run or built)

readme = Path(transformer_spectrum.__file__).parents[1] / "README.md"
out_dir = tempfile.mkdtemp(prefix="hessianflow-gallery-")
flags = "--seq-len 32 --batch-size 4 --trace-matvecs 30 --density-runs 2 --density-steps 30 --tol 1e-4"
argv = ["--text", str(readme), *shlex.split(flags), "--out", out_dir]
result = transformer_spectrum.main(transformer_spectrum.build_parser().parse_args(argv))

# %%
# The density it wrote
# --------------------
# Stochastic Lanczos quadrature (Ghorbani et al. 2019): the PNG the script wrote, shown as is.
fig, ax = plt.subplots(figsize=(7, 4.5))
ax.imshow(plt.imread(result["density_png"]))
ax.set_axis_off()
