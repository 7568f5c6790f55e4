"""Several nodes on one machine, for tests of multi-node programs.

    from minray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    node = cluster.add_node(num_cpus=2, resources={"b": 1}, node_ip_address="127.0.0.2")
    cluster.wait_for_nodes()
    minray.init(address=cluster.address)
    ...
    cluster.remove_node(node)           # as if its machine went away
    cluster.shutdown()

Every node is a real node manager process with its own session directory,
arena and TCP port (any free port unless `port` is given); give nodes
different loopback addresses (127.0.0.2, 127.0.0.3, ...) to tell them apart
as machines. The first node added is the head.
"""
import atexit
import os
import signal
import time

from minray.node_launcher import query_node, start_node, stop_node
from minray.session import read_token

NODE_ARGS = ("num_cpus", "num_gpus", "resources", "object_store_memory", "node_ip_address",
             "port", "num_gcs_shards", "num_workers", "memory")
HEAD_ONLY_ARGS = ("num_gcs_shards",)


class Cluster:
    def __init__(self, initialize_head=False, head_node_args=None, connect=False,
                 shutdown_at_exit=True):
        self.head_node = None
        self.worker_nodes = []
        self._token = None
        self._head_args = {}
        self._dead_head = None
        self._connected = False
        if shutdown_at_exit:
            atexit.register(self.shutdown)
        if connect and not initialize_head:
            raise ValueError("connect=True needs initialize_head=True (there is nothing to "
                             "connect to without a head)")
        if initialize_head:
            self.add_node(**(head_node_args or {}))
            if connect:
                self.connect()
        elif head_node_args:
            raise ValueError("head_node_args is used only with initialize_head=True; pass "
                             "them to the first add_node() instead")

    @property
    def address(self):
        """The head node manager's "ip:port" (what init() and joining nodes take)."""
        return self.head_node.address if self.head_node is not None else None

    def add_node(self, wait=True, **node_args):
        """Start a node (the head if it is the first) and return it.

        Takes num_cpus, num_gpus, resources, object_store_memory,
        node_ip_address (default 127.0.0.1), port (default any free port),
        num_workers, memory, and num_gcs_shards for the head. wait=True
        (default) returns once the node manager is ready to serve.
        """
        unknown = sorted(set(node_args) - set(NODE_ARGS))
        if unknown:
            raise ValueError(f"add_node() got unknown arguments {', '.join(unknown)}; it takes "
                             + ", ".join(NODE_ARGS))
        head = self.head_node is None
        if not head:
            given = [name for name in HEAD_ONLY_ARGS if name in node_args]
            if given:
                raise ValueError(f"{', '.join(given)} applies to the head only (the first "
                                 "node added)")
        node_args.setdefault("node_ip_address", "127.0.0.1")
        node_args.setdefault("port", 0)
        if head:
            node = start_node(head=True, keep_process=True, **node_args)
            self.head_node = node
            self._head_args = dict(node_args, port=0)
            self._token = read_token(node.session_dir)
        else:
            node = start_node(head=False, head_address=self.address, token=self._token,
                              keep_process=True, **node_args)
            self.worker_nodes.append(node)
        return node

    def remove_node(self, node, allow_graceful=True):
        """Stop a node: SIGTERM (allow_graceful) or SIGKILL of the node manager
        and every process under it, as if its machine went away."""
        if node is self.head_node:
            self.head_node = None
        elif node in self.worker_nodes:
            self.worker_nodes.remove(node)
        else:
            raise ValueError(f"{node!r} is not a node of this cluster")
        stop_node(node, force=not allow_graceful)

    def kill_head(self):
        """SIGKILL the head's node manager, alone, as a crash would (its
        control store shards stop by themselves); restart_head() brings the
        cluster a new head in its session."""
        if self.head_node is None:
            raise RuntimeError("the cluster has no head to kill")
        head, self.head_node = self.head_node, None
        os.kill(head.pid, signal.SIGKILL)
        if head.process is not None:
            head.process.wait()
        self._dead_head = head

    def restart_head(self, **node_args):
        """Start a head that takes over the dead one's cluster (its token,
        control store and address): the other nodes link to it again.
        Takes add_node()'s arguments; by default the dead head's."""
        if self._dead_head is None:
            raise RuntimeError("no head of this cluster died: kill_head() first")
        args = dict(self._head_args, **node_args)
        args.pop("num_gcs_shards", None)       # (the session's own count)
        node = start_node(head=True, keep_process=True,
                          resume_session=self._dead_head.session_dir, **args)
        self.head_node, self._dead_head = node, None
        return node

    def list_all_nodes(self):
        """The head (if any) and the other nodes, in the order they were added."""
        return ([self.head_node] if self.head_node is not None else []) + list(self.worker_nodes)

    def connect(self, namespace=None):
        """Connect this process's driver to the cluster (minray.init)."""
        import minray
        if self.head_node is None:
            raise RuntimeError("the cluster has no head yet: add_node() first")
        context = minray.init(address=self.address, namespace=namespace)
        self._connected = True
        return context

    def wait_for_nodes(self, timeout=30):
        """Wait until the cluster lists every node added here (and not
        removed) as alive; RuntimeError after `timeout` seconds."""
        wanted = {node.node_id for node in self.list_all_nodes()}
        deadline = time.monotonic() + timeout
        alive = set()
        while True:
            alive = self._alive_node_ids()
            if wanted <= alive:
                return
            if time.monotonic() > deadline:
                missing = [n for n in self.list_all_nodes() if n.node_id not in alive]
                raise RuntimeError(
                    f"{len(missing)} node(s) did not show up alive in the cluster within "
                    f"{timeout} s: " + ", ".join(f"{n.address} (session {n.session_dir})"
                                                 for n in missing))
            time.sleep(0.05)

    def _alive_node_ids(self):
        from minray.runtime import core
        client = core.current()
        if client is not None and client.role == "driver":
            return _alive(client.request_info("nodes"))
        if self.head_node is None:
            return set()
        return _alive(query_node(self.head_node.session_dir, "nodes"))

    def shutdown(self):
        """Disconnect this process's driver if it is connected to one of the
        nodes, stop every node (other nodes first, the head last) and clean
        up their arenas and sessions."""
        from minray import api
        sessions = {node.session_dir for node in self.list_all_nodes()}
        if self._connected or api._State.session_dir in sessions:
            # A driver of ours would otherwise watch its node vanish under it.
            api.shutdown()
            self._connected = False
        for node in reversed(self.worker_nodes):
            stop_node(node)
        self.worker_nodes = []
        if self.head_node is not None:
            stop_node(self.head_node)
            self.head_node = None


def _alive(nodes):
    return {n["node_id"] for n in nodes or () if n.get("alive")}

