"""Ray behaviours a Ray user's program relies on, through the public API and
written as a Ray user's test would be (`import minray as ray`):

- calls are checked against the signature at `.remote()` (functions, actor
  constructors, actor methods, also through handles passed on or looked up);
- an actor class behaves like its class (attributes, class and static methods,
  dir(), __mro__), cannot be subclassed, and every actor has the built-ins
  __ray_ready__, __ray_call__ and __ray_terminate__; exit_actor() runs atexit
  handlers; @remote() with empty brackets is refused;
- exceptions have Ray's types: ActorDiedError for calls of an actor whose
  constructor failed, RayTaskError for a task whose argument failed, TypeError
  for a wrongly typed option, ValueError for kill() of something else, and a
  warning for an exception class that cannot be subclassed;
- ObjectID, code too large to ship, init(num_workers=N).
"""
import os
import tempfile
import warnings

import numpy as np
import pytest

import minray as ray
from minray.actor import ActorClassInheritanceException
from minray.exceptions import ActorDiedError, RayActorError, RayTaskError
from minray_driver import gone, module_cluster, poll, run_driver

cluster = module_cluster(num_cpus=2)


# ---------------------------------------------------------------- call checks

def test_function_calls_that_cannot_bind_raise_type_error_at_remote():
    @ray.remote
    def add(x, y=1, *, scale=1):
        return (x + y) * scale

    for call, words in (
            (lambda: add.remote(), "missing a required argument: 'x'"),
            (lambda: add.remote(1, 2, 3), "too many positional arguments"),
            (lambda: add.remote(1, z=3), "unexpected keyword argument 'z'"),
            (lambda: add.remote(1, x=3), "multiple values for argument 'x'"),
            (lambda: add.options(num_cpus=0.5).remote(), "missing a required argument")):
        with pytest.raises(TypeError, match=words) as info:
            call()
        assert "add.remote()" in str(info.value)          # says where, and what fits
        assert "(x, y=..., *, scale=...)" in str(info.value)
    assert ray.get(add.remote(1)) == 2
    assert ray.get(add.remote(1, 2, scale=3)) == 9
    assert ray.get(add.remote(x=1, y=5)) == 6

    @ray.remote
    def anything(*args, **kwargs):
        return len(args), sorted(kwargs)

    assert ray.get(anything.remote(1, 2, a=3)) == (2, ["a"])


def test_actor_constructor_and_method_calls_are_checked_at_remote():
    @ray.remote
    class Actor:
        def __init__(self, arg0, arg1=1, arg2="a"):
            self.values = (arg0, arg1, arg2)

        def get_values(self, arg0, arg1=2):
            return self.values, arg0, arg1

        @classmethod
        def make(cls, label):
            return label

        @staticmethod
        def twice(x):
            return 2 * x

    with pytest.raises(TypeError, match="missing a required argument: 'arg0'"):
        Actor.remote()
    with pytest.raises(TypeError, match="too many positional"):
        Actor.remote(0, 1, 2, 3)
    with pytest.raises(TypeError, match="multiple values for argument 'arg0'"):
        Actor.remote(0, arg0=1)
    actor = Actor.remote(1, arg2="c")
    with pytest.raises(TypeError, match=r"Actor\.get_values\.remote\(\).*missing"):
        actor.get_values.remote()
    with pytest.raises(TypeError, match="too many positional"):
        actor.get_values.remote(1, 2, 3)
    with pytest.raises(TypeError, match="unexpected keyword argument 'arg9'"):
        actor.get_values.remote(1, arg9=2)
    with pytest.raises(TypeError):
        actor.make.remote()                  # cls is bound: label is missing
    with pytest.raises(TypeError):
        actor.twice.remote(1, 2)             # a static method has no self
    assert ray.get(actor.get_values.remote(0, arg1=5)) == ((1, 1, "c"), 0, 5)
    assert ray.get([actor.make.remote("x"), actor.twice.remote(4)]) == ["x", 8]

    # A class without __init__ takes no constructor arguments.
    @ray.remote
    class Plain:
        def ping(self):
            return "pong"

    with pytest.raises(TypeError, match="too many positional"):
        Plain.remote(1)
    assert ray.get(Plain.remote().ping.remote()) == "pong"


