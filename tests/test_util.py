"""minray.util through the public API, as Ray users write it: ActorPool,
the actor-backed Queue, and the multiprocessing.Pool drop-in.

Every test runs on one shared 2-CPU cluster, except those that need a fresh
driver (a Pool made before init starts its own cluster). Work that must be
held up waits for a gate file; nothing sleeps to wait.
"""
import asyncio
import itertools
import multiprocessing
import os
import pickle
import queue as stdlib_queue
import threading

import pytest

import minray
from minray.exceptions import RayActorError, RayError
from minray.util import ActorPool
from minray.util.multiprocessing import Pool, TimeoutError as PoolTimeoutError
from minray.util.queue import Empty, Full, Queue
from minray_driver import gone, module_cluster, poll, run_driver, wait_for_file

cluster = module_cluster(num_cpus=2)


# ---------------------------------------------------------------- helpers (module level,
# so Pool workers import them by name, as multiprocessing users write them)

def square(x):
    return x * x


def add(x, y, scale=1):
    return (x + y) * scale


def getpid(_=None):
    return os.getpid()


def wait_then_square(args):
    path, x = args
    if path is not None:
        wait_for_file(path)
    return x * x


def fail_on_three(x):
    if x == 3:
        raise ValueError(f"three is not allowed ({x})")
    return x


class LockedError(Exception):
    """An exception that cannot be pickled (it holds a lock)."""

    def __init__(self):
        super().__init__("holds a lock")
        self.lock = threading.Lock()


def raise_locked(_):
    raise LockedError()


def exit_process(_):
    os._exit(3)


_greeting = None


def set_greeting(word, marker_dir=None):
    global _greeting
    _greeting = word
    if marker_dir is not None:
        open(os.path.join(marker_dir, str(os.getpid())), "w").close()


def greet(name):
    return f"{_greeting}, {name}"


def failing_initializer():
    raise RuntimeError("initializer refused")


@minray.remote
class Doubler:
    def double(self, v):
        return 2 * v

    def double_after(self, path, v):
        wait_for_file(path)
        return 2 * v

    def pid(self):
        return os.getpid()

    def fail(self, v):
        raise KeyError(v)

    @minray.method(num_returns=2)
    def pair(self, v):
        return v, -v


# ---------------------------------------------------------------- ActorPool

def test_actor_pool_map_from_ray_docs_with_only_import_minray():
    a1, a2 = Doubler.remote(), Doubler.remote()
    pool = minray.util.ActorPool([a1, a2])
    assert list(pool.map(lambda a, v: a.double.remote(v), [1, 2, 3, 4])) == [2, 4, 6, 8]
    assert not pool.has_next()


def test_actor_pool_map_submits_eagerly_and_map_unordered_yields_as_ready(gate):
    pool = ActorPool([Doubler.remote(), Doubler.remote()])
    # Value 0 waits for the gate on one actor; the other actor does 1, 2, 3.
    gen = pool.map_unordered(
        lambda a, v: a.double_after.remote(gate, v) if v == 0 else a.double.remote(v),
        [0, 1, 2, 3])
    assert sorted(next(gen) for _ in range(3)) == [2, 4, 6]
    open(gate, "w").close()
    assert list(gen) == [0]


def test_submit_get_next_in_order_and_stop_iteration():
    pool = ActorPool([Doubler.remote() for _ in range(2)])
    for v in range(5):                   # more values than actors: three wait
        pool.submit(lambda a, v: a.double.remote(v), v)
    assert not pool.has_free()
    assert [pool.get_next() for _ in range(5)] == [0, 2, 4, 6, 8]
    assert not pool.has_next() and pool.has_free()
    with pytest.raises(StopIteration):
        pool.get_next()
    with pytest.raises(StopIteration):
        pool.get_next_unordered()


