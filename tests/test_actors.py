"""Actors through the public API on one shared cluster: creation and options,
ordered and parallel calls, arguments, passing handles, names, kill and
exit_actor, release of unreferenced actors, threaded and async actors, and
the original docs' Counter and parameter server patterns.

Failures (raising methods and constructors, kill -9, restarts) are in
test_actor_failures.py; everything that needs its own driver process (other
drivers, detached actors, GPUs, a driver exiting) in test_actor_drivers.py.

Waiting is done with gate files and poll() deadlines, never with sleeps.
"""
import os
import threading
import time

import numpy as np
import pytest

import minray
from minray.exceptions import (
    ActorDiedError, RayActorError, RayTaskError, TaskUnschedulableError,
)
from minray_driver import gone, module_cluster, poll, wait_for_file


cluster = module_cluster(num_cpus=2, resources={"widget": 1})


@minray.remote
class Counter:
    def __init__(self, start=0):
        self.value = start

    def increment(self, by=1):
        self.value += by
        return self.value

    def read(self):
        return self.value

    def pid(self):
        return os.getpid()


@minray.remote
class Log:
    """Appends what it is sent; can be held up by a gate file."""

    def __init__(self):
        self.items = []

    def append(self, item):
        self.items.append(item)
        return len(self.items)

    def append_after(self, path, item):
        wait_for_file(path)
        self.items.append(item)
        return len(self.items)

    def items_so_far(self):
        return list(self.items)

    def pid(self):
        return os.getpid()


@minray.remote
def wait_then_return(path, value):
    wait_for_file(path)
    return value


# ---------------------------------------------------------------- creation

def test_counter_from_the_original_docs():
    # The docs' example, as written, with minray names (and today's .remote()).
    @minray.remote
    class Counter(object):
        def __init__(self):
            self.value = 0

        def increment(self):
            self.value += 1
            return self.value

    # Create ten actors.
    counters = [Counter.remote() for _ in range(10)]
    # Increment each counter once and get the results. These tasks all happen in
    # parallel.
    results = minray.get([c.increment.remote() for c in counters])
    assert results == [1, 1, 1, 1, 1, 1, 1, 1, 1, 1]
    # Increment the first counter five times. These tasks are executed serially
    # and share state.
    results = minray.get([counters[0].increment.remote() for _ in range(5)])
    assert results == [2, 3, 4, 5, 6]


def test_each_actor_has_its_own_dedicated_process():
    a, b = Counter.remote(), Counter.remote(100)
    pid_a, pid_b = minray.get([a.pid.remote(), b.pid.remote()])
    assert pid_a != pid_b and os.getpid() not in (pid_a, pid_b)
    assert minray.get([a.increment.remote(), b.increment.remote(5)]) == [1, 105]
    # Every call of an actor runs in its one process.
    assert set(minray.get([a.pid.remote() for _ in range(20)])) == {pid_a}


def test_remote_on_a_class_with_options():
    @minray.remote(num_cpus=1, resources={"widget": 1}, max_restarts=1, max_concurrency=1,
                   name="options-on-the-decorator", lifetime=None)
    class Holder:
        def pid(self):
            return os.getpid()

    h = Holder.remote()
    minray.get(h.pid.remote())
    available = minray.available_resources()
    assert available.get("CPU") == 1.0, available          # the actor holds 1 of 2 CPUs
    assert "widget" not in available, available
    assert minray.get_actor("options-on-the-decorator") == h
    minray.kill(h)
    poll(lambda: minray.available_resources().get("CPU") == 2.0
         and minray.available_resources().get("widget") == 1.0,
         what="the killed actor's resources to be free again")


def test_options_override_without_changing_the_class():
    @minray.remote
    class Plain:
        def resources(self):
            return minray.available_resources()

    plain = Plain.remote()
    assert minray.get(plain.resources.remote()).get("CPU") == 2.0   # actors hold 0 CPU by default
    big = Plain.options(num_cpus=2, name="overridden").remote()
    assert "CPU" not in minray.get(big.resources.remote())
    assert minray.get_actor("overridden") == big
    minray.kill(big)
    again = Plain.remote()               # the class itself kept its defaults
    assert minray.get(again.resources.remote()).get("CPU") == 2.0
    with pytest.raises(ValueError, match="name"):
        minray.get_actor("overridden")


