"""What matrix, and how its products are computed: the objective, the products, their combination over
the pieces of the data, parameter selection, and the operators built from them."""

from .objective import Objective
from .operators import CurvatureOperator, EmpiricalFisherOperator, GGNOperator, HessianOperator, exact_hessian
from .params import resolve_params, unwrap_model

__all__ = [
    "Objective",
    "CurvatureOperator",
    "HessianOperator",
    "GGNOperator",
    "EmpiricalFisherOperator",
    "exact_hessian",
    "resolve_params",
    "unwrap_model",
]
