"""Faults inside the node manager's bookkeeping: malformed messages from an
authenticated peer, and work re-submitted by a retried parent or a restarted
actor (ids are deterministic, so the same ids come again)."""
import os
import signal

import cloudpickle
import pytest

import minray
from minray import wire
from minray.serialization import deserialize
from minray.session import node_socket_path, read_token
from minray_driver import module_cluster, poll, wait_for_file

cluster = module_cluster(num_cpus=2)


class RawClient:
    """A peer speaking the wire protocol by hand, as a buggy client would."""

    def __init__(self):
        session_dir = minray.api._State.session_dir
        self.sock = wire.connect(node_socket_path(session_dir), read_token(session_dir))
        self.reader = wire.FrameReader(self.sock)
        self.announced = {}
        self.send(("hello", "driver", {"pid": os.getpid(), "code_paths": []}))
        assert self.read()[0] == "welcome"

    def send(self, message):
        self.sock.sendall(wire.encode(message))

    def read(self, timeout=20.0):
        self.sock.settimeout(timeout)
        return self.reader.read()

    def read_until(self, predicate):
        while True:
            message = self.read()
            if predicate(message):
                return message

    def read_object(self, object_id):
        """(object_id, kind, meta, payload) of an object announced to us
        (now or while reading for another)."""
        while object_id not in self.announced:
            for announced in self.read_until(lambda m: m[0] == "objs")[1]:
                self.announced[announced[0]] = announced
        return self.announced[object_id]

    def close(self):
        self.sock.close()


@pytest.fixture
def raw():
    client = RawClient()
    yield client
    client.close()


def test_a_malformed_submission_fails_its_results_and_the_connection_goes_on(raw):
    task_id = os.urandom(16)
    result_id = task_id + (1).to_bytes(4, "big")
    # A NaN CPU request and an argument that is no argument: refused whole.
    raw.send(("submit", (task_id, os.urandom(16), "bad", [("x",)], (), 1,
                         {"CPU": float("nan")}, 0, [])))
    raw.send(("sub", [result_id]))
    assert raw.read_object(result_id)[1] == "e"    # an error object, not a hang
    # A handler that raises on its input, and a request that fails: the
    # request gets an answer saying so, and the connection still works.
    raw.send(("free", 5))
    raw.send(("actor_create", {"class_name": "Broken"}, 42))
    failed = raw.read_until(lambda m: m[0] in ("failed", "info"))
    assert failed[:2] == ("failed", 42) and "resources" in failed[2]
    raw.send(("info", 43, "resources"))
    info = raw.read_until(lambda m: m[0] == "info" and m[1] == 43)
    assert info[2]["total"]["CPU"] == 2.0
    # Nothing of the bad task was left queued or holding resources.
    assert minray.available_resources()["CPU"] == 2.0

    @minray.remote
    def ok():
        return "still fine"

    assert minray.get(ok.remote(), timeout=30) == "still fine"


def test_a_batch_of_submissions_is_handled_one_by_one_and_a_bad_batch_drops_its_peer(raw):
    function_id = os.urandom(16)
    raw.send(("fn", function_id, cloudpickle.dumps(lambda: 42), "answer"))
    tasks = [os.urandom(16) for _ in range(3)]
    results = [task_id + (1).to_bytes(4, "big") for task_id in tasks]
    # The middle one is malformed (NaN CPUs): it fails alone, the others run.
    raw.send(("batch", [("submit", (task_id, function_id, "answer", [], (), 1,
                                    {"CPU": float("nan") if i == 1 else 1.0}, 0, [], 0, None))
                        for i, task_id in enumerate(tasks)]))
    raw.send(("sub", results))
    assert raw.read_object(results[1])[1] == "e"
    for result_id in (results[0], results[2]):
        _, kind, meta, payload = raw.read_object(result_id)
        assert kind == "v" and deserialize(meta, payload) == 42
    # A batch may hold submissions only: anything else is a protocol error.
    raw.send(("batch", [("info", 8, "stats")]))
    assert_dropped_and_the_cluster_goes_on(raw)


def test_a_batch_whose_message_name_is_no_name_drops_its_peer_cleanly(raw):
    raw.send(("batch", [(["submit"], ())]))         # a list where a name belongs
    assert_dropped_and_the_cluster_goes_on(raw)
    log_path = os.path.join(minray.api._State.session_dir, "logs", "node_manager.log")
    with open(log_path) as f:
        assert "unhashable" not in f.read()           # a protocol error, not a crash


def test_an_unknown_message_drops_only_that_peer(raw):
    raw.send(("no-such-message", 1, 2))
    assert_dropped_and_the_cluster_goes_on(raw)


def assert_dropped_and_the_cluster_goes_on(raw):
    with pytest.raises((ConnectionError, OSError)):
        raw.read_until(lambda m: False)

    @minray.remote
    def ok():
        return 1

    assert minray.get(ok.remote(), timeout=30) == 1


@minray.remote
def gated_child(gate, started):
    open(started, "w").close()
    wait_for_file(gate)
    return "child result"


def test_a_retried_parent_gets_the_result_of_the_child_its_first_run_started(tmp_path):
    gate, started, parent_pid = (str(tmp_path / n) for n in ("gate", "started", "pid"))

    @minray.remote(max_retries=1)
    def parent():
        first_run = not os.path.exists(parent_pid)
        with open(parent_pid, "a") as f:
            f.write(f"{os.getpid()}\n")
        # The same child id on both runs (ids derive from the parent's id).
        return minray.get(gated_child.remote(gate, started), timeout=60), first_run

    ref = parent.remote()
    poll(lambda: os.path.exists(started), what="the child to start")
    with open(parent_pid) as f:
        os.kill(int(f.read().split()[0]), signal.SIGKILL)
    poll(lambda: len(open(parent_pid).read().split()) == 2, what="the parent's retry")
    open(gate, "w").close()
    assert minray.get(ref, timeout=60) == ("child result", False)


def test_a_restarted_actor_gets_the_results_of_children_its_first_life_started(tmp_path):
    gate, started = str(tmp_path / "gate"), str(tmp_path / "started")

    @minray.remote(max_restarts=1)
    class Parent:
        def __init__(self):
            self.child = gated_child.remote(gate, started)

        def pid(self):
            return os.getpid()

        def result(self):
            return minray.get(self.child, timeout=60)

    actor = Parent.remote()
    first_pid = minray.get(actor.pid.remote(), timeout=30)
    poll(lambda: os.path.exists(started), what="the child to start")
    os.kill(first_pid, signal.SIGKILL)
    # The restart re-runs __init__, which submits the same child id again.
    poll(lambda: _pid_or_none(actor) not in (None, first_pid), what="the actor's restart")
    open(gate, "w").close()
    assert minray.get(actor.result.remote(), timeout=60) == "child result"


def _pid_or_none(actor):
    try:
        return minray.get(actor.pid.remote(), timeout=30)
    except minray.exceptions.RayActorError:
        return None
