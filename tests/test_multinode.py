"""Several node managers on this machine (loopback addresses 127.0.0.x), used
through the public API as a user of a cluster would."""
import collections
import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

import minray
from minray.cluster_utils import Cluster
from minray.exceptions import (
    NodeDiedError, ObjectLostError, RayTaskError, TaskUnschedulableError,
)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STORE = 256 << 20


@pytest.fixture
def cluster(monkeypatch):
    # Dead nodes are noticed within a second (the default is a few seconds).
    monkeypatch.setenv("MINRAY_NODE_TIMEOUT_S", "1")
    made = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 1, "resources": {"head": 1}, "object_store_memory": STORE})
    try:
        yield made
    finally:
        if minray.is_initialized():
            minray.shutdown()
        made.shutdown()


def add_worker_node(cluster, number, **resources):
    node = cluster.add_node(num_cpus=1, resources=resources or {f"node{number}": 1},
                            object_store_memory=STORE, node_ip_address=f"127.0.0.{number}")
    cluster.wait_for_nodes()
    return node


@minray.remote
def node_of(*args):
    return minray.get_runtime_context().get_node_id()


def test_nodes_and_resources_cover_the_cluster(cluster):
    add_worker_node(cluster, 2)
    minray.init(address=cluster.address)
    nodes = minray.nodes()
    assert len(nodes) == 2 and all(n["Alive"] for n in nodes)
    addresses = {n["NodeManagerAddress"] for n in nodes}
    assert addresses == {"127.0.0.1", "127.0.0.2"}
    total = minray.cluster_resources()
    assert total["CPU"] == 2 and total["head"] == 1 and total["node2"] == 1


