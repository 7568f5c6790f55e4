"""Group ``tasks``: the task runtime through the public API (minray.init, remote, get, ...).

Every workload is written once against the Ray-style API and run on minray;
``--vs ray`` runs the same code on Ray (``ray_*`` figures) when ``import ray``
works. multiprocessing.Pool equivalents (``pool_*``) run in the same run, next
to the minray figures they compare with.

Bars to beat (issue 4, docs/benchmarks.md):
  init_s < 0.5, idle_rss_mb < 200, task_sync_per_s >= 3,000,
  task_async_per_s >= 10,000, put_small_per_s >= 20,000,
  put of 256 MB >= 0.6 x memcpy, get of 256 MB < 100 us,
  tree_reduce_1024_s < 0.5, wait_1k_s < 0.1.

Measurements that need a fresh interpreter (init_s, idle memory) run a small
script in a child process; the others start a cluster with init(num_cpus=2)
in the harness process and shut it down afterwards.
"""
import contextlib
import json
import math
import os
import statistics
import subprocess
import sys
import textwrap
import time

from . import figures

MB = 1 << 20
NUM_CPUS = 2
ASYNC_TASKS = 20_000


# --- helpers ----------------------------------------------------------------

def _runtime(name):
    """The module under test: minray or ray."""
    if name == "ray":
        import ray
        return ray
    try:
        import minray
    except ImportError as e:
        raise ImportError(f"minray is not importable ({e}); build it: pip install -e .") from e
    return minray


@contextlib.contextmanager
def _cluster(name, **kwargs):
    rt = _runtime(name)
    if name == "ray":
        kwargs.setdefault("include_dashboard", False)
        kwargs.setdefault("log_to_driver", False)
    rt.init(num_cpus=NUM_CPUS, **kwargs)
    try:
        yield rt
    finally:
        rt.shutdown()


def _remote_functions(rt):
    """No-op and add tasks, defined here so they are pickled by value (workers
    cannot import this module: tools/ is not on their path)."""
    @rt.remote
    def noop():
        return None

    @rt.remote
    def add(x, y):
        return x + y

    return noop, add


def _warm(rt, noop, n=200):
    """Bring every worker up and export the function before timing."""
    rt.get([noop.remote() for _ in range(n)])


def _child_env():
    """Environment for child scripts: they import the same minray we do."""
    env = dict(os.environ)
    try:
        import minray
        root = os.path.dirname(os.path.dirname(os.path.abspath(minray.__file__)))
        env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    except ImportError:
        pass
    return env


def _run_child(code, timeout=180):
    """Run a Python script in a fresh interpreter; return the JSON it prints last."""
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=_child_env(),
                          capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"child benchmark exited with {proc.returncode}:\n{proc.stderr[-3000:]}")
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if not lines:
        raise RuntimeError(f"child benchmark printed no result:\n{proc.stdout[-2000:]}")
    return json.loads(lines[-1])


def _pool_noop():
    return None


# --- init to first result -------------------------------------------------------

_INIT_SCRIPT = """
import json, sys, time
import {name} as rt
@rt.remote
def f(x):
    return x + 1
start = time.perf_counter()
rt.init({init_args})
assert rt.get(f.remote(1)) == 2
elapsed = time.perf_counter() - start
rt.shutdown()
print(json.dumps({{"s": elapsed}}))
"""

_POOL_INIT_SCRIPT = """
import json, multiprocessing, time
def f(x):
    return x + 1
if __name__ == "__main__":
    start = time.perf_counter()
    pool = multiprocessing.Pool(2)
    assert pool.apply(f, (1,)) == 2
    elapsed = time.perf_counter() - start
    pool.close(); pool.join()
    print(json.dumps({"s": elapsed}))
"""


def _init_times(name, runs):
    init_args = "include_dashboard=False" if name == "ray" else ""
    script = _INIT_SCRIPT.format(name=name, init_args=init_args)
    return [_run_child(script)["s"] for _ in range(runs)]


