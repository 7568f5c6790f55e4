"""Bad input to the public API gets a clear error, not a hang or a crash:
unknown or invalid options, non-refs, unserializable arguments, and calls
made before init (put/remote start a local cluster, as Ray does; get/wait
and the cluster queries say to call init first)."""
import threading

import pytest

import minray
from minray.exceptions import RayTaskError, SerializationError
from minray_driver import run_driver


@pytest.fixture(scope="module")
def cluster():
    minray.init(num_cpus=2)
    yield
    minray.shutdown()


# ---------------------------------------------------------------- no cluster needed

def test_unknown_remote_option_lists_the_valid_ones():
    with pytest.raises(ValueError) as info:
        @minray.remote(num_cpu=1)
        def f():
            pass
    message = str(info.value)
    assert "num_cpu" in message
    for valid in ("num_cpus", "num_gpus", "num_returns", "resources", "max_retries"):
        assert valid in message


@pytest.mark.parametrize("options, pattern", [
    ({"num_returns": -1}, "num_returns"),
    ({"num_returns": "dynamic"}, "not supported"),
    ({"num_cpus": -1}, "num_cpus"),
    ({"num_gpus": -0.5}, "num_gpus"),
    ({"num_gpus": 1.5}, "num_gpus"),
    ({"resources": {"bank": -1}}, "bank"),
    ({"resources": {"CPU": 1}}, "num_cpus"),
    ({"max_retries": -2}, "max_retries"),
])
def test_bad_option_values_are_value_errors(options, pattern):
    with pytest.raises(ValueError, match=pattern):
        minray.remote(**options)(lambda: None)

    @minray.remote
    def f():
        pass

    with pytest.raises(ValueError, match=pattern):
        f.options(**options)


@pytest.mark.parametrize("options, pattern", [
    ({"num_returns": "2"}, "num_returns"),
    ({"num_return_vals": 1.5}, "num_return_vals"),
    ({"num_cpus": "1"}, "num_cpus"),
    ({"resources": ["gpu"]}, "resources"),
    ({"resources": {"bank": "one"}}, "bank"),
    ({"max_retries": 1.0}, "max_retries"),
])
def test_wrongly_typed_option_values_are_type_errors(options, pattern):
    # As in Ray: a value of the wrong type is a TypeError, a value of the
    # right type but out of range a ValueError.
    with pytest.raises(TypeError, match=pattern):
        minray.remote(**options)(lambda: None)

    @minray.remote
    def f():
        pass

    with pytest.raises(TypeError, match=pattern):
        f.options(**options)


def test_unknown_option_in_options_lists_the_valid_ones():
    @minray.remote
    def f():
        pass

    with pytest.raises(ValueError, match="valid options are: .*num_cpus"):
        f.options(num_gpu=1)


def test_remote_decorator_misuse():
    with pytest.raises(TypeError):
        minray.remote(3)                            # positional, not a function
    with pytest.raises(TypeError):
        minray.remote(lambda: 1, lambda: 2)
    with pytest.raises(TypeError):
        minray.remote(num_cpus=1)(42)               # not callable


def test_unknown_init_argument_lists_the_valid_ones():
    with pytest.raises(ValueError) as info:
        minray.init(num_cpu=2)
    message = str(info.value)
    assert "num_cpu" in message
    for valid in ("num_cpus", "num_gpus", "resources", "address", "ignore_reinit_error"):
        assert valid in message


