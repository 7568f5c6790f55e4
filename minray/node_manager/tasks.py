"""A task's life in the node manager: submitted, waiting for its arguments,
dispatched, finished or failed, retried when its worker dies.

Each handler validates a message completely before it changes any state, so
a malformed submission is refused whole (its results become errors) instead
of leaving a task half-registered.
"""
import logging

from minray import ids
from minray._core.scheduler import Task
from minray.exceptions import (
    ActorDiedError, NodeDiedError, ObjectLostError, TaskCancelledError, TaskUnschedulableError,
    WorkerCrashedError,
)
from minray.node_manager.dispatch import pop_from_worker
from minray.node_manager.objects import error_object, failed_argument_object
from minray.protocol import ERROR, IN_STORE, LOCATED, SPILLED, ActorCallSpec, TaskSpec
from minray.resources import is_valid_request

log = logging.getLogger("minray.node_manager")

UNLIMITED_RETRIES = 1 << 30      # max_retries=-1


class MalformedSpec(ValueError):
    """A submitted spec that does not describe a task."""


_new_tuple = tuple.__new__


def parse_spec(spec_type, fields):
    """A TaskSpec or ActorCallSpec from a message's fields, checked."""
    # (what spec_type(*fields) makes, without a Python-level __new__ per task)
    if type(fields) is not tuple or len(fields) != len(spec_type._fields):
        raise MalformedSpec(f"a {spec_type.__name__} is a tuple of {len(spec_type._fields)} "
                            f"fields, got {type(fields).__name__} {fields!r:.80}")
    spec = _new_tuple(spec_type, fields)
    # Exact type checks: cheap, and what a well-formed (plain-data) spec has.
    if type(spec.task_id) is not bytes or len(spec.task_id) != ids.TASK_ID_SIZE:
        raise MalformedSpec("a task id is 16 bytes")
    if type(spec.num_returns) is not int or not 0 <= spec.num_returns < 1 << 20:
        raise MalformedSpec(f"num_returns must be a small int, got {spec.num_returns!r}")
    if spec.args or spec.contained or type(spec.contained) is not list:
        check_args(spec.args, spec.contained)
    return spec


def parse_task_spec(fields):
    spec = parse_spec(TaskSpec, fields)
    if not is_valid_request(spec.resources):
        raise MalformedSpec(f"resources must map names to finite amounts >= 0, "
                            f"got {spec.resources!r}")
    # (exact types: a bool is no count, and plain data has no subclasses)
    if type(spec.max_calls) is not int or spec.max_calls < 0:
        raise MalformedSpec(f"max_calls must be an int >= 0, got {spec.max_calls!r}")
    if spec.parent_task_id is not None and type(spec.parent_task_id) is not bytes:
        raise MalformedSpec("parent_task_id must be a task id or None")
    return spec


def check_args(args, contained):
    if type(args) is not list:
        raise MalformedSpec("arguments are a list")
    for arg in args:
        if not (type(arg) is tuple and (
                (len(arg) == 2 and arg[0] == "r" and type(arg[1]) is bytes)
                or (len(arg) == 3 and arg[0] == "v"))):
            raise MalformedSpec(f"an argument is ('r', id) or ('v', meta, bytes), got {arg!r:.80}")
    if type(contained) is not list or any(type(c) is not bytes for c in contained):
        raise MalformedSpec("contained must be a list of object ids")


def spec_name(spec):
    """What to call a task or actor call in messages."""
    return spec.method if isinstance(spec, ActorCallSpec) else spec.name


def held_ids(args, contained):
    """The objects a task holds while it is queued or running."""
    return [arg[1] for arg in args if arg[0] == "r"] + list(contained)


