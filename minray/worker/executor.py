"""The worker loop: take dispatched tasks, run them, send back their results."""
import atexit
import inspect
import os
import sys
import threading
import time
import traceback

import cloudpickle

from minray import ids
from minray.exceptions import ActorDiedError, RayTaskError, SerializationError
from minray.object_store import write_serialized
from minray.protocol import ERROR, IN_STORE, INLINE
from minray.runtime import core
from minray.runtime.object_ref import serialize_with_refs
from minray.serialization import deserialize, serialize

RESULT_BATCH = 32                 # results sent together when tasks are short ...
RESULT_DELAY_S = 0.002            # ... but never held back longer than this


class PrefixedStream:
    """Prefixes every line a worker prints with its pid, like Ray's (pid=...)."""

    def __init__(self, stream, prefix):
        self.stream = stream
        self.prefix = prefix
        self.at_line_start = True

    def write(self, text):
        if not text:
            return 0
        lines = text.split("\n")
        out = []
        for i, line in enumerate(lines):
            if line and self.at_line_start:
                out.append(self.prefix)
            out.append(line)
            if i < len(lines) - 1:
                out.append("\n")
                self.at_line_start = True
            elif line:
                self.at_line_start = False
        self.stream.write("".join(out))
        self.stream.flush()
        return len(text)

    def flush(self):
        self.stream.flush()

    def __getattr__(self, name):
        return getattr(self.stream, name)