def test_handles_passed_to_tasks_and_found_by_name_check_calls_too():
    @ray.remote
    class Greeter:
        def greet(self, name):
            return f"hello {name}"

    greeter = Greeter.options(name="compat-greeter").remote()

    @ray.remote
    def misuse(handle):
        try:
            handle.greet.remote()
        except TypeError as exc:
            return f"TypeError: {exc}"
        return "no error"

    assert ray.get(misuse.remote(greeter)).startswith("TypeError: Greeter.greet.remote()")
    found = ray.get_actor("compat-greeter")
    with pytest.raises(TypeError, match="missing a required argument: 'name'"):
        found.greet.remote()
    assert ray.get(found.greet.remote("you")) == "hello you"
    ray.kill(greeter)


# ---------------------------------------------------------------- actor classes

def test_class_and_static_attributes_are_reached_through_the_actor_class():
    class Grandparent:
        GRANDPARENT = 2

        @staticmethod
        def grandparent_static():
            return 1

    class Parent1(Grandparent):
        PARENT1 = 6

    class Parent2:
        PARENT2 = 7

    @ray.remote
    class TestActor(Parent1, Parent2):
        X = 3

        @classmethod
        def f(cls):
            # Inside the actor, the module-level name is the decorated class.
            assert TestActor.GRANDPARENT == 2 and TestActor.PARENT1 == 6
            assert TestActor.PARENT2 == 7 and TestActor.X == 3
            return 4

        @staticmethod
        def s():
            return TestActor.grandparent_static() + 10

        def g(self):
            assert TestActor.f() == 4
            return TestActor.X

    t = TestActor.remote()
    assert ray.get([t.g.remote(), t.f.remote(), t.s.remote()]) == [3, 4, 11]
    # And in the driver.
    assert (TestActor.X, TestActor.GRANDPARENT, TestActor.f(), TestActor.s()) == (3, 2, 4, 11)
    assert TestActor.__mro__[1:] == (Parent1, Grandparent, Parent2, object)
    assert TestActor.__name__ == "TestActor" and TestActor.__module__ == __name__


def test_class_methods_and_the_mro_work_on_the_decorated_class():
    @ray.remote
    class Foo:
        def __init__(self, x):
            self.x = x

        @classmethod
        def factory_f(cls, x):
            return cls(x)

        def get_x(self):
            return self.x

    obj = Foo.factory_f(1)                    # a plain local instance
    assert obj.get_x() == 1
    assert isinstance(obj, Foo.__ray_actor_class__)

    class Base:
        def f(self):
            return "base"

    @ray.remote
    class Derived(Base):
        def g(self):
            return "derived"

    d = Derived.remote()
    assert ray.get([d.f.remote(), d.g.remote()]) == ["base", "derived"]


def test_dir_lists_what_autocomplete_needs():
    @ray.remote
    class Foo:
        LIMIT = 3

        def method_one(self):
            pass

    assert {n for n in dir(Foo) if not n.startswith("_")} == {
        "LIMIT", "method_one", "options", "remote"}
    f = Foo.remote()
    assert [n for n in dir(f) if not n.startswith("_")] == ["method_one"]
    assert set(dir(f)) == {"method_one", "__ray_ready__", "__ray_call__", "__ray_terminate__"}
    assert {n for n in dir(f.method_one) if not n.startswith("_")} == {"options", "remote"}