def test_get_next_timeout_keeps_or_drops_the_call(gate):
    pool = ActorPool([Doubler.remote()])
    pool.submit(lambda a, v: a.double_after.remote(gate, v), 1)
    with pytest.raises(TimeoutError):
        pool.get_next(timeout=0.2)
    assert pool.has_next()               # still there
    with pytest.raises(TimeoutError):
        pool.get_next_unordered(timeout=0.2)
    assert pool.has_next()
    with pytest.raises(TimeoutError, match="dropped"):
        pool.get_next(timeout=0.2, ignore_if_timedout=True)
    assert not pool.has_next() and pool.has_free()
    open(gate, "w").close()
    pool.submit(lambda a, v: a.double.remote(v), 5)   # queued behind the dropped call
    assert pool.get_next(timeout=30) == 10


def test_get_next_unordered_returns_the_finished_one_first(gate):
    pool = ActorPool([Doubler.remote(), Doubler.remote()])
    pool.submit(lambda a, v: a.double_after.remote(gate, v), 1)
    pool.submit(lambda a, v: a.double.remote(v), 2)
    assert pool.get_next_unordered(timeout=30) == 4
    open(gate, "w").close()
    assert pool.get_next() == 2          # mixing both kinds of get is fine


def test_pop_idle_and_push():
    a1, a2, a3 = Doubler.remote(), Doubler.remote(), Doubler.remote()
    pool = ActorPool([a1])
    pool.submit(lambda a, v: a.double.remote(v), 1)
    assert pool.pop_idle() is None and not pool.has_free()
    with pytest.raises(ValueError, match="already belongs"):
        pool.push(a1)
    pool.push(a2)
    assert pool.has_free()
    pool.submit(lambda a, v: a.double.remote(v), 2)
    pool.submit(lambda a, v: a.double.remote(v), 3)     # waits for an actor
    assert not pool.has_free()
    pool.push(a3)                                        # takes the waiting value
    assert not pool.has_free()
    assert sorted(pool.get_next() for _ in range(3)) == [2, 4, 6]
    assert pool.pop_idle() is not None


def test_multiple_returns_and_errors_keep_the_actor_in_the_pool():
    pool = ActorPool([Doubler.remote()])
    pool.submit(lambda a, v: a.pair.remote(v), 3)
    assert pool.get_next() == [3, -3]
    pool.submit(lambda a, v: a.fail.remote(v), "x")
    with pytest.raises(KeyError):
        pool.get_next()
    assert pool.has_free()
    pool.submit(lambda a, v: a.double.remote(v), 4)
    assert pool.get_next() == 8


def test_actor_pool_bad_input_is_a_clear_error():
    with pytest.raises(TypeError, match="actor handles"):
        ActorPool([1, 2])
    pool = ActorPool([Doubler.remote()])
    with pytest.raises(TypeError, match="must call a method"):
        pool.submit(lambda a, v: v, 1)
    assert pool.has_free()               # the actor was not lost


# ---------------------------------------------------------------- Queue

def test_queue_put_get_in_order_with_sizes():
    q = Queue()
    assert q.empty() and not q.full() and q.qsize() == 0
    for item in range(10):
        q.put(item)
    assert q.size() == len(q) == 10
    assert [q.get() for _ in range(10)] == list(range(10))
    bounded = minray.util.queue.Queue(maxsize=2)
    bounded.put_nowait("a")
    bounded.put("b")
    assert bounded.full()


def test_queue_empty_and_full_raise_the_stdlib_compatible_errors():
    q = Queue(maxsize=1)
    with pytest.raises(Empty):
        q.get_nowait()
    with pytest.raises(stdlib_queue.Empty):
        q.get(block=False)
    with pytest.raises(Empty, match="0.2"):
        q.get(timeout=0.2)
    q.put(1)
    with pytest.raises(Full):
        q.put_nowait(2)
    with pytest.raises(stdlib_queue.Full):
        q.put(2, block=False)
    with pytest.raises(Full):
        q.put(2, timeout=0.2)
    assert q.get() == 1
    with pytest.raises(ValueError, match="timeout"):
        q.get(timeout=-1)
    with pytest.raises(TypeError, match="maxsize"):
        Queue(maxsize="3")


