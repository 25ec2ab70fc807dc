"""Models studied by HessianFlow: the small CNNs C1 and C2, and the CIFAR ResNet.

nn.Modules only, no training code. Build one by name with :func:`get_model`::

    from hessianflow.training.models import get_model
    net = get_model("ResNet", depth=20, num_classes=10)             # CIFAR-10
    net = get_model("c1", num_classes=10, in_channels=1, input_size=28)   # MNIST

Each model keeps its constructor arguments in ``model.config`` (a dict with ``arch``), which is what a
checkpoint needs to rebuild it. Parameter and buffer names are those of HessianFlow's models (``conv1``,
``bn1``, ``fc1``, ..., ``layer1.0.downsample.0``), so that its checkpoints load as they are; HessianFlow's
constructor names ``c1_model``, ``c2_model`` and ``resnet`` are here too.
"""

from __future__ import annotations

from torch import nn

from .cnn import C1, C2, c1_model, c2_model
from .resnet import BasicBlock, ResNet, resnet, resnet_num_blocks

__all__ = [
    "ARCHS",
    "C1",
    "C2",
    "BasicBlock",
    "ResNet",
    "c1_model",
    "c2_model",
    "canonical_arch",
    "count_parameters",
    "get_model",
    "resnet",
    "resnet_num_blocks",
]

#: Canonical architecture names, as stored in checkpoints.
ARCHS = ("c1", "c2", "ResNet")

_BY_LOWER = {name.lower(): name for name in ARCHS}


def canonical_arch(name: str) -> str:
    """Return the canonical spelling of an architecture name (``"resnet"`` -> ``"ResNet"``).

    Raises:
        ValueError: for an unknown name; the message lists the valid ones.
    """
    if not isinstance(name, str) or name.strip().lower() not in _BY_LOWER:
        raise ValueError(f"unknown architecture {name!r}; valid names (case-insensitive): {', '.join(ARCHS)}")
    return _BY_LOWER[name.strip().lower()]


def get_model(arch: str, depth: int = 20, num_classes: int = 10, in_channels: int = 3, input_size=32) -> nn.Module:
    """Build a model by name (case-insensitive).

    Args:
        arch: ``"c1"``, ``"c2"`` or ``"ResNet"`` in any case.
        depth: ResNet depth, ``6n + 2`` (20, 32, 44, 56, 110, ...); ignored by C1 and C2. The default 20
            is the smallest network of He et al. (2016, table 6).
        num_classes: number of output logits.
        in_channels: input channels (3 for CIFAR/SVHN, 1 for MNIST).
        input_size: input height/width, an int or ``(height, width)`` (32 for CIFAR/SVHN, 28 for MNIST).

    Raises:
        ValueError: for an unknown architecture or an invalid ResNet depth.

    Example:
        >>> import torch
        >>> net = get_model("resnet", depth=8, num_classes=10, in_channels=1, input_size=16)
        >>> net.config["arch"], tuple(net(torch.zeros(2, 1, 16, 16)).shape)
        ('ResNet', (2, 10))
    """
    name = canonical_arch(arch)
    if name == "ResNet":
        return ResNet(depth=depth, num_classes=num_classes, in_channels=in_channels, input_size=input_size)
    cls = C1 if name == "c1" else C2
    return cls(num_classes=num_classes, in_channels=in_channels, input_size=input_size)


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of scalar parameters in ``model`` (optionally only those with ``requires_grad``).

    Example:
        >>> count_parameters(get_model("c1")), count_parameters(get_model("ResNet", depth=20))
        (1756682, 272474)
    """
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)
