"""HessianFlow's ``utils`` (``getData`` and friends), kept importable from a checkout: the code is
:mod:`hessianflow.training.data`."""

from hessianflow.training.data import *  # noqa: F401,F403
from hessianflow.training.data import __all__  # noqa: F401
