"""The curvature operators' former import path: they live in :mod:`hessianflow.curvature` now."""

from .curvature.operators import CurvatureOperator, EmpiricalFisherOperator, GGNOperator, HessianOperator, exact_hessian
from .curvature.params import resolve_params, unwrap_model

__all__ = [
    "CurvatureOperator",
    "HessianOperator",
    "GGNOperator",
    "EmpiricalFisherOperator",
    "exact_hessian",
    "resolve_params",
    "unwrap_model",
]
