"""Group ``faults``: work that survives failures, and what surviving costs.

- ``chaos_*``: a job of 2,047 tasks (a tree reduce of 1,024 arrays of 256 KB)
  plus 256 gradient tasks feeding an actor parameter server on the head
  (every task works 10 ms), on
  3 nodes (head + 2 worker nodes, 1 CPU each), once without faults and once
  while a worker node is killed with -9 every KILL_EVERY_S seconds and a
  fresh node takes its place. Both runs must give exactly the result
  computed here without minray (checked, not just timed); the figure is
  the slowdown. Lost results come back by lineage reconstruction and task
  retries.
- ``reconstruct_100mb_s``: a 100 MB result on a worker node that is then
  killed: seconds from the kill to `get` returning it on the driver
  (detection with MINRAY_NODE_TIMEOUT_S=1, re-run on the other node, pull).
- ``spill_gbps`` / ``restore_gbps``: puts of 4x a 512 MB store in 64 MB
  arrays (all kept referenced, so the oldest are spilled to disk: bytes put
  per second), then reading the spilled ones back once the others are
  dropped (bytes restored per second); beside a plain file write / read of the same bytes
  in the same directory in the same run (page cache, no fsync, as spilling).
"""
import contextlib
import os
import tempfile
import threading
import time

import numpy as np

from . import figures

MB = 1 << 20
LEAVES = 1024
LEAF_FLOATS = 32 * 1024              # 256 KB: stored, not inline
GRADIENTS = 256
KILL_EVERY_S = 2.0
TASK_S = 0.01                        # each task's work: the job lasts several kills


@contextlib.contextmanager
def _cluster(nodes=3, store=512 * MB, node_timeout="1"):
    import minray
    from minray.cluster_utils import Cluster
    saved = os.environ.get("MINRAY_NODE_TIMEOUT_S")
    os.environ["MINRAY_NODE_TIMEOUT_S"] = node_timeout
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 1, "object_store_memory": store, "resources": {"head": 1}})
    try:
        for number in range(2, nodes + 1):
            cluster.add_node(num_cpus=1, object_store_memory=store,
                             resources={"worker": 1}, node_ip_address=f"127.0.0.{number}")
        cluster.wait_for_nodes()
        minray.init(address=cluster.address)
        yield minray, cluster
    finally:
        if minray.is_initialized():
            minray.shutdown()
        cluster.shutdown()
        if saved is None:
            os.environ.pop("MINRAY_NODE_TIMEOUT_S", None)
        else:
            os.environ["MINRAY_NODE_TIMEOUT_S"] = saved


def _expected(leaves):
    total = sum(np.full(LEAF_FLOATS, float(i % 97)) for i in range(leaves))
    params = np.zeros(16)
    for step in range(GRADIENTS):
        params += np.arange(16.0) * (step % 5)
    return float(total.sum()), params


def _job(rt, leaves):
    """The tree reduce and the parameter server; (sum, parameters)."""
    @rt.remote(max_retries=-1)
    def leaf(i):
        time.sleep(TASK_S)
        return np.full(LEAF_FLOATS, float(i % 97))

    @rt.remote(max_retries=-1)
    def add(a, b):
        time.sleep(TASK_S)
        return a + b

    @rt.remote(max_retries=-1)
    def gradient(step):
        time.sleep(TASK_S)
        return np.arange(16.0) * (step % 5)

    @rt.remote(resources={"head": 0.01})
    class ParameterServer:
        def __init__(self):
            self.params = np.zeros(16)

        def push(self, grad):
            self.params += grad            # integer values: exact in any order
            return True

        def get(self):
            return self.params

    server = ParameterServer.remote()
    pushes = [server.push.remote(gradient.remote(step)) for step in range(GRADIENTS)]
    level = [leaf.remote(i) for i in range(leaves)]
    while len(level) > 1:
        level = [add.remote(level[i], level[i + 1]) for i in range(0, len(level), 2)]
    total = float(rt.get(level[0], timeout=600).sum())
    rt.get(pushes, timeout=600)
    return total, rt.get(server.get.remote(), timeout=600)


def _killer(cluster, stop, kills):
    """Kill -9 a worker node every KILL_EVERY_S, and start a fresh one."""
    while not stop.wait(KILL_EVERY_S):
        victims = list(cluster.worker_nodes)
        if not victims:
            continue
        victim = victims[kills[0] % len(victims)]
        address = victim.address.rsplit(":", 1)[0]
        cluster.remove_node(victim, allow_graceful=False)
        kills[0] += 1
        if stop.is_set():
            return
        cluster.add_node(num_cpus=1, object_store_memory=512 * MB, resources={"worker": 1},
                         node_ip_address=address)


