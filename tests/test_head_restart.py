"""The head's node manager killed with -9 and restarted in its session: the
other nodes link to it again and the cluster goes on."""
import os
import time

import pytest

import minray
from minray.cluster_utils import Cluster
from minray.exceptions import NodeDiedError
from test_multinode import hanging_task_on, wait_for_file

STORE = 128 << 20


@pytest.fixture
def cluster(monkeypatch):
    monkeypatch.setenv("MINRAY_NODE_TIMEOUT_S", "1")
    monkeypatch.setenv("MINRAY_HEAD_TIMEOUT_S", "60")
    made = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 1, "resources": {"head": 1}, "object_store_memory": STORE})
    try:
        for number in (2, 3):
            made.add_node(num_cpus=1, resources={f"node{number}": 1},
                          object_store_memory=STORE, node_ip_address=f"127.0.0.{number}")
        made.wait_for_nodes()
        yield made
    finally:
        if minray.is_initialized():
            minray.shutdown()
        made.shutdown()


def test_a_restarted_head_takes_the_cluster_back(cluster, tmp_path):
    node2, node3 = cluster.worker_nodes
    minray.init(address=node2.address)          # the driver is not on the head
    job_id = minray.get_runtime_context().get_job_id()

    @minray.remote(resources={"node3": 0.5})
    class Counter:
        def __init__(self):
            self.count = 0

        def inc(self):
            self.count += 1
            return self.count

    @minray.remote(resources={"node3": 0.5})
    def on_node3():
        return minray.get_runtime_context().get_node_id()

    @minray.remote(resources={"head": 1})
    def on_head():
        return minray.get_runtime_context().get_node_id()

    @minray.remote(resources={"head": 1})
    def long_on_head(path):
        open(path, "w").close()
        time.sleep(3)
        return minray.get_runtime_context().get_node_id()

    counter = Counter.options(name="kept", namespace="restart", lifetime="detached").remote()
    assert minray.get(counter.inc.remote()) == 1
    old_head = cluster.head_node
    assert minray.get(on_head.remote()) == old_head.node_id     # its code went there
    running = long_on_head.remote(str(tmp_path / "started"))
    wait_for_file(tmp_path / "started")
    head_address = cluster.address
    cluster.kill_head()

    # While there is no head, work between the other nodes goes on.
    assert minray.get(on_node3.remote(), timeout=30) == node3.node_id
    assert minray.get(counter.inc.remote(), timeout=30) == 2
    waiting_for_head = on_head.remote()        # runs once a head is back

    head = cluster.restart_head()
    assert head.address == head_address
    cluster.wait_for_nodes()
    assert minray.get(waiting_for_head, timeout=60) == head.node_id
    # What ran on the dead head runs again on the new one (its code sent again).
    assert minray.get(running, timeout=60) == head.node_id
    assert minray.get(on_head.remote(), timeout=60) == head.node_id

    @minray.remote(resources={"node3": 0.5})
    def find_by_name():
        # node 3 asks the head, which learned the name again from node 2
        return minray.get(minray.get_actor("kept", namespace="restart").inc.remote())

    assert minray.get(find_by_name.remote(), timeout=60) == 3
    # The control store's tables came back from LMDB: this job is still there.
    from minray import state
    jobs = {row["id"] for row in state.jobs()}
    assert job_id in jobs
    assert {n["NodeID"] for n in minray.nodes() if n["Alive"]} == \
        {head.node_id, node2.node_id, node3.node_id}


def test_a_node_lost_while_the_head_was_away_is_declared_dead(cluster, tmp_path):
    node2, node3 = cluster.worker_nodes
    minray.init(address=node2.address)
    ref = hanging_task_on("node3", tmp_path)
    cluster.kill_head()
    cluster.remove_node(node3, allow_graceful=False)   # nobody is there to notice
    cluster.restart_head()
    # The restarted head expects node 3 (the control store lists it alive);
    # it never links again, so it is declared dead, and its task fails.
    with pytest.raises(NodeDiedError):
        minray.get(ref, timeout=60)
    assert node3.node_id not in {n["NodeID"] for n in minray.nodes() if n["Alive"]}


def test_restart_needs_a_dead_head(cluster):
    from minray.node_launcher import _lock_restart, start_node
    with pytest.raises(RuntimeError, match="kill_head"):
        cluster.restart_head()
    session = cluster.head_node.session_dir
    with pytest.raises(ValueError, match="still running"):
        start_node(head=True, resume_session=session)
    # Two restarts of one session at once: the second is refused.
    lock = _lock_restart(session)
    try:
        with pytest.raises(ValueError, match="under way"):
            start_node(head=True, resume_session=session)
    finally:
        lock.close()
    assert os.path.isdir(session)


def test_actors_a_driver_on_the_dead_head_owned(cluster):
    minray.init(address=cluster.address)           # this driver is on the head

    @minray.remote(resources={"node2": 0.5})
    class Pid:
        def pid(self):
            return os.getpid()

    owned = Pid.remote()
    detached = Pid.options(name="stays", namespace="restart", lifetime="detached").remote()
    owned_pid, detached_pid = minray.get([owned.pid.remote(), detached.pid.remote()])
    cluster.kill_head()
    minray.shutdown()                              # (its node manager is gone)
    cluster.restart_head()

    def alive(pid):
        try:
            os.kill(pid, 0)
            return True
        except ProcessLookupError:
            return False

    # Node 2 deals with the old head as a dead node: what it owned ends,
    # a detached actor lives on.
    deadline = time.monotonic() + 30
    while alive(owned_pid):
        assert time.monotonic() < deadline, "the owned actor outlived its owner"
        time.sleep(0.05)
    assert alive(detached_pid)
