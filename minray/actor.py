"""@minray.remote on a class: actors, their handles and method calls.

Creating an actor sends its class and constructor arguments to the node
manager, which dedicates a worker to it; `Cls.remote()` returns a handle at
once. Method calls go to the node manager, which forwards each caller's calls
to the actor's worker in the order they were sent. Handles can be passed to
tasks and other actors; every copy calls the same actor.

Handles are counted like ObjectRefs, on the object id that stands for the
actor (minray.ids.actor_handle_id): the creator owns it, a copy rebuilt in
another process borrows it, and a value or task that carries a handle holds
it, so a non-detached actor stops once none of these is left. A handle got
by name (get_actor) is not counted, as in Ray.
"""
import hashlib
import inspect
import warnings

from minray.serialization.code import dumps_code

from minray import ids
from minray.exceptions import SerializationError
from minray.remote_function import (
    _bad_option, check_code_size, check_count, check_num_returns, check_option_type,
    encode_args, returns_of, validate_resources,
)
from minray.runtime import core
from minray.runtime.object_ref import note_pickled
from minray.signatures import CallSignature

ACTOR_OPTIONS = {
    "num_cpus": "CPUs the actor holds while it lives (default 0, as in Ray; with no "
                "resource option at all it needs 1 CPU while its constructor runs)",
    "num_gpus": "GPUs the actor holds; their ids are in minray.get_gpu_ids() inside it",
    "resources": "custom resources the actor holds",
    "memory": "bytes of the node's memory resource the actor holds while it lives",
    "max_restarts": "times the actor is restarted (constructor re-run) if its process dies",
    "max_task_retries": "times a call that was running or queued when the actor died is "
                        "sent again to its restarted instance (-1: unlimited)",
    "max_concurrency": "calls run at once (threads; async actors default to 1000)",
    "name": "register the actor under this name for minray.get_actor",
    "namespace": "the namespace its name is registered in (default: the job's)",
    "get_if_exists": "with name: return the actor that has the name if there is one",
    "lifetime": "None (stops with its creator or its last handle) or 'detached' "
                "(lives until killed)",
}
METHOD_OPTIONS = {"num_returns": "how many ObjectRefs the call returns",
                  "num_return_vals": "the original docs' name for num_returns"}
DEFAULT_ASYNC_CONCURRENCY = 1000
# Methods every actor has, as in Ray (the worker implements them):
# name -> (num_returns, parameters in minray.signatures' compact form).
BUILTIN_METHODS = {
    "__ray_ready__": (1, ()),                    # True once the actor is up
    "__ray_call__": (1, (("fn", int(inspect.Parameter.POSITIONAL_ONLY), False),
                         ("args", int(inspect.Parameter.VAR_POSITIONAL), False),
                         ("kwargs", int(inspect.Parameter.VAR_KEYWORD), False))),
    "__ray_terminate__": (1, ()),                # a graceful stop, as exit_actor()
}
# Dunder names the decorated class answers from the original class.
_CLASS_DUNDERS = frozenset(("__mro__", "__bases__", "__annotations__"))


class ActorClassInheritanceException(TypeError):
    """A class statement tried to subclass an actor class (the decorated one)."""


def exit_actor():
    """Called inside an actor method: end this actor (its process exits).

    Finished calls are reported and atexit handlers run first; calls still
    queued, and later ones, raise RayActorError.
    """
    from minray.worker.executor import ActorExit
    client = core.current()
    if client is None or client.actor_id is None:
        raise TypeError("exit_actor() can only be called inside an actor method")
    raise ActorExit()


def method(*args, num_returns=None, num_return_vals=None):
    """Decorator for actor methods: @minray.method(num_returns=2).

    num_return_vals is the original docs' name for num_returns.
    """
    if args:
        raise TypeError("@minray.method takes only keyword options, e.g. num_returns=2")
    if num_returns is not None and num_return_vals is not None:
        raise TypeError("pass num_returns or num_return_vals (its old name), not both")
    if num_return_vals is not None:
        check_num_returns(num_return_vals, "num_return_vals")
        num_returns = num_return_vals
    elif num_returns is None:
        num_returns = 1
    check_num_returns(num_returns)

    def mark(function):
        function.__minray_num_returns__ = num_returns
        return function
    return mark


def validate_actor_options(options):
    for name in options:
        if name not in ACTOR_OPTIONS:
            raise _bad_option(name, ACTOR_OPTIONS)
    for count in ("max_restarts", "max_task_retries"):
        if count in options:
            check_count(count, options[count], -1, "an int >= 0 (or -1 for unlimited)")
    if options.get("max_concurrency") is not None:
        check_count("max_concurrency", options["max_concurrency"], 1, "an int >= 1")
    name = options.get("name")
    if name is not None:
        check_option_type("name", name, str, "a non-empty str")
        if not name:
            raise ValueError("name must be a non-empty str, got ''")
    lifetime = options.get("lifetime")
    if lifetime is not None:
        check_option_type("lifetime", lifetime, str, "None or 'detached'")
        if lifetime not in ("detached", "non_detached"):
            raise ValueError(f"lifetime must be None or 'detached', got {lifetime!r}")
    check_namespace(options.get("namespace"))
    if not isinstance(options.get("get_if_exists", False), bool):
        raise TypeError(f"get_if_exists must be True or False, got "
                        f"{options['get_if_exists']!r}")
    resources = dict(options)
    resources.setdefault("num_cpus", 0)
    validate_resources(resources)
    return options


