# Copyright (c) mmnorm contributors. All rights reserved.
"""Checks of the plain arguments that configs pass to the layers and functional forms.

Each refuses a value of the wrong kind with a message naming the argument, where Python would
take it silently or fail later with a message about something else: a config's
``using_bn='False'`` is a non-empty string, true to Python, and built a layer *with* BN; an
``eps='1e-5'`` failed inside a comparison that named neither. Values of the right kind are
returned as the plain Python type the layers keep (NumPy integers are taken, as torch's layers
take them).
"""
import numbers
import sys

from torch import Tensor

__all__ = ['check_flag', 'check_positive_int', 'check_eps']


def check_flag(value, name: str) -> bool:
    """``value`` as a bool: a bool (NumPy's too), or the integer 0 or 1; anything else raises
    ``TypeError``."""
    # (a NumPy bool exists only where NumPy is loaded: the core does not import it, the GPU
    # check runs with torch alone)
    numpy = sys.modules.get('numpy')
    if isinstance(value, bool) or (numpy is not None and isinstance(value, numpy.bool_)):
        return bool(value)
    if isinstance(value, numbers.Integral) and value in (0, 1):
        return bool(value)
    raise TypeError(f'{name} must be True or False, got {value!r}')


def check_positive_int(value, name: str) -> int:
    """``value`` as an int: an integer (NumPy's too) >= 1; anything else (bools, floats such as
    ``16.0``, strings) raises ``ValueError``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f'{name} must be a positive int, got {value!r}')
    return int(value)


def check_eps(eps, function: str) -> None:
    """Refuse an ``eps`` that is not a number (``TypeError``) or is below 0 or NaN
    (``ValueError``: the functional forms returned NaN for it). A tensor is taken as it is."""
    if isinstance(eps, Tensor):
        return
    if isinstance(eps, bool) or not isinstance(eps, numbers.Real):
        raise TypeError(f'{function}: eps must be a number >= 0, got {eps!r}')
    if not eps >= 0:
        raise ValueError(f'{function}: eps must be >= 0, got {eps!r}')
