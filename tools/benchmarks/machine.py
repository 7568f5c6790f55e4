"""Group ``machine``: what the hardware itself allows two processes, no minray involved.

A speed-up on N CPUs can only be read against what N independent processes
get from this machine: on a VM whose vCPUs share physical cores (or with
neighbours), two processes computing at once each run slower than one alone.
These figures time the same work units with multiprocessing.Pool(1) and
Pool(2) in one run; ``*_2proc_speedup`` is the throughput ratio, the ceiling
for any 2-worker example on this machine (2.0 = two full cores).
"""
import multiprocessing
import os
import time

from . import figures

UNITS = 16


def _python_unit(_):
    # Interpreter-bound: like stepping a gymnasium environment.
    total = 0
    for i in range(400_000):
        total += i * i % 7
    return total


def _numpy_unit(_):
    # BLAS-bound (one thread): like a minibatch gradient.
    import numpy as np
    rng = np.random.default_rng(0)
    a = rng.random((384, 384))
    for _ in range(12):
        a = np.tanh(a @ a / 384)
    return float(a[0, 0])


def _one_thread():
    for name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[name] = "1"


def _throughput(unit, processes, units):
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(processes, initializer=_one_thread) as pool:
        pool.map(unit, range(processes))             # workers started and warm
        start = time.perf_counter()
        pool.map(unit, range(units), chunksize=1)
        return units / (time.perf_counter() - start)


@figures("machine", {"cpu_python_2proc_speedup": "x", "cpu_numpy_2proc_speedup": "x"},
         quick_note=f"{UNITS // 2} work units")
def two_processes_vs_one(quick):
    units = UNITS // 2 if quick else UNITS
    result = {}
    for name, unit in (("python", _python_unit), ("numpy", _numpy_unit)):
        one = _throughput(unit, 1, units)
        two = _throughput(unit, 2, units)
        result[f"cpu_{name}_2proc_speedup"] = two / one
    return result
