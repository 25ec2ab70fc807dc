"""The CIFAR ResNet of He, Zhang, Ren and Sun, "Deep Residual Learning for Image Recognition"
(CVPR 2016, arXiv:1512.03385), section 4.2.

A 3x3 convolution with 16 channels, three stages of ``n`` basic blocks with 16, 32 and 64 channels
(the first block of stages 2 and 3 has stride 2), global average pooling and one fully connected layer:
``6n + 2`` weighted layers, so depths 20, 32, 44, 56, 110, ... Shortcuts are identities, except where
the shape changes, where they are 1x1 convolution + batch norm projections (the paper's option B).

Unlike HessianFlow, which switches to bottleneck blocks (with a block count that does not give the
stated depth) from depth 44 on, this implementation uses basic blocks at every depth, as the paper does.
ResNet-20 on CIFAR-10 has 272,474 parameters.
"""

from __future__ import annotations

import torch
from torch import nn

from ..._checks import check_int, is_int
from .cnn import pair

__all__ = ["BasicBlock", "ResNet", "resnet", "resnet_num_blocks"]


def resnet_num_blocks(depth) -> int:
    """Return ``n``, the number of basic blocks per stage, for a CIFAR ResNet of the given depth.

    Raises:
        ValueError: unless ``depth = 6n + 2`` with ``n >= 1`` (20, 32, 44, 56, 110, ...).

    Example:
        >>> resnet_num_blocks(20), resnet_num_blocks(110)
        (3, 18)
    """
    if not is_int(depth) or depth < 8 or (depth - 2) % 6 != 0:
        raise ValueError(
            f"ResNet depth must be of the form 6n+2 with n >= 1 (8, 14, 20, 32, 44, 56, 110, ...), got {depth!r}"
        )
    return (int(depth) - 2) // 6


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with batch norm, plus a shortcut: ``relu(bn(conv(relu(bn(conv(x))))) + s(x))``.

    ``s`` is the identity when the shape is kept and a 1x1 convolution + batch norm projection otherwise.
    """

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU()
        # HessianFlow's name (``downsample``, None for an identity shortcut): its checkpoints load as they are
        self.downsample = None
        if stride != 1 or in_planes != planes:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_planes, planes, kernel_size=1, stride=stride, bias=False),
                nn.BatchNorm2d(planes),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + (x if self.downsample is None else self.downsample(x)))


class ResNet(nn.Module):
    """CIFAR ResNet-(6n+2) with basic blocks and projection shortcuts (He et al., 2016, section 4.2).

    Convolutions have no bias (batch norm follows each of them) and use He (Kaiming) normal
    initialisation, as in the paper; batch norm starts at weight 1, bias 0.

    Args:
        depth: ``6n + 2`` for some ``n >= 1``: 20, 32, 44, 56, 110, ...
        num_classes: number of output logits.
        in_channels: channels of the input images.
        input_size: spatial size of the inputs; only validated, since global average pooling makes the
            network independent of it.

    Raises:
        ValueError: for a depth that is not ``6n + 2``.
    """

    def __init__(self, depth: int = 20, num_classes: int = 10, in_channels: int = 3, input_size=32):
        super().__init__()
        n = resnet_num_blocks(depth)
        num_classes = check_int("num_classes", num_classes, minimum=1)
        in_channels = check_int("in_channels", in_channels, minimum=1)
        pair(input_size)
        depth = int(depth)
        self.depth = depth
        self.config = {
            "arch": "ResNet",
            "depth": depth,
            "num_classes": num_classes,
            "in_channels": in_channels,
            "input_size": input_size,
        }
        self.conv1 = nn.Conv2d(in_channels, 16, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.relu = nn.ReLU()
        stages = []
        in_planes = 16
        for planes, stride in ((16, 1), (32, 2), (64, 2)):
            blocks = []
            for i in range(n):
                blocks.append(BasicBlock(in_planes, planes, stride if i == 0 else 1))
                in_planes = planes
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = stages
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(64, num_classes)

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.layer3(self.layer2(self.layer1(out)))
        return self.fc(torch.flatten(self.avgpool(out), 1))


def resnet(depth: int = 20, num_classes: int = 10) -> ResNet:
    """HessianFlow's constructor name (``from models.resnet import *``; ``resnet(depth=20)``).

    HessianFlow switched to bottleneck blocks from depth 44 on; this ResNet has basic blocks at every
    depth, so HessianFlow checkpoints of depth 44 and more do not fit it (the loader names the keys).
    """
    return ResNet(depth=depth, num_classes=num_classes)
