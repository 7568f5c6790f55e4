"""Actors on a node: placing them on dedicated workers, ordering their calls,
restarting or burying them.

Each actor has one FIFO of calls. A call leaves the FIFO for the actor's
worker only when it and every call before it have their arguments, so the
calls of each caller run in the order they were sent (calls from different
callers interleave in arrival order). Calls whose actor is dead, or that were
running when it died, fail with ActorDiedError (a RayActorError).
"""
import collections
import logging

from minray import ids
from minray._core.scheduler import Task
from minray.exceptions import ActorDiedError, TaskUnschedulableError
from minray.node_manager.objects import error_object, failed_argument_object
from minray.node_manager.tasks import MalformedSpec, check_args, parse_spec
from minray.protocol import ERROR, ActorCallSpec
from minray.resources import is_valid_request

log = logging.getLogger("minray.node_manager")

PENDING, ALIVE, RESTARTING, DEAD = "PENDING", "ALIVE", "RESTARTING", "DEAD"


class ActorState:
    def __init__(self, spec, owner):
        self.actor_id = spec["actor_id"]
        self.spec = spec
        self.owner = owner
        self.state = PENDING
        self.worker = None
        self.calls = collections.deque()
        self.restarts_left = spec["max_restarts"]
        self.death = None                 # (meta, data) of the error calls get
        self.missing = 0                  # constructor arguments not ready yet
        self.held = None                  # resources held while placed
        self.escaped = False              # a handle was serialized
        self.released = False             # the owner dropped its handles

    @property
    def resources(self):
        return self.spec["resources"]


def check_actor_spec(spec):
    if not isinstance(spec, dict):
        raise MalformedSpec("an actor spec is a dict")
    if not is_valid_request(spec.get("resources")):
        raise MalformedSpec(f"resources must map names to finite amounts >= 0, "
                            f"got {spec.get('resources')!r}")
    check_args(spec["args"], spec["contained"])


