"""HessianFlow's ``models.resnet`` (``from models.resnet import *``): :mod:`hessianflow.models.resnet`."""

from hessianflow.models.resnet import ResNet, resnet  # noqa: F401

__all__ = ["resnet"]
