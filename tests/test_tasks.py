"""Tasks on one node through the public API: remote functions, get/put/wait,
dependencies, nested tasks, resources, errors, worker crashes and logs.

Most tests share one cluster (init(num_cpus=2), module fixture). Those that
need other init arguments, or watch the driver's output, run a driver script
in a fresh process (minray_driver.run_driver).
"""
import os
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

import minray
import minray.state
from minray.exceptions import (
    GetTimeoutError, RayTaskError, TaskUnschedulableError, WorkerCrashedError,
)
from minray_driver import module_cluster, poll, run_driver


cluster = module_cluster(num_cpus=2)




@minray.remote
def wait_for_file(path, value=None, limit=60.0):
    """Finish (returning value) once `path` exists; a controllable slow task."""
    deadline = time.monotonic() + limit
    while not os.path.exists(path):
        if time.monotonic() > deadline:
            raise TimeoutError(f"{path} never appeared")
        time.sleep(0.005)
    return value


@minray.remote
def add(a, b):
    return a + b


@minray.remote
def identity(x):
    return x


# ---------------------------------------------------------------- remote functions

def test_remote_without_arguments():
    @minray.remote
    def hello():
        return "hello"

    ref = hello.remote()
    assert isinstance(ref, minray.ObjectRef)
    assert minray.get(ref) == "hello"


def test_remote_with_arguments_and_keyword_arguments():
    @minray.remote(num_cpus=1)
    def describe(a, b=2, *rest, c=3, **extra):
        return (a, b, rest, c, extra)

    assert minray.get(describe.remote(1)) == (1, 2, (), 3, {})
    assert minray.get(describe.remote(1, 5, 6, 7, c=8, d=9)) == (1, 5, (6, 7), 8, {"d": 9})
    assert minray.get(add.remote(1, 2)) == 3
    # The tutorial: a value and a ref to it are interchangeable as arguments.
    assert minray.get([add.remote(1, minray.put(2)),
                       add.remote(minray.put(1), minray.put(2))]) == [3, 3]


def test_num_returns_and_the_original_alias():
    @minray.remote(num_returns=3)
    def three():
        return 1, 2, 3

    @minray.remote(num_return_vals=2)
    def two():
        return "a", "b"

    refs = three.remote()
    assert isinstance(refs, list) and len(refs) == 3
    assert minray.get(refs) == [1, 2, 3]
    a, b = two.remote()
    assert (minray.get(a), minray.get(b)) == ("a", "b")


def test_num_returns_zero_runs_the_task_and_returns_none(tmp_path):
    @minray.remote(num_returns=0)
    def side_effect(path):
        open(path, "w").close()

    assert side_effect.remote(str(tmp_path / "ran")) is None
    poll(lambda: os.path.exists(tmp_path / "ran"), what="the task with no returns to run")


def test_num_returns_mismatch_is_a_task_error():
    @minray.remote(num_returns=2)
    def one_value():
        return 1

    a, b = one_value.remote()
    with pytest.raises(RayTaskError, match="num_returns=2"):
        minray.get(a)


def test_options_override_without_changing_the_function():
    @minray.remote
    def pair():
        return (1, 2)

    assert minray.get(pair.remote()) == (1, 2)
    x, y = pair.options(num_returns=2).remote()
    assert minray.get([x, y]) == [1, 2]
    x, y = pair.options(num_return_vals=2, num_cpus=0.5, max_retries=0).remote()
    assert minray.get(y) == 2
    assert minray.get(pair.remote()) == (1, 2)      # the decorator's options are unchanged


def test_remote_returns_refs_at_once_while_the_task_runs(gate):
    started = time.monotonic()
    ref = wait_for_file.remote(gate, "done")
    assert isinstance(ref, minray.ObjectRef)
    # The task cannot finish before the gate opens, yet .remote() came back:
    ready, not_ready = minray.wait([ref], timeout=0)
    assert ready == [] and not_ready == [ref]
    assert time.monotonic() - started < 20          # sanity bound only
    open(gate, "w").close()
    assert minray.get(ref, timeout=30) == "done"


def test_calling_a_remote_function_directly_is_a_type_error():
    @minray.remote
    def square(x):
        return x * x

    with pytest.raises(TypeError, match=r"square\.remote\("):
        square(3)
    assert minray.get(square.remote(3)) == 9


# ---------------------------------------------------------------- get / put

def test_get_single_and_list_and_tuple():
    refs = [identity.remote(i) for i in range(10)]
    assert minray.get(refs[3]) == 3
    assert minray.get(refs) == list(range(10))
    assert minray.get(tuple(refs[:2])) == [0, 1]
    assert minray.get([]) == []
    assert minray.get([refs[1], refs[1], refs[2]]) == [1, 1, 2]     # duplicates are fine
    # The tutorial's dict result.
    assert minray.get(identity.remote({"key1": ["value"]})) == {"key1": ["value"]}