def test_bad_init_values_and_calls_before_init():
    proc = run_driver("""
        import minray

        def expect(error, call, *words):
            try:
                call()
            except error as exc:
                for word in words:
                    assert word in str(exc), (word, str(exc))
                return
            raise AssertionError(f"{call} did not raise {error.__name__}")

        assert not minray.is_initialized()
        expect(ValueError, lambda: minray.init(num_cpus=-1), "num_cpus")
        expect(ValueError, lambda: minray.init(num_cpus="2"), "num_cpus")
        expect(ValueError, lambda: minray.init(num_gpus=-2), "num_gpus")
        expect(ValueError, lambda: minray.init(resources=["x"]), "resources")
        expect(ValueError, lambda: minray.init(resources={"x": -1}), "'x'")
        expect(ValueError, lambda: minray.init(object_store_memory=10), "object_store_memory")
        expect(ValueError, lambda: minray.init(num_gcs_shards=0), "num_gcs_shards")
        assert not minray.is_initialized()

        # get / wait / cluster queries before init: a clear error.
        expect(RuntimeError, lambda: minray.get([]), "minray.init()")
        expect(RuntimeError, lambda: minray.cluster_resources(), "minray.init()")
        expect(RuntimeError, lambda: minray.available_resources(), "minray.init()")
        expect(RuntimeError, lambda: minray.nodes(), "minray.init()")
        expect(RuntimeError, lambda: minray.error_info(), "minray.init()")
        assert not minray.is_initialized()

        # put() and .remote() start a local cluster, as Ray does.
        import os
        ref = minray.put("auto")
        assert minray.is_initialized()
        assert minray.cluster_resources()["CPU"] == os.cpu_count()   # init()'s default
        assert minray.get(ref) == "auto"
        minray.shutdown()
        assert not minray.is_initialized()

        @minray.remote
        def f(x):
            return x * 2

        assert minray.get(f.remote(21)) == 42
        assert minray.is_initialized()
        print("OK")
    """)
    assert "OK" in proc.stdout


# ---------------------------------------------------------------- with a cluster

def test_get_of_a_non_ref_is_a_type_error(cluster):
    ref = minray.put(1)
    for bad in (5, "ref", None, {"a": ref}):
        with pytest.raises(TypeError, match="ObjectRef"):
            minray.get(bad)
    with pytest.raises(TypeError, match="ObjectRef"):
        minray.get([ref, 5])
    with pytest.raises(ValueError, match="timeout"):
        minray.get(ref, timeout=-1)
    with pytest.raises(ValueError, match="timeout"):
        minray.get(ref, timeout="1")
    assert minray.get(ref) == 1


def test_put_of_a_ref_is_a_type_error(cluster):
    ref = minray.put(1)
    with pytest.raises(TypeError, match="ObjectRef"):
        minray.put(ref)


def test_unserializable_argument_is_reported_at_remote_naming_it(cluster):
    @minray.remote
    def takes(a, b=None):
        return 1

    with pytest.raises(TypeError) as info:
        takes.remote(1, threading.Lock())
    assert isinstance(info.value, SerializationError)
    message = str(info.value)
    assert "argument 1" in message and "takes" in message and "lock" in message.lower()

    with pytest.raises(SerializationError, match="keyword argument 'b'"):
        takes.remote(1, b=threading.Lock())
    # Nothing was half-submitted: the function still works.
    assert minray.get(takes.remote(1, b=2)) == 1


def test_unserializable_put_is_a_clear_error(cluster):
    with pytest.raises(SerializationError, match="lock"):
        minray.put(threading.Lock())


def test_function_that_cannot_be_pickled_is_reported_at_remote(cluster):
    lock = threading.Lock()

    @minray.remote
    def uses_lock():
        with lock:
            return 1

    with pytest.raises(SerializationError, match="uses_lock"):
        uses_lock.remote()


def test_unserializable_return_value_is_a_task_error(cluster):
    @minray.remote
    def returns_lock():
        return threading.Lock()

    with pytest.raises(RayTaskError, match="lock"):
        minray.get(returns_lock.remote(), timeout=30)

    @minray.remote
    def fine():
        return "fine"

    assert minray.get(fine.remote()) == "fine"