class Executor:
    def __init__(self, client, worker_id):
        self.client = client
        self.worker_id = worker_id
        self.instance = None              # the actor's object, if we host one
        self.methods = {}                 # name -> the instance's bound method
        self.concurrency = None           # ConcurrentCalls of a threaded/async actor
        self.functions = {}
        self.gpu_ids = []
        self.done = []
        self.unsent_values = []           # returned values whose results are not sent yet
        self.last_send = time.monotonic()

    def loop(self):
        client = self.client
        while True:
            if not client.tasks:
                self.flush()
                client.wait_until(lambda: bool(client.tasks))
            self.run(client.tasks.popleft())
            if (not client.tasks or len(self.done) >= RESULT_BATCH
                    or time.monotonic() - self.last_send > RESULT_DELAY_S):
                self.flush()

    def flush(self):
        if self.done:
            items, self.done = self.done, []
            self.client.send(("done", items))
            # Only now may the returned values (and refs inside them) go: a
            # ref dropped earlier would be released before the result that
            # contains it was recorded.
            self.unsent_values.clear()
            self.last_send = time.monotonic()

    def run(self, dispatch):
        if dispatch[0] == "actor_init":
            self.init_actor(dispatch)
        elif dispatch[1] is None and self.concurrency is not None:
            self.concurrency.submit(dispatch)        # threaded or async actor
        else:
            item, value = self.execute(dispatch)
            self.done.append(item)
            self.unsent_values.append(value)

    def execute(self, dispatch):
        """Run one task or actor call; return its ("done", ...) item and the
        returned value, which the caller keeps until the item is sent."""
        task_id, function_id, pickled, name, args, kwarg_names, num_returns, gpu_ids = dispatch
        client = self.client
        return_ids = [ids.return_object_id(task_id, i) for i in range(1, num_returns + 1)]
        if self.concurrency is None:
            client.current_task_id = task_id
            client.task_index = 0
            client.put_index = 0
        self.set_gpus(gpu_ids)
        started = time.perf_counter()
        error_text = result = None
        client.executing = True
        try:
            function = self.resolve_function(function_id, pickled, name)
            values = [self.argument(a) for a in args]
            split = len(values) - len(kwarg_names)
            result = function(*values[:split], **dict(zip(kwarg_names, values[split:])))
            results = self.encode_returns(name, return_ids, result)
        except ActorExit:
            self.exit_actor()
        except Exception as exc:
            error_text, results = self.encode_error(name, return_ids, exc)
        finally:
            client.executing = self.concurrency is not None
        return (task_id, results, time.perf_counter() - started, error_text), result

    def resolve_function(self, function_id, pickled, name):
        if function_id is None:                      # a method of our actor
            method = self.methods.get(name)
            if method is None:
                method = self.methods[name] = actor_method(self.instance, name)
            return method
        function = self.functions.get(function_id)
        if function is None:
            function = self.functions[function_id] = cloudpickle.loads(pickled)
        return function

    # ------------------------------------------------------------ actors
    def init_actor(self, message):
        (_, actor_id, class_id, pickled, class_name, args, kwarg_names, gpu_ids,
         max_concurrency, is_async) = message
        client = self.client
        client.actor_id = actor_id
        client.current_task_id = actor_id
        self.set_gpus(gpu_ids)            # CUDA_VISIBLE_DEVICES before __init__ runs
        meta = data = error_text = None
        try:
            cls = cloudpickle.loads(pickled)
            values = [self.argument(a) for a in args]
            split = len(values) - len(kwarg_names)
            self.instance = cls(*values[:split], **dict(zip(kwarg_names, values[split:])))
        except ActorExit:
            self.exit_actor()
        except Exception as exc:
            # Its calls raise ActorDiedError, carrying the constructor's error.
            error_text, results = self.encode_error(
                f"{class_name}.__init__", [b""], exc,
                wrap=lambda error: ActorDiedError.from_creation_error(class_name, error))
            meta, data = results[0][2], results[0][3]
        if meta is None and (is_async or max_concurrency > 1):
            self.concurrency = ConcurrentCalls(self, max_concurrency, is_async)
            client.concurrent = True
            client.executing = True
        client.send(("actor_ready", actor_id, meta, data, error_text))

    def exit_actor(self):
        """exit_actor() was called: report finished calls, run the atexit
        handlers (as a process that exits does), tell the node manager, go."""
        self.flush()
        # Before actor_exit: the node manager then kills this process.
        atexit._run_exitfuncs()
        self.client.send(("actor_exit",))
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)

    def set_gpus(self, gpu_ids):
        if gpu_ids != self.gpu_ids:
            self.gpu_ids = list(gpu_ids)
            os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(str(g) for g in gpu_ids)

    def argument(self, arg):
        if arg[0] == "v":
            return deserialize(arg[1], arg[2])
        pinned = self.client.store.get(arg[1])       # ("s", object_id, meta)
        return deserialize(pinned.metadata, pinned)

    def encode_returns(self, name, return_ids, result):
        if len(return_ids) == 1:
            values = [result]
        elif len(return_ids) == 0:
            return []
        else:
            if not isinstance(result, (tuple, list)) or len(result) != len(return_ids):
                raise ValueError(
                    f"task {name} declares num_returns={len(return_ids)} but returned "
                    f"{type(result).__name__}"
                    + (f" of length {len(result)}" if hasattr(result, "__len__") else ""))
            values = list(result)
        results = []       # minray.protocol.ResultObject fields, as plain tuples
        for object_id, value in zip(return_ids, values):
            serialized, contained = serialize_with_refs(value)
            if serialized.total_size <= core.INLINE_MAX_BYTES:
                results.append((object_id, INLINE, serialized.metadata, serialized.to_bytes(),
                                contained))
            else:
                write_serialized(self.client.store, object_id, serialized)
                results.append((object_id, IN_STORE, serialized.metadata,
                                serialized.total_size, contained))
        return results

    def encode_error(self, name, return_ids, exc, wrap=None):
        """The error results of a failed call: a RayTaskError around `exc`
        (passed through `wrap` if given)."""
        text = remote_traceback(exc)
        wrap = wrap or (lambda error: error)
        error = wrap(RayTaskError(name, text, exc, os.getpid()))
        try:
            serialized = serialize(error)
        except SerializationError:
            # The exception itself cannot travel: send its text instead.
            error = wrap(RayTaskError(name, text, RuntimeError(repr(exc)), os.getpid()))
            serialized = serialize(error)
        payload = serialized.to_bytes()
        summary = f"task {name} failed (pid={os.getpid()}):\n{text.rstrip()}"
        return summary, [(object_id, ERROR, serialized.metadata, payload, [])
                         for object_id in return_ids]


def remote_traceback(exc):
    """The traceback of a task's exception from the user's code on: the
    executor's own frame (which called the function) is left out."""
    tb = exc.__traceback__
    if tb is not None and tb.tb_frame.f_code.co_filename == __file__:
        tb = tb.tb_next
    return "".join(traceback.format_exception(type(exc), exc, tb))