@figures("tasks", {"init_s": "s", "pool_init_s": "s"}, quick_note="median of 3")
def init_to_first_result(quick):
    """Fresh interpreter: time from just before init() (no arguments: the embedded
    default) to the first task's result; Pool(2) creation to the first apply()
    result. Imports are not timed. Median of 5 runs, alternating."""
    runs = 3 if quick else 5
    ours, pool = [], []
    for _ in range(runs):
        ours += _init_times("minray", 1)
        pool.append(_run_child(_POOL_INIT_SCRIPT)["s"])
    return {"init_s": statistics.median(ours), "pool_init_s": statistics.median(pool)}


@figures("tasks", {"ray_init_s": "s"}, vs="ray", quick_note="median of 3")
def ray_init_to_first_result(quick):
    return {"ray_init_s": statistics.median(_init_times("ray", 3 if quick else 5))}


# --- idle memory ------------------------------------------------------------------

_MEMORY_SCRIPT = """
import json, os, time
import psutil
import {name} as rt
rt.init(num_cpus=2{extra})
@rt.remote
def f():
    return os.getpid()
rt.get(f.remote())
time.sleep({settle})
me = psutil.Process()
procs = [me] + me.children(recursive=True)
rss = pss = 0
names = []
for p in procs:
    try:
        info = p.memory_full_info()
    except psutil.NoSuchProcess:
        continue
    rss += info.rss
    pss += info.pss
    names.append(" ".join(p.cmdline()[1:3])[:60])
rt.shutdown()
print(json.dumps({{"rss_mb": rss / 2**20, "pss_mb": pss / 2**20, "processes": len(names),
                  "names": names}}))
"""


def _idle_memory(name, quick):
    extra = ", include_dashboard=False" if name == "ray" else ""
    settle = 1.0 if quick else 3.0
    return _run_child(_MEMORY_SCRIPT.format(name=name, extra=extra, settle=settle))


@figures("tasks", {"idle_rss_mb": "MB", "idle_pss_mb": "MB", "idle_processes": "procs"},
         quick_note="1 s settle")
def idle_memory(quick):
    """Fresh interpreter: init(num_cpus=2), one task, then idle for 3 s; the sum
    of RSS (and of PSS, which splits shared pages between the processes that map
    them) over the driver and every process descended from it."""
    result = _idle_memory("minray", quick)
    if os.environ.get("MINRAY_BENCH_VERBOSE"):
        print("#   processes: " + "; ".join(result["names"]), file=sys.stderr)
    return {"idle_rss_mb": result["rss_mb"], "idle_pss_mb": result["pss_mb"],
            "idle_processes": result["processes"]}


@figures("tasks", {"ray_idle_rss_mb": "MB", "ray_idle_pss_mb": "MB"}, vs="ray",
         quick_note="1 s settle")
def ray_idle_memory(quick):
    result = _idle_memory("ray", quick)
    return {"ray_idle_rss_mb": result["rss_mb"], "ray_idle_pss_mb": result["pss_mb"]}


# --- task throughput ---------------------------------------------------------------

def _task_rates(name, quick):
    sync_n = 2_000 if quick else 5_000
    reps = 2 if quick else 3
    sync_best = async_best = math.inf
    with _cluster(name) as rt:
        noop, _ = _remote_functions(rt)
        _warm(rt, noop)
        for _ in range(reps):
            start = time.perf_counter()
            for _ in range(sync_n):
                rt.get(noop.remote())
            sync_best = min(sync_best, (time.perf_counter() - start) / sync_n)
            start = time.perf_counter()
            refs = [noop.remote() for _ in range(ASYNC_TASKS)]
            rt.get(refs)
            async_best = min(async_best, (time.perf_counter() - start) / ASYNC_TASKS)
            del refs
    return 1 / sync_best, 1 / async_best


