"""Actors on a node: placing them on dedicated workers, ordering their calls,
naming them, restarting, retiring or burying them.

Calls are ordered per caller, as in Ray: each actor keeps one FIFO per
caller (the connection of the driver or worker process that sent the call).
A call leaves its FIFO for the actor's worker only when it and every earlier
call in that FIFO have their arguments, so a call waiting for an argument
holds back only the later calls of its own caller; the calls of different
callers interleave in the order they became ready. A threaded or async actor
(max_concurrency > 1 or async methods) keeps no order, as in Ray: each call
goes to its worker as soon as its own arguments are there. Calls whose actor
is dead, or that were running when it died, fail with ActorDiedError (a RayActorError).

Lifetime, as in Ray. A non-detached actor stops when its creator (owner)
exits, and once nothing holds its handles: handles are counted by the object
directory like refs, on one entry per actor (minray.ids.actor_handle_id):
the creator's handles, copies rebuilt in other processes (borrowers), values
and queued tasks that carry a handle. Handles got by name (get_actor) are
not counted. A detached actor lives until it is killed. Names are unique
within a namespace; each driver's job has one (anonymous by default).

Actors across nodes (placing them elsewhere, passing calls on, names kept
unique cluster-wide) are in minray.node_manager.actors_across_nodes.
"""
import collections
import logging

from minray import ids
from minray._core.scheduler import Task
from minray.exceptions import ActorDiedError, TaskCancelledError, TaskUnschedulableError
from minray.node_manager.actors_across_nodes import (
    ALIVE, DEAD, PENDING, RESTARTING, ActorsAcrossNodes,
)
from minray.node_manager.objects import error_object, failed_argument_object
from minray.node_manager.tasks import MalformedSpec, check_args, parse_spec
from minray.protocol import ACTOR_HANDLES, ERROR, ActorCallSpec
from minray.resources import is_valid_request

log = logging.getLogger("minray.node_manager")



def _call_retries(actor):
    return actor.spec.get("max_task_retries", 0) if actor is not None else 0


class ActorState:
    def __init__(self, spec, owner):
        self.actor_id = spec["actor_id"]
        self.spec = spec
        self.owner = owner
        self.state = PENDING
        self.worker = None
        self.calls = {}                   # caller -> deque of calls not yet sent
        self.unordered = spec["max_concurrency"] > 1 or spec["is_async"]
        self.restarts_left = spec["max_restarts"]
        self.death = None                 # (meta, data) of the error calls get
        self.missing = 0                  # constructor arguments not ready yet
        self.held = None                  # resources held while placed
        self.released = False             # nothing holds its handles any more

    @property
    def resources(self):
        return self.spec["resources"]

    @property
    def registered_name(self):
        """(namespace, name) in the registry, or None for an unnamed actor."""
        name = self.spec["name"]
        return None if name is None else (self.spec["namespace"], name)

    def caller(self, task):
        """The FIFO a call joins: its sender's, or its own where calls keep no order."""
        return task.task_id if self.unordered else task.owner

    def queue_of(self, task):
        """The FIFO of calls not yet sent that `task` joins."""
        caller = self.caller(task)
        queue = self.calls.get(caller)
        if queue is None:
            queue = self.calls[caller] = collections.deque()
        return queue

    def queued_calls(self):
        for queue in self.calls.values():
            yield from queue

    @property
    def placement(self):
        """Resources it needs only while it is placed and constructed."""
        return self.spec.get("placement") or {}

    @property
    def needs(self):
        """What placing it takes: its resources and the placement ones."""
        needed = dict(self.resources)
        for name, amount in self.placement.items():
            needed[name] = needed.get(name, 0.0) + amount
        return needed


def check_actor_spec(spec):
    if not isinstance(spec, dict):
        raise MalformedSpec("an actor spec is a dict")
    if not is_valid_request(spec.get("resources")):
        raise MalformedSpec(f"resources must map names to finite amounts >= 0, "
                            f"got {spec.get('resources')!r}")
    if not is_valid_request(spec.get("placement") or {}):
        raise MalformedSpec(f"placement must map names to finite amounts >= 0, "
                            f"got {spec.get('placement')!r}")
    check_args(spec["args"], spec["contained"])
    if spec["name"] is not None and not (isinstance(spec["name"], str)
                                         and isinstance(spec.get("namespace"), str)):
        raise MalformedSpec("a named actor needs a str name and namespace")