def test_queue_batches_are_all_or_nothing():
    q = Queue(maxsize=3)
    q.put_nowait_batch([1, 2])
    with pytest.raises(Full, match="2 items"):
        q.put_nowait_batch([3, 4])
    assert q.qsize() == 2                # nothing of the failed batch was added
    with pytest.raises(Empty, match="3 items"):
        q.get_nowait_batch(3)
    assert q.get_nowait_batch(2) == [1, 2]
    assert q.get_nowait_batch(0) == []
    with pytest.raises(TypeError):
        q.put_nowait_batch(5)
    with pytest.raises(TypeError):
        q.get_nowait_batch("2")
    with pytest.raises(ValueError):
        q.get_nowait_batch(-1)


def test_queue_items_that_are_refs_follow_ray():
    q = Queue()
    ref = minray.put(41)
    q.put(ref)                           # an argument ref: stored as its value
    assert q.get() == 41
    q.put_nowait_batch([ref])            # inside a list: stored as the ref
    stored = q.get()
    assert isinstance(stored, minray.ObjectRef) and minray.get(stored) == 41


@minray.remote
def consume(q, n, started=None):
    if started is not None:
        open(started, "w").close()
    return [q.get(timeout=60) for _ in range(n)]


@minray.remote
def produce(q, items):
    for item in items:
        q.put(item, timeout=60)
    return len(items)


def test_blocked_gets_in_tasks_do_not_hold_the_queue_up(tmp_path):
    q = Queue()
    started = [str(tmp_path / f"started-{i}") for i in range(2)]
    consumers = [consume.remote(q, 1, path) for path in started]
    poll(lambda: all(os.path.exists(p) for p in started), what="the consumers to start")
    # Both consumers wait inside the queue's actor; other calls still run
    # (with a get holding the actor, the puts would wait behind it for 60 s).
    assert q.empty()
    q.put("a")
    q.put("b")
    assert sorted(minray.get(consumers, timeout=60)) == [["a"], ["b"]]


def test_a_blocked_put_waits_for_room():
    q = Queue(maxsize=1)
    producer = produce.remote(q, list(range(5)))
    got = [q.get(timeout=60) for _ in range(5)]
    assert got == list(range(5))
    assert minray.get(producer, timeout=60) == 5


def test_queue_between_tasks_and_an_actor():
    @minray.remote
    class Summer:
        def drain(self, q, n):
            return sum(q.get(timeout=60) for _ in range(n))

    q = Queue(maxsize=4)
    producers = [produce.remote(q, list(range(i * 10, i * 10 + 10))) for i in range(3)]
    total = Summer.remote().drain.remote(q, 30)
    assert minray.get(total, timeout=60) == sum(range(30))
    assert minray.get(producers) == [10, 10, 10]
    assert q.empty()


def test_queue_pickles_and_async_methods_await():
    q = Queue()
    copy = pickle.loads(pickle.dumps(q))
    copy.put("via copy")
    assert q.get() == "via copy"

    @minray.remote
    class AsyncConsumer:
        async def take(self, q):
            first = await q.get_async(timeout=60)
            await q.put_async(first + "!")
            return first

    ref = AsyncConsumer.remote().take.remote(q)
    q.put("hello")
    assert minray.get(ref, timeout=60) == "hello"
    assert q.get(timeout=60) == "hello!"
    with pytest.raises(Empty):
        asyncio.run(q.get_async(block=False))


def test_queue_actor_options_and_shutdown():
    q = Queue(actor_options={"name": "test-util-queue"})
    q.put(1)
    assert minray.get(minray.get_actor("test-util-queue").qsize.remote()) == 1
    blocked = consume.remote(q, 2)       # gets 1, then waits for a second item
    poll(lambda: q.qsize() == 0, what="the consumer to take the first item")
    q.shutdown()
    with pytest.raises(RayError):
        minray.get(blocked, timeout=60)
    with pytest.raises(RuntimeError, match="shut down"):
        q.put(2)
    q.shutdown()                         # twice is harmless
    with pytest.raises(TypeError, match="actor_options"):
        Queue(actor_options=["num_cpus"])