def test_get_timeout_raises_and_the_value_is_still_gettable(gate):
    ref = wait_for_file.remote(gate, 42)
    started = time.monotonic()
    with pytest.raises(GetTimeoutError):
        minray.get(ref, timeout=0.3)
    assert time.monotonic() - started >= 0.25       # seconds, not milliseconds
    with pytest.raises(GetTimeoutError):
        minray.get([ref, minray.put(1)], timeout=0)
    assert issubclass(GetTimeoutError, TimeoutError)
    open(gate, "w").close()
    assert minray.get(ref, timeout=30) == 42


@pytest.mark.parametrize("value", [
    1, -2.5, "text", b"\x00bytes", None, True, [1, [2, 3]], (1, "a"), {"k": [1, 2]},
    {1, 2, 3}, "x" * 300_000, list(range(50_000)),
])
def test_put_get_round_trip(value):
    ref = minray.put(value)
    assert isinstance(ref, minray.ObjectRef)
    assert minray.get(ref) == value
    assert minray.get(identity.remote(ref)) == value        # through a worker too


def test_put_tutorial_snippets():
    x_id = minray.put([1, 2, 3])
    assert minray.get(x_id) == [1, 2, 3]
    result_ids = [minray.put(i) for i in range(10)]
    assert minray.get(result_ids) == list(range(10))


def test_numpy_get_is_zero_copy_and_read_only():
    array = np.arange(1_000_000, dtype=np.float64)       # 8 MB: lives in the store
    ref = minray.put(array)
    first, second = minray.get(ref), minray.get(ref)
    np.testing.assert_array_equal(first, array)
    assert not first.flags.writeable
    with pytest.raises(ValueError):
        first[0] = 1.0
    assert np.shares_memory(first, second)               # both views of the shared copy
    # A task's large result too.
    @minray.remote
    def make(n):
        return np.ones(n, dtype=np.uint8)

    result = minray.get(make.remote(4_000_000))
    assert result.shape == (4_000_000,) and int(result.sum()) == 4_000_000
    assert not result.flags.writeable
    # Small arrays round trip as well.
    small = np.arange(10, dtype=np.int32)
    np.testing.assert_array_equal(minray.get(minray.put(small)), small)


def _store_puts(minimum_size):
    return [o for o in minray.state.objects(limit=1_000_000)
            if o.get("kind") == "store" and o.get("size", 0) >= minimum_size
            and o.get("task_id") is None]


def test_large_argument_is_put_once_and_passed_by_reference():
    @minray.remote
    def stats(x):
        return float(x.sum()), x.flags.writeable

    big = np.ones(2_000_000, dtype=np.float64)       # 16 MB, far above the inline limit
    before = {o["id"] for o in _store_puts(big.nbytes)}
    total, writeable = minray.get(stats.remote(big))
    assert total == 2_000_000.0
    assert writeable is False                         # the worker reads the shared copy
    new = poll(lambda: [o for o in _store_puts(big.nbytes) if o["id"] not in before],
               what="the large argument in the objects table")
    assert len(new) == 1
    # A small argument travels inline: no store object for it.
    assert minray.get(stats.remote(np.ones(10))) == (10.0, False)


# ---------------------------------------------------------------- wait

def test_wait_ready_and_not_ready_in_input_order(gate):
    slow = wait_for_file.remote(gate, "slow")
    fast = [identity.remote(i) for i in range(3)]
    refs = [fast[0], slow, fast[1], fast[2]]
    ready, not_ready = minray.wait(refs, num_returns=3, timeout=30)
    assert ready == [fast[0], fast[1], fast[2]]
    assert not_ready == [slow]
    # num_returns=1 (default) returns exactly one ref, the first ready one in input order.
    ready, not_ready = minray.wait(refs)
    assert len(ready) == 1 and ready[0] in fast
    assert len(not_ready) == 3 and slow in not_ready
    assert [r for r in refs if r in ready or r in not_ready] == refs
    open(gate, "w").close()
    ready, not_ready = minray.wait(refs, num_returns=4, timeout=30)
    assert ready == refs and not_ready == []


def test_wait_timeout_is_in_seconds(gate):
    slow = wait_for_file.remote(gate)
    started = time.monotonic()
    ready, not_ready = minray.wait([slow], timeout=0.5)
    elapsed = time.monotonic() - started
    assert (ready, not_ready) == ([], [slow])
    assert 0.4 <= elapsed < 15, elapsed


def test_wait_timeout_zero_returns_at_once(gate):
    slow = wait_for_file.remote(gate)
    done = minray.put("done")
    ready, not_ready = minray.wait([slow, done], num_returns=2, timeout=0)
    assert ready == [done] and not_ready == [slow]


