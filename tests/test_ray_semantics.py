"""Behaviours a Ray program relies on, written as a Ray user writes tests
(minray imported as `ray`): `get` of a list fails fast on an error, a
finished result is never held back by the task after it, actor calls are
ordered per caller, and refs returned inside values are freed once dropped.

Waiting is done with gate files, get/wait timeouts and poll() deadlines;
time bounds are generous sanity bounds, never measurements.
"""
import gc
import time

import numpy as np
import pytest

import minray as ray
from minray_driver import module_cluster, poll, wait_for_file

cluster = module_cluster(num_cpus=2)

ARRAY_ITEMS = 1 << 18          # 2 MB of float64: stored in the arena, not inline


@ray.remote
def fail(message):
    raise ValueError(message)


@ray.remote
def wait_then_return(path, value):
    wait_for_file(path, limit=120)
    return value


def node_object_ids():
    rows = ray.runtime.core.current().request_info("objects")
    return {row["id"] for row in rows}


# ---------------------------------------------------------------- get fails fast

@pytest.mark.timeout(60)
def test_get_of_a_list_raises_an_error_while_other_objects_are_pending(gate):
    # The second object never arrives while the test runs (its gate opens at
    # teardown): get must raise the first object's error, not wait for it.
    pending = wait_then_return.remote(gate, "late")
    failing = fail.remote("boom")
    with pytest.raises(ValueError, match="boom"):
        ray.get([pending, failing])


def test_get_with_a_timeout_raises_the_error_not_a_timeout(gate):
    pending = wait_then_return.remote(gate, "late")
    failing = fail.remote("first failure")
    started = time.monotonic()
    with pytest.raises(ray.exceptions.RayTaskError, match="first failure"):
        ray.get([failing, pending], timeout=30)
    assert time.monotonic() - started < 20, "get waited for the pending object"


def test_get_inside_a_task_raises_an_error_while_other_objects_are_pending(gate):
    @ray.remote
    def gather(refs):
        try:
            ray.get(refs, timeout=60)
        except ValueError as exc:
            return "caught: inner" if "inner" in str(exc) else f"another error: {exc}"
        return "no error"

    refs = [wait_then_return.remote(gate, "late"), fail.remote("inner")]
    assert ray.get(gather.remote(refs), timeout=30) == "caught: inner"


def test_get_of_a_list_returns_every_value_when_none_failed():
    @ray.remote
    def square(x):
        return x * x

    assert ray.get([square.remote(i) for i in range(50)], timeout=30) == [
        i * i for i in range(50)]


# ---------------------------------------------------------------- results not held back

@ray.remote(num_cpus=2)        # takes both CPUs: every call runs on one worker, in turn
def nap(gate=None):
    if gate is not None:
        wait_for_file(gate, limit=120)
    return gate


def test_a_finished_result_is_ready_while_the_next_task_runs(gate):
    # Known-short calls are queued on a worker behind each other; the last
    # one waits on the gate. The quick ones must not wait for it to end.
    ray.get([nap.remote() for _ in range(50)], timeout=60)
    quick = [nap.remote() for _ in range(10)]
    slow = nap.remote(gate)
    ready, _ = ray.wait(quick, num_returns=len(quick), timeout=10)
    assert len(ready) == len(quick), "finished results were held back by the running task"
    assert ray.get(quick[-1], timeout=1) is None
    assert ray.wait([slow], timeout=0)[0] == []
    open(gate, "w").close()
    assert ray.get(slow, timeout=60) == gate


@ray.remote
class Gatekeeper:            # holds no CPU: the 2-CPU tasks below never wait for it
    def wait_for(self, path):
        wait_for_file(path, limit=120)
        return "late"


def test_a_result_is_ready_while_the_next_task_blocks_in_get(gate):
    @ray.remote(num_cpus=2)
    def nap_or_get(refs=None):
        if refs is not None:
            return ray.get(refs[0], timeout=120)
        return "quick"

    keeper = Gatekeeper.remote()
    ray.get([nap_or_get.remote() for _ in range(50)], timeout=60)
    quick = [nap_or_get.remote() for _ in range(10)]
    blocked = nap_or_get.remote([keeper.wait_for.remote(gate)])
    ready, _ = ray.wait(quick, num_returns=len(quick), timeout=10)
    assert len(ready) == len(quick), "finished results were held back by a blocked task"
    open(gate, "w").close()
    assert ray.get(blocked, timeout=60) == "late"


# ---------------------------------------------------------------- actor call order

@ray.remote
class Log:
    def __init__(self):
        self.items = []

    def append(self, item):
        self.items.append(item)
        return len(self.items)

    def items_so_far(self):
        return list(self.items)


@ray.remote
def append_from_a_task(actor, item):
    return ray.get(actor.append.remote(item), timeout=60)


