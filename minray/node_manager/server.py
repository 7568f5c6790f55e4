"""The node manager: one process per node holding the local scheduler, the
object store (as its owner), the object directory and the worker pool.

Drivers and workers talk to it over a Unix socket (minray.wire frames, the
messages of minray.protocol). This module starts and stops the node and
routes each message to the component that handles it:

    dispatch.py   ready tasks -> workers, leases, pipelining, GPUs
    tasks.py      a task's life: submitted, waiting, finished, failed, retried
    objects.py    the object directory: values, references, who waits
    actors.py     actors: placement, call order, restarts
    lineage.py    what is recorded in the control store
    workers.py    worker processes

A handler's exception is contained to its message: it is logged, a request is
answered with "failed", and a submission's results become errors; the
connection and the node go on.
"""
import asyncio
import logging
import os
import signal

from minray import wire
from minray.node_manager.actors import ActorManager
from minray.node_manager.dispatch import Dispatcher
from minray.node_manager.lineage import LineageLog
from minray.node_manager.objects import ObjectDirectory
from minray.node_manager.tasks import TaskManager
from minray.node_manager.workers import WorkerPool
from minray.object_store import SharedStore
from minray.protocol import (
    IN_STORE, NODE_MANAGER_MESSAGE_LENGTHS, REQUEST_ID_FIELD, TO_NODE_MANAGER, bad_message,
)
from minray.session import node_socket_path

log = logging.getLogger("minray.node_manager")


class Connection(wire.FramedServerProtocol):
    first_max_frame = wire.FIRST_MAX_FRAME
    default_max_frame = wire.ORDINARY_MAX_FRAME
    message_max_frame = wire.NODE_MANAGER_MAX_FRAME

    def __init__(self, manager):
        super().__init__(manager.token, name="node manager", batcher=manager.batcher)
        self.manager = manager
        self.role = None
        self.worker = None
        self.embedded_owner = False

    def message_received(self, message):
        # (wire.decode gives plain data; a well-formed message is a tuple
        # whose name has the right number of fields)
        if (type(message) is not tuple or not message or type(message[0]) is not str
                or NODE_MANAGER_MESSAGE_LENGTHS.get(message[0]) != len(message)):
            raise wire.ProtocolError(bad_message(message, TO_NODE_MANAGER))
        self.manager.handle(self, message)

    def lost(self):
        self.manager.connection_lost(self)


class NodeManager:
    def __init__(self, session_dir, node_id, resources, store_capacity, token,
                 num_workers=None, embedded=False, log_to_driver=True, gpu_ids=None):
        self.session_dir = session_dir
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
        self.code_paths = []       # drivers' script directories, for workers' sys.path
        self.stopping = None
        self.batcher = wire.OutputBatcher()
        self.objects = ObjectDirectory(self.store)
        # Off the event loop; it asks (from its thread) which objects are still
        # held, to keep the lineage they may need.
        self.lineage = LineageLog(node_id, self.objects.entries.__contains__)
        self.dispatcher = Dispatcher(resources, self.pool, self.objects,
                                     num_workers or max(1, int(resources.get("CPU", 1))),
                                     self.batcher, gpu_ids)
        self.tasks = TaskManager(self.dispatcher, self.objects, self.lineage)
        self.actors = ActorManager(self.dispatcher, self.tasks, self.objects, self.lineage)
        self.actors.kill_worker = self.worker_died
        actors = self.actors
        self.handlers = {
            "hello": self.on_hello, "fn": self.on_function, "submit": self.tasks.submit,
            "put": self.on_put, "sub": self.on_subscribe, "borrow": self.on_borrow,
            "free": self.on_free, "escape": self.on_escape, "done": self.on_done,
            "blocked": self.on_blocked, "unblocked": self.on_unblocked,
            "giveback": self.on_giveback, "info": self.on_info, "shutdown": self.on_shutdown,
            "actor_create": actors.on_create, "actor_call": actors.on_call,
            "actor_ready": actors.on_ready,
            "actor_exit": lambda conn: actors.on_exit(conn.worker),
            "actor_kill": lambda conn, actor_id, no_restart: actors.kill(actor_id, no_restart),
            "cancel": self.tasks.cancel,
        }

    # ------------------------------------------------------------ lifecycle
    async def run(self, ready_path=None, parent_pid=None, connect_gcs=None):
        loop = asyncio.get_running_loop()
        self.stopping = asyncio.Event()
        os.makedirs(os.path.dirname(self.socket_path), mode=0o700, exist_ok=True)
        server = await loop.create_unix_server(lambda: Connection(self), self.socket_path,
                                               backlog=wire.LISTEN_BACKLOG)
        os.chmod(self.socket_path, 0o600)
        for _ in range(self.dispatcher.num_workers):
            self.pool.start()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stopping.set)
        if ready_path:
            with open(ready_path + ".tmp", "w") as f:
                f.write(self.socket_path)
            os.replace(ready_path + ".tmp", ready_path)
        watchdog = asyncio.ensure_future(self._watchdog(parent_pid))
        if connect_gcs is not None:
            # Serve drivers and workers at once: the control store (started in
            # parallel on the head) only receives our log, written by a thread.
            self.lineage.start(connect_gcs)
        await self.stopping.wait()
        watchdog.cancel()
        server.close()
        self.shutdown()

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

    def shutdown(self):
        self.pool.stop_all()
        self.lineage.close()
        self.objects.entries.clear()
        self.store.close()
        try:
            os.unlink(self.socket_path)
        except FileNotFoundError:
            pass

    # ------------------------------------------------------------ routing
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
        conn.role = role
        if role == "worker":
            conn.worker = self.pool.admit(info, conn)
            if conn.worker is None:
                return          # refused: dropped, with the reason logged
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
        conn.send(("welcome", {
            "node_id": self.node_id, "store_name": self.store_name,
            "session_dir": self.session_dir, "resources": self.resources,
        }))

    def connection_lost(self, conn):
        self.objects.forget_connection(conn)
        self.actors.owner_left(conn)
        if conn.worker is not None:
            self.worker_died(conn.worker)
        self.drivers.discard(conn)
        if conn.embedded_owner and self.stopping is not None:
            log.info("the driver that started this cluster left; shutting down")
            self.stopping.set()

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
        if what == "resources":
            result = {"total": queues.total_resources, "available": queues.available_resources}
        elif what == "tasks":
            result = self.tasks.rows(node_hex)
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
                      "lineage": self.lineage.stats()}
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
                     log_to_driver=True, gpu_ids=None):
    manager = NodeManager(session_dir, node_id, resources, store_capacity, token,
                          num_workers, embedded, log_to_driver, gpu_ids)
    try:
        asyncio.run(manager.run(ready_path, parent_pid, connect_gcs))
    except Exception:
        log.exception("the node manager failed")
        manager.shutdown()
        raise
    return manager