def test_wait_rejects_duplicates_and_too_many_returns():
    ref = minray.put(1)
    other = minray.put(2)
    with pytest.raises(ValueError, match="more than once"):
        minray.wait([ref, other, ref])
    with pytest.raises(ValueError, match=r"num_returns \(3\)"):
        minray.wait([ref, other], num_returns=3)
    with pytest.raises(ValueError):
        minray.wait([ref], num_returns=0)
    with pytest.raises(TypeError):
        minray.wait(ref)                           # a ref, not a list
    with pytest.raises(TypeError):
        minray.wait([ref, 5])
    with pytest.raises(ValueError):
        minray.wait([ref], timeout=-1)
    assert minray.wait([]) == ([], [])              # as in Ray: nothing to wait for


def test_wait_loop_from_the_tutorial():
    # Whenever one task finishes, process it and start a new one.
    @minray.remote
    def one():
        return 1

    remaining = [one.remote() for _ in range(5)]
    total = 0
    for _ in range(40):
        ready, remaining = minray.wait(remaining)
        assert len(ready) == 1
        total += sum(minray.get(ready))
        remaining.append(one.remote())
    total += sum(minray.get(remaining))
    assert total == 45


def test_wait_loop_processes_results_as_they_finish(tmp_path):
    # Four tasks run at once; each finishes when its gate opens. Opened in
    # an order unlike the submission order, wait hands each back as it ends.
    gates = [str(tmp_path / f"gate{i}") for i in range(4)]
    refs = [wait_for_file.options(num_cpus=0.5).remote(gates[i], i) for i in range(4)]
    remaining = list(refs)
    order = []
    try:
        for i in (2, 0, 3, 1):
            open(gates[i], "w").close()
            ready, remaining = minray.wait(remaining, timeout=30)
            assert ready, "nothing finished within 30 s"
            order.extend(minray.get(ready))
            assert [r for r in refs if r in remaining] == remaining      # input order kept
    finally:
        for gate in gates:
            open(gate, "w").close()
    assert order == [2, 0, 3, 1]
    assert remaining == []


# ---------------------------------------------------------------- arguments and dependencies

def test_top_level_refs_are_resolved_nested_refs_arrive_as_refs():
    @minray.remote
    def inspect(top, nested_list, nested_dict):
        assert not isinstance(top, minray.ObjectRef)
        inner = nested_list[0]
        assert isinstance(inner, minray.ObjectRef), type(inner)
        assert isinstance(nested_dict["k"], minray.ObjectRef)
        return top, minray.get(inner), minray.get(nested_dict["k"])

    a = minray.put("A")
    b = identity.remote("B")
    c = minray.put(np.arange(500_000))                # in the store
    top, got_b, got_c = minray.get(inspect.remote(a, [b], {"k": c}))
    assert top == "A" and got_b == "B"
    np.testing.assert_array_equal(got_c, np.arange(500_000))
    # Keyword arguments: a top-level ref is resolved there too.
    top, got_b, got_c = minray.get(inspect.remote(nested_dict={"k": b}, top=identity.remote(7),
                                                  nested_list=(a,)))
    assert (top, got_b, got_c) == (7, "A", "B")


def test_chain_of_dependent_tasks():
    @minray.remote
    def f(x):
        return x + 1

    x = f.remote(0)
    y = f.remote(x)
    z = f.remote(y)
    assert minray.get(z) == 3
    ref = minray.put(0)
    for _ in range(50):
        ref = f.remote(ref)
    assert minray.get(ref) == 50


def test_tree_reduce_from_the_tutorial():
    @minray.remote
    def generate_data(seed):
        return np.random.default_rng(seed).normal(size=1000)

    @minray.remote
    def aggregate_data(x, y):
        return x + y

    data = [generate_data.remote(i) for i in range(100)]
    while len(data) > 1:
        data.append(aggregate_data.remote(data.pop(0), data.pop(0)))
    expected = sum(np.random.default_rng(i).normal(size=1000) for i in range(100))
    np.testing.assert_allclose(minray.get(data)[0], expected)


def test_tasks_submit_tasks_nested_experiments():
    @minray.remote
    def sub_experiment(i, j):
        return i + j

    @minray.remote
    def run_experiment(i):
        sub_results = [sub_experiment.remote(i, j) for j in range(10)]
        return sum(minray.get(sub_results))

    results = [run_experiment.remote(i) for i in range(5)]
    assert minray.get(results) == [45, 55, 65, 75, 85]


def test_task_returns_a_ref_made_inside_it():
    @minray.remote
    def inner():
        return minray.put("made inside")

    ref = minray.get(inner.remote())
    assert isinstance(ref, minray.ObjectRef)
    assert minray.get(ref) == "made inside"