def test_custom_resources_pin_tasks_and_big_objects_cross_nodes(cluster):
    add_worker_node(cluster, 2)
    add_worker_node(cluster, 3)
    minray.init(address=cluster.address)
    here = minray.get_runtime_context().get_node_id()
    on2 = node_of.options(resources={"node2": 1})
    on3 = node_of.options(resources={"node3": 1})
    ids = {minray.get(on2.remote()), minray.get(on3.remote()), here}
    assert len(ids) == 3

    @minray.remote(resources={"node2": 1})
    def make(n):
        return np.arange(n, dtype=np.int64)

    @minray.remote(resources={"node3": 1})
    def total(array):
        return int(array.sum()), minray.get_runtime_context().get_node_id()

    n = 8 << 20                                 # 64 MB, pulled in chunks
    made = make.remote(n)
    # Made on node 2, read by a task on node 3 and by the driver on the head.
    assert minray.get(total.remote(made)) == (n * (n - 1) // 2, minray.get(on3.remote()))
    array = minray.get(made)
    assert array.shape == (n,) and array[-1] == n - 1
    # Put by the driver, read on node 2.
    driver_array = minray.put(np.ones(3 << 20))
    assert minray.get(node_of.options(resources={"node2": 1}).remote(driver_array)) != here
    # Small values and refs inside values cross too.

    @minray.remote(resources={"node2": 1})
    def nested():
        return [minray.put(np.full(1 << 18, 7.0)), minray.put("small")]

    inner = minray.get(nested.remote())
    assert minray.get(inner[0])[0] == 7.0 and minray.get(inner[1]) == "small"


def test_impossible_request_fails_at_once(cluster):
    add_worker_node(cluster, 2)
    minray.init(address=cluster.address)
    with pytest.raises(TaskUnschedulableError, match="no node"):
        minray.get(node_of.options(resources={"nowhere": 1}).remote(), timeout=30)
    with pytest.raises(TaskUnschedulableError):
        minray.get(node_of.options(num_cpus=2).remote(), timeout=30)   # 1 + 1, never 2 on one


def test_cpu_tasks_spread_over_nodes(cluster):
    add_worker_node(cluster, 2)
    minray.init(address=cluster.address)

    @minray.remote
    def slow():
        time.sleep(0.1)
        return minray.get_runtime_context().get_node_id()

    # Submitted at once, most first queue on the driver's node; as the other
    # node finishes what it was sent, it is sent more of them.
    counts = collections.Counter(minray.get([slow.remote() for _ in range(24)]))
    assert len(counts) == 2 and min(counts.values()) >= 6, counts


def test_actor_on_one_node_called_from_tasks_on_another(cluster):
    node2 = add_worker_node(cluster, 2)
    add_worker_node(cluster, 3)
    minray.init(address=cluster.address)

    @minray.remote(resources={"node2": 1})
    class Counter:
        def __init__(self):
            self.calls = []

        def add(self, caller, k):
            self.calls.append((caller, k))
            return len(self.calls)

        def history(self):
            return self.calls, minray.get_runtime_context().get_node_id()

    @minray.remote(resources={"node3": 1})
    def call_many(counter, name):
        return minray.get([counter.add.remote(name, k) for k in range(20)])

    counter = Counter.remote()
    from_driver = [counter.add.remote("driver", k) for k in range(20)]
    results = minray.get([call_many.remote(counter, "task")] + from_driver)
    calls, host = minray.get(counter.history.remote())
    assert host == node2.node_id
    assert len(calls) == 40
    for caller in ("driver", "task"):          # each caller's order is kept
        assert [k for c, k in calls if c == caller] == list(range(20))
    assert sorted(results[0] + results[1:]) == list(range(1, 41))


def test_calls_from_a_third_node_go_straight_to_the_actor_host(cluster, tmp_path):
    add_worker_node(cluster, 2)
    add_worker_node(cluster, 3)
    minray.init(address=cluster.address)
    located, resume, finished = (tmp_path / n for n in ("located", "resume", "finished"))

    @minray.remote(resources={"node2": 1})
    class Counter:
        def __init__(self):
            self.count = 0

        def inc(self):
            self.count += 1
            return self.count

    @minray.remote
    def plus_zero(x):
        return x

    @minray.remote(resources={"node3": 1})
    def call_while_owner_is_stopped(counter):
        # The first call's ref is an argument before node 3 knows the host.
        first = minray.get(plus_zero.remote(counter.inc.remote()))
        located.touch()
        while not resume.exists():
            time.sleep(0.01)
        rest = minray.get([counter.inc.remote() for _ in range(20)], timeout=30)
        finished.write_text(repr([first] + rest))
        return [first] + rest

    counter = Counter.remote()      # owned by the driver's node, the head
    ref = call_while_owner_is_stopped.remote(counter)
    wait_for_file(located)
    # The head (the handle's owner) is frozen: node 3's calls still reach
    # node 2, so they never went through it.
    os.kill(cluster.head_node.pid, signal.SIGSTOP)
    try:
        resume.touch()
        wait_for_file(finished, timeout=30)
    finally:
        os.kill(cluster.head_node.pid, signal.SIGCONT)
    assert minray.get(ref, timeout=60) == list(range(1, 22))


def test_refs_pickled_outside_minray_resolve_on_another_node(cluster):
    import pickle
    add_worker_node(cluster, 2)
    minray.init(address=cluster.address)
    small = minray.put("small value")
    big = minray.put(np.arange(1_000_000))
    # Pickled by other means (a file, another framework): they escape, and
    # carry the node they came from.
    blobs = [pickle.dumps(small), pickle.dumps(big)]

    @minray.remote(resources={"node2": 1})
    def load_and_get(blob):
        return minray.get(pickle.loads(blob))

    assert minray.get(load_and_get.remote(blobs[0])) == "small value"
    assert minray.get(load_and_get.remote(blobs[1])).sum() == np.arange(1_000_000).sum()


def test_an_actor_whose_node_dies_restarts_on_another_node(cluster):
    from minray.exceptions import ActorDiedError
    nodes = {add_worker_node(cluster, n, workers=1).node_id: n for n in (2, 3)}
    minray.init(address=cluster.address)

    @minray.remote(resources={"workers": 1}, max_restarts=1)
    class Counter:
        def __init__(self):
            self.count = 0

        def inc(self):
            self.count += 1
            return self.count, minray.get_runtime_context().get_node_id()

    counter = Counter.options(name="survivor").remote()
    assert [minray.get(counter.inc.remote())[0] for _ in range(3)] == [1, 2, 3]
    first_host = minray.get(counter.inc.remote())[1]
    victim = next(n for n in cluster.list_all_nodes() if n.node_id == first_host)
    cluster.remove_node(victim, allow_graceful=False)

    # Calls made meanwhile fail (they ran on the dead node) or wait for the
    # restart; then the actor answers from the other node, constructor re-run.
    deadline = time.monotonic() + 60
    while True:
        try:
            count, host = minray.get(counter.inc.remote(), timeout=60)
            break
        except ActorDiedError:
            assert time.monotonic() < deadline, "the actor was not restarted"
    assert host != first_host and host in nodes
    assert count == 1
    assert minray.get(minray.get_actor("survivor").inc.remote())[0] == 2   # name kept

    # No restarts left: its next node's death is final.
    cluster.remove_node(next(n for n in cluster.list_all_nodes() if n.node_id == host),
                        allow_graceful=False)
    with pytest.raises(ActorDiedError, match="max_restarts exhausted|no live node"):
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            minray.get(counter.inc.remote(), timeout=60)
            time.sleep(0.1)


def test_a_call_running_when_its_actor_node_dies_is_retried_there_after(cluster, tmp_path):
    nodes = {add_worker_node(cluster, n, workers=1).node_id: n for n in (2, 3)}
    minray.init(address=cluster.address)

    @minray.remote(resources={"workers": 1}, max_restarts=1, max_task_retries=1)
    class Slow:
        def where(self):
            return minray.get_runtime_context().get_node_id()

        def slow(self, started):
            open(started, "a").close()
            time.sleep(3)
            return minray.get_runtime_context().get_node_id()

    actor = Slow.remote()
    first_host = minray.get(actor.where.remote())
    started = tmp_path / "started"
    ref = actor.slow.remote(str(started))
    wait_for_file(started)
    cluster.remove_node(next(n for n in cluster.list_all_nodes() if n.node_id == first_host),
                        allow_graceful=False)
    # Sent again to the instance on the other node (max_task_retries=1).
    second_host = minray.get(ref, timeout=60)
    assert second_host != first_host and second_host in nodes


def test_a_task_that_kills_its_node_every_time_ends_in_an_error(cluster):
    for number in (2, 3):
        add_worker_node(cluster, number, workers=1)
    minray.init(address=cluster.address)
    pids = {n.node_id: n.pid for n in cluster.list_all_nodes()}

    @minray.remote(resources={"workers": 1}, max_retries=1)
    def kill_my_node(pids):
        os.kill(pids[minray.get_runtime_context().get_node_id()], signal.SIGKILL)
        time.sleep(60)

    # Run twice (once retried), each time killing the node it runs on: then
    # its retries are spent, and no node has its resource any more.
    with pytest.raises((NodeDiedError, TaskUnschedulableError)):
        minray.get(kill_my_node.remote(pids), timeout=120)
    assert [n["Alive"] for n in minray.nodes() if n["NodeID"] in pids and
            n["NodeID"] != cluster.head_node.node_id] == [False, False]


def wait_for_file(path, timeout=30):
    deadline = time.monotonic() + timeout
    while not path.exists() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert path.exists(), f"{path} did not appear within {timeout} s"


def test_killed_node_loses_its_objects_and_its_tasks_run_again(cluster, tmp_path):
    nodes = {add_worker_node(cluster, 2, node2=1, shared=1).node_id: "node2",
             add_worker_node(cluster, 3, node3=1, shared=1).node_id: "node3"}
    by_name = {name: node for node in cluster.list_all_nodes()
               for node_id, name in nodes.items() if node.node_id == node_id}
    minray.init(address=cluster.address)

    @minray.remote(resources={"node3": 1})
    def put_there():
        return [minray.put(np.ones(1 << 20))]   # owned by node 3, kept only there

    only_on_3 = minray.get(put_there.remote())[0]
    started = tmp_path / "started"

    @minray.remote(resources={"shared": 1}, max_retries=2)
    def long_task(path):
        with open(path, "a") as f:
            f.write(minray.get_runtime_context().get_node_id() + "\n")
        time.sleep(1.0)
        return minray.get_runtime_context().get_node_id()

    ref = long_task.remote(str(started))
    wait_for_file(started)
    first = started.read_text().split()[0]
    victim = nodes[first]
    survivor = "node2" if victim == "node3" else "node3"
    cluster.remove_node(by_name[victim], allow_graceful=False)
    assert nodes[minray.get(ref, timeout=60)] == survivor      # run again elsewhere
    if victim != "node3":
        cluster.remove_node(by_name["node3"], allow_graceful=False)
    with pytest.raises(ObjectLostError, match="died"):
        minray.get(only_on_3, timeout=60)


def hanging_task_on(resource, tmp_path):
    """The ref of a task without retries that hangs on the node with
    `resource`, once it has started there."""
    started = tmp_path / "started"

    @minray.remote(resources={resource: 1}, max_retries=0)
    def hang(path):
        open(path, "w").close()
        time.sleep(600)

    ref = hang.remote(str(started))
    wait_for_file(started)
    return ref


def test_task_without_retries_on_a_killed_node_fails(cluster, tmp_path):
    node2 = add_worker_node(cluster, 2)
    minray.init(address=cluster.address)
    ref = hanging_task_on("node2", tmp_path)
    cluster.remove_node(node2, allow_graceful=False)
    with pytest.raises(NodeDiedError, match="died"):
        minray.get(ref, timeout=60)
    alive = [n for n in minray.nodes() if n["Alive"]]
    assert len(alive) == 1


def test_two_drivers_share_a_cluster(cluster):
    add_worker_node(cluster, 2)
    code = textwrap.dedent("""
        import sys, minray
        minray.init(address=sys.argv[1])
        @minray.remote(resources={"node2": 1})
        def square(x):
            return x * x
        print(sum(minray.get([square.remote(i) for i in range(50)])))
    """)
    env = dict(os.environ, PYTHONPATH=REPO)
    drivers = [subprocess.Popen([sys.executable, "-c", code, cluster.address], env=env,
                                stdout=subprocess.PIPE, text=True) for _ in range(2)]
    outputs = [d.communicate(timeout=120)[0] for d in drivers]
    assert [d.returncode for d in drivers] == [0, 0]
    assert [o.strip() for o in outputs] == [str(sum(i * i for i in range(50)))] * 2


def test_a_node_of_another_version_is_refused(cluster, tmp_path):
    from minray.session import read_token, write_token
    head_session = cluster.head_node.session_dir
    session = tmp_path / "session"
    session.mkdir(mode=0o700)
    (session / "logs").mkdir(mode=0o700)
    write_token(str(session), read_token(head_session))
    code = textwrap.dedent("""
        import sys, minray
        import minray.node_manager.server as server
        server.__version__ = "0.0.0-other"
        from minray.node_manager.__main__ import main
        main(sys.argv[1:])
    """)
    result = subprocess.run(
        [sys.executable, "-c", code, "--session-dir", str(session), "--resources",
         '{"CPU": 1}', "--object-store-memory", str(64 << 20),
         "--head-address", cluster.address, "--node-ip-address", "127.0.0.5"],
        env=dict(os.environ, PYTHONPATH=REPO), timeout=60, capture_output=True, text=True)
    assert result.returncode == 2
    log = (session / "logs" / "node_manager.log").read_text()
    assert "0.0.0-other" in log and minray.__version__ in log
    assert "cannot join the cluster" in log


def test_transfer_port_refuses_a_wrong_token(cluster):
    import json
    from minray import wire
    with open(os.path.join(cluster.head_node.session_dir, "node.json")) as f:
        host, port = json.load(f)["transfer_address"].rsplit(":", 1)
    with pytest.raises(wire.AuthenticationError):
        wire.connect((host, int(port)), b"x" * 32)


def test_driver_error_names_the_remote_task(cluster):
    add_worker_node(cluster, 2)
    minray.init(address=cluster.address)

    @minray.remote(resources={"node2": 1})
    def broken():
        raise ValueError("bad input on node 2")

    with pytest.raises(ValueError, match="bad input on node 2") as info:
        minray.get(broken.remote())
    assert isinstance(info.value, RayTaskError)


def test_stopped_node_is_declared_dead_and_then_stops(cluster):
    node2 = add_worker_node(cluster, 2)
    minray.init(address=cluster.address)
    os.kill(node2.pid, signal.SIGSTOP)
    try:
        deadline = time.monotonic() + 30
        while any(n["Alive"] for n in minray.nodes() if n["NodeID"] == node2.node_id):
            assert time.monotonic() < deadline, "a stopped node was not declared dead"
            time.sleep(0.1)
        with pytest.raises(TaskUnschedulableError):
            minray.get(node_of.options(resources={"node2": 1}).remote(), timeout=30)
    finally:
        os.kill(node2.pid, signal.SIGCONT)
    # Woken up, it hears it was declared dead and stops.
    assert node2.process.wait(timeout=30) is not None


def test_output_of_remote_work_reaches_its_own_driver(cluster):
    node2 = add_worker_node(cluster, 2)
    add_worker_node(cluster, 3)
    code = textwrap.dedent("""
        import sys, minray
        tag = sys.argv[2]
        minray.init(address=sys.argv[1])

        @minray.remote(resources={"node3": 1})
        def leaf():
            print("leaf of", tag)

        @minray.remote(resources={"node2": 1})
        def shout(i):
            print("shout", i, "of", tag)
            print("warn of", tag, file=sys.stderr)
            minray.get(leaf.remote())   # node 2 -> node 3: its output comes back two hops

        @minray.remote(resources={"node2": 1})
        class Speaker:
            def say(self):
                print("actor of", tag)

        minray.get([shout.remote(i) for i in range(3)])
        minray.get(Speaker.remote().say.remote())
        print("done", tag)
    """)
    env = dict(os.environ, PYTHONPATH=REPO)
    drivers = {tag: subprocess.Popen([sys.executable, "-c", code, cluster.address, tag],
                                     env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     text=True) for tag in ("alpha", "beta")}
    outputs = {tag: d.communicate(timeout=120) for tag, d in drivers.items()}
    for tag, (out, err) in outputs.items():
        assert drivers[tag].returncode == 0, err
        other = "beta" if tag == "alpha" else "alpha"
        # Printed before the results the driver waited for: all there, in order.
        lines = out.splitlines()
        assert lines[-1] == f"done {tag}"
        for i in range(3):
            assert any(line.startswith("(shout pid=") and line.endswith(
                f", ip=127.0.0.2) shout {i} of {tag}") for line in lines), out
        assert sum(line.endswith(f"ip=127.0.0.3) leaf of {tag}") and line.startswith("(leaf ")
                   for line in lines) == 3, out
        assert any(line.startswith("(Speaker pid=") and line.endswith(
            f"ip=127.0.0.2) actor of {tag}") for line in lines), out
        assert err.count(f"warn of {tag}") == 3, err
        assert other not in out + err
    # A node started on its own keeps a copy in its workers' log files.
    logs = os.path.join(node2.session_dir, "logs")
    kept = "".join(open(os.path.join(logs, name)).read() for name in os.listdir(logs)
                   if name.startswith("worker-"))
    assert "shout 2 of alpha" in kept and "shout 2 of beta" in kept