def test_an_actor_that_cannot_be_placed_fails_its_calls_clearly():
    @minray.remote(resources={"widget": 5})
    class Greedy:
        def hello(self):
            return "hello"

    greedy = Greedy.remote()
    with pytest.raises(TaskUnschedulableError, match="widget"):
        minray.get(greedy.hello.remote(), timeout=20)


def test_an_actor_waits_for_its_resources_and_gets_them_when_freed():
    @minray.remote(resources={"widget": 1})
    class Holder:
        def pid(self):
            return os.getpid()

    first = Holder.remote()
    first_pid = minray.get(first.pid.remote())
    second = Holder.remote()
    ref = second.pid.remote()
    ready, _ = minray.wait([ref], timeout=0.3)
    assert not ready, "a second widget actor started while the only widget was held"
    minray.kill(first)
    second_pid = minray.get(ref, timeout=30)
    assert second_pid != first_pid


def test_remote_returns_a_handle_at_once_while_the_constructor_runs(gate):
    @minray.remote
    class Slow:
        def __init__(self, path):
            wait_for_file(path)        # raises if .remote() waited for this

        def ready(self):
            return "ready"

    started = time.monotonic()
    slow = Slow.remote(gate)
    named = Slow.options(name="slow-but-named").remote(gate)
    elapsed = time.monotonic() - started
    refs = [slow.ready.remote(), named.ready.remote()]
    ready, _ = minray.wait(refs, num_returns=2, timeout=0.1)
    assert not ready                    # the constructors are still waiting
    assert isinstance(refs[0], minray.ObjectRef)
    open(gate, "w").close()
    assert minray.get(refs, timeout=30) == ["ready", "ready"]
    assert elapsed < 10, elapsed


# ---------------------------------------------------------------- calls

def test_calls_from_one_caller_run_in_the_order_sent():
    log = Log.remote()
    refs = [log.append.remote(i) for i in range(200)]
    assert minray.get(refs) == list(range(1, 201))
    assert minray.get(log.items_so_far.remote()) == list(range(200))


def test_a_call_waiting_for_its_argument_holds_back_later_calls(gate):
    # The first call's argument comes from a slow task; the second call's is
    # ready at once. The second still runs after the first, as sent.
    log = Log.remote()
    slow_value = wait_then_return.remote(gate, "first")
    first = log.append.remote(slow_value)
    second = log.append.remote("second")
    ready, _ = minray.wait([second], timeout=0.3)
    assert not ready, "a later call overtook an earlier one that waited for its argument"
    open(gate, "w").close()
    assert minray.get([first, second], timeout=30) == [1, 2]
    assert minray.get(log.items_so_far.remote()) == ["first", "second"]


def test_calls_of_one_actor_do_not_overlap():
    @minray.remote
    class Timed:
        def span(self):
            start = time.monotonic()
            time.sleep(0.02)
            return start, time.monotonic()

    t = Timed.remote()
    spans = sorted(minray.get([t.span.remote() for _ in range(10)]))
    for (_, end), (next_start, _) in zip(spans, spans[1:]):
        assert end <= next_start, spans


def test_calls_to_different_actors_run_in_parallel():
    @minray.remote
    class Sleeper:
        def nap(self):
            start = time.monotonic()
            time.sleep(0.5)
            return start, time.monotonic()

        def ready(self):
            return True

    a, b = Sleeper.remote(), Sleeper.remote()
    assert minray.get([a.ready.remote(), b.ready.remote()]) == [True, True]   # both created
    started = time.monotonic()
    (start_a, end_a), (start_b, end_b) = minray.get([a.nap.remote(), b.nap.remote()])
    elapsed = time.monotonic() - started
    assert max(start_a, start_b) < min(end_a, end_b), "the two naps did not overlap"
    assert elapsed < 0.95, elapsed      # one after the other would take >= 1 s


