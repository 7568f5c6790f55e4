"""Dispatch: matching ready tasks to workers and the resources they hold.

A worker running tasks holds a *lease*: the resources of the task shape it
runs. Tasks of a function that runs briefly are queued on a busy worker of
the same shape (pipelining); a worker blocked in get/wait lends its CPUs out
and hands back the tasks queued on it. GPU ids are handed out with leases,
from the ids the node was given (its CUDA_VISIBLE_DEVICES).

Workers are keyed by kind, as Ray keys its worker pool: a worker that ran a
GPU task runs only GPU tasks afterwards, and one that ran a CPU task only CPU
tasks (a process that touched a GPU keeps its CUDA context). A fresh worker
takes either; when none of the right kind is idle and the pool is full, an
idle worker of the other kind is retired to make room.

A task with max_calls retires its worker after that many runs of its
function there: the worker takes nothing more and exits once idle.

Dispatch runs once per batch of incoming messages, right before replies are
written (OutputBatcher.before_flush): one event-loop iteration per batch.
"""
import asyncio
import logging

from minray._core.scheduler import SchedulerQueues
from minray.protocol import IN_STORE, SPILLED

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
EPSILON = 1e-9
GPU_KIND, CPU_KIND = "gpu", "cpu"


class GpuSlots:
    """The node's GPU ids and how much of each one is free.

    A request of one GPU or more takes that many whole free GPUs. A fraction
    goes to the busiest GPU that still has room for it, so fractions pack
    together and whole GPUs stay free for whole requests.
    """

    def __init__(self, gpu_ids):
        self.ids = list(gpu_ids)
        self.free = dict.fromkeys(self.ids, 1.0)

    def take(self, amount):
        """The ids for `amount` GPUs, or None if the free GPUs can't hold it now."""
        if amount >= 1.0 - EPSILON:
            wanted = int(round(amount))
            whole = [g for g in self.ids if self.free[g] >= 1.0 - EPSILON]
            if len(whole) < wanted:
                return None
            for gpu in whole[:wanted]:
                self.free[gpu] = 0.0
            return whole[:wanted]
        roomy = [g for g in self.ids if self.free[g] >= amount - EPSILON]
        if not roomy:
            return None
        gpu = min(roomy, key=self.free.__getitem__)
        self.free[gpu] -= amount
        return [gpu]

    def give_back(self, gpu_ids, amount):
        share = 1.0 if amount >= 1.0 - EPSILON else amount
        for gpu in gpu_ids:
            self.free[gpu] = min(1.0, self.free[gpu] + share)