def test_subclassing_an_actor_class_is_a_clear_type_error():
    class NonActorBase:
        pass

    @ray.remote
    class ActorBase(NonActorBase):
        def who(self):
            return "base"

    with pytest.raises(TypeError, match="cannot be instantiated directly"):
        ActorBase()
    with pytest.raises(ActorClassInheritanceException,
                       match="Inheriting from actor classes is not currently supported") as info:
        class Derived(ActorBase):
            pass
    assert isinstance(info.value, TypeError)
    assert "__ray_actor_class__" in str(info.value)       # says what to do instead

    # Subclassing the original class works, and can be made an actor class.
    @ray.remote
    class Derived(ActorBase.__ray_actor_class__):
        def who(self):
            return "derived"

    assert ray.get(Derived.remote().who.remote()) == "derived"


def test_a_method_is_found_even_when_an_instance_attribute_has_its_name():
    @ray.remote
    class Shadowed:
        def __init__(self):
            self.value = "an attribute"      # same name as the method below

        def value(self):
            return "the method"

    assert ray.get(Shadowed.remote().value.remote()) == "the method"


def test_builtin_ready_and_call():
    @ray.remote
    class Actor:
        def __init__(self):
            self.secret = 41

    actor = Actor.remote()
    with pytest.raises(TypeError):
        actor.__ray_ready__()
    assert ray.get(actor.__ray_ready__.remote()) is True
    assert ray.get(actor.__ray_call__.remote(lambda self, x: self.secret + x, 1)) == 42

    def set_secret(self, value):
        self.secret = value
        return os.getpid()

    pid = ray.get(actor.__ray_call__.remote(set_secret, value=7))
    assert pid != os.getpid()
    assert ray.get(actor.__ray_call__.remote(lambda self: self.secret)) == 7
    with pytest.raises(TypeError):
        actor.__ray_call__.remote()          # needs the function to call


@pytest.mark.parametrize("how", ["__ray_terminate__", "exit_actor", "kill"])
def test_atexit_handlers_run_when_an_actor_ends_gracefully(how):
    @ray.remote
    class Actor:
        def __init__(self, path):
            import atexit

            def write():
                with open(path, "w") as f:
                    f.write("ran")
            atexit.register(write)

        def pid(self):
            return os.getpid()

        def exit(self):
            ray.actor.exit_actor()

    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "atexit")
        actor = Actor.remote(path)
        pid = ray.get(actor.pid.remote())
        if how == "__ray_terminate__":
            ending = actor.__ray_terminate__.remote()
        elif how == "exit_actor":
            ending = actor.exit.remote()
        else:
            ray.kill(actor)
            ending = None
        if ending is not None:
            with pytest.raises(ActorDiedError):
                ray.get(ending, timeout=30)
        with pytest.raises(RayActorError):
            ray.get(actor.pid.remote(), timeout=30)          # later calls fail too
        poll(lambda: gone(pid), what="the actor's process to exit")
        # kill() ends the process at once: its atexit handlers do not run.
        assert os.path.exists(path) == (how != "kill")


def test_remote_with_empty_brackets_is_refused_as_ray_refuses_it():
    with pytest.raises(AssertionError, match="@minray.remote"):
        @ray.remote()
        class Actor:
            pass
    with pytest.raises(TypeError, match="empty parentheses"):
        @ray.remote()
        def f():
            pass
    with pytest.raises(ValueError, match="invalid_kwarg"):
        @ray.remote(num_cpus=0, invalid_kwarg=0)
        class Actor2:
            pass


def test_method_takes_num_return_vals_like_remote():
    @ray.remote
    class Foo:
        @ray.method(num_return_vals=2)
        def two(self):
            return 1, 2

        def pair(self):
            return 3, 4

    f = Foo.remote()
    a, b = f.two.remote()
    c, d = f.pair.options(num_return_vals=2).remote()
    assert ray.get([a, b, c, d]) == [1, 2, 3, 4]
    with pytest.raises(TypeError, match="num_return_vals"):
        ray.method(num_return_vals="2")


# ---------------------------------------------------------------- exception types

