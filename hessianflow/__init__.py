"""hessianflow: Hessian-based analysis of neural networks, and ABSA training.

The top level holds what a notebook reaches for; everything else is importable from its subpackage:

- :mod:`hessianflow.curvature`: the objective (which loss, of which data, averaged over which units),
  the curvature operators and their products, per-layer analysis, loss landscapes, approximation audits;
- :mod:`hessianflow.linalg`: operators, eigenvalues, traces, diagonals, densities, linear solves;
- :mod:`hessianflow.training`: the ABSA controller, the training loops, adversarial examples, tracking,
  the scripts' data sets and models;
- :mod:`hessianflow.io`: checkpoints and history files; :mod:`hessianflow.plotting`;
  :mod:`hessianflow.distributed`; :mod:`hessianflow.compat` (HessianFlow's own names); :mod:`hessianflow.cli`.
"""

from ._version import __version__
from .compat import (
    get_eigen,
    get_eigen_full_dataset,
    get_params_grad,
    group_add,
    group_product,
    hessian_vector_product,
    normalization,
)
from .curvature import EmpiricalFisherOperator, GGNOperator, HessianOperator, Objective, exact_hessian
from .curvature.analysis import loss_landscape, per_layer
from .curvature.compare import compare_curvatures
from .curvature.losses import OutputLoss, causal_lm_loss, seq2seq_loss, sequence_classification_loss
from .linalg.density import DensityResult, spectral_density
from .linalg.diagonal import DiagonalResult, diagonal
from .linalg.eigen import ConvergenceWarning, EigenResult, lanczos, power_iteration
from .linalg.linop import LinearOperator, NonFiniteError
from .linalg.solve import SolveResult, solve
from .linalg.trace import TraceResult, trace
from .plotting import plot_density
from .training.absa import ABSAController
from .training.loop import evaluate, train_epoch
from .training.tracking import EigenTracker, top_eigenvalue

__all__ = [
    "__version__",
    # the objective and the curvature operators
    "Objective",
    "HessianOperator",
    "GGNOperator",
    "EmpiricalFisherOperator",
    "exact_hessian",
    "LinearOperator",
    "NonFiniteError",
    # losses of models' outputs (loss_fn=)
    "OutputLoss",
    "causal_lm_loss",
    "seq2seq_loss",
    "sequence_classification_loss",
    # solvers and their results
    "lanczos",
    "power_iteration",
    "EigenResult",
    "ConvergenceWarning",
    "trace",
    "TraceResult",
    "spectral_density",
    "DensityResult",
    "diagonal",
    "DiagonalResult",
    "solve",
    "SolveResult",
    # analysis
    "top_eigenvalue",
    "per_layer",
    "loss_landscape",
    "compare_curvatures",
    "plot_density",
    # training
    "ABSAController",
    "train_epoch",
    "evaluate",
    "EigenTracker",
    # the historical HessianFlow API
    "get_eigen",
    "get_eigen_full_dataset",
    "group_product",
    "group_add",
    "normalization",
    "get_params_grad",
    "hessian_vector_product",
]
