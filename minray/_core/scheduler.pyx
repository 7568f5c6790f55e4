# cython: language_level=3
"""The node manager's scheduling queues: dependencies, resources, ready tasks.

A task enters with the ids of the objects it still waits for. It is parked
under each of them; when the last one becomes available it moves to the ready
queue of its shape: its job and its resource request (one FIFO per job and
distinct request, so a task waiting for a GPU never holds up CPU tasks behind
it, and one driver's backlog never holds up another driver's tasks).
Dispatch takes ready tasks round-robin across shapes whose request fits the
free resources, which shares the node fairly between jobs.
"""
from collections import deque

EPSILON = 1e-9


def resource_shape(dict resources):
    return tuple(sorted(resources.items()))


def shape_resources(tuple shape):
    """The resource request of a task shape (its job id left out)."""
    return dict(shape[1:])


cdef class Task:
    def __init__(self, bytes task_id, spec, dict resources, int retries_left=0, owner=None):
        self.task_id = task_id
        self.spec = spec
        self.resources = resources
        # The job (the task id's first bytes, minray.ids) and the request.
        self.shape = (task_id[:4],) + resource_shape(resources)
        self.missing = 0
        self.retries_left = retries_left
        self.owner = owner
        self.worker = None
        self.extra = None


cdef class SchedulerQueues:
    def __init__(self, dict total):
        self.total = dict(total)
        self.available = dict(total)
        self.waiting = {}
        self.ready = {}
        self.shapes = []
        self.gpu_shapes = {}
        self.next_shape = 0
        self.num_ready = 0
        self.num_waiting = 0

    @property
    def total_resources(self):
        return dict(self.total)

    @property
    def available_resources(self):
        return {k: v for k, v in self.available.items()}

    cpdef bint feasible(self, dict resources):
        """Could this node ever run it (with everything free)?"""
        for name, amount in resources.items():
            if amount > self.total.get(name, 0.0) + EPSILON:
                return False
        return True

    cpdef bint fits(self, dict resources):
        for name, amount in resources.items():
            if amount > self.available.get(name, 0.0) + EPSILON:
                return False
        return True

    cpdef acquire(self, dict resources):
        for name, amount in resources.items():
            self.available[name] = self.available.get(name, 0.0) - amount

    cpdef release(self, dict resources):
        for name, amount in resources.items():
            self.available[name] = self.available.get(name, 0.0) + amount

    cpdef add(self, Task task, list missing):
        """Queue a task that still waits for the objects in `missing`."""
        cdef bytes object_id
        task.missing = len(missing)
        if task.missing == 0:
            self.push_ready(task)
            return
        self.num_waiting += 1
        for object_id in missing:
            parked = self.waiting.get(object_id)
            if parked is None:
                self.waiting[object_id] = [task]
            else:
                parked.append(task)

    cpdef list object_available(self, bytes object_id):
        """Mark an object available; return the tasks that became ready."""
        cdef list parked = self.waiting.pop(object_id, None)
        cdef list now_ready = []
        cdef Task task
        if parked is None:
            return now_ready
        for task in parked:
            task.missing -= 1
            if task.missing == 0:
                self.num_waiting -= 1
                self.push_ready(task)
                now_ready.append(task)
        return now_ready

    cpdef list drain_waiting_on(self, bytes object_id):
        """Remove and return the tasks parked on an object (it failed)."""
        cdef list parked = self.waiting.pop(object_id, None)
        cdef Task task
        if parked is None:
            return []
        for task in parked:
            task.missing -= 1
            if task.missing == 0:
                self.num_waiting -= 1
        return parked

    cpdef push_ready(self, Task task, bint front=False):
        queue = self.ready.get(task.shape)
        if queue is None:
            queue = deque()
            self.ready[task.shape] = queue
            self.shapes.append(task.shape)
            self.gpu_shapes[task.shape] = task.resources.get("GPU", 0.0) > 0
        if front:
            queue.appendleft(task)
        else:
            queue.append(task)
        self.num_ready += 1

    cpdef Task pop_dispatchable(self, bint gpu_ok=True, bint cpu_ok=True):
        """The next ready task whose resources fit now (round-robin over shapes).

        gpu_ok / cpu_ok False: skip the shapes that ask for GPUs / that don't
        (no worker of that kind is free this round).
        """
        cdef Py_ssize_t n = len(self.shapes)
        cdef Py_ssize_t i
        cdef tuple shape
        cdef Task task
        cdef bint every_kind = gpu_ok and cpu_ok
        for i in range(n):
            shape = self.shapes[(self.next_shape + i) % n]
            queue = self.ready[shape]
            if not queue:
                continue
            if not every_kind and not (gpu_ok if self.gpu_shapes[shape] else cpu_ok):
                continue
            task = queue[0]
            if self.fits(task.resources):
                queue.popleft()
                self.num_ready -= 1
                self.next_shape = (self.next_shape + i + 1) % n
                return task
        return None

    cpdef Task pop_shape(self, tuple shape):
        """The next ready task of exactly this shape (for pipelining), or None."""
        queue = self.ready.get(shape)
        if not queue:
            return None
        self.num_ready -= 1
        return queue.popleft()

    def ready_counts(self):
        return {shape: len(q) for shape, q in self.ready.items() if q}

    def remove_ready(self, Task task):
        queue = self.ready.get(task.shape)
        if queue is not None and task in queue:
            queue.remove(task)
            self.num_ready -= 1
            return True
        return False