def test_a_call_waiting_for_its_argument_does_not_hold_up_other_callers(gate):
    log = Log.remote()
    held = log.append.remote(wait_then_return.remote(gate, "driver"))
    later_from_driver = log.append.remote("driver again")
    # Another caller (a task's worker process) is not ordered behind the
    # driver's calls: its call runs while the driver's first one waits.
    assert ray.get(append_from_a_task.remote(log, "task"), timeout=20) == 1
    # The driver's own later call still waits for its earlier one.
    assert ray.wait([later_from_driver], timeout=0.3)[0] == []
    open(gate, "w").close()
    assert ray.get([held, later_from_driver], timeout=60) == [2, 3]
    assert ray.get(log.items_so_far.remote()) == ["task", "driver", "driver again"]


def test_calls_from_two_actors_are_each_in_order_and_independent(gate):
    @ray.remote
    class Caller:
        def call(self, actor, items):
            return ray.get([actor.append.remote(i) for i in items], timeout=60)

    log = Log.remote()
    held = log.append.remote(wait_then_return.remote(gate, "held"))
    first, second = Caller.remote(), Caller.remote()
    a = first.call.remote(log, [f"a{i}" for i in range(20)])
    b = second.call.remote(log, [f"b{i}" for i in range(20)])
    # Both callers' calls ran while the driver's waits; each in its order.
    positions_a, positions_b = ray.get([a, b], timeout=20)
    assert positions_a == sorted(positions_a) and positions_b == sorted(positions_b)
    assert sorted(positions_a + positions_b) == list(range(1, 41))
    open(gate, "w").close()
    assert ray.get(held, timeout=60) == 41
    items = ray.get(log.items_so_far.remote(), timeout=20)
    assert [i for i in items if i.startswith("a")] == [f"a{i}" for i in range(20)]
    assert [i for i in items if i.startswith("b")] == [f"b{i}" for i in range(20)]


@pytest.mark.parametrize("kind", ["threaded", "async"])
def test_a_concurrent_actor_runs_ready_calls_before_one_waiting_for_its_argument(gate, kind):
    if kind == "threaded":
        actor = Log.options(max_concurrency=4).remote()
    else:
        @ray.remote
        class AsyncLog:
            def __init__(self):
                self.items = []

            async def append(self, item):
                self.items.append(item)
                return len(self.items)

        actor = AsyncLog.remote()
    held = actor.append.remote(wait_then_return.remote(gate, "held"))
    # As in Ray, a threaded or async actor does not keep submission order:
    # this call's argument is ready, so it runs without waiting.
    assert ray.get(actor.append.remote("ready"), timeout=20) == 1
    open(gate, "w").close()
    assert ray.get(held, timeout=60) == 2


# ---------------------------------------------------------------- refs inside values

@ray.remote
def make_two_arrays(first, second):
    return [ray.put(np.full(ARRAY_ITEMS, first)), ray.put(np.full(ARRAY_ITEMS, second))]


@ray.remote
def square_remotely(x):
    return np.full(ARRAY_ITEMS, float(x * x))


@ray.remote
def start_two_tasks(x, y):
    return [square_remotely.remote(x), square_remotely.remote(y)]


@pytest.mark.parametrize("make", ["puts", "tasks"])
def test_refs_returned_in_a_list_are_readable_while_held_and_freed_after(make):
    outer = make_two_arrays.remote(1.0, 2.0) if make == "puts" else start_two_tasks.remote(1, 2)
    ref1, ref2 = ray.get(outer, timeout=60)
    inner_ids = {ref1.hex(), ref2.hex()}
    del outer
    gc.collect()
    # The list is gone and the task that made the refs has ended: the refs
    # we hold keep their objects, however long we keep them.
    for _ in range(3):
        assert ray.get(ref1, timeout=30)[0] == 1.0
        assert ray.get(ref2, timeout=30)[-1] == (4.0 if make == "tasks" else 2.0)
    assert inner_ids <= node_object_ids()
    del ref1, ref2
    gc.collect()
    poll(lambda: not inner_ids & node_object_ids(), timeout=30,
         what="the returned objects to be freed once every ref was dropped")


def test_refs_returned_in_a_list_in_a_loop_do_not_fill_the_store():
    # 2 MB arrays, 2 per round, 40 rounds: 160 MB through the default store
    # would be noticed if they were pinned; the node's table must shrink back.
    before = len(node_object_ids())
    for i in range(40):
        refs = ray.get(make_two_arrays.remote(float(i), float(-i)), timeout=60)
        assert [ray.get(r, timeout=30)[0] for r in refs] == [float(i), float(-i)]
        del refs
    gc.collect()
    poll(lambda: len(node_object_ids()) <= before, timeout=30,
         what="the node's objects to go back to what they were")