class ActorManager:
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
        self.names = {}
        self.unplaced = collections.deque()
        self.waiting_creation = {}        # object id -> [actor]
        self.waiting_calls = {}           # object id -> [(actor, task)]
        dispatcher.place_actors = self.place
        objects.ready_listeners.append(self.object_ready)

    # ------------------------------------------------------------ creation
    def on_create(self, conn, spec, request_id):
        check_actor_spec(spec)
        name = spec["name"]
        if name is not None and name in self.names:
            conn.send(("info", request_id, f"an actor named {name!r} already exists; pick "
                       f"another name, or use minray.get_actor({name!r}) to reach it"))
            return
        actor = ActorState(spec, conn)
        self.actors[actor.actor_id] = actor
        if name is not None:
            self.names[name] = actor.actor_id
        if request_id:
            conn.send(("info", request_id, None))
        self.lineage.actor(actor.actor_id, self._record(actor))
        # Arguments are held first: a dead actor releases them either way.
        failed, missing = self.tasks.claim_args(spec["args"], spec["contained"],
                                                f"actor {spec['class_name']}")
        queues = self.dispatcher.queues
        if not queues.feasible(actor.resources):
            self.die(actor, TaskUnschedulableError(
                f"actor {spec['class_name']} asks for {actor.resources} but this cluster has "
                f"{queues.total_resources} in total: it can never be placed"))
            return
        if failed is not None:
            self.die_with(actor, *failed_argument_object(
                None, *failed, actor_class=spec["class_name"]))
            return
        actor.missing = len(missing)
        for object_id in missing:
            self.waiting_creation.setdefault(object_id, []).append(actor)
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
            worker = dispatcher.lease_dedicated(actor.resources)
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
                if not actor.owner.closed:
                    actor.owner.send(("error", f"actor {name} could not be created: "
                                               f"{error_text}"))
            actor.restarts_left = 0
            self.die_with(actor, meta, data)
            return
        actor.state = ALIVE
        self.lineage.actor(actor_id, self._record(actor))
        self.pump(actor)

    # ------------------------------------------------------------ calls
    def on_call(self, conn, fields):
        spec = parse_spec(ActorCallSpec, fields)
        for index in range(1, spec.num_returns + 1):
            self.objects.expect(ids.return_object_id(spec.task_id, index), conn)
        task = Task(spec.task_id, spec, {}, 0, conn)
        task.extra = "call"
        actor = self.actors.get(spec.actor_id)
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
        actor.calls.append(task)
        self.pump(actor)

    def pump(self, actor):
        """Send the actor's calls whose turn has come to its worker."""
        if actor.state != ALIVE or actor.worker is None:
            return
        batch = []
        worker = actor.worker
        while actor.calls and (actor.calls[0].missing == 0 or actor.calls[0].extra == "failed"):
            task = actor.calls.popleft()
            if task.extra == "failed":
                continue
            task.worker = worker
            worker.queue.append(task)
            spec = task.spec
            batch.append((spec.task_id, None, None, spec.method,
                          self.dispatcher.resolve_args(spec.args), spec.kwarg_names,
                          spec.num_returns, worker.gpu_ids))
        if batch:
            worker.conn.send(("tasks", batch))
        self.maybe_retire(actor)

    def object_ready(self, object_id, entry):
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
        touched = []
        for actor, task in self.waiting_calls.pop(object_id, ()):
            task.missing -= 1
            if entry.kind == ERROR and task.extra != "failed":
                self.tasks.fail(task, *failed_argument_object(
                    f"{actor.spec['class_name']}.{task.spec.method}", entry.meta, entry.data))
            touched.append(actor)
        for actor in dict.fromkeys(touched):
            self.pump(actor)

    def call_done(self, worker):
        actor = self.actors.get(worker.actor)
        if actor is not None:
            self.pump(actor)

    # ------------------------------------------------------------ endings
    def worker_died(self, worker):
        actor = self.actors.get(worker.actor)
        if actor is None:
            return
        self._unplace(actor)
        running, worker.queue = worker.queue, []
        for task in running:
            self.tasks.fail_with(task, ActorDiedError(
                f"actor {actor.spec['class_name']} died while running {task.spec.method}"))
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

    def _unplace(self, actor):
        if actor.held is not None:
            self.dispatcher.return_dedicated(actor.worker, actor.held)
            actor.held = None
        actor.worker = None
        actor.state = PENDING if actor.state != DEAD else DEAD

    def kill(self, actor_id, no_restart=True, reason=None):
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
            worker = actor.worker
            worker.dead = True
            self.dispatcher.pool.remove(worker.worker_id)
            self.worker_died(worker)
            self.dispatcher.schedule()

    def die(self, actor, exc):
        self.die_with(actor, *error_object(exc))

    def die_with(self, actor, meta, data):
        """The actor is gone for good: every call queued now or later fails."""
        if actor.state == DEAD:
            return
        actor.state = DEAD
        actor.death = (meta, data)
        worker = actor.worker
        self._unplace(actor)
        actor.state = DEAD
        if worker is not None and not worker.dead:
            running, worker.queue = worker.queue, []
            for task in running:
                self.tasks.fail(task, meta, data)
            self.dispatcher.pool.remove(worker.worker_id)
        while actor.calls:
            task = actor.calls.popleft()
            if task.extra != "failed":
                self.tasks.fail(task, meta, data)
        name = actor.spec["name"]
        if name is not None and self.names.get(name) == actor.actor_id:
            del self.names[name]
        self.tasks.release_args(actor.spec["args"], actor.spec["contained"])
        self.lineage.actor(actor.actor_id, self._record(actor))

    def on_exit(self, worker):
        actor = self.actors.get(worker.actor)
        if actor is not None and actor.worker is worker:
            actor.restarts_left = 0
            self.die(actor, ActorDiedError(
                f"actor {actor.spec['class_name']} exited (minray.actor.exit_actor())"))

    def release(self, actor_ids):
        for actor_id in actor_ids:
            actor = self.actors.get(actor_id)
            if actor is not None:
                actor.released = True
                self.maybe_retire(actor)

    def escape(self, actor_ids):
        for actor_id in actor_ids:
            actor = self.actors.get(actor_id)
            if actor is not None:
                actor.escaped = True

    def maybe_retire(self, actor):
        """Stop an actor nobody can call any more, once its calls are done."""
        spec = actor.spec
        if (not actor.released or actor.escaped or spec["name"] is not None
                or spec["detached"] or actor.state == DEAD or actor.calls
                or (actor.worker is not None and actor.worker.queue)):
            return
        self.die(actor, ActorDiedError(
            f"actor {spec['class_name']} was stopped: every handle to it was dropped"))

    def owner_left(self, conn):
        for actor in list(self.actors.values()):
            if actor.owner is conn and not actor.spec["detached"] and actor.state != DEAD:
                self.die(actor, ActorDiedError(
                    f"actor {actor.spec['class_name']} was stopped: the process that created "
                    "it exited (pass lifetime='detached' to keep it)"))

    def lookup(self, name):
        actor_id = self.names.get(name)
        actor = self.actors.get(actor_id) if actor_id else None
        if actor is None or actor.state == DEAD:
            return None
        return (actor.actor_id, actor.spec["class_name"], actor.spec["methods"])

    def _record(self, actor):
        spec = actor.spec
        return {"class_name": spec["class_name"], "state": actor.state, "name": spec["name"],
                "node": self.lineage.node_hex, "detached": spec["detached"],
                "restarts_left": actor.restarts_left}
