"""The node manager: one process per node holding the local scheduler, the
object store (as its owner), the object table and the worker pool.

Drivers and workers talk to it over a Unix socket (minray.wire frames).
Messages, client -> node manager:

    ("hello", role, info)                         role "driver" | "worker"
    ("fn", function_id, pickled, name)            export a function (once)
    ("submit", spec)                              spec: see minray.runtime.core
    ("put", object_id, kind, meta, payload)       kind "v" inline | "s" in store
    ("sub", [object_id, ...])                     tell me when these are ready
    ("free", [object_id, ...])                    the owner dropped its refs
    ("escape", [object_id, ...])                  a ref was serialized
    ("done", [(task_id, results, seconds, error_text), ...])   worker results
    ("blocked", [task_id not started, ...]) / ("unblocked",)   lend the CPU
    ("giveback", [task_id, ...])                  dispatched to a blocked worker
    ("info", request_id, what)                    resources, nodes
    ("shutdown",)                                 the embedded driver is done

node manager -> client:

    ("welcome", info)        ("obj", object_id, kind, meta, payload)
    ("tasks", [dispatch, ...])  ("error", text)  ("info", request_id, result)
"""
import asyncio
import logging
import os
import signal
import time
import traceback

from minray import ids, wire
from minray._core.scheduler import SchedulerQueues, Task
from minray.exceptions import (
    ObjectLostError, TaskUnschedulableError, WorkerCrashedError,
)
from minray.node_manager.actors import ActorManager
from minray.node_manager.lineage import LineageLog
from minray.node_manager.objects import ERROR, IN_STORE, ObjectTable
from minray.node_manager.workers import WorkerPool
from minray.object_store import SharedStore
from minray.serialization import serialize
from minray.session import node_socket_path

log = logging.getLogger("minray.node_manager")

# Tasks queued on a busy worker, so it starts the next one without waiting
# for a round trip through this process (~1-2 ms when the CPUs were idle on a
# VM). Deep for tiny tasks; one ahead for medium ones, which bounds the cost
# of a bad guess (a task waiting behind a slow one while another worker is
# free) to one medium task; none for long tasks, where a round trip is noise.
PIPELINE_DEPTH = 16            # queue length for functions that run ...
SHORT_TASK_S = 0.002           # ... at most this long on average
MEDIUM_PIPELINE_DEPTH = 2      # queue length for functions that run ...
MEDIUM_TASK_S = 0.05           # ... at most this long on average
MIN_MAX_WORKERS = 16
UNLIMITED_RETRIES = 1 << 30      # max_retries=-1


def error_object(exc):
    """Serialize an exception into (meta, bytes) of an ERROR object."""
    ser = serialize(exc)
    return ser.metadata, ser.to_bytes()


class Connection(wire.FramedServerProtocol):
    def __init__(self, manager):
        super().__init__(manager.token, name="node manager", batcher=manager.batcher)
        self.manager = manager
        self.role = None
        self.worker = None
        self.embedded_owner = False

    def message_received(self, message):
        handler = self.manager.handlers.get(message[0])
        if handler is None:
            raise wire.ProtocolError(f"unknown message {message[0]!r}")
        handler(self, *message[1:])

    def lost(self):
        self.manager.connection_lost(self)


