"""The node manager: one process per node holding the local scheduler, the
object store (as its owner), the object directory and the worker pool.

Drivers and workers talk to it over a Unix socket (minray.wire frames, the
messages of minray.protocol). This module starts and stops the node and
routes each message to the component that handles it:

    connection.py a connection's messages checked, batches unpacked
    dispatch.py   ready tasks -> workers, leases, pipelining, GPUs
    tasks.py      a task's life: submitted, waiting, finished, failed, retried
    objects.py    the object directory: values, references, who waits
    actors.py     actors: placement, call order, restarts
    lineage.py    what is recorded in the control store
    workers.py    worker processes
    peers.py      TCP links to other node managers
    cluster.py    membership, heartbeats, the global scheduler's choice of node
    transfer.py   objects pulled from and served to other nodes
    output.py     what tasks print, to the driver of their job

A handler's exception is contained to its message: it is logged, a request is
answered with "failed", and a submission's results become errors; the
connection and the node go on.
"""
import asyncio
import gc
import json
import logging
import os
import signal
import socket
import time

from minray import __version__, wire
from minray.node_manager.actors import ActorManager
from minray.node_manager.cluster import ClusterView, NodeInfo
from minray.node_manager.connection import Connection, OutboundLink
from minray.node_manager.dispatch import Dispatcher
from minray.node_manager.lineage import LineageLog
from minray.node_manager.membership import JoinError, Membership
from minray.node_manager.objects import ObjectDirectory
from minray.node_manager.output import OutputRouter
from minray.node_manager.peers import PeerTable
from minray.node_manager.recovery import ObjectRecovery
from minray.node_manager.spilling import Spiller
from minray.node_manager.tasks import TaskManager
from minray.node_manager.transfer import Puller, TransferServer
from minray.node_manager.workers import WorkerPool
from minray.object_store import SharedStore
from minray.protocol import IN_STORE, REQUEST_ID_FIELD
from minray.session import NODE_FILE, node_socket_path

log = logging.getLogger("minray.node_manager")

# When the node manager collects reference cycles (see _collect_cycles).
GC_CHECK_S = 1.0
GC_MIN_ALLOCATIONS = 10_000     # objects made since the last collection, at least
GC_MAX_INTERVAL_S = 60.0