class ActorExit(BaseException):
    """Raised by minray.actor.exit_actor() to end the actor's process."""


def _terminate():
    raise ActorExit()


def actor_method(instance, name):
    """What a call of method `name` runs: the method as the class defines it,
    bound to the instance (an instance attribute of the same name does not
    hide it, as in Ray), or one of the built-ins every actor has."""
    if name == "__ray_ready__":
        return lambda: True
    if name == "__ray_call__":
        return lambda fn, *args, **kwargs: fn(instance, *args, **kwargs)
    if name == "__ray_terminate__":
        return _terminate
    cls = type(instance)
    try:
        raw = inspect.getattr_static(cls, name)
    except AttributeError:
        return getattr(instance, name)      # e.g. made by a __getattr__
    binder = getattr(type(raw), "__get__", None)
    return raw if binder is None else binder(raw, instance, cls)


class ConcurrentCalls:
    """Runs an actor's calls at once: in threads, or as coroutines on a loop.

    Each finished call reports its result on its own; the order of results
    follows completion, not submission (as in Ray's threaded/async actors).
    """

    def __init__(self, executor, max_concurrency, is_async):
        self.executor = executor
        self.is_async = is_async
        if is_async:
            import asyncio
            self.loop = asyncio.new_event_loop()
            self.limit = asyncio.Semaphore(max_concurrency)
            threading.Thread(target=self.loop.run_forever, daemon=True,
                             name="minray-actor-loop").start()
        else:
            from concurrent.futures import ThreadPoolExecutor
            self.pool = ThreadPoolExecutor(max_concurrency, thread_name_prefix="minray-actor")

    def submit(self, dispatch):
        if self.is_async:
            import asyncio
            asyncio.run_coroutine_threadsafe(self._run_async(dispatch), self.loop)
        else:
            self.pool.submit(self._run_threaded, dispatch)

    def _run_threaded(self, dispatch):
        item, value = self.executor.execute(dispatch)
        self.executor.client.send(("done", [item]))
        del value                       # after the send: see Executor.flush

    async def _run_async(self, dispatch):
        async with self.limit:
            item, value = await self._execute_async(dispatch)
            self.executor.client.send(("done", [item]))
            del value                   # after the send: see Executor.flush

    async def _execute_async(self, dispatch):
        # Run the method on the loop; if it is a coroutine, await it here so
        # other calls interleave at its awaits.
        task_id, function_id, pickled, name, args, kwarg_names, num_returns, gpu_ids = dispatch
        executor = self.executor
        return_ids = [ids.return_object_id(task_id, i) for i in range(1, num_returns + 1)]
        started = time.perf_counter()
        error_text = result = None
        try:
            function = executor.resolve_function(function_id, pickled, name)
            values = [executor.argument(a) for a in args]
            split = len(values) - len(kwarg_names)
            result = function(*values[:split], **dict(zip(kwarg_names, values[split:])))
            if inspect.iscoroutine(result):
                result = await result
            results = executor.encode_returns(name, return_ids, result)
        except ActorExit:
            executor.exit_actor()
        except Exception as exc:
            error_text, results = executor.encode_error(name, return_ids, exc)
        return (task_id, results, time.perf_counter() - started, error_text), result


def run_worker(socket_path, session_dir, store_name, node_id, worker_id):
    from minray.session import read_token
    sys.stdout = PrefixedStream(sys.stdout, f"(pid={os.getpid()}) ")
    sys.stderr = PrefixedStream(sys.stderr, f"(pid={os.getpid()}) ")
    try:
        client = core.CoreClient(socket_path, read_token(session_dir), "worker",
                                 {"worker_id": worker_id, "pid": os.getpid()},
                                 root_task_id=bytes(16))
    except (ConnectionRefusedError, FileNotFoundError):
        return      # started as the node manager shut down: its socket or session is gone
    client.attach_store(store_name)
    core.set_current(client)
    try:
        Executor(client, worker_id).loop()
    except Exception:
        if client.closed:
            return              # the node manager is gone: so are we
        raise