# ---------------------------------------------------------------- multiprocessing.Pool

def test_pool_as_a_drop_in_for_multiprocessing():
    with Pool(2) as p:
        assert p.map(square, range(10)) == [x * x for x in range(10)]
        assert p.starmap(add, [(1, 2), (3, 4)]) == [3, 7]
        assert p.apply(add, (1, 2), {"scale": 10}) == 30
        assert p.apply(add, (1, 2), kwargs={"scale": 2}) == 6    # Ray's spelling
        assert list(p.imap(square, range(5), chunksize=2)) == [0, 1, 4, 9, 16]
        assert sorted(p.imap_unordered(square, range(5))) == [0, 1, 4, 9, 16]
        assert p.map(square, []) == []
        assert p.map(lambda x: x + 1, range(3)) == [1, 2, 3]    # lambdas travel too
        assert len(set(p.map(getpid, range(10)))) == 2          # both workers are used


def test_pool_before_init_starts_a_local_cluster():
    proc = run_driver("""
        import minray
        from minray.util.multiprocessing import Pool

        def cube(x):
            return x ** 3

        with Pool(2) as pool:
            assert minray.is_initialized()
            assert minray.cluster_resources()["CPU"] == 2
            print(pool.map(cube, range(4)))
        """, timeout=120)
    assert proc.stdout.strip().splitlines()[-1] == "[0, 1, 8, 27]"


def test_pool_arguments_are_checked():
    with pytest.raises(ValueError, match="at most 2"):
        Pool(3)                          # more than the cluster's CPUs, as in Ray
    with pytest.raises(ValueError, match="at least 1"):
        Pool(0)
    with pytest.raises(TypeError, match="initializer"):
        Pool(1, initializer=5)
    with pytest.raises(ValueError, match="maxtasksperchild"):
        Pool(1, maxtasksperchild=0)
    with Pool(1) as p:
        with pytest.raises(ValueError, match="Chunksize"):
            p.map(square, range(3), chunksize=0)
        with pytest.raises(TypeError, match="iterable"):
            p.imap(square, 3)
        with pytest.raises(NotImplementedError):
            pickle.dumps(p)


def test_initializer_state_lives_in_each_worker(tmp_path):
    with Pool(2, initializer=set_greeting, initargs=("hello", str(tmp_path))) as p:
        assert len(os.listdir(tmp_path)) == 2          # ran once per worker, at start
        assert p.map(greet, ["a", "b", "c"]) == ["hello, a", "hello, b", "hello, c"]


def test_an_initializer_that_raises_fails_the_constructor():
    with pytest.raises(RayError, match="initializer refused"):
        Pool(1, initializer=failing_initializer)


def test_errors_are_raised_with_their_own_type_and_remote_traceback():
    with Pool(2) as p:
        with pytest.raises(ValueError, match="three is not allowed") as info:
            p.map(fail_on_three, range(6))
        assert type(info.value) is ValueError
        assert "fail_on_three" in str(info.value.__cause__)
        with pytest.raises(ValueError):
            p.apply(fail_on_three, (3,))
        with pytest.raises(RuntimeError, match="LockedError.*could not be sent back"):
            p.map(raise_locked, [1])
        # imap yields a failed item's exception in its place, as Ray's pool does.
        results = list(p.imap(fail_on_three, range(5)))
        assert results[:3] == [0, 1, 2] and results[4] == 4
        assert isinstance(results[3], ValueError)
        assert p.map(square, [2]) == [4]                # the pool is fine afterwards


