"""Group ``actors``: actor creation and method calls through the public API.

Bars to beat (issue 5): actor_sync_per_s >= 3,000 and actor_async_per_s >=
10,000 (Ray 2.60 on this machine: 1,254 / 2,634). ``--vs ray`` runs the same
code on Ray (``ray_*`` figures) when ``import ray`` works.
"""
import math
import time

from . import figures
from .tasks import _cluster

PIPELINED_CALLS = 20_000


def _counter_class(rt):
    @rt.remote
    class Counter:
        def __init__(self):
            self.n = 0

        def incr(self):
            self.n += 1
            return self.n

    return Counter


def _actor_rates(name, quick):
    sync_n = 2_000 if quick else 5_000
    calls = 5_000 if quick else PIPELINED_CALLS
    creates = 20 if quick else 50
    reps = 2 if quick else 3
    sync_best = async_best = create_best = nn_best = math.inf
    with _cluster(name) as rt:
        Counter = _counter_class(rt)
        counter = Counter.remote()
        rt.get([counter.incr.remote() for _ in range(200)])          # warm up
        for _ in range(reps):
            start = time.perf_counter()
            for _ in range(sync_n):
                rt.get(counter.incr.remote())
            sync_best = min(sync_best, (time.perf_counter() - start) / sync_n)
            start = time.perf_counter()
            rt.get([counter.incr.remote() for _ in range(calls)])
            async_best = min(async_best, (time.perf_counter() - start) / calls)
            # Creation: new actors answering their first call.
            start = time.perf_counter()
            actors = [Counter.remote() for _ in range(creates)]
            rt.get([a.incr.remote() for a in actors])
            create_best = min(create_best, (time.perf_counter() - start) / creates)
            # n:n: n callers (tasks) each calling all n actors.
            n = 4
            targets = actors[:n]

            @rt.remote
            def caller(handles, k):
                return sum(rt.get([h.incr.remote() for h in handles for _ in range(k)]))

            k = 250 if quick else 1_000
            start = time.perf_counter()
            rt.get([caller.remote(targets, k) for _ in range(n)])
            nn_best = min(nn_best, (time.perf_counter() - start) / (n * n * k))
            for actor in actors:
                rt.kill(actor)
            del actors
    return 1 / sync_best, 1 / async_best, 1 / create_best, 1 / nn_best


@figures("actors", {"actor_sync_per_s": "/s", "actor_async_per_s": "/s",
                    "actor_create_per_s": "/s", "actor_nn_calls_per_s": "/s"},
         quick_note="2 rounds, smaller counts")
def actor_throughput(quick):
    """init(num_cpus=2). Sync: get(a.incr.remote()) one after another. Async:
    20,000 calls to one actor, then one get. Create: 50 actors created and
    each answering one call. n:n: 4 tasks each making 1,000 calls to each of
    4 actors. Best of 3 rounds."""
    sync, async_, create, nn = _actor_rates("minray", quick)
    return {"actor_sync_per_s": sync, "actor_async_per_s": async_,
            "actor_create_per_s": create, "actor_nn_calls_per_s": nn}


@figures("actors", {"ray_actor_sync_per_s": "/s", "ray_actor_async_per_s": "/s",
                    "ray_actor_create_per_s": "/s", "ray_actor_nn_calls_per_s": "/s"},
         vs="ray", quick_note="2 rounds, smaller counts")
def ray_actor_throughput(quick):
    sync, async_, create, nn = _actor_rates("ray", quick)
    return {"ray_actor_sync_per_s": sync, "ray_actor_async_per_s": async_,
            "ray_actor_create_per_s": create, "ray_actor_nn_calls_per_s": nn}
