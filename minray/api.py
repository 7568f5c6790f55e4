"""minray's public functions: init, remote, get, put, wait and friends."""
import atexit
import inspect
import numbers
import os
import threading
import time
import uuid

from minray import ids
from minray.exceptions import RaySystemError
from minray.local_cluster import LocalCluster, find_node_socket
from minray.actor import ACTOR_OPTIONS, ActorClass, ActorHandle, check_namespace
from minray.remote_function import TASK_OPTIONS, RemoteFunction, check_count
from minray.runtime import core
from minray.runtime.object_ref import ObjectRef, serialize_with_refs
from minray.session import read_token

INIT_OPTIONS = ("address", "num_cpus", "num_gpus", "resources", "object_store_memory",
                "num_gcs_shards", "log_to_driver", "ignore_reinit_error", "redis_address",
                "num_workers", "_memory", "include_webui", "configure_logging", "namespace")


class _State:
    lock = threading.RLock()
    client = None
    cluster = None          # LocalCluster when this driver started it
    session_dir = None
    gcs = None


def is_initialized():
    """True in a driver after init(), and inside tasks (as in Ray)."""
    return _State.client is not None or core.current() is not None


def init(address=None, *, num_cpus=None, num_gpus=None, resources=None,
         object_store_memory=None, num_gcs_shards=1, log_to_driver=True,
         ignore_reinit_error=False, redis_address=None, num_workers=None, namespace=None,
         _memory=None, **unknown):
    """Start a local cluster (no address) or join a running one (address).

    ``namespace``: where this job's named actors are registered and looked
    up (default: an anonymous namespace of its own). ``redis_address`` is the
    original docs' name for ``address``; ``num_workers``, also from them, is
    how many worker processes a local cluster starts (the CPU count stays
    ``num_cpus``, or the machine's). ``_memory`` (Ray's name) sets the
    node's ``memory`` resource in bytes.
    """
    for name in unknown:
        if name not in INIT_OPTIONS:
            raise ValueError(f"init() got an unknown argument {name!r}; valid arguments are: "
                             + ", ".join(o for o in INIT_OPTIONS if o not in ("include_webui",
                                                                              "configure_logging")))
    with _State.lock:
        if _State.client is not None:
            if ignore_reinit_error:
                return _context()
            raise RuntimeError("minray.init() was already called in this process; call "
                               "minray.shutdown() first, or pass ignore_reinit_error=True")
        check_namespace(namespace)
        address = address or redis_address
        if num_workers is not None:
            check_count("num_workers", num_workers, 1, "an int >= 1 (worker processes)")
        if address is None:
            cluster = LocalCluster(num_cpus=num_cpus, num_gpus=num_gpus, resources=resources,
                                   object_store_memory=object_store_memory,
                                   num_gcs_shards=num_gcs_shards, log_to_driver=log_to_driver,
                                   memory=_memory, num_workers=num_workers)
            cluster.start()
            session_dir, socket_path = cluster.session_dir, cluster.socket_path
        else:
            given = [name for name, value in (
                ("num_cpus", num_cpus), ("num_gpus", num_gpus), ("resources", resources),
                ("object_store_memory", object_store_memory), ("_memory", _memory),
                ("num_workers", num_workers))
                if value is not None]
            if num_gcs_shards != 1:
                given.append("num_gcs_shards")
            if given:
                # As in Ray: a running cluster's resources were fixed when it started.
                raise ValueError(
                    f"init(address=...) joins a running cluster, whose resources were set "
                    f"when it started; do not pass {', '.join(given)}")
            cluster = None
            session_dir, socket_path = find_node_socket(address)
        try:
            job_id = os.urandom(ids.JOB_ID_SIZE)
            client = core.CoreClient(socket_path, read_token(session_dir), "driver",
                                     {"pid": os.getpid(), "embedded_owner": cluster is not None,
                                      "job_id": job_id, "code_paths": _code_paths(),
                                      "log_to_driver": bool(log_to_driver),
                                      # As in Ray, a job without one gets its own.
                                      "namespace": namespace or str(uuid.uuid4()),
                                      "anonymous_namespace": namespace is None},
                                     root_task_id=ids.driver_task_id(job_id))
            if not client.wait_until(lambda: client.welcome is not None, 30.0):
                raise RaySystemError("the node manager did not answer within 30 s")
            client.attach_store(client.welcome["store_name"])
        except BaseException:
            if cluster is not None:
                cluster.stop()
            raise
        core.set_current(client)
        _State.client, _State.cluster, _State.session_dir = client, cluster, session_dir
        return _context()


