"""hessianflow: Hessian-based analysis of neural networks, and ABSA training."""

from ._version import __version__
from .linop import DenseOperator, LinearOperator, NonFiniteError, as_operator

__all__ = [
    "__version__",
    # operators
    "LinearOperator",
    "DenseOperator",
    "NonFiniteError",
    "as_operator",
]
