"""Checking resource amounts (num_cpus, num_gpus, custom resources)."""
import math
import numbers


def check_amount(what, value):
    """Raise ValueError unless value is a finite number >= 0.

    NaN passes `value < 0` and would disable a node's limit for good, and an
    infinite amount can never be released, so both are refused here.
    """
    if (isinstance(value, bool) or not isinstance(value, numbers.Real)
            or not math.isfinite(value) or value < 0):
        raise ValueError(f"{what} must be a finite number >= 0, got {value!r}")


_INF = math.inf


def is_valid_request(resources):
    """True if a resource dict (as it crossed a socket) is safe to schedule."""
    # Once per submitted task: exact type tests, no calls.
    if type(resources) is not dict:
        return False
    for name, amount in resources.items():
        if (type(name) is not str or (type(amount) is not float and type(amount) is not int)
                or not 0 <= amount < _INF):        # NaN fails both comparisons
            return False
    return True
