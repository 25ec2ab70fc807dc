"""HessianFlow's ``utils`` (``getData`` and friends), kept importable from a checkout: the code is
:mod:`hessianflow.data`."""

from hessianflow.data import *  # noqa: F401,F403
from hessianflow.data import __all__  # noqa: F401
