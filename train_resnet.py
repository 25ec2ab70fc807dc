"""HessianFlow's train_resnet.py: a CIFAR ResNet with the dominant Hessian eigenvalue after every epoch
(the code is :mod:`hessianflow.cli.train_resnet`).

    python train_resnet.py --name cifar10 --epochs 160 --lr 0.1 --lr-decay 0.2 --lr-decay-epoch 60 90 120

Installed, the same program is ``hessianflow-train-resnet``.
"""

import sys

from hessianflow.cli.train_resnet import build_parser, cli, main, parse_args  # noqa: F401

if __name__ == "__main__":
    sys.exit(cli())
