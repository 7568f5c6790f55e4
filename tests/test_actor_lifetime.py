"""How long actors live, and where their names are found, through the public
API as a Ray program would see it (minray imported under Ray's name).

Lifetime: a non-detached actor stops once no handle is left anywhere: the
creator's, copies passed to tasks and other actors (borrowed), handles inside
values in the store and inside queued tasks' arguments. Handles found by name
do not keep it; a detached actor lives until killed; a handle pickled outside
minray keeps its actor until the creator exits.

Namespaces: init(namespace=...), get_actor(name, namespace=...),
.options(name=..., namespace=..., get_if_exists=True); every driver without a
namespace gets an anonymous one of its own, and its tasks use its namespace.

"Still alive" is checked without sleeping: `settled()` drops a probe actor
and waits until it is gone, so every release this driver sent before it has
been handled; then a call that would fail on a stopped actor must succeed.
"""
import json
import os
import pickle

import pytest

import minray as ray
from minray.exceptions import RayActorError
from minray_driver import gone, module_cluster, poll, run_driver, wait_for_file

NAMESPACE = "lifetime-tests"
cluster = module_cluster(num_cpus=2, namespace=NAMESPACE)


@ray.remote
class Counter:
    def __init__(self, start=0):
        self.value = start

    def increment(self, by=1):
        self.value += by
        return self.value

    def pid(self):
        return os.getpid()


@ray.remote
class Keeper:
    """Holds handles it is given, in its state."""

    def __init__(self):
        self.kept = []

    def keep(self, handle):
        self.kept.append(handle)
        return len(self.kept)

    def call_kept(self):
        return ray.get(self.kept[-1].increment.remote())

    def give_back(self):
        return self.kept[-1]

    def forget(self):
        self.kept.clear()
        return 0


def settled():
    """Every release this driver sent so far has been handled by the node."""
    probe = Counter.remote()
    pid = ray.get(probe.pid.remote())
    del probe
    poll(lambda: gone(pid), what="the probe actor to stop")


def stopped(pid):
    poll(lambda: gone(pid), what=f"actor process {pid} to stop")
    return True


# ---------------------------------------------------------------- handles

def test_a_handle_passed_to_a_task_that_keeps_nothing_does_not_keep_the_actor():
    @ray.remote
    def use(counter):
        return ray.get(counter.increment.remote(5))

    @ray.remote
    def use_first(counters):
        return ray.get(counters[0].increment.remote(5))

    c = Counter.remote()
    pid = ray.get(c.pid.remote())
    assert ray.get(use.remote(c)) == 5
    assert ray.get(use_first.remote([c])) == 10
    del c
    assert stopped(pid)


def test_a_handle_stored_in_another_actor_keeps_the_actor_until_it_is_dropped():
    c = Counter.remote()
    pid = ray.get(c.pid.remote())
    keeper = Keeper.remote()
    assert ray.get(keeper.keep.remote(c)) == 1
    del c
    settled()
    assert ray.get(keeper.call_kept.remote()) == 1       # still there, state and all
    assert not gone(pid)
    ray.get(keeper.forget.remote())
    assert stopped(pid)


def test_a_handle_in_a_stored_list_keeps_the_actor_while_the_list_lives():
    c = Counter.remote()
    pid = ray.get(c.pid.remote())
    boxed = ray.put([c, "other things"])
    del c
    settled()
    handle = ray.get(boxed)[0]                # rebuilt here: this driver borrows it
    assert ray.get(handle.increment.remote()) == 1
    del handle
    settled()
    assert ray.get(ray.get(boxed)[0].increment.remote()) == 2
    del boxed
    assert stopped(pid)


def test_a_handle_inside_a_queued_tasks_argument_keeps_the_actor(tmp_path):
    gate = str(tmp_path / "gate")

    @ray.remote
    def later(gate, counters):
        wait_for_file(gate)
        return ray.get(counters["c"].increment.remote(7))

    c = Counter.remote()
    pid = ray.get(c.pid.remote())
    ref = later.remote(gate, {"c": c})
    del c
    settled()
    open(gate, "w").close()
    assert ray.get(ref, timeout=60) == 7
    assert stopped(pid)


