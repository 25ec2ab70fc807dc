"""Train a CIFAR ResNet with SGD and print the dominant Hessian eigenvalue after every epoch.

HessianFlow's train_resnet.py, with its flags and defaults. Usage::

    python train_resnet.py --name cifar10 --epochs 160 --lr 0.1 --lr-decay 0.2 --lr-decay-epoch 60 90 120
    python train_resnet.py --name synthetic --epochs 4 --lr-decay-epoch 2 --eigen-type full --eig-batches 2
    torchrun --nproc_per_node 2 train_resnet.py --name cifar10

``--eigen-type approximate`` (default) computes the eigenvalue on one fixed batch of
``--hessian-batch-size`` un-augmented samples of ``--eig-data``, drawn once with ``--seed``;
``full`` on the whole ``--eig-data`` set, or its first ``--eig-batches`` batches. The history goes to
``OUT_DIR/eigen_history.csv`` / ``.json`` and ``OUT_DIR/eigen_history.png`` (lr decays marked); the
checkpoint (``--save``) loads in hessian_eig_driver.py with no further flags. It takes train.py's other
flags too (``--large-ratio`` is a fixed accumulation here).
"""

from __future__ import annotations

import sys

from . import common as _cli
from . import train

DEFAULTS = {
    "batch_size": 128,
    "test_batch_size": 200,
    "epochs": 160,
    "lr": 0.1,
    "lr_decay": 0.1,
    "lr_decay_epoch": [60, 120],
    "seed": 1,
    "weight_decay": 5e-4,
    "large_ratio": 1,
    "depth": 20,
    "method": "sgd",
    "track_eigen": True,
    "eigen_type": "approximate",
    "eig_max_iter": 20,
    "eig_tol": 1e-3,
    "out_dir": "runs/resnet",
}


def build_parser():
    parser = train.build_parser(defaults=DEFAULTS, description=__doc__.split("\n\n")[0], fixed_arch="ResNet")
    parser.set_defaults(eig_max_iter=DEFAULTS["eig_max_iter"], eig_tol=DEFAULTS["eig_tol"])
    return parser


def parse_args(argv=None):
    parser = build_parser()
    return train.validate(parser, parser.parse_args(argv), argv)


def main(args) -> dict:
    """Train as :func:`train.main` does, with the per-epoch eigenvalue tracker on."""
    args.track_eigen = True
    return train.main(args)


cli = _cli.entry_point(main, parse_args)

if __name__ == "__main__":
    sys.exit(cli())
