"""HessianFlow's ``models.c1`` (``from models.c1 import *``): :mod:`hessianflow.training.models.cnn`."""

from hessianflow.training.models.cnn import C1, C2, c1_model, c2_model  # noqa: F401

__all__ = ["c1_model", "c2_model"]
