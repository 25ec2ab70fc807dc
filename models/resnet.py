"""HessianFlow's ``models.resnet`` (``from models.resnet import *``): :mod:`hessianflow.training.models.resnet`."""

from hessianflow.training.models.resnet import ResNet, resnet  # noqa: F401

__all__ = ["resnet"]
