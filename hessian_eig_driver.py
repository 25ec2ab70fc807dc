"""HessianFlow's hessian_eig_driver.py: Hessian analysis of a checkpoint (the code is
:mod:`hessianflow.cli.eig`).

    python hessian_eig_driver.py --name cifar10 --arch c1 --resume model_param.pkl --eigen-type full

Installed, the same program is ``hessianflow-eig``.
"""

import sys

from hessianflow.cli.eig import build_parser, cli, main, parse_args  # noqa: F401

if __name__ == "__main__":
    sys.exit(cli())