def test_tasks_given_back_by_a_blocked_worker_still_run(tmp_path):
    # Short tasks queue up behind two running tasks (all CPUs taken); those
    # then block in get, lend their CPUs and give the queued tasks back. Every
    # worker must still be able to run the function later.
    @minray.remote
    def short(i):
        return i

    @minray.remote
    def outer(started, gate):
        open(started, "w").close()
        deadline = time.monotonic() + 30
        while not os.path.exists(gate) and time.monotonic() < deadline:
            time.sleep(0.005)
        # The first get reads the tasks queued behind us; the second gives
        # them back (it blocks again with them not started).
        first = minray.get(short.remote(-1), timeout=30)
        return first + minray.get(short.remote(0), timeout=30)

    gate = str(tmp_path / "gate")
    started = [str(tmp_path / f"started{i}") for i in range(2)]
    outers = [outer.remote(path, gate) for path in started]
    try:
        poll(lambda: all(os.path.exists(p) for p in started), what="both outer tasks running")
        # Learn that short is short, on workers other than the two busy ones.
        free = short.options(num_cpus=0)
        assert minray.get([free.remote(i) for i in range(20)], timeout=30) == list(range(20))
        queued = [short.remote(i) for i in range(1, 40)]     # queued behind the outers
    finally:
        open(gate, "w").close()
    assert minray.get(outers, timeout=30) == [-1, -1]
    assert minray.get(queued, timeout=30) == list(range(1, 40))
    assert minray.get([short.remote(i) for i in range(300)], timeout=60) == list(range(300))


def test_short_tasks_never_queue_behind_a_long_running_task(tmp_path):
    # Once a task's function is known to be short, the node manager queues
    # such tasks on busy workers, but never on one running a long or untimed
    # task: there they would wait for it while another CPU runs nothing.
    @minray.remote
    def hold(gate):
        deadline = time.monotonic() + 30
        while not os.path.exists(gate) and time.monotonic() < deadline:
            time.sleep(0.005)
        return "released"

    @minray.remote
    def quick(i):
        return i

    assert minray.get([quick.remote(i) for i in range(20)], timeout=30) == list(range(20))
    gate = str(tmp_path / "gate")
    held = hold.remote(gate)
    try:
        refs = [quick.remote(i) for i in range(200)]
        ready, _ = minray.wait(refs, num_returns=len(refs), timeout=20)
        assert len(ready) == len(refs), f"{len(refs) - len(ready)} quick tasks stuck"
    finally:
        open(gate, "w").close()
    assert minray.get(held, timeout=30) == "released"


@pytest.mark.parametrize("learned_seconds, queued_ahead", [(0.01, 2), (0.08, 0)])
def test_medium_tasks_queue_one_ahead_and_long_ones_do_not(tmp_path, learned_seconds,
                                                            queued_ahead):
    # A function whose runs take ~10 ms gets one task queued behind each busy
    # worker (no idle round trip between them); one taking ~80 ms does not
    # (a task stuck behind it while a CPU frees up would cost more than the
    # round trip saves). The node manager reports queued-on-a-worker tasks as
    # RUNNING and tasks it still holds as PENDING.
    @minray.remote
    def timed(seconds, gate=None):
        time.sleep(seconds)
        if gate is not None:
            deadline = time.monotonic() + 30
            while not os.path.exists(gate) and time.monotonic() < deadline:
                time.sleep(0.005)
        return seconds

    for _ in range(6):                       # teach the node manager its run time
        minray.get(timed.remote(learned_seconds), timeout=30)
    gate = str(tmp_path / "gate")
    refs = [timed.remote(0, gate) for _ in range(6)]
    try:
        def states():
            rows = [t for t in minray.state.tasks() if t["name"].endswith("timed")
                    and t["state"] in ("RUNNING", "PENDING")]
            return sorted(t["state"] for t in rows)
        expected = ["PENDING"] * (4 - queued_ahead) + ["RUNNING"] * (2 + queued_ahead)
        poll(lambda: states() == expected, what=f"tasks dispatched as {expected} (now {states()})")
    finally:
        open(gate, "w").close()
    assert minray.get(refs, timeout=60) == [0] * 6


def test_children_queued_on_their_parents_worker_do_not_deadlock():
    # Every CPU is busy with a parent task, and the children are known to be
    # short, so the node manager queues them on busy workers, maybe on the
    # parent's own. The parent then blocks in get: its children must be run
    # elsewhere, not wait behind it forever.
    @minray.remote
    def child(i):
        return i

    assert minray.get([child.remote(i) for i in range(50)]) == list(range(50))

    @minray.remote
    def parent():
        refs = [child.remote(i) for i in range(10)]
        # Some work between submitting and getting: the node manager has
        # queued the children by the time we block (this widens the window
        # for the bug; it synchronizes nothing).
        started = time.monotonic()
        while time.monotonic() - started < 0.05:
            pass
        return sum(minray.get(refs, timeout=20))

    assert minray.get([parent.remote() for _ in range(2)], timeout=60) == [45] * 2


def test_recursion_deeper_than_the_cpus():
    @minray.remote
    def factorial(n):
        if n <= 1:
            return 1
        return n * minray.get(factorial.remote(n - 1))

    assert minray.get(factorial.remote(8), timeout=60) == 40320


