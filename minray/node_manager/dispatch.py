"""Dispatch: matching ready tasks to workers and the resources they hold.

A worker running tasks holds a *lease*: the resources of the task shape it
runs. Tasks of a function that runs briefly are queued on a busy worker of
the same shape (pipelining); a worker blocked in get/wait lends its CPUs out
and hands back the tasks queued on it. GPU ids are handed out with leases.

Dispatch runs once per batch of incoming messages, right before replies are
written (OutputBatcher.before_flush): one event-loop iteration per batch.
"""
import asyncio
import logging

from minray._core.scheduler import SchedulerQueues

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


class Dispatcher:
    def __init__(self, resources, pool, objects, num_workers, batcher):
        self.queues = SchedulerQueues(resources)
        self.resources = dict(resources)
        self.free_gpus = list(range(int(resources.get("GPU", 0))))
        self.pool = pool
        self.objects = objects
        self.num_workers = num_workers
        self.max_workers = max(MIN_MAX_WORKERS, 4 * num_workers)
        self.functions = {}        # function id -> its pickle (sent once per worker)
        self.durations = {}        # function id -> recent run time (s)
        self.idle = []
        self.pending = False
        self.place_actors = None   # called first in each dispatch round
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
        while queues.num_ready:
            task = queues.pop_dispatchable()
            if task is None:
                break
            if task.extra == "failed":
                continue
            if not self.idle:
                queues.push_ready(task, front=True)
                self.start_workers()
                break
            worker = self.idle.pop()
            queues.acquire(task.resources)
            worker.lease = task.resources
            worker.lease_shape = task.shape
            self._take_gpus(worker, task.resources)
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
            limit = min((self._pipeline_depth(t.spec.function_id) for t in worker.queue),
                        default=PIPELINE_DEPTH)
            while len(worker.queue) < limit:
                task = self.queues.pop_shape(worker.lease_shape)
                if task is None:
                    break
                if task.extra == "failed":
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

    def _assign(self, worker, task, batches):
        task.worker = worker
        worker.queue.append(task)
        spec = task.spec
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
                if entry.kind == "s":
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
        # Actors' dedicated workers do not count against the task-worker cap.
        workers = self.pool.workers.values()
        task_workers = sum(1 for w in workers if w.actor is None)
        blocked = sum(1 for w in workers if w.blocked)
        live = task_workers + len(self.pool.starting)
        if self.pool.starting or (not for_actor and live >= self.max_workers + blocked):
            return
        self.pool.start()

    def keep_task_workers(self):
        """Keep one task worker per CPU (after one became an actor's, or died)."""
        task_workers = sum(1 for w in self.pool.workers.values()
                           if w.actor is None and not w.dead)
        if task_workers + len(self.pool.starting) < self.num_workers:
            self.pool.start()

    def lease_dedicated(self, resources, unsuitable=None):
        """An idle worker holding `resources` for an actor, or None (a worker
        is being started, or the resources are not free now). Idle workers
        for which unsuitable(worker) is true are passed over."""
        if not self.queues.fits(resources):
            return None
        for index in range(len(self.idle) - 1, -1, -1):
            if unsuitable is None or not unsuitable(self.idle[index]):
                worker = self.idle.pop(index)
                break
        else:
            self.start_workers(for_actor=True)
            return None
        self.queues.acquire(resources)
        self._take_gpus(worker, resources)
        return worker

    def return_dedicated(self, worker, resources):
        self.queues.release(resources)
        self._return_gpus(worker)

    def release_if_idle(self, worker):
        """A task worker whose queue emptied gives its lease back and idles."""
        if worker.queue or worker.dead:
            return
        self._drop_lease(worker)
        if worker.actor is None and worker not in self.idle:
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
        gpus = int(resources.get("GPU", 0))
        if gpus:
            worker.gpu_ids, self.free_gpus = self.free_gpus[:gpus], self.free_gpus[gpus:]

    def _return_gpus(self, worker):
        self.free_gpus.extend(worker.gpu_ids)
        worker.gpu_ids = []

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
