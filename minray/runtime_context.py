"""minray.get_runtime_context(): which job, node, task and actor the calling
code runs in, with the method names of Ray's RuntimeContext.

Ids are hex strings. In a driver there is no task or actor (None); inside a
task, an actor's constructor or one of its calls, they name that task, call
or actor.
"""
import contextvars

from minray.ids import JOB_ID_SIZE
from minray.runtime import core

# The task or actor call running in this thread or coroutine, set by the
# worker's executor (threaded and async actors run several at once).
current_task = contextvars.ContextVar("minray_current_task", default=None)


class WorkerInfo:
    """What a worker's executor tells this module about its process."""

    def __init__(self):
        self.node_id = None           # bytes
        self.worker_id = None         # str
        self.gpu_ids = []             # GPU ids of the running task or actor
        self.async_actor = False
        self.is_cancelled = lambda task_id: False


worker = WorkerInfo()


class RuntimeContext:
    """Where the calling code runs. Get one with minray.get_runtime_context()."""

    def __init__(self, client):
        self._client = client

    @property
    def _in_worker(self):
        return self._client.role == "worker"

    def get_job_id(self):
        """The job (driver) this code belongs to, as hex."""
        return self._task_or_root()[:JOB_ID_SIZE].hex()

    def get_node_id(self):
        """The node this process runs on, as hex."""
        if self._in_worker:
            return worker.node_id.hex() if worker.node_id else None
        welcome = self._client.welcome or {}
        node_id = welcome.get("node_id")
        return node_id.hex() if node_id else None

    def get_task_id(self):
        """The running task or actor call, as hex; None in a driver."""
        if not self._in_worker:
            return None
        task_id = current_task.get()
        return task_id.hex() if task_id else None

    def get_actor_id(self):
        """The actor this code runs in, as hex; None outside actors."""
        actor_id = self._client.actor_id
        return actor_id.hex() if actor_id else None

    @property
    def namespace(self):
        """The namespace of the current job (where named actors are found)."""
        return self._client.namespace

    def get_worker_id(self):
        """This worker process's id; None in a driver."""
        return worker.worker_id if self._in_worker else None

    def get_accelerator_ids(self):
        """{"GPU": [ids as strings]} of the running task or actor."""
        ids = worker.gpu_ids if self._in_worker else []
        return {"GPU": [str(g) for g in ids]}

    def is_canceled(self):
        """True once minray.cancel was called on the running task or actor call.

        An actor's calls are not interrupted by cancel (its state would be
        left half-changed): a long call can check this and stop early.
        """
        if not self._in_worker:
            raise RuntimeError("is_canceled() can only be called inside a task or actor call")
        if worker.async_actor:
            raise RuntimeError("is_canceled() is not supported in async actors: cancel "
                               "raises asyncio.CancelledError in the call instead")
        task_id = current_task.get()
        return task_id is not None and worker.is_cancelled(task_id)

    def _task_or_root(self):
        return current_task.get() or self._client.actor_id or self._client.current_task_id

    def __repr__(self):
        return (f"RuntimeContext(job_id={self.get_job_id()}, node_id={self.get_node_id()}, "
                f"task_id={self.get_task_id()}, actor_id={self.get_actor_id()})")


def get_runtime_context():
    """The RuntimeContext of the calling driver, task or actor."""
    client = core.current()
    if client is None:
        raise RuntimeError("minray is not initialized: call minray.init() first")
    return RuntimeContext(client)
