"""HessianFlow's ``models`` package, kept importable from a checkout: the code is :mod:`hessianflow.training.models`.

``from models.c1 import *`` and ``from models.resnet import *`` (HessianFlow's imports) give
``c1_model``, ``c2_model`` and ``resnet``.
"""

from hessianflow.training.models import *  # noqa: F401,F403
from hessianflow.training.models import __all__  # noqa: F401