def test_calls_of_an_actor_whose_constructor_raised_raise_actor_died_error():
    @ray.remote
    class FailedActor:
        def __init__(self):
            raise ValueError("actor constructor failed")

        def fail_method(self):
            raise ValueError("actor method failed")

    a = FailedActor.remote()
    for _ in range(2):
        with pytest.raises(RayActorError) as info:
            ray.get(a.fail_method.remote(), timeout=30)
        error = info.value
        assert isinstance(error, ActorDiedError) and error.actor_init_failed
        assert "actor constructor failed" in str(error)
        assert "raise ValueError" in str(error)                # the constructor's traceback
        assert isinstance(error.cause, RayTaskError)
        assert isinstance(error.cause.cause, ValueError)
        assert "FailedActor.__init__" in error.cause.function_name


def test_an_actor_whose_constructor_argument_failed_raises_actor_died_error():
    @ray.remote
    def broken():
        raise KeyError("no start value")

    @ray.remote
    class Counter:
        def __init__(self, start):
            self.value = start

        def read(self):
            return self.value

    c = Counter.remote(broken.remote())
    with pytest.raises(ActorDiedError, match="no start value") as info:
        ray.get(c.read.remote(), timeout=30)
    assert isinstance(info.value.cause, RayTaskError)
    assert isinstance(info.value.cause.cause, KeyError)


def test_a_task_whose_argument_is_a_failed_actor_call_raises_ray_task_error():
    @ray.remote
    class Actor:
        def kill(self):
            os._exit(0)

    @ray.remote
    def consume(x):
        return x

    a = Actor.remote()
    [obj], _ = ray.wait([a.kill.remote()], timeout=30)
    with pytest.raises(RayActorError):
        ray.get(obj)
    with pytest.raises(RayTaskError) as info:
        ray.get(consume.remote(obj), timeout=30)
    assert info.value.function_name.endswith("consume")          # this task's own error
    assert isinstance(info.value.cause, ActorDiedError)
    assert "could not be computed" in str(info.value)


def test_a_task_whose_argument_failed_raises_its_own_error_of_the_original_type():
    @ray.remote
    def f():
        raise ZeroDivisionError("the real error")

    @ray.remote
    def g(x):
        return x

    with pytest.raises(ZeroDivisionError) as info:
        ray.get(g.remote(f.remote()), timeout=30)
    assert isinstance(info.value, RayTaskError) and info.value.function_name.endswith("g")
    assert "the real error" in str(info.value)


def test_kill_of_something_else_than_a_handle_is_a_value_error():
    @ray.remote
    def f():
        return 1

    for thing in ("not an actor", f, f.remote()):
        with pytest.raises(ValueError, match="actor handle"):
            ray.kill(thing)


@pytest.mark.parametrize("options", [
    {"num_returns": "2"}, {"num_cpus": "1"}, {"num_gpus": [1]}, {"max_retries": 1.5},
    {"resources": {"bank": "one"}}, {"resources": ["bank"]}, {"name": 3},
])
def test_a_wrongly_typed_task_option_is_a_type_error(options):
    (key,) = options
    with pytest.raises(TypeError, match=key if key != "resources" else "resource"):
        ray.remote(**options)(lambda: None)

    @ray.remote
    def f():
        return 1

    with pytest.raises(TypeError):
        f.options(**options)


def test_a_wrongly_typed_actor_or_method_option_is_a_type_error():
    @ray.remote
    class A:
        def m(self):
            return 1, 2

    for options in ({"max_restarts": "lots"}, {"max_concurrency": 1.5}, {"num_cpus": "1"},
                    {"name": 5}, {"lifetime": 1}):
        with pytest.raises(TypeError, match=list(options)[0]):
            A.options(**options)
    with pytest.raises(TypeError, match="num_returns"):
        A.remote().m.options(num_returns="2")
    with pytest.raises(ValueError, match="max_restarts"):
        A.options(max_restarts=-2)               # the right type, a bad value


