"""Group ``store``: the per-node shared-memory object store.

Bars to beat (docs/benchmarks.md, from the design card):
  put of a large array >= 0.6 x memcpy of the same array (same run),
  get of a 256 MB array < 100 us (zero-copy), 1 KB put/get >= 100,000/s in-process.
"""
import itertools
import math
import os
import random
import sys
import time

from . import figure, figures

MB = 1 << 20
_names = itertools.count()


def _api():
    try:
        from minray.object_store import SharedStore, get_value, put_value
    except ImportError as e:
        raise ImportError(
            f"the minray object store is not importable ({e}); "
            "build it first: pip install -e .") from e
    return SharedStore, put_value, get_value


class _Store:
    """A private store in /dev/shm, always closed (and unlinked) on exit."""

    def __init__(self, capacity, max_objects=None):
        SharedStore, _, _ = _api()
        self.name = f"minray-bench-{os.getpid()}-{next(_names)}"
        if max_objects is None:
            self.store = SharedStore.create(self.name, capacity)
        else:
            self.store = SharedStore.create(self.name, capacity, max_objects=max_objects)

    def __enter__(self):
        return self.store

    def __exit__(self, *exc):
        self.store.close()
        return False


def _ids(n):
    return [os.urandom(20) for _ in range(n)]


def _note(text):
    print(f"# note: {text}", file=sys.stderr, flush=True)


# --- large put vs memcpy ---------------------------------------------------