def test_recursive_factorial_with_one_cpu():
    proc = run_driver("""
        import minray
        minray.init(num_cpus=1)

        @minray.remote
        def factorial(n):
            if n <= 1:
                return 1
            return n * minray.get(factorial.remote(n - 1))

        print("result", minray.get(factorial.remote(6), timeout=60))
        # wait also lends the CPU back.
        @minray.remote
        def waiter():
            ref = factorial.remote(3)
            ready, _ = minray.wait([ref], timeout=60)
            return minray.get(ready[0])

        print("waited", minray.get(waiter.remote(), timeout=60))
    """)
    assert "result 720" in proc.stdout
    assert "waited 6" in proc.stdout


# ---------------------------------------------------------------- resources

def test_cluster_and_available_resources_and_nodes(gate):
    assert minray.cluster_resources()["CPU"] == 2.0
    assert poll(lambda: minray.available_resources().get("CPU") == 2.0,
                what="both CPUs free")
    ref = wait_for_file.remote(gate)
    poll(lambda: minray.available_resources().get("CPU") == 1.0,
         what="one CPU taken by the running task")
    open(gate, "w").close()
    minray.get(ref, timeout=30)
    poll(lambda: minray.available_resources().get("CPU") == 2.0, what="the CPU given back")
    nodes = minray.nodes()
    assert len(nodes) == 1
    assert nodes[0]["Alive"] is True
    assert nodes[0]["Resources"]["CPU"] == 2.0
    assert len(nodes[0]["NodeID"]) == 32


@minray.remote
def meet(directory, i, count):
    """Say we started, then wait until `count` tasks have: True if they all
    ran at the same time."""
    open(os.path.join(directory, str(i)), "w").close()
    deadline = time.monotonic() + 30
    while len(os.listdir(directory)) < count:
        if time.monotonic() > deadline:
            return False
        time.sleep(0.005)
    return True


def test_tasks_run_in_parallel_on_both_cpus(tmp_path):
    assert minray.get([meet.remote(str(tmp_path), i, 2) for i in range(2)],
                      timeout=60) == [True, True]


def test_fractional_cpus_run_concurrently(tmp_path):
    # Four tasks of half a CPU each fit on two CPUs at once.
    refs = [meet.options(num_cpus=0.5).remote(str(tmp_path), i, 4) for i in range(4)]
    assert minray.get(refs, timeout=60) == [True] * 4


def test_impossible_resource_request_fails_clearly():
    @minray.remote(num_cpus=64)
    def too_big():
        return 1

    @minray.remote(resources={"unicorn": 1})
    def needs_unicorn():
        return 1

    for ref, pattern in ((too_big.remote(), "CPU"), (needs_unicorn.remote(), "unicorn"),
                         (identity.options(num_gpus=1).remote(1), "GPU")):
        with pytest.raises(TaskUnschedulableError, match=pattern):
            minray.get(ref, timeout=20)
    # A task depending on an impossible one fails the same way.
    with pytest.raises(TaskUnschedulableError):
        minray.get(identity.remote(too_big.remote()), timeout=20)
    assert minray.get(identity.remote(1)) == 1


def test_gpu_ids_and_cuda_visible_devices(tmp_path):
    proc = run_driver(f"""
        import os, time
        import minray
        minray.init(num_cpus=2, num_gpus=2)
        assert minray.cluster_resources()["GPU"] == 2.0
        assert minray.get_gpu_ids() == []            # the driver holds none

        @minray.remote(num_gpus=1)
        def gpu_task(directory, name):
            ids = minray.get_gpu_ids()
            open(os.path.join(directory, name), "w").close()
            deadline = time.monotonic() + 30       # run at the same time as the other
            while len(os.listdir(directory)) < 2 and time.monotonic() < deadline:
                time.sleep(0.005)
            return ids, os.environ.get("CUDA_VISIBLE_DEVICES")

        @minray.remote
        def cpu_task():
            return minray.get_gpu_ids()

        a, b = minray.get([gpu_task.remote({str(tmp_path)!r}, "a"),
                           gpu_task.remote({str(tmp_path)!r}, "b")], timeout=60)
        print("A", a)
        print("B", b)
        print("CPU", minray.get(cpu_task.remote()))
        two = minray.get(gpu_task.options(num_gpus=2).remote({str(tmp_path)!r}, "c"))
        print("TWO", two)

        # A task blocked in get/wait lends its CPU, not its GPUs: a GPU task
        # submitted meanwhile waits for them (instead of running with none).
        @minray.remote(num_gpus=1)
        def quick():
            return minray.get_gpu_ids()

        @minray.remote(num_gpus=2)
        def holder():
            probe = quick.remote()
            ready, _ = minray.wait([probe], timeout=1.0)
            return minray.get_gpu_ids(), len(ready), probe

        held, ready_while_held, probe = minray.get(holder.remote(), timeout=60)
        print("HELD", (held, ready_while_held, minray.get(probe, timeout=60)))
    """)
    results = {}
    for line in proc.stdout.splitlines():
        key, _, rest = line.partition(" ")
        results[key] = eval(rest)
    (ids_a, env_a), (ids_b, env_b) = results["A"], results["B"]
    assert len(ids_a) == 1 and len(ids_b) == 1
    assert ids_a != ids_b and {ids_a[0], ids_b[0]} == {0, 1}
    assert env_a == str(ids_a[0]) and env_b == str(ids_b[0])
    assert results["CPU"] == []
    ids_two, env_two = results["TWO"]
    assert sorted(ids_two) == [0, 1] and sorted(env_two.split(",")) == ["0", "1"]
    held, ready_while_held, probe_ids = results["HELD"]
    assert sorted(held) == [0, 1]
    assert ready_while_held == 0, "a GPU task ran while a blocked task held every GPU"
    assert len(probe_ids) == 1


