"""@minray.remote on a class: actors, their handles and method calls.

Creating an actor sends its class and constructor arguments to the node
manager, which dedicates a worker to it; `Cls.remote()` returns a handle at
once. Method calls go to the node manager, which forwards each caller's calls
to the actor's worker in the order they were sent. Handles can be passed to
tasks and other actors; every copy calls the same actor.
"""
import hashlib
import inspect

from minray.serialization.code import dumps_code

from minray.exceptions import SerializationError
from minray.remote_function import (
    _bad_option, encode_args, returns_of, validate_resources,
)
from minray.runtime import core

ACTOR_OPTIONS = {
    "num_cpus": "CPUs the actor holds while it lives (default 0, as in Ray; with no "
                "resource option at all it needs 1 CPU while its constructor runs)",
    "num_gpus": "GPUs the actor holds; their ids are in minray.get_gpu_ids() inside it",
    "resources": "custom resources the actor holds",
    "memory": "bytes of the node's memory resource the actor holds while it lives",
    "max_restarts": "times the actor is restarted (constructor re-run) if its process dies",
    "max_concurrency": "calls run at once (threads; async actors default to 1000)",
    "name": "register the actor under this name for minray.get_actor",
    "lifetime": "None (dies with its creator) or 'detached' (outlives it)",
    "namespace": "accepted for compatibility; one namespace per cluster",
}
METHOD_OPTIONS = {"num_returns": "how many ObjectRefs the call returns"}
DEFAULT_ASYNC_CONCURRENCY = 1000


def exit_actor():
    """Called inside an actor method: end this actor (its process exits).

    Calls still queued, and later ones, raise RayActorError.
    """
    from minray.worker.executor import ActorExit
    client = core.current()
    if client is None or client.actor_id is None:
        raise TypeError("exit_actor() can only be called inside an actor method")
    raise ActorExit()


def method(*args, num_returns=1):
    """Decorator for actor methods: @minray.method(num_returns=2)."""
    if args:
        raise TypeError("@minray.method takes only keyword options, e.g. num_returns=2")
    if isinstance(num_returns, bool) or not isinstance(num_returns, int) or num_returns < 0:
        raise ValueError(f"num_returns must be an int >= 0, got {num_returns!r}")

    def mark(function):
        function.__minray_num_returns__ = num_returns
        return function
    return mark


def validate_actor_options(options):
    for name in options:
        if name not in ACTOR_OPTIONS:
            raise _bad_option(name, ACTOR_OPTIONS)
    for name in ("max_restarts",):
        value = options.get(name, 0)
        if isinstance(value, bool) or not isinstance(value, int) or value < -1:
            raise ValueError(f"{name} must be an int >= 0 (or -1 for unlimited), got {value!r}")
    concurrency = options.get("max_concurrency")
    if concurrency is not None and (isinstance(concurrency, bool)
                                    or not isinstance(concurrency, int) or concurrency < 1):
        raise ValueError(f"max_concurrency must be an int >= 1, got {concurrency!r}")
    name = options.get("name")
    if name is not None and (not isinstance(name, str) or not name):
        raise ValueError(f"name must be a non-empty str, got {name!r}")
    lifetime = options.get("lifetime")
    if lifetime not in (None, "detached", "non_detached"):
        raise ValueError(f"lifetime must be None or 'detached', got {lifetime!r}")
    resources = dict(options)
    resources.setdefault("num_cpus", 0)
    validate_resources(resources)
    return options


