"""Group ``cluster``: several node managers on this machine (loopback 127.0.0.x).

- ``transfer_*``: an object made on node B read by the driver on node A
  (pulled in chunks into A's store), beside raw TCP throughput of the same
  size between the same addresses, measured here in the same run (one
  socket pair, sendall on one side, a recv_into loop on the other). Bar:
  >= 0.8 x raw TCP. As nodes on one machine run by default (no per-object
  HMAC on loopback), and with the HMAC used between hosts
  (MINRAY_TRANSFER_INTEGRITY=1).
- ``remote_task_latency_ms``: sequential get(f.remote()) of a no-op task
  pinned to node B, from a driver on node A.
- ``tasks_2_nodes_per_s`` / ``tasks_1_node_per_s``: 20k no-op tasks spread
  over 2 nodes of NODE_CPUS CPUs each, and on 1 node of twice that.
- ``spilled_task_us``: node A's cost per task it sends to node B (20k no-op
  tasks pinned to B, submitted then gotten).
- ``tasks_1ms_per_s_<n>_nodes``: 1 ms tasks on n nodes of NODE_CPUS each
  (MINRAY_BENCH_NODES, default "1,2"; MINRAY_BENCH_NODE_CPUS, default 1):
  the paper's claim is close to linear growth with nodes.
"""
import contextlib
import os
import socket
import threading
import time

from . import figures

MB = 1 << 20
NODE_CPUS = int(os.environ.get("MINRAY_BENCH_NODE_CPUS", "1"))
SCALING_NODES = [int(n) for n in os.environ.get("MINRAY_BENCH_NODES", "1,2").split(",")]
STORE_BYTES = 2600 * MB


@contextlib.contextmanager
def _cluster(nodes, cpus, integrity=False, store=STORE_BYTES):
    """A head on 127.0.0.1 and nodes-1 more on 127.0.0.2, ...; the driver on
    the head. integrity: objects carry the HMAC used between hosts."""
    import minray
    from minray.cluster_utils import Cluster
    saved = os.environ.pop("MINRAY_TRANSFER_INTEGRITY", None)
    if integrity:
        os.environ["MINRAY_TRANSFER_INTEGRITY"] = "1"
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": cpus, "object_store_memory": store, "resources": {"node1": 1}})
    try:
        for number in range(2, nodes + 1):
            cluster.add_node(num_cpus=cpus, object_store_memory=store,
                             resources={f"node{number}": 1}, node_ip_address=f"127.0.0.{number}")
        cluster.wait_for_nodes()
        minray.init(address=cluster.address)
        yield minray
    finally:
        if minray.is_initialized():
            minray.shutdown()
        cluster.shutdown()
        if saved is None:
            os.environ.pop("MINRAY_TRANSFER_INTEGRITY", None)
        else:
            os.environ["MINRAY_TRANSFER_INTEGRITY"] = saved


def _raw_tcp_gbps(size, repeats):
    """A plain socket pair 127.0.0.2 -> 127.0.0.1: sendall, recv_into loop.

    It receives into a fresh bytearray each time: memory in 4 KB pages that
    the copy faults in, as the object store's arena is (/dev/shm gets no
    huge pages here). A numpy array would get transparent huge pages, and
    the comparison would measure page sizes instead of the transfer.
    """
    import numpy as np
    payload = np.ones(size, dtype=np.uint8)
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    best = 0.0
    for _ in range(repeats):
        sender = socket.create_connection(("127.0.0.1", port), source_address=("127.0.0.2", 0))
        receiver, _ = listener.accept()
        target = bytearray(size)
        thread = threading.Thread(target=sender.sendall, args=(memoryview(payload),))
        start = time.perf_counter()
        thread.start()
        view, got = memoryview(target), 0
        while got < size:
            got += receiver.recv_into(view[got:got + (8 << 20)])
        elapsed = time.perf_counter() - start
        thread.join()
        sender.close()
        receiver.close()
        del view, target
        best = max(best, size / elapsed / 1e9)
    listener.close()
    return best


