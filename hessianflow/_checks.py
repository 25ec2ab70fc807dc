"""Argument checks shared by the solvers, the estimators and the tracker: one rule, one place.

Integers are any :class:`numbers.Integral` (``int``, ``np.int64``, ...) but not ``bool``; numbers are any
:class:`numbers.Real` but not ``bool``. Both come back as plain Python ``int``/``float``, so that a NumPy
scalar never reaches ``range``, an f-string format or a JSON record as itself. The argument order is
always ``(name, value)`` and the bound is keyword-only, so no call can swap them silently.
"""

from __future__ import annotations

import math
import numbers

__all__ = ["check_int", "check_positive", "is_int"]


def is_int(value) -> bool:
    """Whether ``value`` is an integer of any integral type (``bool`` is not an integer here)."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def check_int(name: str, value, *, minimum: int) -> int:
    """``value`` as a Python ``int`` if it is an integer ``>= minimum``, else a ``ValueError`` naming ``name``."""
    if not is_int(value) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def check_positive(name: str, value) -> float:
    """``value`` as a Python ``float`` if it is a positive finite real number, else a ``ValueError``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a positive finite number, got {value!r}")
    return float(value)
