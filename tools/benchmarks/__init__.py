"""Registry and timing helpers for ``tools/bench.py``.

Each module in this package is one *group* of figures (``store``, later ``gcs``,
``tasks``, ``actors``). A module registers *measurements*: functions that take
``quick: bool`` and return either one number or a dict of related numbers that
were measured in the same run (so ratios between them are fair on a shared,
noisy machine).

One figure::

    from benchmarks import figure

    @figure("store", "store_get_256mb_us", unit="us")
    def get_256mb(quick):
        ...
        return microseconds

Several figures from one run (the function returns ``{name: number}`` with
exactly the declared names)::

    from benchmarks import figures

    @figures("store", {"store_put_256mb_gbps": "GB/s",
                       "memcpy_256mb_gbps": "GB/s",
                       "store_put_vs_memcpy_ratio": "x"})
    def put_vs_memcpy(quick):
        ...
        return {"store_put_256mb_gbps": p, "memcpy_256mb_gbps": m,
                "store_put_vs_memcpy_ratio": p / m}

``vs="ray"`` marks a measurement that compares against Ray; it only runs with
``bench.py --vs ray`` and only when ``import ray`` works. ``quick_note`` is
printed next to the figures in ``--quick`` mode (e.g. "32 MB arrays").

Import what is being measured (minray, ray) *inside* the measurement function,
not at module top level, so that ``--list`` and the other groups keep working
when one dependency is missing.
"""
import statistics
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional

__all__ = [
    "Measurement",
    "figure",
    "figures",
    "registry",
    "best_of",
    "median_of",
    "timed",
    "Skip",
]


class Skip(Exception):
    """Raise from a measurement to skip it with a reason (not an error)."""


@dataclass
class Measurement:
    group: str
    func: Callable
    units: Dict[str, str]  # figure name -> unit, in print order
    vs: Optional[str] = None
    quick_note: str = ""
    doc: str = ""

    @property
    def name(self):
        return f"{self.func.__module__}.{self.func.__name__}"


@dataclass
class Registry:
    measurements: List[Measurement] = field(default_factory=list)

    def add(self, m: Measurement):
        taken = self.figure_names()
        for name in m.units:
            if name in taken:
                raise ValueError(f"figure {name!r} is registered twice")
        self.measurements.append(m)

    def figure_names(self):
        return [n for m in self.measurements for n in m.units]

    def groups(self):
        seen = []
        for m in self.measurements:
            if m.group not in seen:
                seen.append(m.group)
        return seen

    def units(self):
        return {n: u for m in self.measurements for n, u in m.units.items()}


registry = Registry()


def figures(group: str, units: Dict[str, str], *, vs: Optional[str] = None,
            quick_note: str = ""):
    """Register a function returning ``{figure_name: number}`` for ``units``."""
    if not units:
        raise ValueError("figures() needs at least one figure name")

    def deco(func):
        registry.add(Measurement(group, func, dict(units), vs, quick_note,
                                 (func.__doc__ or "").strip()))
        return func

    return deco


def figure(group: str, name: str, *, unit: str, vs: Optional[str] = None,
           quick_note: str = ""):
    """Register a function returning one number as figure ``name``."""

    def deco(func):
        def one(quick):
            return {name: func(quick)}

        one.__name__ = func.__name__
        one.__module__ = func.__module__
        one.__doc__ = func.__doc__
        figures(group, {name: unit}, vs=vs, quick_note=quick_note)(one)
        return func

    return deco


# --- timing helpers -------------------------------------------------------

def timed(fn, *args, **kwargs):
    """Run ``fn`` once; return (seconds, result)."""
    t0 = time.perf_counter()
    result = fn(*args, **kwargs)
    return time.perf_counter() - t0, result


def _times(fn, repeat, setup=None, teardown=None):
    out = []
    for _ in range(repeat):
        state = setup() if setup is not None else None
        t0 = time.perf_counter()
        fn() if state is None else fn(state)
        out.append(time.perf_counter() - t0)
        if teardown is not None:
            teardown() if state is None else teardown(state)
    return out


def best_of(fn, repeat=5, setup=None, teardown=None):
    """Smallest wall time in seconds of ``repeat`` runs of ``fn``.

    ``setup()`` runs before each run (untimed); if it returns something other
    than None, that value is passed to ``fn`` and ``teardown``.
    """
    return min(_times(fn, repeat, setup, teardown))


def median_of(fn, repeat=5, setup=None, teardown=None):
    """Median wall time in seconds of ``repeat`` runs of ``fn`` (see best_of)."""
    return statistics.median(_times(fn, repeat, setup, teardown))