@figures("faults", {
    "chaos_tasks": "tasks", "chaos_kills": "kills", "chaos_clean_s": "s",
    "chaos_with_kills_s": "s", "chaos_slowdown_x": "x",
}, quick_note="256 leaves")
def chaos(quick):
    leaves = 256 if quick else LEAVES
    expected_total, expected_params = _expected(leaves)
    out = {"chaos_tasks": 2 * leaves - 1 + GRADIENTS}
    with _cluster() as (rt, _):
        start = time.perf_counter()
        total, params = _job(rt, leaves)
        out["chaos_clean_s"] = time.perf_counter() - start
    assert total == expected_total and np.array_equal(params, expected_params), \
        "the run without faults gave a wrong result"
    with _cluster() as (rt, cluster):
        stop, kills = threading.Event(), [0]
        killer = threading.Thread(target=_killer, args=(cluster, stop, kills), daemon=True)
        start = time.perf_counter()
        killer.start()
        try:
            total, params = _job(rt, leaves)
        finally:
            stop.set()
            killer.join()
        out["chaos_with_kills_s"] = time.perf_counter() - start
    assert total == expected_total and np.array_equal(params, expected_params), \
        f"the run with {kills[0]} kills gave a wrong result: {total} vs {expected_total}"
    out["chaos_kills"] = kills[0]
    out["chaos_slowdown_x"] = out["chaos_with_kills_s"] / out["chaos_clean_s"]
    return out


@figures("faults", {"reconstruct_100mb_s": "s"}, quick_note="20 MB")
def reconstruct(quick):
    size = (20 if quick else 100) * MB
    with _cluster(nodes=2) as (rt, cluster):
        @rt.remote(resources={"worker": 1})
        def make():
            return np.ones(size // 8)

        ref = make.remote()
        rt.wait([ref], fetch_local=False)       # made, and left on the worker node
        victim = cluster.worker_nodes[0]
        cluster.add_node(num_cpus=1, object_store_memory=512 * MB, resources={"worker": 1},
                         node_ip_address="127.0.0.3")
        cluster.wait_for_nodes()
        start = time.perf_counter()
        cluster.remove_node(victim, allow_graceful=False)
        array = rt.get(ref, timeout=120)
        elapsed = time.perf_counter() - start
        assert array.nbytes == size and array[0] == 1.0
    return {"reconstruct_100mb_s": elapsed}


@figures("faults", {
    "spill_gbps": "GB/s", "file_write_gbps": "GB/s", "spill_vs_file_write_ratio": "x",
    "restore_gbps": "GB/s", "file_read_gbps": "GB/s", "restore_vs_file_read_ratio": "x",
}, quick_note="1 GB through a 256 MB store")
def spill(quick):
    import minray
    from minray.api import _client
    store = (256 if quick else 512) * MB
    count = 16 if quick else 32                      # 64 MB each: 4x the store
    chunk = 64 * MB
    minray.init(num_cpus=1, object_store_memory=store)
    try:
        arrays = [np.full(chunk // 8, float(i)) for i in range(count)]
        start = time.perf_counter()
        refs = [minray.put(array) for array in arrays]
        put_s = time.perf_counter() - start
        spilled = _client().request_info("stats")["spilling"]["spilled_bytes"]
        # Read back what was spilled with room to spare (what is still in
        # the store dropped first, each array dropped once read): restoring,
        # not spilling more to make room for it.
        on_disk = count - (store // chunk - 1)
        del refs[on_disk:]
        start = time.perf_counter()
        for i in range(on_disk):
            value = minray.get(refs[i])
            assert value[0] == float(i)
            del value
            refs[i] = None
        get_s = time.perf_counter() - start
        restored = _client().request_info("stats")["spilling"]["restored_bytes"]
        total = count * chunk
        path = os.path.join(tempfile.gettempdir(), f"minray-bench-{os.getpid()}")
        start = time.perf_counter()
        with open(path, "wb") as f:
            for array in arrays:
                f.write(memoryview(array).cast("B"))
        write_s = time.perf_counter() - start
        buffer = bytearray(chunk)
        start = time.perf_counter()
        with open(path, "rb") as f:
            while f.readinto(buffer):
                pass
        read_s = time.perf_counter() - start
        os.unlink(path)
    finally:
        minray.shutdown()
    assert spilled >= total // 2 and restored > 0, (spilled, restored)
    out = {"spill_gbps": total / put_s / 1e9, "file_write_gbps": total / write_s / 1e9,
           "restore_gbps": restored / get_s / 1e9, "file_read_gbps": total / read_s / 1e9}
    out["spill_vs_file_write_ratio"] = out["spill_gbps"] / out["file_write_gbps"]
    out["restore_vs_file_read_ratio"] = out["restore_gbps"] / out["file_read_gbps"]
    return out