def check_namespace(namespace):
    """None (the job's namespace) or a non-empty str."""
    if namespace is None:
        return
    if not isinstance(namespace, str):
        raise TypeError(f"namespace must be None or a str, got {type(namespace).__name__}: "
                        f"{namespace!r:.60}")
    if not namespace:
        raise ValueError("namespace must not be empty; pass None for the job's namespace")


def _method_signature(cls, name):
    """The CallSignature of a method as a handle calls it (no self or cls)."""
    try:
        raw = inspect.getattr_static(cls, name)
    except AttributeError:
        return None
    if isinstance(raw, staticmethod):
        return CallSignature.of(raw.__func__)
    if isinstance(raw, classmethod):
        return CallSignature.of(raw.__func__, drop_first=True)
    if inspect.isfunction(raw):
        return CallSignature.of(raw, drop_first=True)
    return None                              # another kind of callable: unchecked


def _constructor_signature(cls):
    if cls.__init__ is object.__init__ and cls.__new__ is object.__new__:
        return CallSignature.from_params(())     # takes no arguments
    return CallSignature.of(cls)


def _describe_class(cls):
    """(methods, constructor parameters, is_async) of a class, read once.

    methods maps each method's name to (num_returns, parameters), the
    parameters in minray.signatures' compact form (None: calls unchecked).
    """
    methods = {}
    is_async = False
    for name, member in inspect.getmembers(cls, callable):
        if name.startswith("__") and name != "__call__":
            continue
        signature = _method_signature(cls, name)
        methods[name] = (getattr(member, "__minray_num_returns__", 1),
                         None if signature is None or signature.free else signature.params)
        if inspect.iscoroutinefunction(member):
            is_async = True
    constructor = _constructor_signature(cls)
    init_params = None if constructor is None or constructor.free else constructor.params
    return methods, init_params, is_async


class ActorClass:
    """A class decorated with @minray.remote.

    `.remote(...)` starts an actor. Everything else behaves like the original
    class, which is `.__ray_actor_class__`: its class and static attributes,
    class methods and `__mro__` are reached through the decorated class, and
    dir() lists them. Subclass the original class, not this object.
    """

    def __init__(self, cls, options, _description=None):
        self.__ray_actor_class__ = cls
        self._cls = cls
        self._options = validate_actor_options(dict(options))
        self._name = cls.__qualname__
        self._methods, init_params, self._is_async = _description or _describe_class(cls)
        self._init_signature = CallSignature.from_params(init_params)
        self._pickled = None
        self._class_id = None
        self.__name__ = cls.__name__
        self.__qualname__ = cls.__qualname__
        self.__module__ = cls.__module__
        self.__doc__ = cls.__doc__

    def __getattr__(self, name):
        # Only called for what the actor class itself does not have.
        cls = self.__dict__.get("_cls")
        if cls is None or (name.startswith("__") and name.endswith("__")
                           and name not in _CLASS_DUNDERS):
            raise AttributeError(f"actor class has no attribute {name!r}")
        return getattr(cls, name)

    def __dir__(self):
        return sorted(set(object.__dir__(self)) | set(dir(self._cls)))

    def __mro_entries__(self, bases):
        # `class Derived(ActorClassObject)`: Python asks the base what to use.
        raise ActorClassInheritanceException(
            f"cannot subclass actor class {self._name}: Inheriting from actor classes is "
            f"not currently supported. Subclass the original class instead "
            f"({self.__name__}.__ray_actor_class__, or the class before @minray.remote) "
            "and decorate the subclass with @minray.remote")

    def __reduce__(self):
        # Methods of the class may name the decorated class (a global): it
        # travels as the class and what was read from it, not re-read while
        # the class is still being unpickled.
        init_params = None if self._init_signature is None else self._init_signature.params
        return ActorClass, (self._cls, self._options,
                            (self._methods, init_params, self._is_async))

    def __repr__(self):
        return f"ActorClass({self._name})"

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
        if self._init_signature is not None:
            self._init_signature.check(args, kwargs, f"{self.__name__}.remote()")
        client = api.ensure_initialized()
        if self._pickled is None:
            try:
                pickled = dumps_code(self._cls)
            except Exception as exc:
                raise SerializationError(
                    f"actor class {self._name} cannot be pickled: {exc}") from None
            check_code_size(pickled, "actor class", self._name, stacklevel=4)
            self._pickled = pickled
            self._class_id = hashlib.blake2b(pickled, digest_size=16).digest()
        name = options.get("name")
        get_if_exists = options.get("get_if_exists", False)
        if get_if_exists and name is None:
            raise ValueError("get_if_exists=True needs a name: pass "
                             ".options(name=..., get_if_exists=True)")
        namespace = options.get("namespace")
        if namespace is None and name is not None:      # (a worker asks once per job)
            namespace, anonymous = client.namespace_info()
            if anonymous and options.get("lifetime") == "detached":
                warnings.warn(
                    f"the detached actor {name!r} is registered in this job's anonymous "
                    f"namespace {namespace!r}: later jobs reach it only with "
                    f"init(namespace={namespace!r}) or get_actor({name!r}, "
                    f"namespace={namespace!r}); pass init(namespace=...) or "
                    f".options(namespace=...) to choose one", stacklevel=3)
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
            "max_task_retries": options.get("max_task_retries", 0),
            "max_concurrency": concurrency, "is_async": self._is_async,
            "name": name, "namespace": namespace, "get_if_exists": get_if_exists,
            "detached": options.get("lifetime") == "detached",
            "methods": self._methods,
        }
        # Raises at once if the name is taken (or returns the actor that has
        # it, with get_if_exists).
        existing = client.create_actor(spec)
        del keep_alive
        if existing is not None:
            return ActorHandle(*existing)         # found by name: not counted
        return ActorHandle(actor_id, self._name, self._methods, owned=True)


