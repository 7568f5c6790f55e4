"""Exceptions raised by minray, with the names Ray users know."""
import warnings


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
    """The actor is dead: its process died, it was killed or its constructor failed.

    ``cause`` is the RayTaskError of the actor's constructor when that is why
    it died (``actor_init_failed`` is then true), else None.
    """

    def __init__(self, message="the actor died before it finished this call", cause=None):
        Exception.__init__(self, message)
        self.cause = cause

    @property
    def actor_init_failed(self):
        return isinstance(self.cause, RayTaskError)

    def __str__(self):
        return str(self.args[0]) if self.args else ""


class ActorDiedError(RayActorError):
    """The RayActorError minray raises: the actor was killed, exited, lost its
    process or could not be created (its constructor, or an argument of it,
    failed)."""

    @classmethod
    def from_creation_error(cls, class_name, task_error):
        """Calls of an actor whose constructor raised `task_error` (a RayTaskError)."""
        return cls(f"actor {class_name} died because its constructor failed, so it cannot "
                   f"run this call:\n{task_error}", cause=task_error)


class ObjectLostError(RayError):
    """An object was lost (evicted or its node died) and cannot be recomputed."""


class NodeDiedError(RayError):
    """The node a task ran on (or an object was kept on) died."""


class OwnerDiedError(ObjectLostError):
    """The node that owned an object died, so its value can't be known."""


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
        if not isinstance(cause, BaseException):
            return self
        cause_cls = type(cause)
        cls = _dual_classes.get(cause_cls)
        if cls is None:
            name = f"RayTaskError({cause_cls.__name__})"
            try:
                cls = type(name, (RayTaskError, cause_cls), {
                    "__init__": _dual_init, "__str__": RayTaskError.__str__,
                    "__reduce__": _dual_reduce, "__module__": "minray.exceptions",
                })
            except Exception as exc:      # a layout or metaclass conflict, a "final" class
                cls = f"{type(exc).__name__}: {exc}"
            _dual_classes[cause_cls] = cls
        if isinstance(cls, str):
            _warn_not_subclassable(cause_cls, cls)
            return self
        try:
            return cls(self.function_name, self.traceback_str, cause, self.pid)
        except Exception as exc:          # e.g. a __new__ that wants other arguments
            _warn_not_subclassable(cause_cls, f"{type(exc).__name__}: {exc}")
            return self


# exception class -> its RayTaskError subclass, or why there can be none
_dual_classes = {}


def _warn_not_subclassable(cause_cls, reason):
    warnings.warn(
        f"the exception class {cause_cls.__module__}.{cause_cls.__qualname__} raised by a task "
        f"cannot be combined with RayTaskError ({reason}); it is raised as a plain "
        "RayTaskError, so `except` clauses for the original class will not catch it. The "
        "original exception is in the error's .cause", RuntimeWarning, stacklevel=4)


def _dual_init(self, function_name, traceback_str, cause, pid=None):
    RayTaskError.__init__(self, function_name, traceback_str, cause, pid)
    for key, value in getattr(cause, "__dict__", {}).items():
        self.__dict__.setdefault(key, value)      # RayTaskError's own attributes stay


def _dual_reduce(self):
    return _rebuild_dual, (self.function_name, self.traceback_str, self.cause, self.pid)


def _rebuild_dual(function_name, traceback_str, cause, pid):
    return RayTaskError(function_name, traceback_str, cause, pid).as_instanceof_cause()


class FailedArgument:
    """The node manager's stand-in for "an argument of this task was an error".

    It carries that error's serialized bytes unopened (the node manager never
    unpickles errors of user code); the process that reads the task's result
    rebuilds them into a RayTaskError of this task that wraps the argument's
    error, as Ray raises for a task whose argument failed. For an actor's
    constructor argument, the result is the ActorDiedError its calls get.
    """

    def __init__(self, function_name, meta, data, actor_class=None):
        self.function_name = function_name
        self.meta = bytes(meta)
        self.data = bytes(data)
        self.actor_class = actor_class

    def __reduce__(self):
        return _rebuild_failed_argument, (self.function_name, self.meta, self.data,
                                          self.actor_class)


def _rebuild_failed_argument(function_name, meta, data, actor_class):
    from minray.serialization import deserialize
    try:
        error = deserialize(meta, data)
    except Exception as exc:              # e.g. its class cannot be imported here
        error = exc
    if isinstance(error, RayTaskError):
        cause, inner = error.cause, str(error)
    else:
        cause, inner = error, f"{type(error).__name__}: {error}"
    if actor_class is not None:
        function_name = f"{actor_class}.__init__"
    task_error = RayTaskError(function_name,
                              f"an argument of {function_name} could not be computed:\n{inner}",
                              cause)
    if actor_class is not None:
        return ActorDiedError.from_creation_error(actor_class, task_error)
    return task_error