def test_custom_resources(tmp_path):
    proc = run_driver(f"""
        import os, time
        import minray
        minray.init(num_cpus=2, resources={{"bank": 1, "slots": 4}})
        total = minray.cluster_resources()
        assert total["bank"] == 1.0 and total["slots"] == 4.0, total

        @minray.remote(resources={{"bank": 1}})
        def exclusive(directory, i):
            # Fails if another bank holder is inside at the same time.
            inside = os.path.join(directory, "inside")
            assert not os.path.exists(inside), "two tasks held the bank at once"
            open(inside, "w").close()
            time.sleep(0.05)
            os.unlink(inside)
            return i

        print("EXCL", minray.get([exclusive.remote({str(tmp_path)!r}, i) for i in range(4)]))

        @minray.remote(num_cpus=0, resources={{"slots": 1}})
        def hold(gate):
            deadline = time.monotonic() + 30
            while not os.path.exists(gate) and time.monotonic() < deadline:
                time.sleep(0.005)
            return True

        gate = os.path.join({str(tmp_path)!r}, "gate")
        refs = [hold.remote(gate) for _ in range(3)]
        deadline = time.monotonic() + 20
        while minray.available_resources().get("slots") != 1.0:
            assert time.monotonic() < deadline, minray.available_resources()
            time.sleep(0.01)
        open(gate, "w").close()
        print("HOLD", minray.get(refs, timeout=30))
        print("OPTIONS", minray.get(exclusive.options(resources={{"slots": 2}}).remote(
            {str(tmp_path)!r}, 9)))
    """)
    assert "EXCL [0, 1, 2, 3]" in proc.stdout
    assert "HOLD [True, True, True]" in proc.stdout
    assert "OPTIONS 9" in proc.stdout


# ---------------------------------------------------------------- errors

def test_task_exception_is_reraised_as_the_original_type_with_traceback():
    # A local class travels by value (cloudpickle), with its own __init__
    # signature: the error raised by get must still be a CustomError.
    class CustomError(Exception):
        def __init__(self, message, code):
            super().__init__(message)
            self.code = code

    @minray.remote
    def fail_value():
        raise ValueError("this task failed on purpose")

    @minray.remote
    def fail_custom():
        raise CustomError("custom failure", 7)

    with pytest.raises(ValueError) as info:
        minray.get(fail_value.remote())
    error = info.value
    assert isinstance(error, RayTaskError)
    assert "this task failed on purpose" in str(error)
    assert "Traceback" in str(error) and "fail_value" in str(error)
    assert "raise ValueError" in str(error)            # the remote source line

    with pytest.raises(CustomError) as info:
        minray.get(fail_custom.remote())
    assert isinstance(info.value, RayTaskError)
    assert info.value.code == 7
    assert "custom failure" in str(info.value)


def test_error_propagates_through_dependent_tasks():
    @minray.remote
    def fail():
        raise KeyError("root cause")

    @minray.remote
    def plus_one(x):
        return x + 1

    downstream = plus_one.remote(plus_one.remote(fail.remote()))
    with pytest.raises(KeyError) as info:
        minray.get(downstream)
    assert isinstance(info.value, RayTaskError)
    assert "root cause" in str(info.value)
    # A list get raises too, and the cluster still works.
    with pytest.raises(RayTaskError):
        minray.get([identity.remote(1), downstream])
    assert minray.get(plus_one.remote(1)) == 2


def test_error_in_nested_task_reaches_the_driver():
    @minray.remote
    def inner():
        raise ZeroDivisionError("inner division")

    @minray.remote
    def outer():
        return minray.get(inner.remote())

    with pytest.raises(ZeroDivisionError, match="inner division"):
        minray.get(outer.remote())