class NodeManager:
    def __init__(self, session_dir, node_id, resources, store_capacity, token,
                 gcs_client=None, num_workers=None, embedded=False, log_to_driver=True):
        self.session_dir = session_dir
        self.node_id = node_id
        self.token = token
        self.embedded = embedded
        self.socket_path = node_socket_path(session_dir)
        self.store_name = f"minray-{os.path.basename(session_dir)}-{node_id.hex()[:8]}"
        self.store = SharedStore.create(self.store_name, store_capacity)
        self.objects = ObjectTable(self.store)
        self.queues = SchedulerQueues(resources)
        self.resources = dict(resources)
        self.free_gpus = list(range(int(resources.get("GPU", 0))))
        self.pool = WorkerPool(session_dir, self.socket_path, self.store_name, node_id,
                               inherit_output=log_to_driver)
        self.num_workers = num_workers or max(1, int(resources.get("CPU", 1)))
        self.max_workers = max(MIN_MAX_WORKERS, 4 * self.num_workers)
        self.functions = {}
        self.tasks = {}
        self.durations = {}        # function id -> recent run time (s)
        self.idle = []
        self.drivers = set()
        self.code_paths = []       # drivers' script directories, for workers' sys.path
        self.lineage = LineageLog(node_id, lambda object_id: object_id in self.objects.entries)
        if gcs_client is not None:
            self.lineage.start(lambda: gcs_client)
        self.schedule_pending = False
        # Dispatch once per batch of incoming messages, right before replies
        # are written: one event-loop iteration per batch, not one per step.
        self.batcher = wire.OutputBatcher()
        self.batcher.before_flush = self._dispatch_if_pending
        self.stopping = None
        self.actors = ActorManager(self)
        self.handlers = {
            "hello": self.on_hello, "fn": self.on_function, "submit": self.on_submit,
            "put": self.on_put, "sub": self.on_subscribe, "free": self.on_free,
            "escape": self.on_escape, "done": self.on_done, "blocked": self.on_blocked,
            "unblocked": self.on_unblocked, "giveback": self.on_giveback, "info": self.on_info,
            "shutdown": self.on_shutdown,
            "actor_create": self.actors.on_create, "actor_call": self.actors.on_call,
            "actor_ready": self.actors.on_ready,
            "actor_exit": lambda conn: self.actors.on_exit(conn.worker),
            "actor_release": lambda conn, ids: self.actors.release(ids),
            "actor_escape": lambda conn, ids: self.actors.escape(ids),
            "actor_kill": lambda conn, actor_id, no_restart: self.actors.kill(actor_id, no_restart),
        }

    # ------------------------------------------------------------ lifecycle
    async def run(self, ready_path=None, parent_pid=None, connect_gcs=None):
        loop = asyncio.get_running_loop()
        self.stopping = asyncio.Event()
        os.makedirs(os.path.dirname(self.socket_path), mode=0o700, exist_ok=True)
        server = await loop.create_unix_server(lambda: Connection(self), self.socket_path)
        os.chmod(self.socket_path, 0o600)
        for _ in range(self.num_workers):
            self.pool.start()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stopping.set)
        if ready_path:
            with open(ready_path + ".tmp", "w") as f:
                f.write(self.socket_path)
            os.replace(ready_path + ".tmp", ready_path)
        watchdog = asyncio.ensure_future(self._watchdog(parent_pid))
        if connect_gcs is not None:
            # Serve drivers and workers at once; the control store (started in
            # parallel on the head) only receives our log, written off the loop.
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
                self.schedule()

    def shutdown(self):
        self.pool.stop_all()
        self.lineage.close()
        self.objects.entries.clear()
        self.store.close()
        try:
            os.unlink(self.socket_path)
        except FileNotFoundError:
            pass

    # ------------------------------------------------------------ connections
    def on_hello(self, conn, role, info):
        conn.role = role
        if role == "worker":
            conn.worker = self.pool.registered(info["worker_id"], info["pid"], conn)
            if self.code_paths:
                conn.send(("path", self.code_paths))
            self.idle.append(conn.worker)
            self.schedule()
            return
        self.drivers.add(conn)
        # Workers import what the driver's script imports from beside it.
        new_paths = [p for p in info.get("code_paths", ()) if p not in self.code_paths]
        if new_paths:
            self.code_paths.extend(new_paths)
            for worker in self.pool.workers.values():
                worker.conn.send(("path", self.code_paths))
        conn.embedded_owner = bool(info.get("embedded_owner"))
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

    def on_shutdown(self, conn):
        self.stopping.set()

    def on_info(self, conn, request_id, what):
        if what == "resources":
            result = {"total": self.queues.total_resources,
                      "available": self.queues.available_resources}
        elif what == "tasks":
            result = [{"id": t.task_id.hex(), "name": t.spec[2],
                       "state": "RUNNING" if t.worker is not None else "PENDING",
                       "node": self.node_id.hex()} for t in self.tasks.values()]
        elif isinstance(what, tuple) and what[0] == "actor":
            result = self.actors.lookup(what[1])
        elif what == "objects":
            kinds = {"v": "inline", "s": "store", "e": "error", None: "pending"}
            result = [{"id": object_id.hex(), "kind": kinds[entry.kind], "size": entry.size,
                       "node": self.node_id.hex()}
                      for object_id, entry in list(self.objects.entries.items())[:10000]]
        elif what == "stats":
            result = {"objects": self.objects.stats(), "tasks": len(self.tasks),
                      "workers": len(self.pool.workers), "ready": self.queues.num_ready,
                      "waiting": self.queues.num_waiting, "store": self.store.stats(),
                      "lineage": self.lineage.stats()}
        elif what == "errors":
            result = self.lineage.errors()
        else:
            result = None
        conn.send(("info", request_id, result))

    # ------------------------------------------------------------ functions, objects
    def on_function(self, conn, function_id, pickled, name):
        if function_id not in self.functions:
            self.functions[function_id] = pickled
            self._log("functions", function_id, {"name": name, "pickled": pickled})

    def on_put(self, conn, object_id, kind, meta, payload):
        entry = self.objects.set_ready(object_id, kind, meta, payload, owner=conn)
        self._log_object(object_id, entry, None)
        self.object_ready(object_id)

    def on_subscribe(self, conn, object_ids):
        for object_id in object_ids:
            entry = self.objects.get(object_id)
            if entry is None:
                meta, data = error_object(ObjectLostError(
                    f"object {object_id.hex()} is not known to this node: it was freed "
                    "(all its references were dropped) or never existed"))
                conn.send(("obj", object_id, ERROR, meta, data))
            elif entry.ready:
                conn.send(entry.message(object_id))
            else:
                if entry.subscribers is None:
                    entry.subscribers = set()
                entry.subscribers.add(conn)

    def on_free(self, conn, object_ids):
        for object_id in object_ids:
            self.objects.release_owner(object_id)

    def on_escape(self, conn, object_ids):
        for object_id in object_ids:
            self.objects.escape(object_id)

    def object_ready(self, object_id):
        """Tell whoever waits; wake tasks that depended on it."""
        entry = self.objects.get(object_id)
        if entry is None:
            return
        message = None
        if entry.owner is not None and not entry.owner_released and not entry.owner.closed:
            message = entry.message(object_id)
            entry.owner.send(message)
        if entry.subscribers:
            message = message or entry.message(object_id)
            for conn in entry.subscribers:
                if conn is not entry.owner:
                    conn.send(message)
            entry.subscribers = None
        self.actors.object_ready(object_id, entry)
        if entry.kind == ERROR:
            for task in self.queues.drain_waiting_on(object_id):
                self.fail_task(task, entry.meta, entry.data)
        elif self.queues.object_available(object_id):
            self.schedule()
        self.objects._maybe_free(object_id, entry)

    # ------------------------------------------------------------ tasks
    def on_submit(self, conn, spec):
        task_id, function_id, name, args, kwarg_names, num_returns, resources, max_retries = spec
        for index in range(1, num_returns + 1):
            self.objects.expect(ids.return_object_id(task_id, index), conn)
        retries = UNLIMITED_RETRIES if max_retries == -1 else max_retries
        task = Task(task_id, spec, resources, retries, conn)
        self.tasks[task_id] = task
        if not self.queues.feasible(resources):
            self.fail_task(task, *error_object(TaskUnschedulableError(
                f"task {name} asks for {resources} but this cluster has "
                f"{self.queues.total_resources} in total: no node can ever run it; "
                "lower the request or add a node with those resources")))
            return
        failed, missing = self.claim_args(args, f"task {name}")
        if failed is not None:
            self.fail_task(task, *failed)
            return
        self.queues.add(task, missing)
        if not missing:
            self.schedule()

    def claim_args(self, args, what):
        """Hold the ref arguments of a task, call or actor until it is done.

        Returns (failure, missing): failure is the (meta, data) error object
        it must fail with (an argument was freed or is itself an error),
        missing the ids of arguments not ready yet. Every argument that
        exists is held, failure or not, so finishing releases them evenly.
        """
        failed, missing = None, []
        for arg in args:
            if arg[0] != "r":
                continue
            entry = self.objects.get(arg[1])
            if entry is None:
                failed = failed or error_object(ObjectLostError(
                    f"argument {arg[1].hex()} of {what} was freed or never existed"))
                continue
            entry.task_refs += 1
            if entry.kind == ERROR:
                failed = failed or (entry.meta, entry.data)
            elif not entry.ready:
                missing.append(arg[1])
        return failed, missing

    def fail_task(self, task, meta, data, error_text=None):
        """Set every return of a task to an error object (it never runs again)."""
        if task.extra == "failed":
            return
        task.extra = "failed"
        self._finish(task, "FAILED")
        num_returns = task.spec[5]
        if error_text:
            self.report_error(task, error_text)
        for index in range(1, num_returns + 1):
            object_id = ids.return_object_id(task.task_id, index)
            self.objects.set_ready(object_id, ERROR, meta, data)
            self.object_ready(object_id)

    def fail_call(self, task, exc):
        self.fail_task(task, *error_object(exc))

    def fail_call_with(self, task, meta, data):
        self.fail_task(task, meta, data)

    def report_error_text(self, name, task_id, text):
        for driver in self.drivers:
            driver.send(("error", text))
        self.lineage.log_error({
            "type": "actor", "function": name, "task_id": task_id.hex(), "message": text,
            "time": time.time()})

    def _finish(self, task, state):
        self.tasks.pop(task.task_id, None)
        for arg in task.spec[3]:
            if arg[0] == "r":
                self.objects.drop_task_ref(arg[1])
        self._log_task(task, state)

    def report_error(self, task, text):
        for driver in self.drivers:
            driver.send(("error", text))
        # Kept in memory before the failed result reaches the driver, so
        # error_info() called right after get() raised already sees it.
        self.lineage.log_error({
            "type": "task", "function": task.spec[2], "task_id": task.task_id.hex(),
            "message": text, "time": time.time()})

    def on_done(self, conn, items):
        worker = conn.worker
        for task_id, results, seconds, error_text in items:
            task = self._pop_from_worker(worker, task_id)
            if task is None:
                continue
            function_id = task.spec[1]
            previous = self.durations.get(function_id, seconds)
            self.durations[function_id] = 0.8 * previous + 0.2 * seconds
            self._finish(task, "FAILED" if error_text else "FINISHED")
            if error_text:                 # recorded before the driver can see it
                self.report_error(task, error_text)
            for object_id, kind, meta, payload in results:
                entry = self.objects.set_ready(object_id, kind, meta, payload)
                if kind == IN_STORE:
                    self._log_object(object_id, entry, task_id)
                self.object_ready(object_id)
        if worker.actor is not None:
            self.actors.call_done(worker)
        else:
            self._maybe_release(worker)
        self.schedule()

    def _pop_from_worker(self, worker, task_id):
        for i, task in enumerate(worker.queue):
            if task.task_id == task_id:
                return worker.queue.pop(i)
        return None

    def _maybe_release(self, worker):
        if worker.queue or worker.dead:
            return
        if worker.lease is not None:
            self.queues.release(_kept(worker.lease) if worker.blocked else worker.lease)
            self.free_gpus.extend(worker.gpu_ids)
            worker.gpu_ids = []
            worker.lease = None
            worker.lease_shape = None
        if worker.actor is None and worker not in self.idle:
            self.idle.append(worker)

    def on_blocked(self, conn, not_started):
        worker = conn.worker
        if worker is None or worker.blocked:
            return
        worker.blocked = True
        if worker.lease is not None:
            self.queues.release(_lent(worker.lease))
        self.on_giveback(conn, not_started)

    def on_giveback(self, conn, task_ids):
        """Queued tasks a worker hands back unstarted: it blocked (in get or
        wait) before or after they reached it. Another worker runs them."""
        worker = conn.worker
        if worker is None:
            return
        for task_id in reversed(task_ids):
            task = self._pop_from_worker(worker, task_id)
            if task is not None:
                task.worker = None
                # The dispatch it drops may have carried the function's code:
                # send the code again with its next task of this function.
                worker.functions.discard(task.spec[1])
                self.queues.push_ready(task, front=True)
        self.schedule()

    def on_unblocked(self, conn):
        worker = conn.worker
        if worker is None or not worker.blocked:
            return
        worker.blocked = False
        if worker.lease is not None:
            self.queues.acquire(_lent(worker.lease))    # may oversubscribe briefly

    def worker_died(self, worker):
        if worker.dead:
            return                  # already handled (an actor killed for a restart)
        worker.dead = True
        if worker in self.idle:
            self.idle.remove(worker)
        self.pool.remove(worker.worker_id)
        if worker.actor is not None:
            self.actors.worker_died(worker)
            self.schedule()
            return
        if worker.lease is not None:
            self.queues.release(_kept(worker.lease) if worker.blocked else worker.lease)
        self.free_gpus.extend(worker.gpu_ids)
        queue, worker.queue = worker.queue, []
        for task in reversed(queue[1:]):           # never started: just requeue
            task.worker = None
            self.queues.push_ready(task, front=True)
        if queue:
            running = queue[0]
            running.worker = None
            if running.retries_left > 0:
                running.retries_left -= 1
                log.warning("worker %s died running %s; retrying (%d retries left)",
                            worker.pid, running.spec[2], running.retries_left)
                self.queues.push_ready(running, front=True)
            else:
                text = (f"the worker (pid={worker.pid}) running task {running.spec[2]} died "
                        "and the task has no retries left (max_retries)")
                self.fail_task(running, *error_object(WorkerCrashedError(text)), error_text=text)
        if len(self.pool.workers) + len(self.pool.starting) < self.num_workers \
                and not self.stopping.is_set():
            self.pool.start()
        self.schedule()

    # ------------------------------------------------------------ dispatch
    def schedule(self):
        if not self.schedule_pending:
            self.schedule_pending = True
            if self.batcher.depth == 0 and not self.batcher.scheduled:
                self.batcher.scheduled = True
                asyncio.get_running_loop().call_soon(self.batcher.flush)

    def _dispatch_if_pending(self):
        if self.schedule_pending:
            self._dispatch()

    def _dispatch(self):
        self.schedule_pending = False
        self.actors.place()
        batches = {}
        queues = self.queues
        while queues.num_ready:
            task = queues.pop_dispatchable()
            if task is None:
                break
            if task.extra == "failed":
                continue
            if not self.idle:
                queues.push_ready(task, front=True)
                self._start_workers()
                break
            worker = self.idle.pop()
            queues.acquire(task.resources)
            worker.lease = task.resources
            worker.lease_shape = task.shape
            gpus = int(task.resources.get("GPU", 0))
            if gpus:
                worker.gpu_ids, self.free_gpus = self.free_gpus[:gpus], self.free_gpus[gpus:]
            self._assign(worker, task, batches)
        if queues.num_ready:
            self._pipeline(batches)
        for worker, dispatches in batches.items():
            worker.conn.send(("tasks", dispatches))

    def _pipeline(self, batches):
        """Queue more short and medium tasks of the same shape on busy workers."""
        for worker in self.pool.workers.values():
            if worker.blocked or worker.lease_shape is None or worker.actor is not None:
                continue
            # The tightest limit of what the worker holds: nothing waits behind
            # a long or untimed task, however short the newcomer.
            limit = min((self._pipeline_depth(t.spec[1]) for t in worker.queue),
                        default=PIPELINE_DEPTH)
            while len(worker.queue) < limit:
                task = self.queues.pop_shape(worker.lease_shape)
                if task is None:
                    break
                if task.extra == "failed":
                    continue
                depth = self._pipeline_depth(task.spec[1])
                if len(worker.queue) >= depth:
                    self.queues.push_ready(task, front=True)
                    break
                limit = min(limit, depth)
                self._assign(worker, task, batches)

    def _pipeline_depth(self, function_id):
        """How many tasks of this function a worker may hold (running + queued)."""
        seconds = self.durations.get(function_id)
        if seconds is None or seconds > MEDIUM_TASK_S:    # unknown or long: one at a time
            return 1
        return PIPELINE_DEPTH if seconds <= SHORT_TASK_S else MEDIUM_PIPELINE_DEPTH

    def _assign(self, worker, task, batches):
        task.worker = worker
        worker.queue.append(task)
        task_id, function_id, name, args, kwarg_names, num_returns, _, _ = task.spec
        resolved = self.resolve_args(args)
        pickled = None
        if function_id not in worker.functions:
            worker.functions.add(function_id)
            pickled = self.functions.get(function_id)
        batches.setdefault(worker, []).append(
            (task_id, function_id, pickled, name, resolved, kwarg_names, num_returns,
             worker.gpu_ids))

    def resolve_args(self, args):
        """Ref arguments as the worker reads them: inline bytes or a store id."""
        resolved = []
        for arg in args:
            if arg[0] == "r":
                entry = self.objects.get(arg[1])
                if entry.kind == IN_STORE:
                    resolved.append(("s", arg[1], entry.meta))
                else:
                    resolved.append(("v", entry.meta, entry.data))
            else:
                resolved.append(arg)
        return resolved

    def _start_workers(self, for_actor=False):
        # Actors' dedicated workers do not count against the task-worker cap.
        task_workers = sum(1 for w in self.pool.workers.values() if w.actor is None)
        live = task_workers + len(self.pool.starting)
        blocked = sum(1 for w in self.pool.workers.values() if w.blocked)
        if self.pool.starting or (not for_actor and live >= self.max_workers + blocked):
            return
        self.pool.start()

    def keep_task_workers(self):
        """After a worker became an actor's, start another for tasks if needed."""
        task_workers = sum(1 for w in self.pool.workers.values()
                           if w.actor is None and not w.dead)
        if task_workers + len(self.pool.starting) < self.num_workers:
            self.pool.start()

    # ------------------------------------------------------------ control store log
    def _log(self, table, key, value):
        self.lineage.log(table, key, value)

    def _log_task(self, task, state):
        """One record per task, when it ends: its spec (the lineage) and state.

        Tasks still queued or running are listed by the node manager itself
        (info "tasks"), so the control store takes one write per task.
        """
        self.lineage.log_task(task.spec, state)

    def _log_object(self, object_id, entry, task_id):
        self.lineage.log_object(object_id, entry, task_id)


def _lent(lease):
    """The part of a lease a worker blocked in get/wait lends out: its CPUs.
    GPUs and custom resources stay held (as in Ray), so GPU ids stay unique."""
    cpus = lease.get("CPU")
    return {"CPU": cpus} if cpus else {}


def _kept(lease):
    """The part of a lease a blocked worker still holds."""
    return {name: amount for name, amount in lease.items() if name != "CPU"}


def run_node_manager(session_dir, node_id, resources, store_capacity, token, connect_gcs,
                     num_workers=None, embedded=False, ready_path=None, parent_pid=None,
                     log_to_driver=True):
    manager = NodeManager(session_dir, node_id, resources, store_capacity, token,
                          None, num_workers, embedded, log_to_driver)
    try:
        asyncio.run(manager.run(ready_path, parent_pid, connect_gcs))
    except Exception:
        traceback.print_exc()
        manager.shutdown()
        raise
    return manager