def test_an_actor_made_in_a_task_lives_while_the_driver_holds_the_returned_handle():
    @ray.remote
    def make():
        return [Counter.remote(100)]

    made = ray.get(make.remote())[0]
    pid = ray.get(made.pid.remote())
    # More actors than idle workers: each takes an idle worker, and its end
    # that worker, but never the one that made `made` (an actor dies with
    # the process that created it, so that would take `made` along).
    probes = [Counter.remote() for _ in range(6)]
    probe_pids = ray.get([p.pid.remote() for p in probes])
    del probes
    poll(lambda: all(gone(p) for p in probe_pids), what="the probe actors to stop")
    assert ray.get(made.increment.remote()) == 101
    del made
    assert stopped(pid)


def test_a_creator_that_gets_its_dropped_handle_back_holds_the_actor_again():
    c = Counter.remote()
    pid = ray.get(c.pid.remote())
    keeper = Keeper.remote()
    ray.get(keeper.keep.remote(c))
    del c
    settled()
    back = ray.get(keeper.give_back.remote())
    ray.get(keeper.forget.remote())
    settled()
    assert ray.get(back.increment.remote()) == 1
    del back
    assert stopped(pid)


def test_a_handle_dropped_and_rebuilt_between_two_messages_still_counts():
    c = Counter.remote()
    pid = ray.get(c.pid.remote())
    boxed = ray.put([c])
    del c
    first = ray.get(boxed)[0]
    del first
    again = ray.get(boxed)[0]             # the drop of `first` is not sent yet
    del boxed
    settled()
    assert ray.get(again.increment.remote()) == 1
    del again
    assert stopped(pid)


def test_a_handle_pickled_outside_minray_keeps_its_actor():
    c = Counter.options(name="escaped").remote()
    pid = ray.get(c.pid.remote())
    pickle.dumps(c)                        # copies nobody can count
    del c
    settled()
    found = ray.get_actor("escaped")
    assert ray.get(found.increment.remote()) == 1
    ray.kill(found)
    assert stopped(pid)


# ---------------------------------------------------------------- names, detached

def test_a_named_actor_stops_with_its_last_handle_even_if_found_by_name():
    c = Counter.options(name="named-and-dropped").remote()
    pid = ray.get(c.pid.remote())
    found = ray.get_actor("named-and-dropped")        # does not count, as in Ray
    assert ray.get(found.increment.remote()) == 1
    del c
    assert stopped(pid)
    with pytest.raises(RayActorError):
        ray.get(found.increment.remote(), timeout=30)
    with pytest.raises(ValueError, match="named-and-dropped"):
        ray.get_actor("named-and-dropped")
    again = Counter.options(name="named-and-dropped").remote(10)     # the name is free
    assert ray.get(again.increment.remote()) == 11


def test_a_detached_actor_lives_without_handles_until_it_is_killed():
    d = Counter.options(name="detached-one", lifetime="detached").remote()
    pid = ray.get(d.pid.remote())
    del d
    settled()
    found = ray.get_actor("detached-one")
    assert ray.get(found.increment.remote()) == 1
    ray.kill(found)
    assert stopped(pid)
    with pytest.raises(ValueError):
        ray.get_actor("detached-one")


# ---------------------------------------------------------------- namespaces

def joiner(body):
    """A second driver's script; it joins this cluster with init(address=SESSION)."""
    session = ray.init(ignore_reinit_error=True)["session_dir"]     # this driver's cluster
    return f"import json, os\nimport minray as ray\nSESSION = {session!r}\n" + body


def test_the_namespace_given_to_init_is_this_jobs_and_its_tasks():
    @ray.remote
    def namespace_in_task():
        return ray.runtime.core.current().namespace

    assert ray.runtime.core.current().namespace == NAMESPACE
    assert ray.get(namespace_in_task.remote()) == NAMESPACE


def test_tasks_and_actors_register_and_find_names_in_the_drivers_namespace():
    @ray.remote
    def create_named():
        Counter.options(name="made-by-task", lifetime="detached").remote(3)
        return True

    @ray.remote
    def find(name):
        return ray.get(ray.get_actor(name).increment.remote())

    assert ray.get(create_named.remote())
    found = ray.get_actor("made-by-task")
    assert ray.get(found.increment.remote()) == 4
    assert ray.get(find.remote("made-by-task")) == 5
    keeper = Keeper.remote()
    assert ray.get(keeper.keep.remote(ray.get_actor("made-by-task"))) == 1
    assert ray.get(keeper.call_kept.remote()) == 6
    ray.kill(found)