class _Sealed(type):
    """A metaclass that refuses subclasses of its classes."""

    def __new__(mcs, name, bases, namespace):
        if any(isinstance(base, _Sealed) for base in bases):
            raise TypeError(f"{name}: classes made by _Sealed cannot be subclassed")
        return super().__new__(mcs, name, bases, namespace)


class SealedError(Exception, metaclass=_Sealed):
    pass


class FinalError(Exception):
    def __init_subclass__(cls, **kwargs):
        raise TypeError("FinalError is final")


@pytest.mark.parametrize("error_class", [FinalError, SealedError])
def test_an_exception_class_that_cannot_be_subclassed_is_raised_as_ray_task_error(error_class):
    @ray.remote
    def fail():
        raise error_class("from the task")

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(RayTaskError) as info:
            ray.get(fail.remote(), timeout=30)
    assert type(info.value) is RayTaskError
    assert isinstance(info.value.cause, error_class)
    assert "from the task" in str(info.value)
    messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert any(error_class.__name__ in m and "cannot be combined" in m for m in messages), messages


# ---------------------------------------------------------------- more API

def test_object_id_is_the_original_name_of_object_ref():
    assert ray.ObjectID is ray.ObjectRef
    assert isinstance(ray.put(1), ray.ObjectID)


def test_code_too_large_to_ship_is_a_clear_error_at_remote():
    big = np.zeros(100_000_001, dtype=np.uint8)          # just over the 100 MB limit

    @ray.remote
    def uses_big():
        return big.nbytes

    with pytest.raises(ValueError, match=r"uses_big is too large .* 100,000,\d\d\d bytes.*minray\.put"):
        uses_big.remote()

    @ray.remote
    class HoldsBig:
        def size(self):
            return big.nbytes

    with pytest.raises(ValueError, match=r"actor class .*HoldsBig is too large.*minray\.put"):
        HoldsBig.remote()
    del big

    medium = np.ones(11_000_000, dtype=np.uint8)         # big, but still shipped

    @ray.remote
    def uses_medium():
        return int(medium.sum())

    with pytest.warns(RuntimeWarning, match="uses_medium pickles to 11.0 MB"):
        ref = uses_medium.remote()
    assert ray.get(ref, timeout=60) == 11_000_000


def test_init_num_workers_starts_that_many_worker_processes():
    proc = run_driver("""
        import os, psutil
        import minray

        def worker_pids():
            # Workers are forked from the zygote: children of a process that
            # runs minray.worker.zygote, running it too.
            found = []
            for child in psutil.Process().children(recursive=True):
                try:
                    if ("minray.worker.zygote:main" in child.cmdline()
                            and "minray.worker.zygote:main" in child.parent().cmdline()):
                        found.append(child.pid)
                except psutil.Error:
                    pass
            return found

        def expect(error, call, word):
            try:
                call()
            except error as exc:
                assert word in str(exc), exc
                return
            raise AssertionError(f"no {error.__name__}")

        expect(ValueError, lambda: minray.init(num_workers=0), "num_workers")
        expect(TypeError, lambda: minray.init(num_workers="3"), "num_workers")
        expect(ValueError, lambda: minray.init(address="auto", num_workers=2), "num_workers")

        minray.init(num_workers=3)
        # Workers, not CPUs: the CPU count is still the machine's.
        assert minray.cluster_resources()["CPU"] == os.cpu_count()
        import time
        deadline = time.monotonic() + 30
        while len(worker_pids()) < 3 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(worker_pids()) == 3, worker_pids()

        @minray.remote
        def pid():
            return os.getpid()

        assert set(minray.get([pid.remote() for _ in range(30)])) <= set(worker_pids())
        minray.shutdown()

        minray.init(num_workers=1, num_cpus=3)
        assert minray.cluster_resources()["CPU"] == 3.0
        deadline = time.monotonic() + 30
        while not worker_pids() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(worker_pids()) == 1, worker_pids()
        print("OK")
    """, timeout=120)
    assert "OK" in proc.stdout
