"""The command-line programs: HessianFlow's three scripts, as functions of parsed arguments.

Each module has ``build_parser()``, ``parse_args(argv)``, ``main(args) -> dict`` (what tests and notebooks
call) and ``cli(argv)`` (the console script: exit status and one-line errors):

* :mod:`hessianflow.cli.train`: ``hessianflow-train`` / ``python train.py`` (ABSA or the SGD baseline);
* :mod:`hessianflow.cli.train_resnet`: ``hessianflow-train-resnet`` / ``python train_resnet.py``;
* :mod:`hessianflow.cli.eig`: ``hessianflow-eig`` / ``python hessian_eig_driver.py``.
"""