def _code_paths():
    """The driver script's directory and the working directory (as Ray adds)."""
    import sys
    script_dir = os.path.abspath(sys.path[0]) if sys.path and sys.path[0] else None
    return [p for p in dict.fromkeys([script_dir, os.getcwd()]) if p]


def _context():
    welcome = _State.client.welcome
    return {"session_dir": _State.session_dir, "node_id": welcome["node_id"].hex(),
            "resources": welcome["resources"], "namespace": _State.client.namespace}


def shutdown():
    """Disconnect; a cluster this driver started is stopped and cleaned up."""
    with _State.lock:
        client, cluster, gcs = _State.client, _State.cluster, _State.gcs
        _State.client = _State.cluster = _State.gcs = _State.session_dir = None
        core.set_current(None)
        if gcs is not None:
            gcs.close()
        if client is not None:
            if cluster is not None:
                try:
                    client.send(("shutdown",))
                except RaySystemError:
                    pass
            client.close()
        if cluster is not None:
            cluster.stop()


atexit.register(shutdown)


def ensure_initialized():
    """The runtime client; starts a local cluster first if needed (as Ray does)."""
    client = _State.client
    if client is None:
        if core.current() is not None:          # inside a worker
            return core.current()
        init()
        client = _State.client
    return client


def _client():
    client = core.current()
    if client is None:
        raise RuntimeError("minray is not initialized: call minray.init() first")
    return client


def _runtime_gcs_client():
    with _State.lock:
        if _State.gcs is None and _State.session_dir is not None:
            from minray.gcs import GcsClient
            from minray.gcs.supervisor import shard_map_file
            # The head starts its control store while already serving tasks.
            deadline = time.monotonic() + 30.0
            while not os.path.exists(shard_map_file(_State.session_dir)):
                if time.monotonic() > deadline:
                    raise RaySystemError("the control store did not come up within 30 s")
                time.sleep(0.005)
            _State.gcs = GcsClient.from_session(_State.session_dir)
        return _State.gcs


# ---------------------------------------------------------------- decorators

class RemoteDecoratorError(TypeError, AssertionError):
    """@minray.remote used with empty parentheses or positional arguments.

    Ray refuses these with an AssertionError; this is also a TypeError, the
    usual type for a call with wrong arguments, so either `except` catches it.
    """


def remote(*args, **options):
    """@minray.remote or @minray.remote(num_cpus=..., ...) on a function or class."""
    if len(args) == 1 and not options and callable(args[0]):
        return _make_remote(args[0], {})
    if args or not options:
        raise RemoteDecoratorError(
            "use @minray.remote either bare (no parentheses), as in '@minray.remote', or with "
            "keyword options, as in '@minray.remote(num_returns=2, num_cpus=0.5)'; "
            + ("empty parentheses are not accepted" if not args
               else "positional arguments are not accepted") + ". The options are: "
            + ", ".join(sorted(set(TASK_OPTIONS) | set(ACTOR_OPTIONS))))
    for name in options:
        if name not in TASK_OPTIONS and name not in ACTOR_OPTIONS:
            raise ValueError(f"unknown option {name!r}; valid options are: "
                             + ", ".join(sorted(set(TASK_OPTIONS) | set(ACTOR_OPTIONS))))
    return lambda target: _make_remote(target, options)