class NodeManager:
    def __init__(self, session_dir, node_id, resources, store_capacity, token,
                 num_workers=None, embedded=False, log_to_driver=True, gpu_ids=None,
                 node_ip="127.0.0.1", port=0, head_address=None, resume=False):
        self.session_dir = session_dir
        self.resume = resume                  # a head taking over from one that died
        self.node_ip = node_ip
        self.port = port
        self.head_address = head_address      # None on the head
        self.address = None                   # "ip:port" once listening
        self.cluster = None
        self.peers = None
        self.transfer = None
        self.puller = None
        self.node_id = node_id
        self.token = token
        self.embedded = embedded
        self.socket_path = node_socket_path(session_dir)
        self.store_name = f"minray-{os.path.basename(session_dir)}-{node_id.hex()[:8]}"
        self.store = SharedStore.create(self.store_name, store_capacity)
        self.resources = dict(resources)
        self.pool = WorkerPool(session_dir, self.socket_path, self.store_name, node_id,
                               inherit_output=log_to_driver)
        self.drivers = set()
        # Unrouted output goes to our stdout only where that is a driver's terminal.
        self.output = OutputRouter(node_ip, print_unrouted=log_to_driver)
        self.code_paths = []       # drivers' script directories, for workers' sys.path
        self.stopping = None
        self.cycle_collections = {"runs": 0, "collected": 0, "seconds": 0.0}
        self.batcher = wire.OutputBatcher()
        self.objects = ObjectDirectory(self.store)
        self.objects.pull = self.pull_object
        # Off the event loop; it asks (from its thread) which objects are still
        # held, to keep the lineage they may need.
        self.lineage = LineageLog(node_id, self.objects.entries.__contains__)
        self.dispatcher = Dispatcher(resources, self.pool, self.objects,
                                     num_workers or max(1, int(resources.get("CPU", 1))),
                                     self.batcher, gpu_ids)
        self.tasks = TaskManager(self.dispatcher, self.objects, self.lineage)
        self.actors = ActorManager(self.dispatcher, self.tasks, self.objects, self.lineage)
        self.actors.kill_worker = self.worker_died
        self.recovery = ObjectRecovery(self.objects, self.tasks)
        self.spiller = Spiller(self.store, self.objects, session_dir)
        self.membership = Membership(self)
        queued_on, actors = self.dispatcher.queues.waiting, self.actors
        self.objects.wanted_here = lambda object_id: (
            object_id in queued_on or object_id in actors.waiting_creation
            or object_id in actors.waiting_calls)
        self.handlers = {
            "hello": self.on_hello, "fn": self.on_function, "submit": self.tasks.submit,
            "put": self.on_put, "sub": self.on_subscribe, "borrow": self.on_borrow,
            "free": self.on_free, "escape": self.on_escape, "adopt": self.on_adopt,
            "done": self.on_done,
            "blocked": self.on_blocked, "unblocked": self.on_unblocked,
            "giveback": self.on_giveback, "info": self.on_info, "shutdown": self.on_shutdown,
            "actor_create": actors.on_create, "actor_call": actors.on_call,
            "actor_ready": actors.on_ready,
            "actor_exit": lambda conn: actors.on_exit(conn.worker),
            "actor_kill": lambda conn, actor_id, no_restart: actors.kill(actor_id, no_restart),
            "cancel": self.tasks.cancel,
            # from other node managers
            "joined": self.membership.on_joined, "refused": self.membership.on_refused,
            "heartbeat": lambda peer, load: self.cluster.on_heartbeat(peer, load),
            "nodes": lambda peer, rows: self.cluster.on_nodes(rows),
            "value": self.on_peer_value, "run": self._routed(self.tasks.run_forwarded),
            "finished": self.tasks.forwarded_finished,
            "create": self._routed(actors.on_create_forwarded),
            "call": self._routed(actors.on_call_forwarded),
            "output": self.output.from_worker, "forwarded_output": self.output.from_peer,
            "name": actors.on_name_request, "name_reply": actors.on_name_reply,
            "locate_actor": actors.on_locate_actor, "actor_host": actors.on_actor_host,
            "lost": self.recovery.on_lost, "make_room": self.on_make_room,
        }

    # ------------------------------------------------------------ lifecycle
    async def run(self, ready_path=None, parent_pid=None, connect_gcs=None):
        loop = asyncio.get_running_loop()
        self.stopping = asyncio.Event()
        os.makedirs(os.path.dirname(self.socket_path), mode=0o700, exist_ok=True)
        server = await loop.create_unix_server(lambda: Connection(self), self.socket_path,
                                               backlog=wire.LISTEN_BACKLOG)
        os.chmod(self.socket_path, 0o600)
        tcp_server = await self._listen_tcp(loop)
        for _ in range(self.dispatcher.num_workers):
            self.pool.start()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stopping.set)
        heartbeats = self.cluster.start()
        if self.head_address is not None:
            await self.membership.join()
        watchdog = asyncio.ensure_future(self._watchdog(parent_pid))
        collector = None if gc.isenabled() else asyncio.ensure_future(self._collect_cycles())
        if connect_gcs is not None:
            # Serve drivers and workers at once: the control store (started in
            # parallel on the head) only receives our log, written by a thread.
            self.lineage.start(connect_gcs)
        if self.resume:
            asyncio.ensure_future(self.membership.expect_known_nodes())
        self._write_node_file()
        if ready_path:
            with open(ready_path + ".tmp", "w") as f:
                f.write(self.socket_path)
            os.replace(ready_path + ".tmp", ready_path)
        await self.stopping.wait()
        watchdog.cancel()
        if collector is not None:
            collector.cancel()
        heartbeats.cancel()
        server.close()
        tcp_server.close()
        self.shutdown()

    async def _listen_tcp(self, loop):
        """Listen for other node managers, and set up what talks to them."""
        tcp_server = await loop.create_server(lambda: Connection(self), self.node_ip, self.port,
                                              backlog=wire.LISTEN_BACKLOG)
        port = tcp_server.sockets[0].getsockname()[1]
        self.address = f"{self.node_ip}:{port}"
        self.objects.address = self.address
        self.transfer = TransferServer(self.store, self.token, self.node_ip,
                                       self.spiller.file_of)
        self.transfer.start()
        self.puller = Puller(self.store, self.token, loop, self.spiller.make_room)
        own = NodeInfo(node_id=self.node_id.hex(), address=self.address,
                       transfer_address=self.transfer.address,
                       is_head=self.head_address is None, resources=dict(self.resources),
                       available=dict(self.resources), ready=0, running=0,
                       store_used=0, store_capacity=self.store.stats().get("capacity"),
                       pid=os.getpid(), hostname=socket.gethostname())
        self.peers = PeerTable(self.token, dict(own.row(), version=__version__),
                               lambda peer, key: OutboundLink(self, peer, key))
        self.cluster = ClusterView(own, self.head_address or self.address, self.peers,
                                   self.lineage, self.node_died)
        self.cluster.load = self.load
        self.cluster.on_head_lost = self.membership.head_lost
        self.peers.on_link_failed = self.cluster.link_failed
        self.cluster.rebalance = self.tasks.rebalance
        self.tasks.cluster, self.tasks.peers = self.cluster, self.peers
        self.actors.cluster, self.actors.peers = self.cluster, self.peers
        self.recovery.cluster, self.recovery.peers = self.cluster, self.peers
        return tcp_server

    def _write_node_file(self):
        path = os.path.join(self.session_dir, NODE_FILE)
        with open(path + ".tmp", "w") as f:
            json.dump({"node_id": self.node_id.hex(), "address": self.address,
                       "head_address": self.head_address or self.address,
                       "socket": self.socket_path, "pid": os.getpid(),
                       "is_head": self.head_address is None, "embedded": self.embedded,
                       "transfer_address": self.transfer.address}, f)
        os.replace(path + ".tmp", path)

    def load(self):
        """This node's load, for heartbeats."""
        queues = self.dispatcher.queues
        store = self.store.stats()
        return {"available": queues.available_resources, "ready": queues.num_ready,
                "running": sum(1 for w in self.pool.workers.values() if w.queue),
                "store_used": store.get("used"), "store_capacity": store.get("capacity")}

    async def _watchdog(self, parent_pid):
        # Parent gone (driver killed) or workers that failed to start.
        while True:
            await asyncio.sleep(0.25)
            if parent_pid and os.getppid() != parent_pid:
                log.info("parent %d is gone; shutting down", parent_pid)
                self.stopping.set()
                return
            for worker_id in self.pool.overdue():
                log.error("worker %s did not connect; starting another if needed", worker_id)
                self.dispatcher.schedule()

    async def _collect_cycles(self):
        # Automatic collection is off in a node manager process (see
        # minray.node_manager.__main__): what little cyclic garbage it makes
        # (connections that closed, errors with tracebacks) is collected here,
        # when no task is in flight, or at least every GC_MAX_INTERVAL_S (a
        # full collection of a node with 100,000 tasks queued takes ~0.3 s).
        last = time.monotonic()
        while True:
            await asyncio.sleep(GC_CHECK_S)
            now = time.monotonic()
            if gc.get_count()[0] < GC_MIN_ALLOCATIONS or (
                    self.tasks.tasks and now - last < GC_MAX_INTERVAL_S):
                continue
            found = gc.collect()
            last = time.monotonic()
            runs = self.cycle_collections
            runs["runs"] += 1
            runs["collected"] += found
            runs["seconds"] += last - now
            log.debug("collected %d objects in reference cycles in %.3f s", found, last - now)

    def shutdown(self):
        if self.transfer is not None:
            self.transfer.close()
        if self.puller is not None:
            self.puller.close()
        self.pool.stop_all()
        self.spiller.close()
        self.lineage.close()
        self.objects.entries.clear()
        self.store.close()
        try:
            os.unlink(self.socket_path)
        except FileNotFoundError:
            pass

    # ------------------------------------------------------------ routing
    def _routed(self, handler):
        """A handler of work sent by a peer (its spec first, the spec's id
        first): the job's output goes back that way."""
        def handle_work(peer, spec, *fields):
            # (a task or call spec is a tuple, an actor's creation a dict)
            work_id = spec.get("actor_id") if isinstance(spec, dict) else \
                spec[0] if isinstance(spec, tuple) and spec else None
            if isinstance(work_id, bytes):
                self.output.learn_route(work_id, peer)
            handler(peer, spec, *fields)
        return handle_work

    def handle(self, conn, message):
        """Run a message's handler; its failure stays with that message."""
        name = message[0]
        try:
            self.handlers[name](conn, *message[1:])
        except Exception as exc:
            log.exception("handling %r from %s failed", name, conn.peer)
            reason = f"{type(exc).__name__}: {exc}"
            if name in REQUEST_ID_FIELD:
                conn.send(("failed", message[1 + REQUEST_ID_FIELD[name]], reason))
            elif name in ("submit", "actor_call"):
                self.tasks.refuse(conn, message[1], reason)

    # ------------------------------------------------------------ connections
    def on_hello(self, conn, role, info):
        if role == "node":
            self.membership.peer_hello(conn, info)
            return
        conn.role = role
        if role == "worker":
            conn.worker = self.pool.admit(info, conn)
            if conn.worker is None:
                return          # refused: dropped, with the reason logged
            conn.send(("welcome", {"address": self.address}))
            if self.code_paths:
                conn.send(("path", self.code_paths))
            self.dispatcher.add_worker(conn.worker)
            return
        self.drivers.add(conn)
        # Workers import what the driver's script imports from beside it.
        new_paths = [p for p in info.get("code_paths", ()) if p not in self.code_paths]
        if new_paths:
            self.code_paths.extend(new_paths)
            for worker in self.pool.workers.values():
                worker.conn.send(("path", self.code_paths))
        conn.embedded_owner = bool(info.get("embedded_owner"))
        self.actors.job_started(info.get("job_id"), info.get("namespace"),
                                info.get("anonymous_namespace"))
        self._log_job(conn, info, "RUNNING")
        self.output.driver_joined(conn, info)
        conn.send(("welcome", {
            "node_id": self.node_id, "store_name": self.store_name,
            "session_dir": self.session_dir, "resources": self.resources,
            "address": self.address,
        }))

    def on_peer_value(self, peer, object_id, kind, meta, payload, contained_owners):
        self.objects.on_peer_value(peer, object_id, kind, meta, payload, contained_owners,
                                   self.peers)

    def pull_object(self, object_id, entry):
        """Fetch a LOCATED object into this node's store (once per object)."""
        nodes = self.cluster.nodes if self.cluster is not None else {}
        addresses = [nodes[a].transfer_address for a in entry.data
                     if a in nodes and nodes[a].alive and nodes[a].transfer_address]
        if not addresses:
            asyncio.get_running_loop().call_soon(
                self.objects.pulled, object_id, "no live node holds a copy", True)
            return
        self.puller.pull(object_id, addresses, self.objects.pulled)

    def node_died(self, address):
        """A node is dead: what only it held is lost, what it ran for us runs
        again (max_retries) or fails, and it holds nothing of ours."""
        peer = self.peers.known(address) or self.peers.get(address)
        self.tasks.node_died(address)
        self.actors.node_died(address)
        self.recovery.node_died(address)
        self.objects.forget_connection(peer)
        self.dispatcher.schedule()

    def connection_lost(self, conn):
        if conn.role == "node":
            if conn.peer_node is not None and self.cluster is not None:
                self.cluster.link_lost(conn.peer_node.address)
            return
        self.objects.forget_connection(conn)
        self.actors.owner_left(conn)
        if conn in self.drivers:
            self._log_job(conn, conn.job_info, "FINISHED")
            self.output.driver_left(conn)
        if conn.worker is not None:
            self.worker_died(conn.worker)
        self.drivers.discard(conn)
        if conn.embedded_owner and self.stopping is not None:
            log.info("the driver that started this cluster left; shutting down")
            self.stopping.set()

    def _log_job(self, conn, info, state):
        """Every driver is a job, recorded in the control store's jobs table."""
        job_id = info.get("job_id")
        if not isinstance(job_id, bytes) or info.get("tool"):
            return                  # (minray status / list connect as drivers too)
        conn.job_info = info
        record = {"state": state, "driver_pid": info.get("pid"), "node": self.address,
                  "namespace": info.get("namespace")}
        if state == "RUNNING":
            conn.job_started = record["start_time"] = time.time()
        else:
            record["start_time"] = getattr(conn, "job_started", None)
            record["end_time"] = time.time()
        self.lineage.log("jobs", job_id, record)

    def worker_died(self, worker):
        """A worker's process ended, or is to end now (it is killed here)."""
        if worker.dead:
            return                  # already handled (e.g. killed for an actor's restart)
        worker.dead = True
        self.pool.remove(worker.worker_id)
        # Results and puts it sealed but never reported: evictable from now on.
        self.store.release_primaries_of(worker.pid)
        if worker.actor is not None:
            self.actors.worker_died(worker)
        else:
            self.tasks.worker_died(worker)
            if not self.stopping.is_set():
                self.dispatcher.keep_task_workers()
        self.dispatcher.schedule()

    def on_shutdown(self, conn):
        self.stopping.set()

    def on_info(self, conn, request_id, what):
        node_hex = self.node_id.hex()
        queues = self.dispatcher.queues
        if what in ("resources", "nodes"):
            self.cluster.update_own(self.load())    # (heartbeats refresh it only every 0.5 s)
        if what == "resources":
            total, available = self.cluster.totals()
            result = {"total": total, "available": available}
        elif what == "nodes":
            result = self.cluster.rows()
        elif what == "tasks":
            result = self.tasks.rows(node_hex)
        elif isinstance(what, tuple) and what[0] == "actor" and len(what) == 3:
            self.actors.lookup_anywhere(conn, request_id, what[1], what[2])
            return
        elif isinstance(what, tuple) and what[0] in ("actor", "namespace"):
            result = self.actors.query(what)
        elif what == "objects":
            result = self.objects.rows(node_hex)
        elif what == "errors":
            result = self.lineage.errors()
        elif what == "stats":
            result = {"objects": self.objects.stats(), "tasks": len(self.tasks.tasks),
                      "workers": len(self.pool.workers), "ready": queues.num_ready,
                      "waiting": queues.num_waiting, "store": self.store.stats(),
                      "lineage": self.lineage.stats(), "reconstruction": self.recovery.stats(),
                      "spilling": self.spiller.stats(),
                      "cycle_collector": dict(self.cycle_collections,
                                              automatic=gc.isenabled())}
        else:
            result = None
        conn.send(("info", request_id, result))

    # ------------------------------------------------------------ code, objects
    def on_function(self, conn, function_id, pickled, name):
        functions = self.dispatcher.functions
        if function_id not in functions:
            functions[function_id] = pickled
            self.lineage.function(function_id, name, pickled)

    def on_put(self, conn, object_id, kind, meta, payload, contained):
        entry = self.objects.set_ready(object_id, kind, meta, payload, owner=conn,
                                       contained=contained)
        if kind == IN_STORE:
            self.lineage.log_object(object_id, entry, None)
        self.objects.announce(object_id)

    def on_make_room(self, conn, request_id, size):
        """A process's put or result did not fit: spill to make room for it."""
        if type(size) is not int or size < 0:
            raise ValueError(f"make_room needs a size in bytes, got {size!r}")

        async def spill_then_answer():
            try:
                room = await self.spiller.make_room(size)
            except Exception as exc:
                log.exception("spilling to make room for %d bytes failed", size)
                conn.send(("failed", request_id, f"{type(exc).__name__}: {exc}"))
                return
            conn.send(("info", request_id, room))
        asyncio.ensure_future(spill_then_answer())

    def on_subscribe(self, conn, object_ids):
        for object_id in object_ids:
            self.objects.subscribe(conn, object_id)

    def on_borrow(self, conn, object_ids):
        for object_id in object_ids:
            self.objects.borrow(conn, object_id)

    def on_free(self, conn, object_ids):
        for object_id in object_ids:
            self.objects.release(conn, object_id)

    def on_escape(self, conn, object_ids):
        for object_id in object_ids:
            self.objects.escape(object_id)

    def on_adopt(self, conn, owners):
        """Refs a process loaded from a pickle made on another node (escaped
        refs): {object_id: address of that node}, a live node of the cluster."""
        if self.cluster is None:
            return
        nodes = self.cluster.nodes

        def member(address):
            # (a node that just joined may not have the cluster view yet,
            # but it knows its head and the peers it talks to)
            node = nodes.get(address)
            if node is not None:
                return node.alive
            return address == self.head_address or self.peers.known(address) is not None
        known = {object_id: address for object_id, address in dict(owners).items()
                 if isinstance(object_id, bytes) and isinstance(address, str) and member(address)}
        self.objects.adopt_foreign(known, self.peers)
        for object_id in known:
            # Held for the process from now: its own "borrow" may come after the value.
            self.objects.borrow(conn, object_id)

    # ------------------------------------------------------------ workers
    def on_done(self, conn, items):
        worker = conn.worker
        self.tasks.done(worker, items)
        if worker.actor is not None:
            self.actors.call_done(worker)       # an actor's worker releases nothing
        else:
            self.dispatcher.release_if_idle(worker)
            self.dispatcher.schedule()

    def on_blocked(self, conn, not_started):
        if conn.worker is not None:
            self.dispatcher.blocked(conn.worker, not_started)

    def on_giveback(self, conn, task_ids):
        if conn.worker is not None:
            self.dispatcher.give_back(conn.worker, task_ids)

    def on_unblocked(self, conn):
        if conn.worker is not None:
            self.dispatcher.unblocked(conn.worker)


def run_node_manager(session_dir, node_id, resources, store_capacity, token, connect_gcs,
                     num_workers=None, embedded=False, ready_path=None, parent_pid=None,
                     log_to_driver=True, gpu_ids=None, node_ip="127.0.0.1", port=0,
                     head_address=None, resume=False):
    manager = NodeManager(session_dir, node_id, resources, store_capacity, token,
                          num_workers, embedded, log_to_driver, gpu_ids, node_ip, port,
                          head_address, resume)
    try:
        asyncio.run(manager.run(ready_path, parent_pid, connect_gcs))
    except JoinError:
        manager.shutdown()          # (its one line is logged by the caller)
        raise
    except Exception:
        log.exception("the node manager failed")
        manager.shutdown()
        raise
    return manager
