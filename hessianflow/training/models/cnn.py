"""The small CNNs C1 and C2 used by HessianFlow (Yao et al., 2018).

Both come from the experiments of Yao, Gholami, Lei, Keutzer and Mahoney, "Hessian-based Analysis of
Large Batch Training and Robustness to Adversaries" (NeurIPS 2018, arXiv:1806.05320) and its follow-up
on adaptive batch sizes (arXiv:1810.01021). The layer order (convolution, ReLU, *then* batch norm) is
HessianFlow's and is kept on purpose: it changes the loss landscape whose Hessian is studied.

For CIFAR-10 (3x32x32 inputs, 10 classes) C1 has 1,756,682 parameters and C2 has 1,148,746. The input
width of the first fully connected layer is computed from ``in_channels`` and ``input_size`` so that
both nets also run on MNIST-shaped (1x28x28) data.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..._checks import check_int, is_int

__all__ = ["C1", "C2", "c1_model", "c2_model", "pair"]


def pair(input_size) -> tuple[int, int]:
    """Return ``(height, width)`` from an int or a 2-sequence, validating that both are positive ints.

    Example:
        >>> pair(32), pair((28, 20))
        ((32, 32), (28, 20))
    """
    if is_int(input_size):
        hw = (int(input_size), int(input_size))
    else:
        try:
            hw = tuple(int(s) for s in input_size)
        except TypeError:
            raise ValueError(f"input_size must be an int or a (height, width) pair, got {input_size!r}") from None
        if len(hw) != 2 or any(s != t for s, t in zip(hw, input_size)):
            raise ValueError(f"input_size must be an int or a (height, width) pair, got {input_size!r}")
    if min(hw) < 1:
        raise ValueError(f"input_size must be positive, got {input_size!r}")
    return hw


def _conv_out(size: int, kernel: int, stride: int = 1, padding: int = 0) -> int:
    # The output-size formula of nn.Conv2d and nn.MaxPool2d (dilation 1, floor mode).
    return (size + 2 * padding - kernel) // stride + 1


class C1(nn.Module):
    """HessianFlow's C1: two 5x5 convolutions and three fully connected layers.

    ``conv5x5(in, 64, pad 2) -> ReLU -> BN -> maxpool(3, 2, pad 1)``, the same again with 64 -> 64
    channels, then ``FC(64 * h * w -> 384) -> ReLU -> FC(384 -> 192) -> ReLU -> FC(192 -> num_classes)``.
    For 32x32 inputs ``h = w = 8`` and the first FC has 4096 inputs.

    Args:
        num_classes: number of output logits.
        in_channels: channels of the input images (3 for CIFAR/SVHN, 1 for MNIST).
        input_size: spatial size of the inputs, an int or ``(height, width)``.
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 3, input_size=32):
        super().__init__()
        num_classes = check_int("num_classes", num_classes, minimum=1)
        in_channels = check_int("in_channels", in_channels, minimum=1)
        h, w = pair(input_size)
        self.config = {
            "arch": "c1",
            "num_classes": num_classes,
            "in_channels": in_channels,
            "input_size": input_size,
        }
        # HessianFlow's layer names (c1_model in its models/c1.py), so that its checkpoints load as they are
        self.conv1 = nn.Conv2d(in_channels, 64, kernel_size=5, padding=2)
        self.bn1 = nn.BatchNorm2d(64)
        self.conv2 = nn.Conv2d(64, 64, kernel_size=5, padding=2)
        self.bn2 = nn.BatchNorm2d(64)
        for _ in range(2):  # the 5x5 convolutions keep the size; each pool halves it (rounding up)
            h, w = _conv_out(h, 3, 2, 1), _conv_out(w, 3, 2, 1)
        self.flat_features = 64 * h * w
        self.fc1 = nn.Linear(self.flat_features, 384)
        self.fc2 = nn.Linear(384, 192)
        self.fc3 = nn.Linear(192, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(self.bn1(F.relu(self.conv1(x))), 3, 2, 1)
        x = F.max_pool2d(self.bn2(F.relu(self.conv2(x))), 3, 2, 1)
        x = torch.flatten(x, 1)
        return self.fc3(F.relu(self.fc2(F.relu(self.fc1(x)))))


class C2(nn.Module):
    """HessianFlow's C2: four unpadded 3x3 convolutions and three fully connected layers.

    ``[conv3x3 -> ReLU -> BN] x 2 (64, 64 channels) -> maxpool 2 -> [conv3x3 -> ReLU -> BN] x 2 (128, 128)
    -> maxpool 2 -> FC(128 * h * w -> 256) -> ReLU -> FC(256 -> 256) -> ReLU -> FC(256 -> num_classes)``.
    For 32x32 inputs ``h = w = 5`` and the first FC has 3200 inputs. HessianFlow's C2 defines dropout
    layers but never applies them; they are left out here.

    Args:
        num_classes: number of output logits.
        in_channels: channels of the input images.
        input_size: spatial size of the inputs, an int or ``(height, width)``; at least 16 so that the
            feature map is not empty.
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 3, input_size=32):
        super().__init__()
        num_classes = check_int("num_classes", num_classes, minimum=1)
        in_channels = check_int("in_channels", in_channels, minimum=1)
        h, w = pair(input_size)
        self.config = {
            "arch": "c2",
            "num_classes": num_classes,
            "in_channels": in_channels,
            "input_size": input_size,
        }

        # HessianFlow's layer names (c2_model in its models/c1.py)
        self.conv1 = nn.Conv2d(in_channels, 64, kernel_size=3)
        self.bn1 = nn.BatchNorm2d(64)
        self.conv2 = nn.Conv2d(64, 64, kernel_size=3)
        self.bn2 = nn.BatchNorm2d(64)
        self.conv3 = nn.Conv2d(64, 128, kernel_size=3)
        self.bn3 = nn.BatchNorm2d(128)
        self.conv4 = nn.Conv2d(128, 128, kernel_size=3)
        self.bn4 = nn.BatchNorm2d(128)
        for _ in range(2):  # two unpadded 3x3 convolutions (-4), then a 2x2 pool (halve, rounding down)
            h, w = (h - 4) // 2, (w - 4) // 2
            if min(h, w) < 1:
                raise ValueError(
                    f"input_size {input_size!r} is too small for C2 (four unpadded 3x3 convolutions and "
                    "two 2x2 pools need at least 16x16 inputs)"
                )
        self.flat_features = 128 * h * w
        self.fc1 = nn.Linear(self.flat_features, 256)
        self.fc2 = nn.Linear(256, 256)
        self.fc3 = nn.Linear(256, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.bn1(F.relu(self.conv1(x)))
        x = F.max_pool2d(self.bn2(F.relu(self.conv2(x))), 2)
        x = self.bn3(F.relu(self.conv3(x)))
        x = F.max_pool2d(self.bn4(F.relu(self.conv4(x))), 2)
        x = torch.flatten(x, 1)
        return self.fc3(F.relu(self.fc2(F.relu(self.fc1(x)))))


def c1_model(num_classes: int = 10) -> C1:
    """HessianFlow's constructor name for :class:`C1` (``from models.c1 import *``)."""
    return C1(num_classes=num_classes)


def c2_model(num_classes: int = 10) -> C2:
    """HessianFlow's constructor name for :class:`C2` (its ``c2_model()`` had 10 classes)."""
    return C2(num_classes=num_classes)