def _transfer_gbps(rt, size, repeats):
    """An object put on node 2 (owned there), read by the driver on node 1."""
    import numpy as np

    @rt.remote(resources={"node2": 1})
    def make(n):
        return [rt.put(np.ones(n, dtype=np.uint8))]

    best = 0.0
    for _ in range(repeats):
        inner = rt.get(make.remote(size))[0]
        start = time.perf_counter()
        array = rt.get(inner)
        elapsed = time.perf_counter() - start
        assert array.nbytes == size
        del array, inner
        best = max(best, size / elapsed / 1e9)
    return best


@figures("cluster", {
    "transfer_256mb_gbps": "GB/s", "raw_tcp_256mb_gbps": "GB/s",
    "transfer_256mb_vs_tcp_ratio": "x",
    "transfer_1gb_gbps": "GB/s", "raw_tcp_1gb_gbps": "GB/s", "transfer_1gb_vs_tcp_ratio": "x",
    "transfer_1gb_integrity_gbps": "GB/s", "transfer_1gb_integrity_vs_tcp_ratio": "x",
}, quick_note="32 MB and 64 MB objects")
def transfer(quick):
    small, large = (32 * MB, 64 * MB) if quick else (256 * MB, 1024 * MB)
    repeats = 2 if quick else 3
    out = {}
    with _cluster(2, 1) as rt:
        for name, size in (("256mb", small), ("1gb", large)):
            out[f"transfer_{name}_gbps"] = _transfer_gbps(rt, size, repeats)
            out[f"raw_tcp_{name}_gbps"] = _raw_tcp_gbps(size, repeats)
            out[f"transfer_{name}_vs_tcp_ratio"] = (out[f"transfer_{name}_gbps"]
                                                    / out[f"raw_tcp_{name}_gbps"])
    with _cluster(2, 1, integrity=True) as rt:
        out["transfer_1gb_integrity_gbps"] = _transfer_gbps(rt, large, repeats)
    out["transfer_1gb_integrity_vs_tcp_ratio"] = (out["transfer_1gb_integrity_gbps"]
                                                  / out["raw_tcp_1gb_gbps"])
    return out


@figures("cluster", {
    "remote_task_latency_ms": "ms", "spilled_task_us": "us",
    "tasks_2_nodes_per_s": "/s", "tasks_1_node_per_s": "/s",
}, quick_note="2k tasks")
def tasks(quick):
    count = 2_000 if quick else 20_000
    out = {}
    with _cluster(2, NODE_CPUS) as rt:
        @rt.remote
        def noop():
            return None

        pinned = noop.options(resources={"node2": 0.001})
        rt.get([pinned.remote() for _ in range(200)])
        calls = 200 if quick else 1000
        start = time.perf_counter()
        for _ in range(calls):
            rt.get(pinned.remote())
        out["remote_task_latency_ms"] = (time.perf_counter() - start) / calls * 1e3
        start = time.perf_counter()
        rt.get([pinned.remote() for _ in range(count)])
        out["spilled_task_us"] = (time.perf_counter() - start) / count * 1e6
        rt.get([noop.remote() for _ in range(200)])
        start = time.perf_counter()
        rt.get([noop.remote() for _ in range(count)])
        out["tasks_2_nodes_per_s"] = count / (time.perf_counter() - start)
    with _cluster(1, 2 * NODE_CPUS) as rt:
        @rt.remote
        def noop():
            return None

        rt.get([noop.remote() for _ in range(200)])
        start = time.perf_counter()
        rt.get([noop.remote() for _ in range(count)])
        out["tasks_1_node_per_s"] = count / (time.perf_counter() - start)
    return out


@figures("cluster", {f"tasks_1ms_per_s_{n}_nodes": "/s" for n in SCALING_NODES},
         quick_note="fewer tasks")
def scaling(quick):
    out = {}
    for nodes in SCALING_NODES:
        count = (500 if quick else 4000) * nodes * NODE_CPUS
        with _cluster(nodes, NODE_CPUS, store=512 * MB) as rt:
            @rt.remote
            def one_ms():
                deadline = time.perf_counter() + 0.001
                while time.perf_counter() < deadline:
                    pass

            rt.get([one_ms.remote() for _ in range(200 * nodes)])
            start = time.perf_counter()
            rt.get([one_ms.remote() for _ in range(count)])
            out[f"tasks_1ms_per_s_{nodes}_nodes"] = count / (time.perf_counter() - start)
    return out
