"""minray.cluster_utils.Cluster: several real node managers on this machine.

Each test runs its script in a fresh process with MINRAY_SESSION_ROOT in the
test's own temporary directory. Nodes listen on loopback addresses only
(127.0.0.1, 127.0.0.2, 127.0.0.3), each on a port the system picks.
"""
import glob
import json
import os
import shutil
import tempfile

import pytest

from minray_driver import gone, poll, run_driver, session_retired

# Prints, as one JSON line, what a node left on this machine: its process
# tree, arena and session, for the test to check after shutdown.
REPORT = """
import glob, json, os, psutil
def node_report(node):
    base = os.path.basename(node.session_dir)
    tree = psutil.Process(node.pid)
    return {"session_dir": node.session_dir, "pid": node.pid,
            "shm": glob.glob(f"/dev/shm/minray-{base}-*"),
            "pids": [node.pid] + [p.pid for p in tree.children(recursive=True)]}
"""


@pytest.fixture
def session_root():
    root = tempfile.mkdtemp(prefix="mr-", dir="/tmp")
    yield {"MINRAY_SESSION_ROOT": root}
    shutil.rmtree(root, ignore_errors=True)


def reports(stdout, tag):
    return [json.loads(line[len(tag):]) for line in stdout.splitlines() if line.startswith(tag)]


def assert_nothing_left(report):
    poll(lambda: all(gone(pid) for pid in report["pids"]),
         what=f"the processes of {report['session_dir']} gone")
    assert all(not os.path.exists(path) for path in report["shm"])
    assert session_retired(report["session_dir"])


def test_nodes_lists_two_alive_nodes_after_add_node(session_root):
    """The head and one node on another loopback address, both listed alive
    (by the node managers and through the public API), their resources summed."""
    proc = run_driver(REPORT + """
import minray
from minray.cluster_utils import Cluster

cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1,
                                                       "object_store_memory": 64 << 20})
node = cluster.add_node(num_cpus=2, resources={"side": 1}, node_ip_address="127.0.0.2",
                        object_store_memory=64 << 20)
assert node.address.startswith("127.0.0.2:"), node.address
assert cluster.address == cluster.head_node.address != node.address
assert cluster.list_all_nodes() == [cluster.head_node, node]
cluster.wait_for_nodes()
cluster.connect()
listed = minray.runtime.core.current().request_info("nodes")
alive = {n["node_id"]: n for n in listed if n["alive"]}
assert set(alive) == {cluster.head_node.node_id, node.node_id}, listed
assert alive[node.node_id]["address"] == node.address
assert alive[cluster.head_node.node_id]["is_head"] and not alive[node.node_id]["is_head"]
assert alive[node.node_id]["resources"]["side"] == 1
public = minray.nodes()
assert sorted(n["NodeID"] for n in public if n["Alive"]) == sorted(alive), public
assert minray.cluster_resources()["CPU"] == 3
assert minray.cluster_resources()["side"] == 1
for n in cluster.list_all_nodes():
    print("NODE", json.dumps(node_report(n)))
cluster.shutdown()
print("DONE")
""", env=session_root, timeout=120)
    assert "DONE" in proc.stdout
    for report in reports(proc.stdout, "NODE "):
        assert_nothing_left(report)


def test_init_by_address_connects_to_the_node_listening_there(session_root):
    proc = run_driver("""
import minray
from minray.cluster_utils import Cluster

cluster = Cluster()
head = cluster.add_node(num_cpus=1, object_store_memory=64 << 20)
other = cluster.add_node(num_cpus=1, object_store_memory=64 << 20,
                         node_ip_address="127.0.0.3")
cluster.wait_for_nodes()
# A node's own address connects to that node; "auto" to the head (the newest
# session it pointed at), as does the head's address.
for address, expected in ((other.address, other), (head.address, head), ("auto", head)):
    context = minray.init(address=address)
    assert context["node_id"] == expected.node_id, (address, context)
    assert context["session_dir"] == expected.session_dir
    minray.shutdown()
cluster.shutdown()
print("DONE")
""", env=session_root, timeout=120)
    assert "DONE" in proc.stdout