def test_actor_class_and_method_misuse_are_clear_errors(cluster):
    @minray.remote
    class Counter:
        def incr(self):
            return 1

    with pytest.raises(TypeError, match=r"Counter.remote"):
        Counter()
    handle = Counter.remote()
    with pytest.raises(TypeError, match=r"\.incr\.remote"):
        handle.incr()
    with pytest.raises(AttributeError, match="incr"):
        handle.decr
    with pytest.raises(TypeError, match="max_restarts"):
        Counter.options(max_restarts="lots")
    with pytest.raises(ValueError, match="valid options"):
        Counter.options(num_return_values=2)
    with pytest.raises(ValueError, match="no live actor named"):
        minray.get_actor("nobody-has-this-name")
    with pytest.raises(ValueError, match="actor handle"):
        minray.kill("not an actor")


def test_object_larger_than_the_store_is_a_clear_error():
    proc = run_driver("""
        import numpy as np
        import minray
        from minray.exceptions import ObjectStoreFullError, RayTaskError
        minray.init(num_cpus=1, object_store_memory=32 << 20)
        big = np.zeros(64 << 20, dtype=np.uint8)

        def expect_full(call):
            try:
                call()
            except ObjectStoreFullError as exc:
                assert "67108" in str(exc) and "capacity" in str(exc), str(exc)
                return exc
            raise AssertionError("no ObjectStoreFullError")

        expect_full(lambda: minray.put(big))

        @minray.remote
        def nbytes(x):
            return x.nbytes

        expect_full(lambda: nbytes.remote(big))          # a large argument is put first

        @minray.remote
        def make_big():
            return np.zeros(64 << 20, dtype=np.uint8)

        error = expect_full(lambda: minray.get(make_big.remote(), timeout=30))
        assert isinstance(error, RayTaskError)
        # Objects that fit still work, and freed ones make room for new ones.
        for _ in range(10):
            ref = minray.put(np.ones(8 << 20, dtype=np.uint8))
            assert minray.get(nbytes.remote(ref)) == 8 << 20
            del ref
        print("OK")
    """)
    assert "OK" in proc.stdout


def test_ref_from_a_previous_cluster_raises_instead_of_hanging():
    from minray_driver import run_driver
    result = run_driver("""
        import minray
        from minray.exceptions import ObjectLostError
        minray.init(num_cpus=1)
        ref = minray.put(1)
        minray.shutdown()
        minray.init(num_cpus=1)
        try:
            minray.get(ref, timeout=20)
        except ObjectLostError:
            print("lost as expected")
        minray.shutdown()
    """, timeout=90)
    assert "lost as expected" in result.stdout


def test_long_session_root_still_starts(tmp_path):
    from minray_driver import run_driver
    root = tmp_path / ("long-session-root-" + "x" * 80)
    result = run_driver("""
        import minray
        minray.init(num_cpus=1)
        @minray.remote
        def f():
            return 3
        print("answer", minray.get(f.remote()))
        minray.shutdown()
    """, timeout=90, env={"MINRAY_SESSION_ROOT": str(root)})
    assert "answer 3" in result.stdout


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_resource_amounts_are_refused_and_change_nothing(cluster, bad):
    @minray.remote
    def f():
        return 1

    @minray.remote
    class Actor:
        pass

    for make in (lambda: f.options(num_cpus=bad), lambda: f.options(num_gpus=bad),
                 lambda: f.options(resources={"custom": bad}),
                 lambda: minray.remote(num_cpus=bad)(lambda: 1),
                 lambda: Actor.options(num_cpus=bad)):
        with pytest.raises(ValueError, match="finite number"):
            make()
    # Nothing reached the node: its CPU limit is what it was.
    assert minray.cluster_resources()["CPU"] == 2.0
    assert minray.get([f.remote() for _ in range(4)]) == [1] * 4


def test_init_refuses_a_non_finite_cpu_count():
    from minray.local_cluster import LocalCluster
    with pytest.raises(ValueError, match="num_cpus must be a finite number"):
        LocalCluster(num_cpus=float("nan"))
    with pytest.raises(ValueError, match="resource 'x' must be a finite number"):
        LocalCluster(num_cpus=1, resources={"x": float("inf")})