class ActorManager(ActorsAcrossNodes):
    """Actors of this node. It reaches the rest of the node manager through
    four collaborators: the dispatcher (workers, resources, code), the task
    manager (holding arguments, failing calls), the object directory and the
    lineage log."""

    def __init__(self, dispatcher, tasks, objects, lineage):
        self.dispatcher = dispatcher
        self.tasks = tasks
        self.objects = objects
        self.lineage = lineage
        self.actors = {}
        self.names = {}                   # (namespace, name) -> actor id
        self.job_namespaces = {}          # job id -> (namespace, anonymous)
        # Connection -> its live non-detached actors, which die with it: a
        # worker that owns some (made by its tasks) must not become an
        # actor's worker, or that actor's end would take them along.
        self.owned_counts = collections.Counter()
        self.unplaced = collections.deque()
        self.waiting_creation = {}        # object id -> [actor]
        self.waiting_calls = {}           # object id -> [(actor, task)]
        dispatcher.place_actors = self.place
        # A worker whose tasks created live actors must keep running: those
        # actors end with the process that created them.
        dispatcher.holds_actors = lambda worker: self.owned_counts.get(worker.conn, 0) > 0
        self.kill_worker = None           # the node's way to kill a worker (NodeManager)
        self.cluster = None               # many nodes: the cluster view and peers
        self.peers = None
        self.remote = {}                  # actor id -> Peer of the node hosting it
        self.locating = {}                # actor id -> (owner Peer, parked calls)
        self.awaiting_creation = {}       # actor id -> calls that came before its "create"
        self.calls_to_resend = {}         # actor id -> calls in flight when its node died
        tasks.retry_actor_call = self._keep_call_for_restart
        # Names are unique in the whole cluster: the head keeps those of
        # actors created on other nodes, (namespace, name) -> (record,
        # address of the creating node); other nodes ask it (name requests).
        self.remote_names = {}
        self.name_requests = {}           # request number -> what to do with the answer
        self.next_name_request = 0
        tasks.cancel_actor_call = self.cancel_call
        objects.ready_listeners.append(self.object_ready)
        objects.freed_listeners.append(self.handles_freed)

    # ------------------------------------------------------------ creation
    def on_create(self, conn, spec, request_id):
        check_actor_spec(spec)
        if spec["name"] is not None and conn.role != "node" and self._asks_head():
            # The name must be free in the whole cluster: the head says.
            self._ask_head(("create", conn, spec, request_id), "claim",
                           (spec["namespace"], spec["name"]),
                           (spec["actor_id"], spec["class_name"], spec["methods"]))
            return
        self._create(conn, spec, request_id)

    def _create(self, conn, spec, request_id):
        actor = ActorState(spec, conn)
        key = actor.registered_name
        if key is not None and (key in self.names or key in self.remote_names):
            if spec.get("get_if_exists"):
                record, address = self._find_name(key)
                if address != self.objects.address:
                    self.remote.setdefault(record[0], self.peers.get(address))
                conn.send(("info", request_id, tuple(record)))
                return
            conn.send(("info", request_id, self._name_taken(key[1], key[0])))
            return
        self.actors[actor.actor_id] = actor
        if key is not None:
            self.names[key] = actor.actor_id
        if not spec["detached"]:
            self.owned_counts[conn] += 1
        # The creator holds the actor until it drops its handles (handles_freed).
        self.objects.add_actor_handles(ids.actor_handle_id(actor.actor_id), conn)
        if request_id:
            conn.send(("info", request_id, None))
        self.lineage.actor(actor.actor_id, self._record(actor))
        # Arguments are held first: a dead actor releases them either way.
        failed, missing = self.tasks.claim_args(spec["args"], spec["contained"],
                                                f"actor {spec['class_name']}")
        queues = self.dispatcher.queues
        needed = actor.needs
        if failed is None and conn.role != "node" and self._place_elsewhere(actor, needed):
            return
        if not queues.feasible(needed):
            self.die(actor, TaskUnschedulableError(
                f"actor {spec['class_name']} asks for {needed} to be placed but this cluster "
                f"has {queues.total_resources} in total: it can never be placed"
                + (" (an actor with no resource options needs 1 CPU while its constructor "
                   "runs, as in Ray; pass num_cpus=0 to place it without one)"
                   if actor.placement else "")))
            return
        if failed is not None:
            self.die_with(actor, *failed_argument_object(
                None, *failed, actor_class=spec["class_name"]))
            return
        actor.missing = len(missing)
        for object_id in missing:
            self.waiting_creation.setdefault(object_id, []).append(actor)
        self.tasks.fetch_missing(missing)
        if actor.missing == 0:
            self.unplaced.append(actor)
            self.dispatcher.schedule()

    def place(self):
        """Give unplaced actors a dedicated worker (called from dispatch)."""
        dispatcher = self.dispatcher
        while self.unplaced:
            actor = self.unplaced[0]
            if actor.state == DEAD:
                self.unplaced.popleft()
                continue
            worker = dispatcher.lease_dedicated(actor.resources, actor.placement)
            if worker is None:
                break
            self.unplaced.popleft()
            actor.held = actor.resources
            worker.actor = actor.actor_id
            actor.worker = worker
            spec = actor.spec
            worker.conn.send(("actor_init", actor.actor_id, spec["class_id"],
                              dispatcher.functions.get(spec["class_id"]), spec["class_name"],
                              dispatcher.resolve_args(spec["args"]), spec["kwarg_names"],
                              worker.gpu_ids, spec["max_concurrency"], spec["is_async"]))
            dispatcher.keep_task_workers()

    def on_ready(self, conn, actor_id, meta, data, error_text):
        actor = self.actors.get(actor_id)
        if actor is None or actor.state == DEAD or conn.worker is not actor.worker:
            return                       # (or from a worker killed since, see kill)
        if meta is not None:             # the constructor raised
            if error_text:
                name = actor.spec["class_name"]
                self.lineage.error("actor", name, actor_id, error_text)
                if not actor.owner.closed and actor.owner.role != "node":
                    actor.owner.send(("error", f"actor {name} could not be created: "
                                               f"{error_text}"))
            actor.restarts_left = 0
            self.die_with(actor, meta, data)
            return
        actor.state = ALIVE
        self.dispatcher.end_placement(actor.worker)      # e.g. the default actor's CPU
        self.lineage.actor(actor_id, self._record(actor))
        self.pump(actor)

    # ------------------------------------------------------------ calls
    def on_call(self, conn, fields):
        spec = parse_spec(ActorCallSpec, fields)
        for index in range(1, spec.num_returns + 1):
            self.objects.expect(ids.return_object_id(spec.task_id, index), conn)
        actor = self.actors.get(spec.actor_id)
        # An actor this node neither hosts nor knows the host of (or one it
        # is asking about, whose earlier calls wait): find where it lives.
        if ((actor is None or spec.actor_id in self.locating) and spec.actor_id not in self.remote
                and (self._must_locate(conn, spec) or self._before_its_creation(conn, spec))):
            return
        # (retries: max_task_retries, known where the actor was created)
        task = Task(spec.task_id, spec, {}, _call_retries(actor), conn)
        task.extra = "call"
        peer = self._host_of(spec.actor_id) if actor is None or spec.actor_id in self.remote \
            else None
        if peer is not None:
            if peer.closed:
                self.tasks.fail_with(task, ActorDiedError(
                    f"the node {peer.address} hosting actor {spec.actor_id.hex()} died"))
                return
            # Its results come back from there, and its arguments stay held
            # here until it has finished there (as a spilled task's).
            self.tasks.claim_args(spec.args, spec.contained, spec.method)
            self.tasks.tasks[spec.task_id] = task
            self.tasks.spilled[spec.task_id] = (task, peer, False)
            self._forward_call(peer, spec)
            return
        if actor is None:
            self.tasks.fail_with(task, ActorDiedError(
                f"no actor {spec.actor_id.hex()} on this node: it was never created here"))
            return
        if actor.state == DEAD:
            self.tasks.fail(task, *actor.death)
            return
        failed, missing = self.tasks.claim_args(spec.args, spec.contained, spec.method)
        if failed is not None:
            self.tasks.fail(task, *failed_argument_object(
                f"{actor.spec['class_name']}.{spec.method}", *failed))
            return
        task.missing = len(missing)
        for object_id in missing:
            self.waiting_calls.setdefault(object_id, []).append((actor, task))
        self.tasks.fetch_missing(missing)
        actor.queue_of(task).append(task)
        self.pump(actor, (actor.caller(task),))

    def pump(self, actor, callers=None):
        """Send the actor's calls whose turn has come to its worker: those of
        `callers`' FIFOs, or of every FIFO."""
        if actor.state != ALIVE or actor.worker is None:
            return
        batch = []
        worker = actor.worker
        for caller in list(actor.calls) if callers is None else callers:
            queue = actor.calls.get(caller)
            if queue is None:
                continue
            while queue and (queue[0].missing == 0 or queue[0].extra == "failed"):
                task = queue.popleft()
                if task.extra == "failed":
                    continue
                task.worker = worker
                worker.queue.append(task)
                spec = task.spec
                batch.append((spec.task_id, None, None, spec.method,
                              self.dispatcher.resolve_args(spec.args), spec.kwarg_names,
                              spec.num_returns, worker.gpu_ids))
            if not queue:
                del actor.calls[caller]
        if batch:
            worker.conn.send(("tasks", batch))
        self.maybe_retire(actor)

    def object_ready(self, object_id, entry):
        if not self.waiting_creation and not self.waiting_calls:
            return                        # (every announced object passes here)
        for actor in self.waiting_creation.pop(object_id, ()):
            if actor.state == DEAD:
                continue
            if entry.kind == ERROR:
                self.die_with(actor, *failed_argument_object(
                    None, entry.meta, entry.data, actor_class=actor.spec["class_name"]))
                continue
            actor.missing -= 1
            if actor.missing == 0:
                self.unplaced.append(actor)
                self.dispatcher.schedule()
        touched = {}                      # actor -> {caller: None}, in order
        for actor, task in self.waiting_calls.pop(object_id, ()):
            task.missing -= 1
            if entry.kind == ERROR and task.extra != "failed":
                self.tasks.fail(task, *failed_argument_object(
                    f"{actor.spec['class_name']}.{task.spec.method}", entry.meta, entry.data))
            touched.setdefault(actor, {})[actor.caller(task)] = None
        for actor, callers in touched.items():
            self.pump(actor, callers)

    def cancel_call(self, task_id, force):
        """minray.cancel of an actor call: None, or why it can't be done.

        As in Ray: force=True is refused for actor calls; a call not yet sent
        to the actor is dropped; one sent already is dropped by the actor if
        it has not started, interrupted if it runs on an async actor, and
        otherwise left to finish, its result replaced by TaskCancelledError.
        """
        for actor in self.actors.values():
            queued = next((t for t in actor.queued_calls() if t.task_id == task_id), None)
            sent = None
            if queued is None and actor.worker is not None:
                sent = next((t for t in actor.worker.queue if t.task_id == task_id), None)
            if queued is None and sent is None:
                continue
            if force:
                return ("force=True is not supported for actor calls: an actor's state "
                        "would be lost with its process; cancel without force, or "
                        "minray.kill the actor")
            if queued is not None:
                caller = actor.caller(queued)
                actor.calls[caller].remove(queued)
                if not actor.calls[caller]:
                    del actor.calls[caller]
                self.tasks.fail(queued, *error_object(TaskCancelledError(
                    task_id.hex(), f"actor call {queued.spec.method} was cancelled with "
                    "minray.cancel")), state="CANCELLED")
                self.pump(actor)
            elif not actor.worker.dead:
                actor.worker.conn.send(("cancel", task_id))
            return None
        return None                       # finished, or never here: nothing to do

    def call_done(self, worker):
        # Calls are sent as soon as their arguments are there, so a finished
        # call frees none: only an actor with nothing left may retire now.
        actor = self.actors.get(worker.actor)
        if actor is not None:
            self.maybe_retire(actor)

    # ------------------------------------------------------------ endings
    def worker_died(self, worker):
        actor = self.actors.get(worker.actor)
        if actor is None:
            return
        self._unplace(actor)
        running, worker.queue = worker.queue, []
        restarting = actor.state != DEAD and actor.restarts_left != 0
        again = []
        for task in running:
            if restarting and task.retries_left != 0 and task.extra != "cancel":
                if task.retries_left > 0:
                    task.retries_left -= 1
                again.append(task)
            else:
                self.tasks.fail_with(task, ActorDiedError(
                    f"actor {actor.spec['class_name']} died while running {task.spec.method}"))
        self._queue_first(actor, again)
        if actor.state == DEAD:
            return
        if actor.restarts_left != 0:
            if actor.restarts_left > 0:
                actor.restarts_left -= 1
            actor.state = RESTARTING
            log.warning("actor %s died; restarting it", actor.spec["class_name"])
            self.lineage.actor(actor.actor_id, self._record(actor))
            self.unplaced.append(actor)
            self.dispatcher.schedule()
        else:
            self.die(actor, ActorDiedError(
                f"actor {actor.spec['class_name']} died: its process exited unexpectedly "
                "(max_restarts exhausted)"))

    def _queue_first(self, actor, tasks):
        """Calls to run again (max_task_retries) ahead of their callers' queued ones."""
        for task in reversed(tasks):
            task.worker = None
            actor.queue_of(task).appendleft(task)

    def _unplace(self, actor):
        if actor.held is not None:
            self.dispatcher.return_dedicated(actor.worker, actor.held)
            actor.held = None
        actor.worker = None
        actor.state = PENDING if actor.state != DEAD else DEAD

    def kill(self, actor_id, no_restart=True, reason=None):
        peer = self.remote.get(actor_id)
        if peer is not None:
            peer.send(("actor_kill", actor_id, no_restart))
            if no_restart:
                self.remote.pop(actor_id, None)
                actor = self.actors.get(actor_id)
                if actor is not None and actor.state != DEAD:
                    self._forget_remote(actor)
            return
        actor = self.actors.get(actor_id)
        if actor is None or actor.state == DEAD:
            return
        if no_restart:
            actor.restarts_left = 0
            self.die(actor, ActorDiedError(reason or (
                f"actor {actor.spec['class_name']} was killed with minray.kill")))
        elif actor.worker is not None:
            # Its worker counts as dead now (and is killed), so the restart is
            # under way before any later call arrives: those wait for it.
            self.kill_worker(actor.worker)

    def die(self, actor, exc):
        self.die_with(actor, *error_object(exc))

    def die_with(self, actor, meta, data):
        """The actor is gone for good: every call queued now or later fails."""
        if actor.state == DEAD:
            return
        actor.state = DEAD
        actor.death = (meta, data)
        peer = self.remote.pop(actor.actor_id, None)
        if peer is not None:                 # hosted elsewhere: it stops there too
            peer.send(("actor_kill", actor.actor_id, True))
        worker = actor.worker
        self._unplace(actor)
        if worker is not None and not worker.dead:
            running, worker.queue = worker.queue, []
            for task in running:
                self.tasks.fail(task, meta, data)
            self.dispatcher.pool.remove(worker.worker_id)
        queued, actor.calls = list(actor.queued_calls()), {}
        for task in queued:
            if task.extra != "failed":
                self.tasks.fail(task, meta, data)
        self._let_go(actor)
        # Handles still around only reach a dead actor: they hold nothing.
        self.objects.discard(ids.actor_handle_id(actor.actor_id))
        self.tasks.release_args(actor.spec["args"], actor.spec["contained"])
        self.lineage.actor(actor.actor_id, self._record(actor))

    def _let_go(self, actor):
        """A dead actor gives up its name and stops counting for its owner."""
        key = actor.registered_name
        if key is not None and self.names.get(key) == actor.actor_id:
            del self.names[key]
            self._release_name(actor)
        if not actor.spec["detached"]:
            self.owned_counts[actor.owner] -= 1
            if self.owned_counts[actor.owner] <= 0:
                del self.owned_counts[actor.owner]

    def on_exit(self, worker):
        actor = self.actors.get(worker.actor)
        if actor is not None and actor.worker is worker:
            actor.restarts_left = 0
            self.die(actor, ActorDiedError(
                f"actor {actor.spec['class_name']} exited (minray.actor.exit_actor())"))

    def handles_freed(self, object_id, entry):
        """The object directory let go of an actor's handles: no process,
        value or queued task holds one."""
        if entry.kind != ACTOR_HANDLES:
            return
        actor = self.actors.get(ids.task_of(object_id))
        if actor is None or actor.state == DEAD:
            return
        if actor.owner.closed and not actor.spec["detached"]:
            self._owner_gone(actor)          # say why: its creator went first
            return
        actor.released = True
        self.maybe_retire(actor)

    def maybe_retire(self, actor):
        """Stop an actor nobody can call any more, once its calls are done."""
        spec = actor.spec
        if (not actor.released or spec["detached"] or actor.state == DEAD or actor.calls
                or (actor.worker is not None and actor.worker.queue)):
            return
        self.die(actor, ActorDiedError(
            f"actor {spec['class_name']} was stopped: every handle to it was dropped"))

    def owner_left(self, conn):
        for actor in list(self.actors.values()):
            if actor.owner is conn and not actor.spec["detached"] and actor.state != DEAD:
                self._owner_gone(actor)

    def _owner_gone(self, actor):
        self.die(actor, ActorDiedError(
            f"actor {actor.spec['class_name']} was stopped: the process that created "
            "it exited (pass lifetime='detached' to keep it)"))

    # ------------------------------------------------------------ names
    def job_started(self, job_id, namespace, anonymous):
        """A driver said which namespace its job (and the tasks and actors it
        starts) uses."""
        if isinstance(job_id, bytes) and isinstance(namespace, str):
            self.job_namespaces[job_id] = (namespace, bool(anonymous))

    def lookup(self, namespace, name):
        actor_id = self.names.get((namespace, name))
        actor = self.actors.get(actor_id) if actor_id else None
        if actor is None or actor.state == DEAD:
            return None
        return (actor.actor_id, actor.spec["class_name"], actor.spec["methods"])

    def query(self, what):
        """Answers to ("info", ...) requests about actors:
        ("actor", namespace, name) -> (actor_id, class_name, methods) or None;
        ("namespace", job_id) -> (namespace, anonymous) or None;
        ("actor", namespace or None) -> the live named actors (of every
        namespace for None) as rows for `minray list names`."""
        if what[0] == "actor" and len(what) == 3:
            return self.lookup(what[1], what[2])
        if what[0] == "actor" and len(what) == 2:
            return self.named_rows(what[1])
        if what[0] == "namespace" and len(what) == 2:
            return self.job_namespaces.get(what[1])
        raise ValueError(f"unknown actor query {what!r:.80}")

    def named_rows(self, namespace=None):
        """Named actors of this node and, on the head, those other nodes
        registered (the head holds every name of the cluster)."""
        rows = []
        for (actor_namespace, name), actor_id in self.names.items():
            actor = self.actors.get(actor_id)
            if actor is None or actor.state == DEAD:
                continue
            if namespace is None or actor_namespace == namespace:
                rows.append({"name": name, "namespace": actor_namespace,
                             "class_name": actor.spec["class_name"], "state": actor.state,
                             "actor_id": actor_id.hex(), "detached": actor.spec["detached"],
                             "node": self.objects.address})
        for (actor_namespace, name), (record, address) in self.remote_names.items():
            if (namespace is None or actor_namespace == namespace) \
                    and (actor_namespace, name) not in self.names:
                # Registered by another node; it releases the name when the actor dies.
                rows.append({"name": name, "namespace": actor_namespace,
                             "class_name": record[1], "state": "ALIVE",
                             "actor_id": record[0].hex(), "detached": None, "node": address})
        return rows

    def _record(self, actor):
        spec = actor.spec
        return {"class_name": spec["class_name"], "state": actor.state, "name": spec["name"],
                "namespace": spec.get("namespace"),
                "node": self.lineage.node_hex, "detached": spec["detached"],
                "restarts_left": actor.restarts_left}