def test_get_if_exists_returns_the_actor_that_has_the_name():
    first = Counter.options(name="only-one", get_if_exists=True).remote(1)
    second = Counter.options(name="only-one", get_if_exists=True).remote(50)
    assert second == first
    assert ray.get(second.increment.remote()) == 2
    with pytest.raises(ValueError, match="already taken"):
        Counter.options(name="only-one").remote()
    # In another namespace the name is free.
    other = Counter.options(name="only-one", namespace="elsewhere",
                            get_if_exists=True).remote(50)
    assert other != first
    assert ray.get(other.increment.remote()) == 51
    assert ray.get_actor("only-one", namespace="elsewhere") == other
    del other
    with pytest.raises(ValueError, match="needs a name"):
        Counter.options(get_if_exists=True).remote()


def test_drivers_in_different_namespaces_can_use_the_same_name():
    script = joiner("""
ray.init(address=SESSION, namespace=NS)

@ray.remote
class Named:
    def where(self):
        return NS

Named.options(name="same-name", lifetime="detached").remote()
print("FOUND", json.dumps(ray.get(ray.get_actor("same-name").where.remote())))
""")
    for ns in ("first-ns", "second-ns"):
        proc = run_driver(script.replace("NS", repr(ns)))
        assert f'FOUND "{ns}"' in proc.stdout
    # A third job reaches both, by namespace; this job's namespace has neither.
    assert ray.get(ray.get_actor("same-name", namespace="first-ns").where.remote()) \
        == "first-ns"
    second = ray.get_actor("same-name", namespace="second-ns")
    assert ray.get(second.where.remote()) == "second-ns"
    with pytest.raises(ValueError, match="same-name"):
        ray.get_actor("same-name")
    ray.kill(second)
    ray.kill(ray.get_actor("same-name", namespace="first-ns"))


def test_each_driver_without_a_namespace_gets_an_anonymous_one():
    script = joiner("""
context = ray.init(address=SESSION)

@ray.remote
class Named:
    def pid(self):
        return os.getpid()

named = Named.options(name="anonymous-detached", lifetime="detached").remote()
print("CREATED", json.dumps([context["namespace"], ray.get(named.pid.remote())]))
""")
    created = []
    for _ in range(2):
        proc = run_driver(script)
        assert "anonymous namespace" in proc.stderr          # warned: hard to reach later
        line = next(l for l in proc.stdout.splitlines() if l.startswith("CREATED "))
        created.append(tuple(json.loads(line[len("CREATED "):])))
    (ns1, pid1), (ns2, pid2) = created
    assert ns1 != ns2 and NAMESPACE not in (ns1, ns2) and pid1 != pid2
    for ns, pid in created:               # detached: still there, by namespace
        found = ray.get_actor("anonymous-detached", namespace=ns)
        assert ray.get(found.pid.remote()) == pid
        ray.kill(found)
        assert stopped(pid)


def test_bad_namespaces_are_clear_errors():
    with pytest.raises(TypeError, match="namespace"):
        ray.get_actor("x", namespace=123)
    with pytest.raises(ValueError, match="namespace"):
        ray.get_actor("x", namespace="")
    with pytest.raises(TypeError, match="namespace"):
        Counter.options(name="x", namespace=5)
    with pytest.raises(ValueError, match="namespace"):
        Counter.options(name="x", namespace="")
    with pytest.raises(TypeError, match="get_if_exists"):
        Counter.options(name="x", get_if_exists="yes")
    proc = run_driver("""
import minray as ray
for bad, error in ((123, TypeError), ("", ValueError)):
    try:
        ray.init(namespace=bad)
    except error as exc:
        print("REFUSED", type(exc).__name__)
    else:
        raise SystemExit("init accepted namespace=%r" % (bad,))
""")
    assert proc.stdout.split() == ["REFUSED", "TypeError", "REFUSED", "ValueError"]