def test_async_results_wait_get_ready_successful_and_callbacks(gate):
    with Pool(2) as p:
        result = p.map_async(wait_then_square, [(gate, x) for x in range(4)])
        assert not result.ready()
        with pytest.raises(ValueError, match="not ready"):
            result.successful()
        with pytest.raises(PoolTimeoutError):
            result.get(timeout=0.2)
        with pytest.raises(multiprocessing.TimeoutError):      # the stdlib's name works too
            result.get(timeout=0)
        result.wait(timeout=0.1)
        open(gate, "w").close()
        assert result.get(timeout=60) == [0, 1, 4, 9]
        assert result.ready() and result.successful()

        got = stdlib_queue.Queue()
        p.apply_async(square, (7,), callback=got.put)
        assert got.get(timeout=60) == 49
        p.map_async(square, range(3), callback=got.put)
        assert got.get(timeout=60) == [0, 1, 4]
        failed = p.map_async(fail_on_three, range(5), callback=got.put,
                             error_callback=got.put)
        error = got.get(timeout=60)
        assert isinstance(error, ValueError)
        failed.wait()
        assert not failed.successful()
        starred = p.starmap_async(add, [(1, 1), (2, 2)], chunksize=1)
        assert starred.get(timeout=60) == [2, 4]


def test_imap_is_lazy_ordered_and_has_a_timeout(gate):
    with Pool(2) as p:
        # An endless iterable: items are read only as results are used.
        first = list(itertools.islice(p.imap(square, itertools.count()), 5))
        assert first == [0, 1, 4, 9, 16]

        it = p.imap(wait_then_square, [(None, 1), (gate, 2), (None, 3)])
        assert it.next(timeout=30) == 1
        with pytest.raises(PoolTimeoutError):
            it.next(timeout=0.2)
        open(gate, "w").close()
        assert it.next(timeout=30) == 4 and next(it) == 9
        with pytest.raises(StopIteration):
            next(it)


def test_imap_unordered_yields_the_finished_items_first(tmp_path):
    held = str(tmp_path / "held")
    with Pool(2) as p:
        it = p.imap_unordered(wait_then_square, [(held, 1), (None, 2), (None, 3)])
        assert sorted([next(it), next(it)]) == [4, 9]
        open(held, "w").close()
        assert next(it) == 1


def test_maxtasksperchild_replaces_workers():
    with Pool(2, maxtasksperchild=1) as p:
        pids = p.map(getpid, range(6), chunksize=1)
        assert len(set(pids)) == 6
        poll(lambda: all(gone(pid) for pid in pids[:4]),
             what="the retired workers to exit")


def test_close_lets_work_finish_and_join_waits(gate):
    p = Pool(2)
    pids = p.map(getpid, range(4), chunksize=1)
    result = p.map_async(wait_then_square, [(gate, x) for x in range(4)], chunksize=1)
    with pytest.raises(ValueError, match="still running"):
        p.join()
    p.close()
    assert not result.ready()
    with pytest.raises(ValueError, match="Pool not running"):
        p.map(square, [1])
    open(gate, "w").close()
    p.join()
    assert result.ready() and result.successful()
    assert result.get() == [0, 1, 4, 9]
    poll(lambda: all(gone(pid) for pid in pids), what="the closed pool's workers to exit")


def test_terminate_stops_work_in_flight(gate):
    p = Pool(2)
    pids = set(p.map(getpid, range(4), chunksize=1))
    result = p.map_async(wait_then_square, [(gate, x) for x in range(4)], chunksize=1)
    p.terminate()
    p.join()
    result.wait(timeout=60)
    assert result.ready() and not result.successful()
    with pytest.raises(RayActorError):
        result.get()
    poll(lambda: all(gone(pid) for pid in pids), what="the terminated workers to exit")


def test_a_worker_that_dies_fails_its_items_and_is_replaced():
    with Pool(1) as p:
        with pytest.raises(RayActorError):
            p.map(exit_process, [1])
        assert p.map(square, [3, 4]) == [9, 16]


@minray.remote
def pool_in_a_task(values):
    with Pool(1) as p:
        return p.map(square, values)


def test_a_pool_inside_a_task():
    assert minray.get(pool_in_a_task.remote([1, 2, 3]), timeout=120) == [1, 4, 9]
