"""Exceptions raised by minray, with the names Ray users know."""


class RayError(Exception):
    """Base class of every error minray raises on its own behalf."""


class ObjectStoreFullError(RayError, MemoryError):
    """An object does not fit in the node's shared-memory object store.

    Raised either because the object is larger than the whole store (it can
    never fit: make the store bigger with ``object_store_memory``) or because
    every object that could be evicted is still in use (pinned) right now.
    """


class ObjectStoreError(RayError):
    """Misuse of the object store: unknown id, double seal, bad release..."""


class ObjectNotFoundError(ObjectStoreError, KeyError):
    """The object id is not in this node's object store."""

    def __str__(self):  # KeyError would print the repr of the message
        return str(self.args[0]) if self.args else ""


class ObjectExistsError(ObjectStoreError):
    """An object with this id was already created in the store."""


class StoreAttachError(ObjectStoreError):
    """The shared-memory arena file is missing, damaged or not a minray store."""


class SerializationError(RayError, TypeError):
    """A value could not be serialized (or deserialized)."""


class GetTimeoutError(RayError, TimeoutError):
    """minray.get or minray.wait did not finish within its timeout."""


class WorkerCrashedError(RayError):
    """The worker running a task died (and the task ran out of retries)."""


class RayActorError(RayError):
    """The actor is dead: its process died, it was killed or its constructor failed."""


ActorDiedError = RayActorError


class ObjectLostError(RayError):
    """An object was lost (evicted or its node died) and cannot be recomputed."""


class TaskCancelledError(RayError):
    """The task was cancelled with minray.cancel (before or while it ran)."""

    def __init__(self, task_id=None, error_message=None):
        self.task_id = task_id
        self.error_message = error_message
        Exception.__init__(self, task_id, error_message)

    def __str__(self):
        if self.error_message:
            return self.error_message
        return f"task {self.task_id} was cancelled" if self.task_id else "the task was cancelled"


class TaskUnschedulableError(RayError, ValueError):
    """A task asks for resources no node of the cluster can ever provide."""


class RaySystemError(RayError):
    """minray itself failed (a node manager died, the cluster went away, ...)."""


class RayTaskError(RayError):
    """A task raised: carries the original exception and its remote traceback.

    `minray.get` raises ``as_instanceof_cause()``, an instance of a class that
    derives from both RayTaskError and the original exception's class, so
    ``except ValueError`` catches a remote ValueError, as in Ray.
    """

    def __init__(self, function_name, traceback_str, cause, pid=None):
        self.function_name = function_name
        self.traceback_str = traceback_str
        self.cause = cause
        self.pid = pid
        # Not super(): in a dual class the next __init__ would be the cause
        # class's, whose signature may differ (e.g. MyError(message, code)).
        Exception.__init__(self, function_name, traceback_str, cause, pid)

    def __str__(self):
        where = f" (pid={self.pid})" if self.pid else ""
        return f"task {self.function_name}{where} failed:\n{self.traceback_str.rstrip()}"

    def as_instanceof_cause(self):
        cause = self.cause
        while isinstance(cause, RayTaskError):
            # The task re-raised a nested task's error: keep our traceback
            # (it contains the nested one) and the original exception's type.
            cause = cause.cause
        cause_cls = type(cause)
        if not _can_subclass(cause_cls):
            return self
        name = f"RayTaskError({cause_cls.__name__})"
        try:
            cls = _dual_classes[cause_cls]
        except KeyError:
            cls = type(name, (RayTaskError, cause_cls), {
                "__init__": _dual_init, "__str__": RayTaskError.__str__,
                "__reduce__": _dual_reduce, "__module__": "minray.exceptions",
            })
            _dual_classes[cause_cls] = cls
        return cls(self.function_name, self.traceback_str, cause, self.pid)


_dual_classes = {}


def _can_subclass(cls):
    try:
        type("probe", (RayTaskError, cls), {})
        return True
    except TypeError:
        return False


def _dual_init(self, function_name, traceback_str, cause, pid=None):
    RayTaskError.__init__(self, function_name, traceback_str, cause, pid)
    self.__dict__.update(getattr(cause, "__dict__", {}))


def _dual_reduce(self):
    return _rebuild_dual, (self.function_name, self.traceback_str, self.cause, self.pid)


def _rebuild_dual(function_name, traceback_str, cause, pid):
    return RayTaskError(function_name, traceback_str, cause, pid).as_instanceof_cause()