def test_method_num_returns():
    @minray.remote
    class Splitter:
        @minray.method(num_returns=2)
        def halves(self, items):
            middle = len(items) // 2
            return items[:middle], items[middle:]

        @minray.method(num_returns=0)
        def nothing(self, path):
            open(path, "w").close()

        def pair(self):
            return 1, 2

    s = Splitter.remote()
    left, right = s.halves.remote([1, 2, 3, 4])
    assert minray.get(left) == [1, 2] and minray.get(right) == [3, 4]
    assert isinstance(s.pair.remote(), minray.ObjectRef)
    one, two = s.pair.options(num_returns=2).remote()
    assert minray.get([one, two]) == [1, 2]
    a, b, c = s.halves.options(num_returns=3).remote([1])
    with pytest.raises(RayTaskError, match="num_returns=3"):
        minray.get(a)


def test_num_returns_zero_runs_the_method(tmp_path):
    @minray.remote
    class Side:
        @minray.method(num_returns=0)
        def touch(self, path):
            open(path, "w").close()

    assert Side.remote().touch.remote(str(tmp_path / "ran")) is None
    poll(lambda: os.path.exists(tmp_path / "ran"), what="the method without returns to run")


# ---------------------------------------------------------------- arguments

def test_constructor_and_method_arguments_follow_task_semantics():
    @minray.remote
    class Holder:
        def __init__(self, value, nested, *, scale=1):
            self.value = value * scale
            self.nested = nested

        def describe(self, extra, nested, *more, key=None):
            return {
                "value": self.value,
                "ctor_nested_is_ref": isinstance(self.nested[0], minray.ObjectRef),
                "ctor_nested_value": minray.get(self.nested[0]),
                "extra": extra,
                "nested_is_ref": isinstance(nested["ref"], minray.ObjectRef),
                "nested_value": minray.get(nested["ref"]),
                "more": more, "key": key,
            }

    @minray.remote
    def twenty():
        return 20

    holder = Holder.remote(minray.put(3), [minray.put("inner")], scale=twenty.remote())
    described = minray.get(holder.describe.remote(
        twenty.remote(), {"ref": minray.put("deep")}, 7, minray.put(8), key=minray.put("k")))
    assert described == {
        "value": 60, "ctor_nested_is_ref": True, "ctor_nested_value": "inner",
        "extra": 20, "nested_is_ref": True, "nested_value": "deep",
        "more": (7, 8), "key": "k",
    }


def test_large_numpy_arguments_are_read_zero_copy():
    @minray.remote
    class Summer:
        def __init__(self, base):
            self.base = base                         # kept: stays pinned while held
            self.base_writeable = base.flags.writeable

        def add(self, x):
            return float((self.base + x).sum()), x.flags.writeable, self.base_writeable

    base = np.ones(1_000_000)
    summer = Summer.remote(base)
    total, writeable, base_writeable = minray.get(summer.add.remote(np.full(1_000_000, 2.0)))
    assert total == 3_000_000.0
    assert writeable is False and base_writeable is False   # read from shared memory
    # A ref to a large put is resolved the same way.
    total, writeable, _ = minray.get(summer.add.remote(minray.put(np.zeros(1_000_000))))
    assert total == 1_000_000.0 and writeable is False


def test_a_ref_argument_that_failed_fails_the_call_not_the_actor():
    @minray.remote
    def broken():
        raise KeyError("missing")

    c = Counter.remote()
    with pytest.raises(KeyError):
        minray.get(c.increment.remote(broken.remote()))
    assert minray.get(c.increment.remote()) == 1


# ---------------------------------------------------------------- handles

def test_handles_passed_to_tasks_call_the_same_actor():
    @minray.remote
    def bump(counter, times):
        return minray.get([counter.increment.remote() for _ in range(times)])[-1]

    @minray.remote
    def bump_in_list(counters):
        return minray.get(counters[0].increment.remote(10))

    c = Counter.remote()
    results = minray.get([bump.remote(c, 5), bump.remote(c, 5)])
    assert sorted(results)[-1] == 10
    assert minray.get(bump_in_list.remote([c])) == 20
    assert minray.get(c.read.remote()) == 20


def test_handles_passed_to_other_actors_and_returned_from_tasks():
    @minray.remote
    class Forwarder:
        def __init__(self, target):
            self.target = target

        def forward(self, by):
            return minray.get(self.target.increment.remote(by))

        def forward_to(self, other, by):
            return minray.get(other.increment.remote(by))

    @minray.remote
    def make_counter(start):
        return Counter.remote(start)

    c = Counter.remote()
    forwarder = Forwarder.remote(c)
    assert minray.get(forwarder.forward.remote(3)) == 3
    assert minray.get(forwarder.forward_to.remote(c, 4)) == 7
    assert minray.get(c.increment.remote()) == 8
    # A handle made inside a task and returned outlives the task.
    made = minray.get(make_counter.remote(50))
    assert minray.get(made.increment.remote()) == 51
    assert minray.get(forwarder.forward_to.remote(made, 1)) == 52
    assert minray.get(made.pid.remote()) != minray.get(c.pid.remote())