def test_remove_node_and_shutdown_leave_nothing_behind(session_root):
    proc = run_driver(REPORT + """
import time
import minray
from minray.cluster_utils import Cluster

cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1,
                                                       "object_store_memory": 64 << 20})
gentle = cluster.add_node(num_cpus=1, node_ip_address="127.0.0.2",
                          object_store_memory=64 << 20)
abrupt = cluster.add_node(num_cpus=1, node_ip_address="127.0.0.3",
                          object_store_memory=64 << 20)
cluster.wait_for_nodes()
print("GENTLE", json.dumps(node_report(gentle)))
print("ABRUPT", json.dumps(node_report(abrupt)))
cluster.remove_node(gentle)
cluster.remove_node(abrupt, allow_graceful=False)
assert cluster.list_all_nodes() == [cluster.head_node]
cluster.wait_for_nodes()            # only the head is expected now
try:
    cluster.remove_node(abrupt)
except ValueError as exc:
    print("REFUSED", exc)
print("HEAD", json.dumps(node_report(cluster.head_node)))
cluster.shutdown()
cluster.shutdown()                  # twice is harmless
print("DONE")
""", env=session_root, timeout=120)
    assert "DONE" in proc.stdout and "is not a node of this cluster" in proc.stdout
    for tag in ("GENTLE ", "ABRUPT ", "HEAD "):
        for report in reports(proc.stdout, tag):
            assert_nothing_left(report)
    root = session_root["MINRAY_SESSION_ROOT"]
    assert not [p for p in glob.glob(os.path.join(root, "session-*", "token"))]


def test_a_removed_node_is_listed_dead(session_root):
    proc = run_driver("""
import time
import minray
from minray.cluster_utils import Cluster

cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1,
                                                       "object_store_memory": 64 << 20},
                  connect=True)
node = cluster.add_node(num_cpus=1, node_ip_address="127.0.0.2", object_store_memory=64 << 20)
cluster.wait_for_nodes()
cluster.remove_node(node, allow_graceful=False)
deadline = time.monotonic() + 60
while True:
    listed = {n["node_id"]: n for n in minray.runtime.core.current().request_info("nodes")}
    if node.node_id in listed and not listed[node.node_id]["alive"]:
        break
    assert time.monotonic() < deadline, listed
    time.sleep(0.1)
assert listed[cluster.head_node.node_id]["alive"]
cluster.shutdown()
print("DONE")
""", env=session_root, timeout=120)
    assert "DONE" in proc.stdout


def test_bad_arguments_are_clear_errors(session_root):
    proc = run_driver("""
from minray.cluster_utils import Cluster
for make in (lambda: Cluster(head_node_args={"num_cpus": 1}),
             lambda: Cluster(connect=True),
             lambda: Cluster().add_node(num_cpu=1),
             lambda: Cluster().add_node(port=-1),
             lambda: Cluster().add_node(node_ip_address="")):
    try:
        make()
    except ValueError as exc:
        print("REFUSED", exc)
""", env=session_root)
    assert proc.stdout.count("REFUSED") == 5, proc.stdout
    assert "unknown arguments num_cpu" in proc.stdout
    root = session_root["MINRAY_SESSION_ROOT"]
    assert not glob.glob(os.path.join(root, "session-*", "token"))


def test_minray_status_and_list_see_every_node(session_root):
    """The command line on a cluster_utils cluster: status lists both nodes,
    `list names` a named actor living on the second node, `list jobs` the
    driver (and not the command line's own connections)."""
    proc = run_driver("""
import subprocess, sys, time
import minray
from minray.cluster_utils import Cluster

def cli(*args):
    return subprocess.run([sys.executable, "-m", "minray.scripts.cli", *args],
                          capture_output=True, text=True, check=True).stdout

cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1,
                                                       "object_store_memory": 64 << 20})
side = cluster.add_node(num_cpus=1, resources={"side": 1}, node_ip_address="127.0.0.2",
                        object_store_memory=64 << 20)
cluster.wait_for_nodes()
cluster.connect(namespace="shown")

@minray.remote(resources={"side": 1})
class Sider:
    def where(self):
        return minray.get_runtime_context().get_node_id()

sider = Sider.options(name="sider").remote()
assert minray.get(sider.where.remote()) == side.node_id
status = cli("status")
assert "2 node(s) alive" in status, status
assert side.address in status and cluster.address in status, status
names = cli("list", "names")
row = next(line for line in names.splitlines() if line.startswith("sider"))
assert "Sider" in row and side.address in row, names
jobs = cli("list", "jobs")
assert "shown" in jobs and "_minray_tools" not in jobs, jobs
cluster.shutdown()
print("DONE")
""", env=session_root, timeout=180)
    assert "DONE" in proc.stdout