class _BoundActorOptions:
    def __init__(self, actor_class, options):
        self._actor_class = actor_class
        self._options = options

    def remote(self, *args, **kwargs):
        return self._actor_class._create(args, kwargs, self._options)


class ActorHandle:
    """A reference to a live actor; pass it anywhere, call its methods.

    A counted handle (the creator's, or a copy of one) keeps a non-detached
    actor alive; one found by name is not counted (nor are its copies)."""

    def __init__(self, actor_id, class_name, methods, *, owned=False, counted=False):
        self._actor_id = actor_id
        self._class_name = class_name
        self._methods = methods
        self._signatures = {}             # method name -> CallSignature, on first call
        self._client = core.current()
        self._counts = owned or counted          # copies of it count too
        self._holding = self._counts and self._client is not None
        if self._holding:
            handles_id = ids.actor_handle_id(actor_id)
            if owned:
                self._client.own([handles_id])
            self._client.add_ref(handles_id)

    def __getattr__(self, name):
        # Methods are looked up here, after the handle's own attributes.
        methods = self.__dict__.get("_methods")
        if methods is None:
            raise AttributeError(name)
        info = methods.get(name)
        if info is None:
            info = BUILTIN_METHODS.get(name)
        if info is None:
            raise AttributeError(
                f"actor {self.__dict__.get('_class_name', '?')} has no method {name!r}; "
                f"its methods are: {', '.join(sorted(methods)) or '(none)'}")
        signatures = self._signatures
        try:
            signature = signatures[name]
        except KeyError:
            signature = signatures[name] = CallSignature.from_params(info[1])
        return ActorMethod(self, name, info[0], signature)

    def __dir__(self):
        return sorted(set(self._methods) | set(BUILTIN_METHODS))

    def __reduce__(self):
        if self._counts:
            note_pickled(ids.actor_handle_id(self._actor_id), self._client)
        return _rebuild_handle, (self._actor_id, self._class_name, self._methods, self._counts)

    def __del__(self):
        client = self.__dict__.get("_client")
        if self.__dict__.get("_holding") and not client.closed:
            client.remove_ref(ids.actor_handle_id(self._actor_id))

    def __repr__(self):
        return f"Actor({self._class_name}, {self._actor_id.hex()})"

    def __eq__(self, other):
        return isinstance(other, ActorHandle) and other._actor_id == self._actor_id

    def __hash__(self):
        return hash(self._actor_id)


def _rebuild_handle(actor_id, class_name, methods, counted):
    # A copy of a counted handle borrows the actor for this process.
    return ActorHandle(actor_id, class_name, methods, counted=counted)


class ActorMethod:
    def __init__(self, handle, name, num_returns, signature):
        self._handle = handle
        self._name = name
        self._num_returns = num_returns
        self._signature = None if signature is None or signature.free else signature

    def __call__(self, *args, **kwargs):
        raise TypeError(f"actor method {self._name} cannot be called directly; "
                        f"use .{self._name}.remote(...)")

    def options(self, **options):
        for name in options:
            if name not in METHOD_OPTIONS:
                raise _bad_option(name, METHOD_OPTIONS)
        if "num_returns" in options and "num_return_vals" in options:
            raise TypeError("pass num_returns or num_return_vals (its old name), not both")
        num_returns = options.get("num_returns", options.get("num_return_vals",
                                                             self._num_returns))
        check_num_returns(num_returns)
        return ActorMethod(self._handle, self._name, num_returns, self._signature)

    def remote(self, *args, **kwargs):
        from minray import api
        if self._signature is not None:
            self._signature.check(args, kwargs, (self._handle._class_name, self._name))
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
