"""hessianflow: Hessian-based analysis of neural networks, and ABSA training.

Curvature operators (:class:`HessianOperator`, :class:`GGNOperator`) are symmetric linear maps on the flat
parameter vector; every algorithm (:func:`power_iteration`, :func:`lanczos`, :func:`spectral_density`, the
trace estimators) takes such an operator or a dense symmetric tensor.
"""

from ._version import __version__
from .checkpoint import (
    CheckpointError,
    atomic_write,
    check_writable_dir,
    extract_state_dict,
    load_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
    versions,
    write_json,
)
from .checkpoint_format import ModelSpec, load_model, make_checkpoint, read_checkpoint
from .compat import (
    get_eigen,
    get_eigen_full_dataset,
    get_params_grad,
    group_add,
    group_product,
    hessian_vector_product,
    normalization,
)
from .curvature import EmpiricalFisherOperator, GGNOperator, HessianOperator, exact_hessian, losses, resolve_params
from .curvature.analysis import LayerResult, layer_blocks, loss_landscape, per_layer
from .curvature.attention import AttentionKernelError, product_kernels
from .curvature.batches import LossSpec, move_batch
from .curvature.losses import OutputLoss, causal_lm_loss, seq2seq_loss, sequence_classification_loss
from .density import DensityResult, spectral_density
from .distributed import DistContext, broadcast_buffers, init_distributed, is_distributed, shard
from .eigen import ConvergenceWarning, EigenResult, lanczos, power_iteration
from .hvp import double_backprop_hvp, flatten, forward_over_reverse_hvp, unflatten
from .linop import DenseOperator, LinearOperator, NonFiniteError, as_operator
from .plotting import (
    plot_density,
    plot_eigen_history,
    plot_landscape_1d,
    plot_landscape_2d,
    plot_per_layer,
    plot_topk,
)
from .trace import TraceResult, hutchinson_trace, hutchpp_trace, trace, xtrace
from .training.absa import ABSAController, Decision
from .training.adversarial import fgsm, normalized_bounds, pgd, pixel_eps
from .training.loop import evaluate, set_lr, train_epoch
from .training.tracking import EigenTracker, load_history, top_eigenvalue

__all__ = [
    "__version__",
    # operators
    "LinearOperator",
    "DenseOperator",
    "as_operator",
    "HessianOperator",
    "GGNOperator",
    "EmpiricalFisherOperator",
    "product_kernels",
    "AttentionKernelError",
    "exact_hessian",
    "resolve_params",
    "NonFiniteError",
    # losses and batches (loss_fn= helpers, the loss forms, moving batches)
    "losses",
    "OutputLoss",
    "causal_lm_loss",
    "seq2seq_loss",
    "sequence_classification_loss",
    "LossSpec",
    "move_batch",
    # Hessian-vector products and flat vectors
    "double_backprop_hvp",
    "forward_over_reverse_hvp",
    "flatten",
    "unflatten",
    # spectra
    "EigenResult",
    "ConvergenceWarning",
    "power_iteration",
    "lanczos",
    "DensityResult",
    "spectral_density",
    # traces
    "TraceResult",
    "trace",
    "hutchinson_trace",
    "hutchpp_trace",
    "xtrace",
    # per-layer analysis and landscapes
    "LayerResult",
    "layer_blocks",
    "per_layer",
    "loss_landscape",
    # tracking during training
    "EigenTracker",
    "top_eigenvalue",
    "load_history",
    # adversarial examples
    "fgsm",
    "pgd",
    "pixel_eps",
    "normalized_bounds",
    # ABSA
    "ABSAController",
    "Decision",
    "train_epoch",
    "evaluate",
    "set_lr",
    # checkpoints
    "CheckpointError",
    "save_checkpoint",
    "load_checkpoint",
    "extract_state_dict",
    "check_writable_dir",
    "rng_state",
    "set_rng_state",
    "versions",
    "atomic_write",
    "write_json",
    # the checkpoint format of the scripts (rebuild the model of any checkpoint)
    "ModelSpec",
    "make_checkpoint",
    "read_checkpoint",
    "load_model",
    # torch.distributed (torchrun)
    "DistContext",
    "init_distributed",
    "is_distributed",
    "shard",
    "broadcast_buffers",
    # plots (matplotlib imported on first use)
    "plot_density",
    "plot_eigen_history",
    "plot_topk",
    "plot_landscape_1d",
    "plot_landscape_2d",
    "plot_per_layer",
    # the historical HessianFlow API
    "get_eigen",
    "get_eigen_full_dataset",
    "group_product",
    "group_add",
    "normalization",
    "get_params_grad",
    "hessian_vector_product",
]
