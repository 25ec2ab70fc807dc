"""HessianFlow's train.py: ABSA or large-batch SGD training (the code is :mod:`hessianflow.cli.train`).

    python train.py --name cifar10 --epochs 90 --lr 0.02 --lr-decay 0.2 --lr-decay-epoch 30 60 --arch c1
    python train.py --arch ResNet --lr 0.1 --lr-decay 0.2 --lr-decay-epoch 30 60 80 --large-ratio 128 --method absa

Installed, the same program is ``hessianflow-train``.
"""

import sys

from hessianflow.cli.train import build_parser, cli, main, parse_args  # noqa: F401 (HessianFlow-style imports)

if __name__ == "__main__":
    sys.exit(cli())