def test_errors_are_recorded_in_error_info():
    marker = f"recorded failure {os.urandom(4).hex()}"

    @minray.remote
    def fail(text):
        raise RuntimeError(text)

    with pytest.raises(RuntimeError):
        minray.get(fail.remote(marker))
    rows = poll(lambda: [r for r in minray.error_info() if marker in r.get("message", "")],
                what="the error in error_info()")
    assert rows[0]["function"].endswith("fail")
    assert "RuntimeError" in rows[0]["message"]


def test_task_error_is_printed_once_without_minray_frames():
    # Raised by get and not caught: Python prints it, and minray adds no copy
    # of its own; the remote traceback starts at the user's function.
    proc = run_driver("""
        import minray
        minray.init(num_cpus=1)

        @minray.remote
        def fail():
            raise Exception("This task failed!!")

        minray.get(fail.remote())
    """, check=False)
    assert proc.returncode == 1
    assert proc.stderr.count("This task failed!!") == 1, proc.stderr
    assert "Traceback" in proc.stderr and "in fail" in proc.stderr
    assert "executor.py" not in proc.stderr, proc.stderr


def test_error_caught_from_get_is_not_printed_but_a_dropped_one_is():
    proc = run_driver("""
        import minray
        minray.init(num_cpus=1)

        @minray.remote
        def fail(text):
            raise Exception(text)

        try:
            minray.get(fail.remote("caught-marker"))
        except Exception as exc:
            print("caught", type(exc).__name__)
        ref = fail.remote("dropped-marker")
        minray.wait([ref])           # ready, never raised, then dropped
        del ref
        print("dropped")
    """)
    assert "caught RayTaskError(Exception)" in proc.stdout
    assert "caught-marker" not in proc.stderr
    assert proc.stderr.count("dropped-marker") == 1, proc.stderr
    assert "minray: unhandled error" in proc.stderr


def test_error_of_a_task_nobody_gets_is_printed_in_the_background(tmp_path):
    stderr_path = tmp_path / "stderr"
    with open(stderr_path, "w") as stderr:
        proc = subprocess.run([sys.executable, "-c", textwrap.dedent(f"""
            import time
            import minray
            minray.init(num_cpus=1)

            @minray.remote
            def f():
                raise Exception("This task failed!!")

            f.remote()      # An error message will be printed in the background.
            deadline = time.monotonic() + 20
            while not minray.error_info():
                assert time.monotonic() < deadline
                time.sleep(0.02)
            # The error is recorded; now poll our own stderr for it, a while.
            deadline = time.monotonic() + 5
            while "This task failed!!" not in open({str(stderr_path)!r}).read():
                if time.monotonic() > deadline:
                    break
                time.sleep(0.02)
        """)], stderr=stderr, timeout=60)
    assert proc.returncode == 0
    assert "This task failed!!" in stderr_path.read_text()


def test_worker_killed_mid_task_is_retried(tmp_path):
    marker = str(tmp_path / "killed-once")

    @minray.remote(max_retries=1)
    def die_once(path):
        if not os.path.exists(path):
            open(path, "w").close()
            os.kill(os.getpid(), 9)
        return os.getpid()

    pid = minray.get(die_once.remote(marker), timeout=60)
    assert os.path.exists(marker)
    assert pid != os.getpid()
    # The cluster keeps working, on both CPUs.
    assert minray.get([add.remote(i, i) for i in range(20)], timeout=60) == \
        [2 * i for i in range(20)]
    poll(lambda: minray.available_resources().get("CPU") == 2.0, what="both CPUs free")


def test_worker_killed_without_retries_raises_worker_crashed():
    @minray.remote(max_retries=0)
    def die():
        os.kill(os.getpid(), 9)

    ref = die.remote()
    with pytest.raises(WorkerCrashedError):
        minray.get(ref, timeout=60)
    # A task depending on it fails the same way; new tasks run.
    with pytest.raises(WorkerCrashedError):
        minray.get(identity.remote(ref), timeout=60)
    assert minray.get([identity.remote(i) for i in range(10)], timeout=60) == list(range(10))
    # Running out of retries after a crash each time: also WorkerCrashedError.
    with pytest.raises(WorkerCrashedError):
        minray.get(die.options(max_retries=2).remote(), timeout=60)
    assert minray.get(add.remote(2, 3), timeout=60) == 5


# ---------------------------------------------------------------- logs and state

def test_worker_output_reaches_the_driver_with_its_name_and_pid():
    code = """
        import os, sys
        import minray
        minray.init(num_cpus=1{extra})

        @minray.remote
        def speak(i):
            print("hello from task", i)
            print("to stderr", i, file=sys.stderr)
            return os.getpid()

        pid = minray.get(speak.remote(7))
        print("WORKER", pid)
        minray.shutdown()
    """
    proc = run_driver(code.format(extra=""))
    pid = int(proc.stdout.split("WORKER ")[1].split()[0])
    assert f"(speak pid={pid}) hello from task 7" in proc.stdout
    assert f"(speak pid={pid}) to stderr 7" in proc.stderr

    quiet = run_driver(code.format(extra=", log_to_driver=False"))
    assert "WORKER" in quiet.stdout
    assert "hello from task" not in quiet.stdout + quiet.stderr
    assert "to stderr" not in quiet.stdout + quiet.stderr


