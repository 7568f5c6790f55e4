"""numpy, imported on first use.

Processes that never touch an array (the node manager, an idle worker) start
~90 ms faster without it, so no module of this package imports numpy at
import time: they call _numpy() when they need it.
"""
import sys

np = None


def _numpy():
    global np
    if np is None:
        import numpy
        np = numpy
    return np


def _is_ndarray_type(t):
    """True for numpy.ndarray, without importing numpy if nobody has."""
    if np is None:
        if "numpy" not in sys.modules:
            return False
        _numpy()
    return t is np.ndarray