def _pool_rates(quick):
    import multiprocessing
    sync_n = 2_000 if quick else 5_000
    reps = 2 if quick else 3
    sync_best = async_best = math.inf
    with multiprocessing.get_context("fork").Pool(NUM_CPUS) as pool:
        pool.apply(_pool_noop)
        for _ in range(reps):
            start = time.perf_counter()
            for _ in range(sync_n):
                pool.apply(_pool_noop)
            sync_best = min(sync_best, (time.perf_counter() - start) / sync_n)
            start = time.perf_counter()
            results = [pool.apply_async(_pool_noop) for _ in range(ASYNC_TASKS)]
            for r in results:
                r.get()
            async_best = min(async_best, (time.perf_counter() - start) / ASYNC_TASKS)
    return 1 / sync_best, 1 / async_best


@figures("tasks", {"task_sync_per_s": "/s", "task_async_per_s": "/s",
                   "pool_task_sync_per_s": "/s", "pool_task_async_per_s": "/s"},
         quick_note="2 rounds, 2,000 sync calls")
def task_throughput(quick):
    """init(num_cpus=2). Sync: get(f.remote()) one after another (5,000 per
    round). Async: 20,000 no-op tasks submitted, then one get of all their refs.
    Pool(2): apply() one after another; 20,000 apply_async() then .get() each.
    Best of 3 rounds each, after a warm-up of 200 tasks."""
    sync, async_ = _task_rates("minray", quick)
    pool_sync, pool_async = _pool_rates(quick)
    return {"task_sync_per_s": sync, "task_async_per_s": async_,
            "pool_task_sync_per_s": pool_sync, "pool_task_async_per_s": pool_async}


@figures("tasks", {"ray_task_sync_per_s": "/s", "ray_task_async_per_s": "/s"}, vs="ray",
         quick_note="2 rounds, 2,000 sync calls")
def ray_task_throughput(quick):
    sync, async_ = _task_rates("ray", quick)
    return {"ray_task_sync_per_s": sync, "ray_task_async_per_s": async_}


# --- objects: small put, large put and get -------------------------------------------

def _put_small_rate(rt, quick):
    n = 5_000 if quick else 20_000
    value = os.urandom(1024)
    best = math.inf
    for _ in range(2 if quick else 3):
        start = time.perf_counter()
        for _ in range(n):
            rt.put(value)             # the ref is dropped at once, as in a plain loop
        best = min(best, (time.perf_counter() - start) / n)
    return 1 / best