def test_handles_compare_by_actor():
    c = Counter.remote()
    d = Counter.remote()
    assert c == c and c != d and len({c, d, c}) == 2
    assert "Counter" in repr(c)


# ---------------------------------------------------------------- names

def test_named_actor_is_found_with_get_actor():
    c = Counter.options(name="the-counter").remote()
    c.increment.remote()
    found = minray.get_actor("the-counter")
    assert found == c
    assert minray.get(found.increment.remote()) == 2
    assert minray.get(c.read.remote()) == 2
    minray.kill(c)


def test_a_name_clash_is_a_value_error_and_the_first_actor_keeps_its_name():
    first = Counter.options(name="taken").remote(1)
    with pytest.raises(ValueError, match="taken"):
        Counter.options(name="taken").remote(2)
    assert minray.get(minray.get_actor("taken").read.remote()) == 1
    minray.kill(first)
    # Once the actor is gone the name is free again.
    with pytest.raises(ValueError, match="no live actor"):
        minray.get_actor("taken")
    second = Counter.options(name="taken").remote(2)
    assert minray.get(minray.get_actor("taken").read.remote()) == 2
    minray.kill(second)


def test_a_named_actor_is_stopped_with_its_last_handle_as_in_ray():
    c = Counter.options(name="dropped-by-name").remote(7)
    pid = minray.get(c.pid.remote())
    found = minray.get_actor("dropped-by-name")
    assert minray.get(found.read.remote()) == 7          # same actor, same state
    assert minray.get(found.pid.remote()) == pid
    del c                                   # a handle found by name does not count
    poll(lambda: gone(pid), what="the named actor's process to exit")
    with pytest.raises(ValueError, match="dropped-by-name"):
        minray.get_actor("dropped-by-name")


# ---------------------------------------------------------------- kill, exit

def test_kill_fails_the_call_in_flight_and_later_calls(gate, tmp_path):
    started = str(tmp_path / "started")

    @minray.remote
    class Busy:
        def pid(self):
            return os.getpid()

        def work(self, started, gate):
            open(started, "w").close()
            wait_for_file(gate)
            return "finished"

    busy = Busy.remote()
    pid = minray.get(busy.pid.remote())
    in_flight = busy.work.remote(started, gate)
    queued = busy.pid.remote()
    poll(lambda: os.path.exists(started), what="the call to start")
    minray.kill(busy)
    for ref in (in_flight, queued, busy.pid.remote()):
        with pytest.raises(RayActorError, match="kill"):
            minray.get(ref, timeout=30)
    poll(lambda: gone(pid), what="the killed actor's process to exit")
    minray.kill(busy)                    # killing a dead actor again is harmless


def test_kill_without_no_restart_restarts_an_actor_with_max_restarts():
    c = Counter.options(max_restarts=1).remote(10)
    assert minray.get(c.increment.remote()) == 11
    pid = minray.get(c.pid.remote())
    minray.kill(c, no_restart=False)
    # Calls sent after kill returns run on the restarted actor: the
    # constructor ran again, so the state is the constructor's.
    assert minray.get(c.increment.remote(), timeout=30) == 11
    new_pid = minray.get(c.pid.remote())
    assert new_pid != pid
    poll(lambda: gone(pid), what="the old actor process to exit")
    # Its one restart is used up: a second kill ends it.
    minray.kill(c, no_restart=False)
    with pytest.raises(RayActorError):
        minray.get(c.read.remote(), timeout=30)


def test_kill_with_no_restart_ends_even_an_actor_with_restarts_left():
    c = Counter.options(max_restarts=5).remote()
    pid = minray.get(c.pid.remote())
    minray.kill(c)
    with pytest.raises(RayActorError):
        minray.get(c.read.remote(), timeout=30)
    poll(lambda: gone(pid), what="the killed actor's process to exit")