@figures("store", {
    "store_put_256mb_gbps": "GB/s",
    "memcpy_256mb_gbps": "GB/s",
    "store_put_vs_memcpy_ratio": "x",
}, quick_note="32 MB array")
def put_vs_memcpy(quick):
    """put_value of a 256 MB int64 array into reused arena space, against
    np.copyto of the same array into a preallocated, already-touched array.
    Put and memcpy alternate in every repetition; best of each is reported."""
    import numpy as np

    _, put_value, _ = _api()
    size = (32 if quick else 256) * MB
    reps = 3 if quick else 7
    src = np.arange(size // 8, dtype=np.int64)
    dst = np.empty_like(src)
    dst.fill(1)  # touch every page of the destination before timing
    # Room for one copy only: every put lands in the space the last one freed.
    with _Store(size + size // 4 + 16 * MB) as store:
        warm = os.urandom(20)
        put_value(store, warm, src)  # first touch of the arena pages
        store.delete(warm)
        np.copyto(dst, src)
        put_best = copy_best = math.inf
        for oid in _ids(reps):
            t0 = time.perf_counter()
            put_value(store, oid, src)
            put_best = min(put_best, time.perf_counter() - t0)
            store.delete(oid)
            t0 = time.perf_counter()
            np.copyto(dst, src)
            copy_best = min(copy_best, time.perf_counter() - t0)
    put_gbps = src.nbytes / put_best / 1e9
    copy_gbps = src.nbytes / copy_best / 1e9
    return {
        "store_put_256mb_gbps": put_gbps,
        "memcpy_256mb_gbps": copy_gbps,
        "store_put_vs_memcpy_ratio": put_gbps / copy_gbps,
    }


# --- large get -------------------------------------------------------------

@figure("store", "store_get_256mb_us", unit="us", quick_note="32 MB array")
def get_large(quick):
    """get_value of a sealed 256 MB int64 array (zero-copy); median of many."""
    import numpy as np

    _, put_value, get_value = _api()
    size = (32 if quick else 256) * MB
    reps = 30 if quick else 100
    src = np.arange(size // 8, dtype=np.int64)
    with _Store(size + size // 4 + 16 * MB) as store:
        oid = os.urandom(20)
        put_value(store, oid, src)
        del src
        arr = get_value(store, oid)  # warm up; check it is the array
        if arr.shape != (size // 8,) or int(arr[-1]) != size // 8 - 1:
            raise AssertionError("get_value returned the wrong array")
        del arr
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            arr = get_value(store, oid)
            times.append(time.perf_counter() - t0)
            del arr  # releases the pin (outside the timed part)
        store.delete(oid)
    times.sort()
    return times[len(times) // 2] * 1e6


# --- small put / get -------------------------------------------------------

@figures("store", {
    "store_put_small_per_s": "/s",
    "store_get_small_per_s": "/s",
}, quick_note="fewer ids")
def small_put_get(quick):
    """put_value then get_value of 1 KB bytes values under many distinct ids,
    in-process; best of a few rounds (each round deletes its objects)."""
    _, put_value, get_value = _api()
    n = 5_000 if quick else 50_000
    reps = 3
    value = os.urandom(1024)
    ids = _ids(n)
    put_best = get_best = math.inf
    with _Store(n * 2048 + 16 * MB, max_objects=n + 1024) as store:
        delete = store.delete
        for _ in range(reps):
            t0 = time.perf_counter()
            for oid in ids:
                put_value(store, oid, value)
            put_best = min(put_best, time.perf_counter() - t0)
            t0 = time.perf_counter()
            for oid in ids:
                get_value(store, oid)
            get_best = min(get_best, time.perf_counter() - t0)
            for oid in ids:
                delete(oid)
        put_value(store, ids[0], value)  # sanity check once, untimed
        if bytes(get_value(store, ids[0])) != value:
            raise AssertionError("get_value returned a different value")
    return {"store_put_small_per_s": n / put_best, "store_get_small_per_s": n / get_best}


# --- mixed-size allocation -------------------------------------------------

def _mixed_plan(nops, capacity, seed=20240601):
    """A fixed sequence of ("c", id, size) / ("d", id) operations.

    Sizes are log-uniform in 64 B .. 1 MB. Creates and deletes interleave at
    random; the chance of a create falls as the live bytes grow, so the arena
    hovers around half full (no evictions expected) once it has filled up.
    """
    rng = random.Random(seed)
    lo, hi = math.log(64), math.log(MB)
    target = capacity * 0.5
    plan, live, live_sizes, live_bytes = [], [], [], 0
    for _ in range(nops):
        p_create = min(0.95, max(0.05, 1.0 - 0.5 * live_bytes / target))
        if live and rng.random() >= p_create:
            j = rng.randrange(len(live))
            oid, sz = live[j], live_sizes[j]
            live[j], live_sizes[j] = live[-1], live_sizes[-1]
            live.pop()
            live_sizes.pop()
            live_bytes -= sz
            plan.append(("d", oid, sz))
        else:
            sz = int(math.exp(rng.uniform(lo, hi)))
            oid = rng.getrandbits(160).to_bytes(20, "little")
            live.append(oid)
            live_sizes.append(sz)
            live_bytes += sz
            plan.append(("c", oid, sz))
    return plan, len(live)


@figures("store", {
    "store_alloc_free_per_s": "op/s",
    "store_fragmentation_pct": "%",
}, quick_note="fewer operations, smaller arena")
def alloc_free_mixed(quick):
    """create_object+seal and delete, sizes log-uniform 64 B..1 MB, randomly
    interleaved with the arena about half full. One op = one create+seal or one
    delete. Fragmentation = 1 - largest_free/free at the end of the run, in %."""
    from minray.exceptions import ObjectNotFoundError

    capacity = (64 if quick else 256) * MB
    nops = 30_000 if quick else 200_000
    reps = 2 if quick else 3
    plan, nlive = _mixed_plan(nops, capacity)
    best = math.inf
    frag = None
    for _ in range(reps):
        with _Store(capacity, max_objects=nlive * 4 + 4096) as store:
            create, seal, delete = store.create_object, store.seal, store.delete
            missing = 0
            t0 = time.perf_counter()
            for op, oid, sz in plan:
                if op == "c":
                    create(oid, sz)
                    seal(oid)
                else:
                    try:
                        delete(oid)
                    except ObjectNotFoundError:  # evicted: arena was too full
                        missing += 1
            best = min(best, time.perf_counter() - t0)
            st = store.stats()
            free, largest = st["free"], st["largest_free"]
            frag = 100.0 * (1.0 - largest / free) if free else 0.0
            if st.get("evictions") or missing:
                _note(f"mixed workload evicted {st.get('evictions')} objects "
                      f"({missing} deletes found nothing)")
    return {"store_alloc_free_per_s": nops / best, "store_fragmentation_pct": frag}