class ActorClass:
    def __init__(self, cls, options):
        self._cls = cls
        self._options = validate_actor_options(dict(options))
        self._name = cls.__qualname__
        self._methods = {}
        self._is_async = False
        for name, member in inspect.getmembers(cls, callable):
            if name.startswith("__") and name != "__call__":
                continue
            self._methods[name] = getattr(member, "__minray_num_returns__", 1)
            if inspect.iscoroutinefunction(member):
                self._is_async = True
        self._pickled = None
        self._class_id = None
        self.__name__ = cls.__name__
        self.__doc__ = cls.__doc__

    def __call__(self, *args, **kwargs):
        raise TypeError(f"actor class {self._name} cannot be instantiated directly; "
                        f"use {self.__name__}.remote(...)")

    def options(self, **options):
        merged = dict(self._options)
        merged.update(validate_actor_options(options))
        return _BoundActorOptions(self, merged)

    def remote(self, *args, **kwargs):
        return self._create(args, kwargs, self._options)

    def _create(self, args, kwargs, options):
        from minray import api
        client = api.ensure_initialized()
        if self._pickled is None:
            try:
                self._pickled = dumps_code(self._cls)
            except Exception as exc:
                raise SerializationError(
                    f"actor class {self._name} cannot be pickled: {exc}") from None
            self._class_id = hashlib.blake2b(self._pickled, digest_size=16).digest()
        client.export_function(self._class_id, self._pickled, self._name)
        entries, kwarg_names, contained, keep_alive = encode_args(
            client, self._name, args, kwargs)
        actor_id = client.next_task_id()
        resources = dict(options)
        resources.setdefault("num_cpus", 0)
        # As in Ray: an actor given no resource option holds no CPU while it
        # lives, but is placed only where a CPU is free, and holds that CPU
        # while its constructor runs (so constructors never outnumber CPUs).
        default_shape = (options.get("num_cpus") is None and options.get("num_gpus") is None
                         and not options.get("resources"))
        concurrency = options.get("max_concurrency") or (
            DEFAULT_ASYNC_CONCURRENCY if self._is_async else 1)
        spec = {
            "actor_id": actor_id, "class_id": self._class_id, "class_name": self._name,
            "args": entries, "kwarg_names": kwarg_names, "contained": contained,
            "resources": validate_resources(resources),
            "placement": {"CPU": 1.0} if default_shape else {},
            "max_restarts": options.get("max_restarts", 0),
            "max_concurrency": concurrency, "is_async": self._is_async,
            "name": options.get("name"), "detached": options.get("lifetime") == "detached",
            "methods": self._methods,
        }
        client.create_actor(spec)     # raises at once if the name is taken
        del keep_alive
        return ActorHandle(actor_id, self._name, self._methods, owned=True)


class _BoundActorOptions:
    def __init__(self, actor_class, options):
        self._actor_class = actor_class
        self._options = options

    def remote(self, *args, **kwargs):
        return self._actor_class._create(args, kwargs, self._options)


class ActorHandle:
    """A reference to a live actor; pass it anywhere, call its methods."""

    def __init__(self, actor_id, class_name, methods, owned=False):
        self._actor_id = actor_id
        self._class_name = class_name
        self._methods = methods
        self._client = core.current()
        self._owned = owned and self._client is not None
        if self._owned:
            self._client.add_actor_handle(actor_id)

    def __getattr__(self, name):
        methods = self.__dict__.get("_methods", {})
        if name in methods:
            return ActorMethod(self, name, methods[name])
        raise AttributeError(
            f"actor {self.__dict__.get('_class_name', '?')} has no method {name!r}; "
            f"its methods are: {', '.join(sorted(methods)) or '(none)'}")

    def __reduce__(self):
        # A copy elsewhere keeps the actor alive as long as its owner lives.
        if self._client is not None:
            self._client.escape_actor(self._actor_id)
        return ActorHandle, (self._actor_id, self._class_name, self._methods)

    def __del__(self):
        client = self.__dict__.get("_client")
        if self.__dict__.get("_owned") and client is not None and not client.closed:
            client.drop_actor_handle(self._actor_id)

    def __repr__(self):
        return f"Actor({self._class_name}, {self._actor_id.hex()})"

    def __eq__(self, other):
        return isinstance(other, ActorHandle) and other._actor_id == self._actor_id

    def __hash__(self):
        return hash(self._actor_id)


class ActorMethod:
    def __init__(self, handle, name, num_returns):
        self._handle = handle
        self._name = name
        self._num_returns = num_returns

    def __call__(self, *args, **kwargs):
        raise TypeError(f"actor method {self._name} cannot be called directly; "
                        f"use .{self._name}.remote(...)")

    def options(self, **options):
        for name in options:
            if name not in METHOD_OPTIONS:
                raise _bad_option(name, METHOD_OPTIONS)
        num_returns = options.get("num_returns", self._num_returns)
        if isinstance(num_returns, bool) or not isinstance(num_returns, int) or num_returns < 0:
            raise ValueError(f"num_returns must be an int >= 0, got {num_returns!r}")
        return ActorMethod(self._handle, self._name, num_returns)

    def remote(self, *args, **kwargs):
        from minray import api
        client = api.ensure_initialized()
        entries, kwarg_names, contained, keep_alive = encode_args(
            client, self._name, args, kwargs)
        task_id = client.next_task_id()
        return_ids = [task_id + i.to_bytes(4, "big") for i in range(1, self._num_returns + 1)]
        client.own(return_ids)
        refs = returns_of(return_ids)
        # The fields of minray.protocol.ActorCallSpec, as a plain tuple.
        client.call_actor((task_id, self._handle._actor_id, self._name, entries, kwarg_names,
                           self._num_returns, contained))
        del keep_alive
        return refs