def test_exit_actor_from_inside():
    @minray.remote(max_restarts=3)
    class Quitter:
        def __init__(self):
            self.calls = 0

        def pid(self):
            return os.getpid()

        def quit(self):
            self.calls += 1
            minray.actor.exit_actor()
            return "not reached"

    q = Quitter.remote()
    pid = minray.get(q.pid.remote())
    quit_ref = q.quit.remote()
    after = q.pid.remote()
    for ref in (quit_ref, after, q.pid.remote()):
        with pytest.raises(RayActorError, match="exit_actor"):
            minray.get(ref, timeout=30)
    poll(lambda: gone(pid), what="the exited actor's process to end")
    with pytest.raises(TypeError, match="inside an actor"):
        minray.actor.exit_actor()


# ---------------------------------------------------------------- release

def test_an_actor_whose_handles_are_dropped_is_stopped_and_its_resources_freed():
    @minray.remote(num_cpus=1)
    class Holder:
        def pid(self):
            return os.getpid()

    h = Holder.remote()
    pid = minray.get(h.pid.remote())
    assert minray.available_resources().get("CPU") == 1.0
    copy = h                             # two handles in this process: one stays
    del h
    assert minray.get(copy.pid.remote()) == pid
    del copy
    poll(lambda: gone(pid), what="the unreferenced actor's process to exit")
    poll(lambda: minray.available_resources().get("CPU") == 2.0,
         what="the unreferenced actor's CPU to be free")


def test_calls_sent_before_the_last_handle_is_dropped_still_run(gate):
    log = Log.remote()
    pid = minray.get(log.pid.remote())
    refs = [log.append_after.remote(gate, i) for i in range(3)]
    del log
    ready, _ = minray.wait(refs, timeout=0.3)
    assert not ready and not gone(pid)
    open(gate, "w").close()
    assert minray.get(refs, timeout=30) == [1, 2, 3]
    poll(lambda: gone(pid), what="the unreferenced actor to stop after its calls")


# ---------------------------------------------------------------- concurrency

def test_max_concurrency_runs_calls_of_a_threaded_actor_at_once():
    @minray.remote(max_concurrency=4)
    class Meeting:
        def __init__(self):
            self.barrier = threading.Barrier(4)

        def arrive(self):
            return self.barrier.wait(timeout=20)        # needs all four at once

    m = Meeting.remote()
    assert sorted(minray.get([m.arrive.remote() for _ in range(4)], timeout=60)) == [0, 1, 2, 3]


def test_max_concurrency_is_a_limit():
    @minray.remote
    class Pairs:
        def __init__(self):
            self.lock = threading.Lock()
            self.running = self.peak = 0
            self.barrier = threading.Barrier(2)

        def pair_up(self):
            with self.lock:
                self.running += 1
                self.peak = max(self.peak, self.running)
            try:
                self.barrier.wait(timeout=20)
            finally:
                with self.lock:
                    self.running -= 1
            return threading.current_thread().name

        def peak_seen(self):
            return self.peak

    p = Pairs.options(max_concurrency=2).remote()
    minray.get([p.pair_up.remote() for _ in range(6)], timeout=60)
    assert minray.get(p.peak_seen.remote()) == 2


def test_async_methods_interleave_at_their_awaits():
    import asyncio

    @minray.remote
    class AsyncActor:
        def __init__(self):
            self.count = 0

        async def nap(self, i):
            start = time.monotonic()
            await asyncio.sleep(0.3)
            self.count += 1
            return i, start, time.monotonic()

        async def count_so_far(self):
            return self.count

    a = AsyncActor.remote()
    minray.get(a.count_so_far.remote())        # created and ready
    started = time.monotonic()
    results = minray.get([a.nap.remote(i) for i in range(10)], timeout=60)
    elapsed = time.monotonic() - started
    assert [r[0] for r in results] == list(range(10))
    assert max(r[1] for r in results) < min(r[2] for r in results), "naps did not overlap"
    assert elapsed < 2.5, elapsed              # one after the other would take >= 3 s
    assert minray.get(a.count_so_far.remote()) == 10


# ---------------------------------------------------------------- patterns