def test_output_of_forked_children_and_endless_lines():
    code = """
        import os, sys
        import minray
        minray.init(num_cpus=1)

        @minray.remote
        def forks():
            print("parent before")
            pid = os.fork()
            if pid == 0:
                print("from the child " * 20000)   # a forked child: to the original stream
                sys.stdout.flush()
                os._exit(0)
            os.waitpid(pid, 0)
            sys.stdout.write("x" * 100_000)        # a line that never ends
            print("parent after")
            return 1

        print("RESULT", sum(minray.get([forks.remote() for _ in range(3)])))
        minray.shutdown()
    """
    proc = run_driver(code)
    assert "RESULT 3" in proc.stdout, proc.stderr
    lines = proc.stdout.splitlines()
    assert sum(line.startswith("(forks pid=") and line.endswith("parent before")
               for line in lines) == 3
    assert sum(line.endswith("parent after") for line in lines) == 3
    assert sum(line.count("x") >= 100_000 - 64 * 1024 for line in lines) >= 3


def test_finished_tasks_are_listed_in_the_tasks_table():
    @minray.remote
    def listed_task(x):
        return x

    refs = [listed_task.remote(i) for i in range(5)]
    assert minray.get(refs) == list(range(5))
    wanted = {ref.task_id().hex() for ref in refs}

    def finished():
        rows = {r["id"]: r for r in minray.state.tasks(limit=100_000)}
        return all(t in rows and rows[t]["state"] == "FINISHED" for t in wanted) and rows

    rows = poll(finished, what="the tasks in the tasks table")
    for task_id in wanted:
        assert rows[task_id]["name"].endswith("listed_task")


def test_running_and_pending_tasks_are_listed_during_the_run(gate):
    running = wait_for_file.remote(gate, 1)
    pending = identity.remote(running)              # waits for its argument

    def states():
        rows = {r["id"]: r for r in minray.state.tasks(limit=100_000)}
        got = (rows.get(running.task_id().hex(), {}).get("state"),
               rows.get(pending.task_id().hex(), {}).get("state"))
        return got if got == ("RUNNING", "PENDING") else None

    poll(states, what="the running and the pending task in minray.state.tasks()")
    open(gate, "w").close()
    assert minray.get(pending, timeout=30) == 1

    def finished():
        rows = {r["id"]: r for r in minray.state.tasks(limit=100_000)}
        return all(rows.get(ref.task_id().hex(), {}).get("state") == "FINISHED"
                   for ref in (running, pending))

    poll(finished, what="both tasks FINISHED")


def test_unlimited_retries_rerun_a_task_whose_worker_died(tmp_path):
    marker = str(tmp_path / "killed-once")

    @minray.remote(max_retries=-1)
    def die_once(path):
        if not os.path.exists(path):
            open(path, "w").close()
            os.kill(os.getpid(), 9)
        return "survived"

    assert minray.get(die_once.remote(marker), timeout=60) == "survived"


def test_wait_with_zero_timeout_sees_results_that_already_arrived():
    ref = add.remote(1, 2)
    assert minray.get(ref, timeout=60) == 3
    fresh = add.remote(2, 2)
    ready = poll(lambda: minray.wait([fresh], timeout=0)[0], what="a finished task in wait(timeout=0)")
    assert ready == [fresh]


def test_inside_a_task_minray_is_initialized_and_blas_threads_are_one():
    @minray.remote
    def inspect_worker():
        return minray.is_initialized(), os.environ.get("OMP_NUM_THREADS")

    assert minray.get(inspect_worker.remote(), timeout=60) == (True, os.environ.get(
        "OMP_NUM_THREADS", "1"))


def test_module_beside_the_driver_script_imports_in_workers(tmp_path):
    (tmp_path / "helper_module_for_workers.py").write_text("def triple(x):\n    return 3 * x\n")
    script = tmp_path / "driver.py"
    script.write_text(textwrap.dedent("""
        import minray
        from helper_module_for_workers import triple
        minray.init(num_cpus=1)
        print("result", minray.get(minray.remote(triple).remote(5), timeout=60))
        minray.shutdown()
    """))
    proc = subprocess.run([sys.executable, str(script)], cwd="/", capture_output=True,
                          text=True, timeout=90)
    assert proc.returncode == 0, proc.stderr
    assert "result 15" in proc.stdout


def test_state_api_lists_live_objects_including_small_results():
    ref = add.remote(20, 22)
    assert minray.get(ref, timeout=60) == 42
    ids = {row["id"]: row for row in minray.state.objects()}
    assert ref.hex() in ids
    assert ids[ref.hex()]["kind"] == "inline"