class Dispatcher:
    def __init__(self, resources, pool, objects, num_workers, batcher, gpu_ids=None):
        self.queues = SchedulerQueues(resources)
        if gpu_ids is None:
            gpu_ids = range(int(resources.get("GPU", 0)))
        self.gpus = GpuSlots(gpu_ids)
        self.pool = pool
        self.objects = objects
        self.num_workers = num_workers
        # The cap follows the CPUs (init(num_workers=) only sets how many start).
        cpus = max(1, int(resources.get("CPU", 1)))
        self.max_workers = max(MIN_MAX_WORKERS, 4 * cpus, num_workers)
        self.functions = {}        # function id -> its pickle (sent once per worker)
        self.durations = {}        # function id -> recent run time (s)
        self.idle = []
        self.pending = False
        self.place_actors = None   # called first in each dispatch round
        self.holds_actors = lambda worker: False   # workers never retired or dedicated
        self.drop_cancelled = None # fails a cancelled task found back in the queue
        self.batcher = batcher
        batcher.before_flush = self._dispatch_if_pending

    # ------------------------------------------------------------ scheduling
    def schedule(self):
        """Ask for a dispatch round before the next replies go out."""
        if not self.pending:
            self.pending = True
            batcher = self.batcher
            if batcher.depth == 0 and not batcher.scheduled:
                batcher.scheduled = True
                asyncio.get_running_loop().call_soon(batcher.flush)

    def _dispatch_if_pending(self):
        if self.pending:
            self._dispatch()

    def _dispatch(self):
        self.pending = False
        if self.place_actors is not None:
            self.place_actors()
        batches = {}
        queues = self.queues
        gpu_ok = cpu_ok = True       # False: no worker of that kind this round
        while queues.num_ready and (gpu_ok or cpu_ok):
            task = queues.pop_dispatchable(gpu_ok, cpu_ok)
            if task is None:
                break
            if task.extra is not None and self._dropped(task):
                continue
            wants_gpu = task.resources.get("GPU", 0.0) > 0
            worker = self._idle_worker(wants_gpu)
            if worker is None or (wants_gpu and not self._take_gpus(worker, task.resources)):
                # No idle worker of its kind, or the free GPUs are split
                # between fractions: tasks of that kind wait for the next round.
                queues.push_ready(task, front=True)
                if worker is None:
                    self._make_room(wants_gpu)
                if wants_gpu:
                    gpu_ok = False
                else:
                    cpu_ok = False
                continue
            self._take_idle(worker, wants_gpu)
            queues.acquire(task.resources)
            worker.lease = task.resources
            worker.lease_shape = task.shape
            self._assign(worker, task, batches)
        if queues.num_ready:
            self._pipeline(batches)
        for worker, dispatches in batches.items():
            worker.conn.send(("tasks", dispatches))

    def _pipeline(self, batches):
        """Queue more short and medium tasks of the same shape on busy workers.

        Only while one shape has tasks waiting: otherwise (another job's
        tasks, or other requests, wait too) workers are left to run dry and
        go back to the round-robin, so no job's backlog keeps a worker."""
        if len(self.queues.ready_counts()) > 1:      # (it lists non-empty queues)
            return
        for worker in self.pool.workers.values():
            if (worker.blocked or worker.lease_shape is None or worker.actor is not None
                    or worker.retiring):
                continue
            # The tightest limit of what the worker holds: nothing waits behind
            # a long or untimed task, however short the newcomer.
            limit = min((self._pipeline_depth(t.spec.function_id) for t in worker.queue),
                        default=PIPELINE_DEPTH)
            while len(worker.queue) < limit and not worker.retiring:
                task = self.queues.pop_shape(worker.lease_shape)
                if task is None:
                    break
                if task.extra is not None and self._dropped(task):
                    continue
                depth = self._pipeline_depth(task.spec.function_id)
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

    def _dropped(self, task):
        """A queued task that must not run: it failed, or was cancelled after
        a worker handed it back."""
        if task.extra == "failed":
            return True
        if task.extra == "cancel" and self.drop_cancelled is not None:
            self.drop_cancelled(task)
            return True
        return False

    def _assign(self, worker, task, batches):
        task.worker = worker
        worker.queue.append(task)
        spec = task.spec
        if spec.max_calls:
            calls = worker.calls.get(spec.function_id, 0) + 1
            worker.calls[spec.function_id] = calls
            if calls >= spec.max_calls:
                worker.retiring = True          # takes no more; exits once idle
        pickled = None
        if spec.function_id not in worker.functions:
            worker.functions.add(spec.function_id)
            pickled = self.functions.get(spec.function_id)
        batches.setdefault(worker, []).append(
            (spec.task_id, spec.function_id, pickled, spec.name, self.resolve_args(spec.args),
             spec.kwarg_names, spec.num_returns, worker.gpu_ids))

    def resolve_args(self, args):
        """Ref arguments as the worker reads them: inline bytes or a store id."""
        resolved = []
        for arg in args:
            if arg[0] == "r":
                entry = self.objects.get(arg[1])
                if entry.kind == IN_STORE or entry.kind == SPILLED:   # (the worker restores it)
                    resolved.append(("s", arg[1], entry.meta))
                else:
                    resolved.append(("v", entry.meta, entry.data))
            else:
                resolved.append(arg)
        return resolved

    def record_duration(self, function_id, seconds):
        previous = self.durations.get(function_id, seconds)
        self.durations[function_id] = 0.8 * previous + 0.2 * seconds

    # ------------------------------------------------------------ workers
    def add_worker(self, worker):
        self.idle.append(worker)
        self.schedule()

    def start_workers(self, for_actor=False):
        """Start a worker unless one is starting or the pool is full; True
        if a fresh worker is on its way."""
        if self.pool.starting:
            return True
        # Actors' dedicated workers do not count against the task-worker cap.
        workers = self.pool.workers.values()
        task_workers = sum(1 for w in workers if w.actor is None)
        blocked = sum(1 for w in workers if w.blocked)
        if not for_actor and task_workers >= self.max_workers + blocked:
            return False
        return self.pool.start() is not None

    def _idle_worker(self, wants_gpu, unsuitable=None):
        """An idle worker for a task of this kind: one of that kind (the most
        recently idle first), else a fresh one; None if there is neither.
        Workers for which unsuitable(worker) is true are passed over."""
        idle = self.idle
        if not idle:
            return None
        kind = GPU_KIND if wants_gpu else CPU_KIND
        if unsuitable is None and idle[-1].kind == kind:
            return idle[-1]
        fresh = None
        for worker in reversed(idle):
            if unsuitable is not None and unsuitable(worker):
                continue
            if worker.kind == kind:
                return worker
            if fresh is None and worker.kind is None:
                fresh = worker
        return fresh

    def _take_idle(self, worker, wants_gpu):
        if self.idle[-1] is worker:
            self.idle.pop()
        else:
            self.idle.remove(worker)
        worker.kind = GPU_KIND if wants_gpu else CPU_KIND

    def _make_room(self, wants_gpu, for_actor=False):
        """No idle worker of this kind: start one, or, with the pool full,
        retire an idle worker of the other kind so a fresh one can start."""
        if self.start_workers(for_actor):
            return
        other = CPU_KIND if wants_gpu else GPU_KIND
        for worker in self.idle:
            if worker.kind == other and not self.holds_actors(worker):
                self.idle.remove(worker)
                self.retire(worker)
                return

    def retire(self, worker):
        """Let a worker go: it exits, and the pool replaces it as needed."""
        worker.retiring = True
        self.pool.retire(worker.worker_id)

    def keep_task_workers(self):
        """Keep one task worker per CPU (after one became an actor's, or died)."""
        task_workers = sum(1 for w in self.pool.workers.values()
                           if w.actor is None and not w.dead)
        if task_workers + len(self.pool.starting) < self.num_workers:
            self.pool.start()

    def lease_dedicated(self, resources, placement=None):
        """An idle worker holding `resources` for an actor, or None (a worker
        is being started, or the resources are not free now). Workers that
        hold actors (holds_actors) are passed over.

        `placement`: resources it holds only until its constructor is done
        (end_placement); Ray's default actor needs a CPU to be placed.
        """
        needed = resources
        if placement:
            needed = dict(resources)
            for name, amount in placement.items():
                needed[name] = needed.get(name, 0.0) + amount
        if not self.queues.fits(needed):
            return None
        wants_gpu = resources.get("GPU", 0.0) > 0
        worker = self._idle_worker(wants_gpu, self.holds_actors)
        if worker is None:
            self._make_room(wants_gpu, for_actor=True)
            return None
        if wants_gpu and not self._take_gpus(worker, resources):
            return None
        self._take_idle(worker, wants_gpu)
        self.queues.acquire(needed)
        worker.lease = dict(placement) if placement else None
        return worker

    def end_placement(self, worker):
        """An actor's constructor is done: give back what only placing it needed."""
        if worker.lease is not None:
            self.queues.release(_kept(worker.lease) if worker.blocked else worker.lease)
            worker.lease = None
            self.schedule()

    def return_dedicated(self, worker, resources):
        self.queues.release(resources)
        self.end_placement(worker)
        self._return_gpus(worker)

    def release_if_idle(self, worker):
        """A task worker whose queue emptied gives its lease back and idles
        (or exits, if it ran a function's max_calls)."""
        if worker.queue or worker.dead:
            return
        self._drop_lease(worker)
        if worker.actor is not None:
            return
        if worker.retiring:
            self.pool.retire(worker.worker_id)
        elif worker not in self.idle:
            self.idle.append(worker)

    def _drop_lease(self, worker):
        if worker.lease is not None:
            self.queues.release(_kept(worker.lease) if worker.blocked else worker.lease)
            worker.lease = None
            worker.lease_shape = None
        self._return_gpus(worker)

    def worker_gone(self, worker):
        """A task worker died: free what it held; return the tasks it had
        (the running one first)."""
        if worker in self.idle:
            self.idle.remove(worker)
        self._drop_lease(worker)
        queue, worker.queue = worker.queue, []
        return queue

    def _take_gpus(self, worker, resources):
        """Give the worker GPU ids for `resources`; False if they can't be had now."""
        amount = resources.get("GPU", 0.0)
        gpu_ids = self.gpus.take(amount)
        if gpu_ids is None:
            return False
        worker.gpu_ids, worker.gpu_share = gpu_ids, amount
        return True

    def _return_gpus(self, worker):
        if worker.gpu_ids:
            self.gpus.give_back(worker.gpu_ids, worker.gpu_share)
        worker.gpu_ids = []
        worker.gpu_share = 0.0

    # ------------------------------------------------------------ blocking
    def blocked(self, worker, not_started):
        """The worker waits in get/wait: lend its CPUs, requeue what it had queued."""
        if worker.blocked:
            return
        worker.blocked = True
        if worker.lease is not None:
            self.queues.release(_lent(worker.lease))
        self.give_back(worker, not_started)

    def give_back(self, worker, task_ids):
        """Queued tasks a worker hands back unstarted: it blocked (in get or
        wait) before or after they reached it. Another worker runs them."""
        for task_id in reversed(task_ids):
            task = pop_from_worker(worker, task_id)
            if task is not None:
                task.worker = None
                # The dispatch it drops may have carried the function's code:
                # send the code again with its next task of this function.
                worker.functions.discard(task.spec.function_id)
                self.queues.push_ready(task, front=True)
        self.schedule()

    def unblocked(self, worker):
        if not worker.blocked:
            return
        worker.blocked = False
        if worker.lease is not None:
            self.queues.acquire(_lent(worker.lease))    # may oversubscribe briefly


def pop_from_worker(worker, task_id):
    for i, task in enumerate(worker.queue):
        if task.task_id == task_id:
            return worker.queue.pop(i)
    return None


def _lent(lease):
    """The part of a lease a worker blocked in get/wait lends out: its CPUs.
    GPUs and custom resources stay held (as in Ray), so GPU ids stay unique."""
    cpus = lease.get("CPU")
    return {"CPU": cpus} if cpus else {}


def _kept(lease):
    """The part of a lease a blocked worker still holds."""
    return {name: amount for name, amount in lease.items() if name != "CPU"}