def test_parameter_server_from_the_original_docs():
    # The blog post's parameter server, as written with minray names; its
    # four "long-running" workers run a fixed number of rounds here.
    @minray.remote
    class ParameterServer(object):
        def __init__(self, keys, values):
            # These values will be mutated, so we must create a local copy.
            values = [value.copy() for value in values]
            self.parameters = dict(zip(keys, values))

        def get(self, keys):
            return [self.parameters[key] for key in keys]

        def update(self, keys, values):
            # This update function adds to the existing values, but the
            # function can be defined arbitrarily.
            for key, value in zip(keys, values):
                self.parameters[key] += value

    @minray.remote
    def worker_task(parameter_server, rounds):
        seen = []
        for _ in range(rounds):
            keys = ['key1', 'key2', 'key3']
            # Get the latest parameters.
            values = minray.get(parameter_server.get.remote(keys))
            seen.append(float(values[0][0]))
            # Compute some parameter updates.
            updates = [np.ones_like(value) for value in values]
            # Update the parameters.
            parameter_server.update.remote(keys, updates)
        return seen

    initial_keys = ['key1', 'key2', 'key3']
    initial_values = [np.zeros(10), np.zeros(1000), np.zeros(20_000)]   # the last one in the store
    parameter_server = ParameterServer.remote(initial_keys, initial_values)
    # Start 4 long-running tasks.
    rounds = 10
    seen = minray.get([worker_task.remote(parameter_server, rounds) for _ in range(4)],
                      timeout=60)
    for values in seen:                 # each worker sees its own updates land
        assert values == sorted(values) and len(set(values)) == rounds
    final = minray.get(parameter_server.get.remote(initial_keys))
    for value, initial in zip(final, initial_values):
        assert value.shape == initial.shape
        assert np.all(value == 4 * rounds)
    assert np.all(initial_values[2] == 0)          # the driver's arrays are untouched


# ---------------------------------------------------------------- actors using the API

def test_an_actor_submits_tasks_gets_them_and_returns_large_values():
    @minray.remote
    def square(x):
        return x * x

    @minray.remote
    class Coordinator:
        def squares(self, n):
            return sum(minray.get([square.remote(i) for i in range(n)]))

        def big(self, n):
            return np.arange(n, dtype=np.float64)

    c = Coordinator.remote()
    assert minray.get(c.squares.remote(20), timeout=60) == sum(i * i for i in range(20))
    big = minray.get(c.big.remote(1_000_000))
    assert big[-1] == 999_999.0 and not big.flags.writeable     # from shared memory


def test_threaded_actor_calls_submit_tasks_and_puts_at_once():
    @minray.remote
    def double(x):
        return 2 * x

    @minray.remote(max_concurrency=4)
    class Fanout:
        def __init__(self):
            self.barrier = threading.Barrier(4)

        def work(self, k):
            self.barrier.wait(timeout=20)           # all four calls at once
            refs = [double.remote(k * 100 + i) for i in range(10)]
            puts = [minray.put(k * 100 + i) for i in range(10)]
            return minray.get(refs), minray.get(puts)

    f = Fanout.remote()
    results = minray.get([f.work.remote(k) for k in range(4)], timeout=60)
    for k, (doubled, put_back) in enumerate(results):
        assert doubled == [2 * (k * 100 + i) for i in range(10)]
        assert put_back == [k * 100 + i for i in range(10)]


def test_errors_in_threaded_and_async_actors_keep_their_type_and_the_actor():
    @minray.remote(max_concurrency=2)
    class Threaded:
        def fail(self):
            raise KeyError("threaded")

        def ok(self):
            return "ok"

    @minray.remote
    class Async:
        async def fail(self):
            raise IndexError("async")

        async def ok(self):
            return "ok"

    for actor, error in ((Threaded.remote(), KeyError), (Async.remote(), IndexError)):
        with pytest.raises(error):
            minray.get(actor.fail.remote(), timeout=30)
        assert minray.get(actor.ok.remote(), timeout=30) == "ok"


def test_a_failed_constructor_argument_fails_every_call():
    @minray.remote
    def broken():
        raise ValueError("bad start")

    c = Counter.remote(broken.remote())
    for _ in range(2):
        # As in Ray: the actor could not be created, so it died; the cause
        # is its constructor's failure, which wraps the argument's error.
        with pytest.raises(ActorDiedError, match="bad start") as info:
            minray.get(c.read.remote(), timeout=30)
        assert isinstance(info.value.cause.cause, ValueError)