def _make_remote(target, options):
    if inspect.isclass(target):
        return ActorClass(target, options)
    if not callable(target):
        raise TypeError(f"@minray.remote needs a function or a class, got "
                        f"{type(target).__name__}")
    return RemoteFunction(target, options)


def get_actor(name, namespace=None):
    """The handle of the live actor registered under `name` in `namespace`
    (default: this job's namespace), whichever driver or task created it.

    The handle does not keep the actor alive (as in Ray): a non-detached
    actor still stops when its creator's handles are gone.
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"get_actor needs an actor name (a non-empty str), got {name!r}")
    check_namespace(namespace)
    client = _client()
    if namespace is None:
        namespace = client.namespace
    found = client.request_info(("actor", namespace, name))
    if found is None:
        raise ValueError(f"Failed to look up actor with name {name!r}: no live actor named "
                         f"{name!r} in namespace {namespace!r} (names are per namespace; "
                         "a non-detached actor stops with its creator or its last handle)")
    actor_id, class_name, methods = found
    return ActorHandle(actor_id, class_name, methods)


def cancel(object_ref, *, force=False, recursive=True):
    """Cancel the task that makes `object_ref`; its `get` raises TaskCancelledError.

    A task still queued never runs. A running task gets KeyboardInterrupt
    (force=True: its worker is killed instead; it is not retried). With
    recursive=True the tasks it submitted are cancelled too. A finished task
    is left alone. An actor call is dropped if it has not started; one that
    runs is interrupted only on an async actor, and otherwise finishes (it can
    poll get_runtime_context().is_canceled()); force=True raises ValueError.
    """
    if not isinstance(object_ref, ObjectRef):
        raise TypeError(f"cancel expects the ObjectRef of a task, got "
                        f"{type(object_ref).__name__}")
    object_id = object_ref.binary()
    if ids.is_put(object_id):
        raise ValueError("cancel needs the ObjectRef of a task; this one was made by put(), "
                         "so there is no task to cancel")
    client = _client()
    request_id = next(client.request_ids)
    client.send(("cancel", request_id, object_id, bool(force), bool(recursive)))
    problem = client._reply(request_id, 30.0)
    if problem:
        raise ValueError(problem)


def kill(actor, *, no_restart=True):
    """Stop an actor now: its calls in flight and later calls raise RayActorError.

    With no_restart=False an actor created with max_restarts is restarted.
    """
    if not isinstance(actor, ActorHandle):
        # ValueError, as Ray raises.
        raise ValueError(f"kill() stops actors only: it expects an actor handle, got "
                         f"{type(actor).__name__}")
    _client().send(("actor_kill", actor._actor_id, bool(no_restart)))


# ---------------------------------------------------------------- objects

def _check_refs(refs, what):
    for ref in refs:
        if not isinstance(ref, ObjectRef):
            raise TypeError(f"{what} expects ObjectRefs, got {type(ref).__name__}: "
                            f"{ref!r:.60}")


def _check_timeout(timeout):
    if timeout is not None and (isinstance(timeout, bool) or not isinstance(timeout, numbers.Real)
                                or timeout < 0):
        raise ValueError(f"timeout must be None or a number of seconds >= 0, got {timeout!r}")


def get(object_refs, *, timeout=None):
    """The value(s) of an ObjectRef or a list of them, waiting until ready.

    Raises GetTimeoutError after `timeout` seconds, and re-raises a task's
    exception (an instance of both RayTaskError and the original type).
    """
    _check_timeout(timeout)
    client = _client()
    if isinstance(object_refs, ObjectRef):
        return client.get([object_refs.binary()], timeout)[0]
    if not isinstance(object_refs, (list, tuple)):
        raise TypeError(f"get expects an ObjectRef or a list of ObjectRefs, got "
                        f"{type(object_refs).__name__}")
    _check_refs(object_refs, "get")
    return client.get([r.binary() for r in object_refs], timeout)


def put(value):
    """Store a value in the object store; returns its ObjectRef."""
    if isinstance(value, ObjectRef):
        raise TypeError("put() of an ObjectRef is not allowed; pass the ref itself around")
    client = ensure_initialized()
    serialized, contained = serialize_with_refs(value)
    object_id = client.next_put_id()
    client.own([object_id])
    ref = ObjectRef(object_id)
    client.put_serialized(object_id, serialized, contained)
    return ref


def wait(object_refs, *, num_returns=1, timeout=None, fetch_local=True):
    """Wait until num_returns of the refs are ready or timeout (seconds) passes.

    Returns (ready, not_ready), each in the order of the input list. The
    original docs' timeout was in milliseconds; here, as in Ray today, seconds.
    With fetch_local=False, a result stored on another node counts as ready
    without being copied here.
    """
    if isinstance(object_refs, ObjectRef) or not isinstance(object_refs, (list, tuple)):
        raise TypeError(f"wait expects a list of ObjectRefs, got {type(object_refs).__name__}")
    _check_refs(object_refs, "wait")
    _check_timeout(timeout)
    if len(set(object_refs)) != len(object_refs):
        raise ValueError("wait() got the same ObjectRef more than once; pass each ref once")
    if isinstance(num_returns, bool) or not isinstance(num_returns, int) or num_returns < 1:
        raise ValueError(f"num_returns must be an int >= 1, got {num_returns!r}")
    if not object_refs:
        return [], []                       # as Ray: waiting for nothing is allowed
    if num_returns > len(object_refs):
        raise ValueError(f"num_returns ({num_returns}) is larger than the number of refs "
                         f"({len(object_refs)})")
    client = _client()
    ready_ids = set(client.wait([r.binary() for r in object_refs], num_returns, timeout,
                                bool(fetch_local)))
    ready = [r for r in object_refs if r.binary() in ready_ids]
    not_ready = [r for r in object_refs if r.binary() not in ready_ids]
    return ready, not_ready


# ---------------------------------------------------------------- cluster info

def cluster_resources():
    return dict(_client().request_info("resources")["total"])


def available_resources():
    return {k: v for k, v in _client().request_info("resources")["available"].items() if v > 0}


def nodes():
    """The cluster's nodes, alive and dead, as Ray lists them: NodeID, Alive,
    NodeManagerAddress (its IP), NodeManagerPort, Resources (totals)."""
    listed = _client().request_info("nodes")
    if listed is not None:
        rows = []
        for node in listed:
            host, _, port = (node.get("address") or "").rpartition(":")
            rows.append({"NodeID": node["node_id"], "Alive": bool(node["alive"]),
                         "NodeManagerAddress": host or None,
                         "NodeManagerPort": int(port) if port.isdigit() else None,
                         "Resources": dict(node.get("resources") or {})})
        return rows
    # A node manager that does not list its cluster: the control store's table.
    gcs = _runtime_gcs_client()
    if gcs is None:
        raise RuntimeError("minray is not initialized: call minray.init() first")
    return [{"NodeID": key.hex(), "Alive": value.get("state") == "ALIVE",
             "NodeManagerAddress": value.get("host"), "Resources": value.get("resources")}
            for key, value in gcs.scan("nodes")]


def get_gpu_ids():
    """GPU ids assigned to the current task or actor (also in its
    CUDA_VISIBLE_DEVICES): ids of the node's CUDA_VISIBLE_DEVICES, as ints
    where they are numbers."""
    client = core.current()
    if client is None or client.role != "worker":
        return []
    from minray.runtime_context import worker
    return list(worker.gpu_ids)


def error_info():
    """Errors of failed tasks and actors, oldest first.

    The node manager writes errors to the control store in the background;
    the newest ones it still holds in memory, so an error shows up here as
    soon as the failed task's get() raised.
    """
    gcs = _runtime_gcs_client()
    if gcs is None:
        raise RuntimeError("minray is not initialized: call minray.init() first")
    recent = _client().request_info("errors") or []
    rows = {key.hex(): value for key, value in gcs.scan("errors")}
    rows.update(recent)
    return sorted(rows.values(), key=lambda r: r.get("time", 0))
