"""Faults inside the node manager's bookkeeping: malformed messages from an
authenticated peer, and work re-submitted by a retried parent or a restarted
actor (ids are deterministic, so the same ids come again)."""
import os
import signal

import pytest

import minray
from minray import wire
from minray.session import node_socket_path, read_token
from minray_driver import module_cluster, poll, wait_for_file

cluster = module_cluster(num_cpus=2)


class RawClient:
    """A peer speaking the wire protocol by hand, as a buggy client would."""

    def __init__(self):
        session_dir = minray.api._State.session_dir
        self.sock = wire.connect(node_socket_path(session_dir), read_token(session_dir))
        self.reader = wire.FrameReader(self.sock)
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
    message = raw.read_until(lambda m: m[0] == "obj" and m[1] == result_id)
    assert message[2] == "e"                       # an error object, not a hang
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


def test_an_unknown_message_drops_only_that_peer(raw):
    raw.send(("no-such-message", 1, 2))
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