def _large_put_get(rt, quick):
    """(put GB/s, memcpy GB/s, get median us) of a 256 MB array, same run."""
    import numpy as np
    size = (32 if quick else 256) * MB
    reps = 3 if quick else 5
    src = np.arange(size // 8, dtype=np.int64)
    dst = np.empty_like(src)
    dst.fill(1)                        # touch every page of the memcpy target
    ref = rt.put(src)                  # warm-up: the first put touches fresh shm pages
    del ref
    np.copyto(dst, src)
    put_best = copy_best = math.inf
    for _ in range(reps):
        start = time.perf_counter()
        ref = rt.put(src)
        put_best = min(put_best, time.perf_counter() - start)
        del ref
        start = time.perf_counter()
        np.copyto(dst, src)
        copy_best = min(copy_best, time.perf_counter() - start)
    ref = rt.put(src)
    del src, dst
    arr = rt.get(ref)
    if arr.shape != (size // 8,) or int(arr[-1]) != size // 8 - 1:
        raise AssertionError("get returned the wrong array")
    del arr
    times = []
    for _ in range(30 if quick else 100):
        start = time.perf_counter()
        arr = rt.get(ref)
        times.append(time.perf_counter() - start)
        del arr
    return size / put_best / 1e9, size / copy_best / 1e9, statistics.median(times) * 1e6


@figures("tasks", {"put_small_per_s": "/s", "put_256mb_gbps": "GB/s",
                   "put_memcpy_256mb_gbps": "GB/s", "put_vs_memcpy_ratio": "x",
                   "get_256mb_us": "us"}, quick_note="32 MB array, 5,000 small puts")
def objects(quick):
    """init(num_cpus=2). put of 1 KB bytes, ref dropped each time: 20,000 per
    round, best of 3. put of a 256 MB int64 array (best of 5), alternating with
    np.copyto of the same array into a touched array (put_memcpy_256mb_gbps: the
    store group already uses memcpy_256mb_gbps). get of a 256 MB array put by
    the driver: median of 100 (zero-copy: a read-only view)."""
    with _cluster("minray") as rt:
        small = _put_small_rate(rt, quick)
        put, copy, get_us = _large_put_get(rt, quick)
    return {"put_small_per_s": small, "put_256mb_gbps": put, "put_memcpy_256mb_gbps": copy,
            "put_vs_memcpy_ratio": put / copy, "get_256mb_us": get_us}


@figures("tasks", {"ray_put_small_per_s": "/s", "ray_put_256mb_gbps": "GB/s",
                   "ray_get_256mb_us": "us"}, vs="ray",
         quick_note="32 MB array, 5,000 small puts")
def ray_objects(quick):
    with _cluster("ray") as rt:
        small = _put_small_rate(rt, quick)
        put, _, get_us = _large_put_get(rt, quick)
    return {"ray_put_small_per_s": small, "ray_put_256mb_gbps": put, "ray_get_256mb_us": get_us}


# --- tree reduce and wait ---------------------------------------------------------------

def _tree_and_wait(name, quick):
    import numpy as np
    reps = 2 if quick else 3
    tree_best = wait_best = ready_best = math.inf
    with _cluster(name) as rt:
        noop, add = _remote_functions(rt)
        _warm(rt, noop)
        rt.get(add.remote(1, 2))
        arrays = [np.full(1000, float(i)) for i in range(1024)]
        expected = float(sum(range(1024)))
        for _ in range(reps):
            data = [rt.put(a) for a in arrays]
            start = time.perf_counter()
            while len(data) > 1:
                data.append(add.remote(data.pop(0), data.pop(0)))
            result = rt.get(data[0])
            tree_best = min(tree_best, time.perf_counter() - start)
            if float(result[0]) != expected:
                raise AssertionError(f"tree reduce gave {result[0]}, expected {expected}")
            del data, result

            refs = [noop.remote() for _ in range(1000)]
            start = time.perf_counter()
            ready, not_ready = rt.wait(refs, num_returns=1000)
            wait_best = min(wait_best, time.perf_counter() - start)
            if len(ready) != 1000 or not_ready:
                raise AssertionError("wait returned before every ref was ready")
            start = time.perf_counter()
            rt.wait(refs, num_returns=1000)
            ready_best = min(ready_best, time.perf_counter() - start)
            del refs, ready
    return tree_best, wait_best, ready_best


@figures("tasks", {"tree_reduce_1024_s": "s", "wait_1k_s": "s", "wait_1k_ready_s": "s"},
         quick_note="best of 2")
def tree_reduce_and_wait(quick):
    """init(num_cpus=2). Tree reduce: 1,024 arrays of 1,000 floats put first,
    then the tutorial's loop (append add.remote(pop(0), pop(0)) until one ref is
    left: 1,023 tasks) and a get of the result, timed from the first submit.
    wait_1k_s: 1,000 no-op tasks submitted, then wait(refs, num_returns=1000)
    timed from the call, while they are finishing. wait_1k_ready_s: the same
    wait again once all are ready. Best of 3."""
    tree, wait, ready = _tree_and_wait("minray", quick)
    return {"tree_reduce_1024_s": tree, "wait_1k_s": wait, "wait_1k_ready_s": ready}


@figures("tasks", {"ray_tree_reduce_1024_s": "s", "ray_wait_1k_s": "s"}, vs="ray",
         quick_note="best of 2")
def ray_tree_reduce_and_wait(quick):
    tree, wait, _ = _tree_and_wait("ray", quick)
    return {"ray_tree_reduce_1024_s": tree, "ray_wait_1k_s": wait}