class TaskManager:
    def __init__(self, dispatcher, objects, lineage):
        self.dispatcher = dispatcher
        self.queues = dispatcher.queues
        self.objects = objects
        self.lineage = lineage
        self.tasks = {}              # task id -> Task, queued or running
        # Many nodes (set by the node manager when it has a cluster view):
        self.cluster = None          # minray.node_manager.cluster.ClusterView
        self.peers = None
        # task id -> (Task, Peer running it for us, whether it took a credit
        # of the cluster view's: tasks do, actor calls do not)
        self.spilled = {}
        self.cancel_actor_call = None   # set by the actor manager: (task id, force) -> reason
        # Set by the actor manager: (call task, dead node address) -> True if
        # it keeps the call to send to the actor's next instance.
        self.retry_actor_call = None
        # Set by lineage recovery: (spec, its result entries) of each task
        # submitted here, kept to make lost results again.
        self.keep_lineage = None
        objects.ready_listeners.append(self.object_ready)
        dispatcher.drop_cancelled = self.fail_cancelled

    # ------------------------------------------------------------ submission
    def submit(self, conn, fields):
        spec = parse_task_spec(fields)
        return_ids = [ids.return_object_id(spec.task_id, i) for i in range(1, spec.num_returns + 1)]
        existing = self.tasks.get(spec.task_id)
        entries = self.objects.entries
        # (a new id has no entries: the usual case is decided by one lookup)
        finished = bool(return_ids) and return_ids[0] in entries and all(
            (entry := entries.get(object_id)) is not None and entry.ready
            for object_id in return_ids)
        for object_id in return_ids:
            self.objects.expect(object_id, conn)
        if existing is not None or finished:
            # Submitted again (its first submitter died and was retried, and
            # ids are deterministic): the new submitter takes over the run
            # under way, or the results already made.
            if existing is not None:
                existing.owner = conn
            return
        task, failed, missing = self._register(spec, conn)
        if self.keep_lineage is not None:
            self.keep_lineage(spec, [entries[object_id] for object_id in return_ids])
        self._place_new(task, failed, missing)

    def resubmit(self, spec, owner):
        """Run a finished task again (its results were lost: lineage
        reconstruction); they go where the first run's went."""
        task, failed, missing = self._register(spec, owner)
        self._place_new(task, failed, missing)

    def _place_new(self, task, failed, missing):
        """Queue a task just registered here, send it to another node, or fail it."""
        spec = task.spec
        if failed is not None:
            self.fail(task, *failed_argument_object(spec.name, *failed))
            return
        cluster = self.cluster
        if not self.queues.feasible(spec.resources):
            if cluster is None or not self.spill(task, need_room=False):
                self.fail_unschedulable(task)
            return
        if cluster is not None and len(cluster.nodes) > 1 and self._backlogged(spec.resources) \
                and self.spill(task, need_room=True):
            return
        self._queue_here(task, missing)

    def _register(self, spec, owner):
        """A new Task for a spec, holding its arguments: (task, failure, missing)
        as claim_args returns them."""
        retries = UNLIMITED_RETRIES if spec.max_retries == -1 else spec.max_retries
        task = Task(spec.task_id, spec, spec.resources, retries, owner)
        self.tasks[spec.task_id] = task
        failed, missing = self.claim_args(spec.args, spec.contained, f"task {spec.name}")
        return task, failed, missing

    def fail_unschedulable(self, task):
        spec = task.spec
        total = self.cluster.totals()[0] if self.cluster is not None \
            else self.queues.total_resources
        self.fail(task, *error_object(TaskUnschedulableError(
            f"task {spec.name} asks for {spec.resources} but no node of this cluster can "
            f"ever run it (the cluster has {total} in total, and no single node has all "
            "of it); lower the request or add a node with those resources")))

    # ------------------------------------------------------------ many nodes
    def _backlogged(self, resources):
        """Tasks wait here for a worker, more per CPU than another node has
        in flight from us: this one may go there (bottom-up: local first)."""
        waiting = self.queues.num_ready
        if not waiting:
            return False
        cpus = max(1.0, self.queues.total_resources.get("CPU", 1.0))
        return self.cluster.idle_elsewhere(resources, waiting / cpus)

    def spill(self, task, need_room):
        """Send a task to another node (the cluster view's choice); False if
        none fits. Its arguments stay held here until it has finished."""
        spec = task.spec
        held = held_ids(spec.args, spec.contained)
        node = self.cluster.pick_node(spec.resources, self._arg_bytes(held),
                                      exclude=(self.objects.address,), need_room=need_room)
        if node is None:
            return False
        self._send_to(task, self.peers.get(node.address), held)
        return True

    def _send_to(self, task, peer, held):
        spec = task.spec
        if spec.function_id not in peer.functions:       # its code, once per node
            peer.functions.add(spec.function_id)
            peer.send(("fn", spec.function_id, self.dispatcher.functions.get(spec.function_id),
                       spec.name))
        arg_owners = {object_id: self.objects.owner_address(object_id) for object_id in held}
        peer.send(("run", tuple(spec), arg_owners, self.objects.address))
        self.spilled[task.task_id] = (task, peer, True)

    def rebalance(self, addresses=None):
        """Tasks queued here while other nodes had no room: now that a node
        has room again (a task it ran for us finished, or a heartbeat), send
        it some of them, as long as more wait here per CPU than it has in
        flight from us. Only ready tasks submitted here move (never one another
        node sent us), and only to nodes that fit them."""
        queues = self.queues
        if not queues.num_ready or self.cluster is None:
            return
        cpus = max(1.0, queues.total_resources.get("CPU", 1.0))
        for node in self.cluster.nodes_with_room(addresses):
            while queues.num_ready:
                shape = self.cluster.movable_shape(node, queues.ready_counts(),
                                                   queues.num_ready / cpus)
                if shape is None:
                    break
                task = queues.pop_shape(shape)
                if task.extra is not None or task.owner is None or task.owner.role == "node":
                    # Failed or cancelled meanwhile, or run here for another
                    # node (which decided where it runs): it stays; so do the
                    # tasks behind it, this round.
                    queues.push_ready(task, front=True)
                    return
                self.cluster.took_credit(node.address)
                self._send_to(task, self.peers.get(node.address),
                              held_ids(task.spec.args, task.spec.contained))

    def _arg_bytes(self, held):
        """Bytes of a task's stored arguments on each node that has them."""
        by_node = {}
        for object_id in held:
            entry = self.objects.get(object_id)
            if entry is None:
                continue
            if entry.kind == IN_STORE:
                by_node[self.objects.address] = by_node.get(self.objects.address, 0) + entry.size
            elif entry.kind == LOCATED:
                for address in entry.data:
                    by_node[address] = by_node.get(address, 0) + entry.size
        return by_node

    def run_forwarded(self, owner, fields, arg_owners, owner_address):
        """Another node sent us a task to run; its results belong to it."""
        spec = parse_task_spec(fields)
        if spec.task_id in self.tasks:
            return                            # sent again: it runs already
        objects = self.objects
        objects.adopt_foreign(arg_owners, self.peers)
        for index in range(1, spec.num_returns + 1):
            objects.expect(ids.return_object_id(spec.task_id, index), owner)
        task, failed, missing = self._register(spec, owner)
        if failed is not None:
            self.fail(task, *failed_argument_object(spec.name, *failed))
        elif not self.queues.feasible(spec.resources):
            self.fail_unschedulable(task)
        else:
            self._queue_here(task, missing)

    def forwarded_finished(self, peer, task_id, state):
        """A node that ran one of our tasks says it ended (its results were
        sent before this)."""
        found = self.spilled.pop(task_id, None)
        if found is None:
            return
        task, _, credit = found
        if credit:
            self.cluster.task_returned(peer.address)
            if self.queues.num_ready:
                self.rebalance((peer.address,))
        self.tasks.pop(task_id, None)
        self.release_args(task.spec.args, task.spec.contained)
        self._tell_owner_node(task, state)      # a call we passed on for another node

    def node_died(self, address):
        """Tasks we sent to a dead node run again elsewhere, or fail."""
        for task_id, (task, peer, credit) in list(self.spilled.items()):
            if peer.address != address:
                continue
            del self.spilled[task_id]
            if credit:
                self.cluster.task_returned(address)
            if task.extra == "call":
                if self.retry_actor_call is not None and self.retry_actor_call(task, address):
                    continue
                text = f"the node {address} hosting the actor of call {spec_name(task.spec)} died"
                self.fail(task, *error_object(ActorDiedError(text)))
            elif task.retries_left > 0:
                task.retries_left -= 1
                log.warning("node %s died running %s; retrying (%d retries left)",
                            address, task.spec.name, task.retries_left)
                self._place_again(task)
            else:
                text = (f"the node {address} running task {task.spec.name} died and the "
                        "task has no retries left (max_retries)")
                self.fail(task, *error_object(NodeDiedError(text)), error_text=text)

    def _place_again(self, task):
        spec = task.spec
        if self.queues.feasible(spec.resources):
            entries = self.objects.entries
            missing = [arg[1] for arg in spec.args if arg[0] == "r"
                       and ((entry := entries.get(arg[1])) is None
                            or self._must_wait_for(entry))]
            self._queue_here(task, missing)
        elif not self.spill(task, need_room=False):
            self.fail_unschedulable(task)

    @staticmethod
    def _must_wait_for(entry):
        """Whether a task run here must wait for this argument: it is not
        ready, or it is in another node's store or on disk here
        (fetch_missing brings it once the task is queued here)."""
        return not entry.ready or entry.kind == LOCATED or entry.kind == SPILLED

    def _queue_here(self, task, missing):
        """Queue a task on this node: dispatch it now, or fetch what it waits for."""
        self.queues.add(task, missing)
        if missing:
            self.fetch_missing(missing)
        else:
            self.dispatcher.schedule()

    def fetch_missing(self, missing):
        """Start fetching the arguments in other nodes' stores (or spilled to
        disk here) of a task or call now queued here (one sent elsewhere
        leaves them where they are)."""
        pull = self.objects.pull
        entries = self.objects.entries
        for object_id in missing:
            entry = entries.get(object_id)
            if entry is not None and entry.ready:
                if entry.kind == LOCATED:
                    pull(object_id, entry)
                elif entry.kind == SPILLED:
                    self.objects.restore(object_id, entry)

    def refuse(self, conn, fields, reason):
        """A submission that could not be handled: its results become errors,
        so whoever waits for them gets a clear error instead of hanging."""
        try:
            task_id, num_returns = fields[0], fields[5]
            return_ids = [ids.return_object_id(task_id, i) for i in range(1, num_returns + 1)]
        except Exception:
            return                   # not even the ids are readable: nothing to fail
        meta, data = error_object(TaskUnschedulableError(
            f"the node manager could not accept this task: {reason}"))
        for object_id in return_ids:
            self.objects.set_ready(object_id, ERROR, meta, data, owner=conn)
            self.objects.announce(object_id)

    def claim_args(self, args, contained, what):
        """Hold the objects a task, call or actor needs until it is done.

        Returns (failure, missing): failure is the (meta, data) error object
        it must fail with (an argument was freed or is itself an error),
        missing the ids of ref arguments not ready yet. Everything that
        exists is held, failure or not, so finishing releases it evenly.
        """
        failed, missing = None, []
        for arg in args:
            if arg[0] != "r":
                continue
            entry = self.objects.add_task_ref(arg[1])
            if entry is None:
                failed = failed or error_object(ObjectLostError(
                    f"argument {arg[1].hex()} of {what} was freed or never existed"))
            elif entry.kind == ERROR:
                failed = failed or (entry.meta, entry.data)
            elif self._must_wait_for(entry):
                missing.append(arg[1])
        for object_id in contained:       # refs inside inline arguments
            self.objects.add_task_ref(object_id)
        return failed, missing

    def release_args(self, args, contained):
        for object_id in held_ids(args, contained):
            self.objects.drop_task_ref(object_id)

    # ------------------------------------------------------------ endings
    def fail(self, task, meta, data, error_text=None, state="FAILED"):
        """Set every return of a task to an error object (it never runs again)."""
        if task.extra == "failed":
            return
        task.extra = "failed"
        self.finish(task, state)
        if error_text:
            self.report_error(task, error_text)
        self.spilled.pop(task.task_id, None)
        for index in range(1, task.spec.num_returns + 1):
            object_id = ids.return_object_id(task.task_id, index)
            self.objects.set_ready(object_id, ERROR, meta, data)
            self.objects.announce(object_id)
        self._tell_owner_node(task, state)

    def _tell_owner_node(self, task, state):
        owner = task.owner
        if owner is not None and owner.role == "node":
            owner.send(("finished", task.task_id, state))

    def fail_with(self, task, exc):
        self.fail(task, *error_object(exc))

    def fail_cancelled(self, task, why="cancelled with minray.cancel"):
        self.fail(task, *error_object(TaskCancelledError(
            task.task_id.hex(), f"task {spec_name(task.spec)} was {why}")), state="CANCELLED")

    def finish(self, task, state):
        self.tasks.pop(task.task_id, None)
        spec = task.spec
        if spec.args or spec.contained:
            self.release_args(spec.args, spec.contained)
        self.lineage.log_task(spec, state)

    def report_error(self, task, text):
        self.lineage.error("task", spec_name(task.spec), task.task_id, text)
        self._tell_if_unheld(task, text)

    def _tell_if_unheld(self, task, text):
        """A failed task whose results nobody holds any more: its owner prints
        the error (otherwise `get` raises it, or the owner prints it when it
        drops the last ref without getting it: each error is shown once)."""
        owner = task.owner
        if owner is None or owner.closed:
            return
        for index in range(1, task.spec.num_returns + 1):
            entry = self.objects.get(ids.return_object_id(task.task_id, index))
            if entry is not None and not entry.owner_released:
                return
        owner.send(("error", f"unhandled error: {text}"))

    def done(self, worker, items):
        """Results of tasks (or actor calls) the worker finished."""
        for task_id, results, seconds, error_text in items:
            task = pop_from_worker(worker, task_id)
            if task is None:
                continue
            if worker.actor is None:
                self.dispatcher.record_duration(task.spec.function_id, seconds)
            if error_text:
                state = "FAILED"
            elif task.extra == "cancel" and results and results[0][1] == ERROR:
                state = "CANCELLED"          # the worker stopped it (see cancel)
            else:
                state = "FINISHED"
            self.finish(task, state)
            if error_text:                 # recorded before the driver can see it
                self.report_error(task, error_text)
            for object_id, kind, meta, payload, contained in results:
                entry = self.objects.set_ready(object_id, kind, meta, payload,
                                               contained=contained)
                if kind == IN_STORE:
                    self.lineage.log_object(object_id, entry, task_id)
                self.objects.announce(object_id)
            self._tell_owner_node(task, state)

    def object_ready(self, object_id, entry):
        if entry.kind == ERROR:
            for task in self.queues.drain_waiting_on(object_id):
                self.fail(task, *failed_argument_object(spec_name(task.spec),
                                                        entry.meta, entry.data))
        elif self.queues.object_available(object_id):
            self.dispatcher.schedule()

    def worker_died(self, worker):
        """A task worker's process ended: requeue what it had, retry or fail
        the task it was running."""
        queue = self.dispatcher.worker_gone(worker)
        for task in reversed(queue[1:]):           # never started: just requeue
            task.worker = None
            if task.extra == "cancel":
                self.fail_cancelled(task)
            else:
                self.queues.push_ready(task, front=True)
        if queue:
            running = queue[0]
            running.worker = None
            if running.extra == "cancel":          # minray.cancel: never retried
                self.fail_cancelled(running)
            elif running.retries_left > 0:
                running.retries_left -= 1
                log.warning("worker %s died running %s; retrying (%d retries left)",
                            worker.pid, running.spec.name, running.retries_left)
                self.queues.push_ready(running, front=True)
            else:
                text = (f"the worker (pid={worker.pid}) running task {running.spec.name} died "
                        "and the task has no retries left (max_retries)")
                self.fail(running, *error_object(WorkerCrashedError(text)), error_text=text)

    # ------------------------------------------------------------ cancel
    def cancel(self, conn, request_id, object_id, force, recursive):
        """minray.cancel of the task that makes `object_id`: answered with None,
        or with why it can't be done (the caller raises ValueError with it)."""
        if not isinstance(object_id, bytes) or len(object_id) != ids.OBJECT_ID_SIZE:
            raise ValueError(f"cancel needs an object id of {ids.OBJECT_ID_SIZE} bytes")
        conn.send(("info", request_id, self.cancel_task(ids.task_of(object_id),
                                                         bool(force), bool(recursive))))

    def cancel_task(self, task_id, force, recursive):
        """Cancel a task (or actor call) by id, and with `recursive` the tasks
        it submitted that are still queued or running. A finished or unknown
        task is left alone, as in Ray."""
        if recursive:
            # Children are found by their spec's parent: cancelling is rare,
            # so this scan costs nothing on the path of ordinary tasks.
            for child in [t for t in self.tasks.values()
                          if t.spec.parent_task_id == task_id and t.extra != "failed"]:
                self.cancel_task(child.task_id, force, True)
        task = self.tasks.get(task_id)
        if task is None:
            if self.cancel_actor_call is not None:
                return self.cancel_actor_call(task_id, force)
            return None
        if task.extra == "failed":
            return None
        worker = task.worker
        if worker is None:                         # queued here: it never runs
            self.queues.remove_ready(task)         # (or parked on its arguments)
            self.fail_cancelled(task)
            return None
        task.extra = "cancel"                      # whatever happens next, no retry
        if force and worker.queue and worker.queue[0] is task:
            log.info("cancel(force=True): killing worker %s running %s",
                     worker.pid, spec_name(task.spec))
            self.dispatcher.pool.kill(worker.worker_id)     # -> worker_died
        else:
            # The worker drops it if it has not started it, or interrupts it
            # (KeyboardInterrupt); either way it answers in "done".
            worker.conn.send(("cancel", task_id))
        return None

    def rows(self, node_hex):
        return [{"id": t.task_id.hex(), "name": spec_name(t.spec),
                 "state": "RUNNING" if t.worker is not None else "PENDING", "node": node_hex}
                for t in self.tasks.values()]
