"""The worker loop: take dispatched tasks, run them, send back their results."""
import atexit
import collections
import inspect
import os
import signal
import sys
import threading
import time
import traceback

import cloudpickle

from minray import ids, runtime_context
from minray.exceptions import (
    ActorDiedError, ObjectNotFoundError, RaySystemError, RayTaskError, SerializationError,
    TaskCancelledError,
)
from minray.protocol import ERROR, IN_STORE, INLINE
from minray.runtime import core
from minray.runtime.object_ref import serialize_with_refs
from minray.runtime_context import current_task
from minray.worker.output import forward_output
from minray.serialization import deserialize, serialize

RESULT_BATCH = 32                 # results sent together when tasks are short ...
RESULT_DELAY_S = 0.002            # ... and at most this long between tasks;
RESULT_TIMER_S = 0.02             # while the next task runs (it may run long), a
                                  # timer thread sends them after this. (Each of its
                                  # turns takes the GIL from the task: at 2 ms, a
                                  # worker made 1,391 futex calls in a burst of
                                  # 20,000 no-op tasks, at 20 ms 289.)
RESIGNAL_S = 0.05                 # a cancelled task in minray's code is signalled again after
CANCELLED_REMEMBERED = 10_000     # ids of cancelled tasks kept (some finished already)
MINRAY_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__))) + os.sep


class Executor:
    def __init__(self, client, worker_id, output=None, output_streams=()):
        self.client = client
        self.worker_id = worker_id
        self.output = output              # OutputForwarder: labels what tasks print
        self.output_streams = output_streams
        self.instance = None              # the actor's object, if we host one
        self.methods = {}                 # name -> the instance's bound method
        self.concurrency = None           # ConcurrentCalls of a threaded/async actor
        self.functions = {}
        self.code = {}                    # pickles of dropped dispatches (see Cancellation)
        self.gpu_ids = None               # None: CUDA_VISIBLE_DEVICES not set by us yet
        self.done = []                    # finished, not sent yet (under results_lock)
        self.unsent_values = []           # returned values whose results are not sent yet
        self.results_lock = threading.Lock()
        self.last_send = time.monotonic()
        # Set when a task starts while results wait to be sent: the timer
        # thread sends them after RESULT_TIMER_S unless the loop did first.
        self.results_waiting = threading.Event()
        threading.Thread(target=self._send_waiting_results, daemon=True,
                         name="minray-results").start()
        self.cancel = Cancellation(self)
        runtime_context.worker.is_cancelled = self.cancel.is_requested

    def loop(self):
        client = self.client
        while True:
            if not client.tasks:
                self.flush()
                client.wait_until(lambda: bool(client.tasks))
            elif self.done and not self.results_waiting.is_set():
                # The next task may run long (or block): its predecessors'
                # results must not wait for it.
                self.results_waiting.set()
            self.run(client.tasks.popleft())
            if (not client.tasks or len(self.done) >= RESULT_BATCH
                    or time.monotonic() - self.last_send > RESULT_DELAY_S):
                self.flush()

    def _send_waiting_results(self):
        while True:
            self.results_waiting.wait()
            time.sleep(RESULT_TIMER_S)
            # Cleared before flushing: a result added after the flush has
            # taken the list sets the event again (see loop).
            self.results_waiting.clear()
            try:
                self.flush()
            except Exception:           # the node manager is gone: the loop sees it too
                return

    def flush(self):
        # Sent under the lock, so no thread can report a later message (an
        # actor's exit) before results another thread has taken.
        with self.results_lock:
            if not self.done:
                return
            items, self.done = self.done, []
            values, self.unsent_values = self.unsent_values, []
            self.client.send(("done", items))
            self.last_send = time.monotonic()
        # Only now may the returned values (and refs inside them) go: a ref
        # dropped earlier would be released before the result that contains
        # it was recorded.
        del values

    def run(self, dispatch):
        if dispatch[0] == "actor_init":
            self.init_actor(dispatch)
        elif dispatch[1] is None and self.concurrency is not None:
            self.concurrency.submit(dispatch)        # threaded or async actor
        else:
            item, value = self.execute(dispatch)
            with self.results_lock:
                self.done.append(item)
                self.unsent_values.append(value)

    def execute(self, dispatch):
        """Run one task or actor call; return its ("done", ...) item and the
        returned value, which the caller keeps until the item is sent."""
        task_id, function_id, pickled, name, args, kwarg_names, num_returns, gpu_ids = dispatch
        client = self.client
        return_ids = [ids.return_object_id(task_id, i) for i in range(1, num_returns + 1)]
        cancel = self.cancel
        if not cancel.begin(task_id, interruptible=function_id is not None):
            self.remember_code(function_id, pickled)
            return self.cancelled_item(dispatch), None
        if self.concurrency is None:
            client.start_task(task_id)
        token = current_task.set(task_id)
        if function_id is not None and self.output is not None:
            self.output.label = name.rpartition(".")[2]   # (an actor's: its class)
        self.set_gpus(gpu_ids)
        started = time.perf_counter()
        error_text = result = None
        client.executing = True
        try:
            try:
                function = self.resolve_function(function_id, pickled, name)
                values = [self.argument(a) for a in args]
                split = len(values) - len(kwarg_names)
                result = function(*values[:split], **dict(zip(kwarg_names, values[split:])))
            finally:
                cancel.end(task_id)        # no interrupt for this task from here on
            results = self.encode_returns(name, return_ids, result)
        except KeyboardInterrupt:
            cancel.end(task_id)
            if not cancel.is_requested(task_id):
                raise                      # not minray.cancel's: as in any Python program
            results = None
        except ActorExit:
            self.exit_actor()
        except Exception as exc:
            error_text, results = self.encode_error(name, return_ids, exc)
        finally:
            client.executing = self.concurrency is not None
            self.end_output()
            current_task.reset(token)
        if cancel.take(task_id):
            # Cancelled while it ran: its result is TaskCancelledError, as in
            # Ray, whether it was interrupted or (an actor call) ran to the end.
            return self.cancelled_item(dispatch, time.perf_counter() - started), None
        return (task_id, results, time.perf_counter() - started, error_text), result

    def end_output(self):
        """A task's unfinished last line goes out with the rest of its output."""
        for stream in self.output_streams:
            if stream.partial:
                stream.flush()

    def cancelled_item(self, dispatch, seconds=0.0):
        """The ("done", ...) item of a cancelled task: every return an error."""
        task_id, name, num_returns = dispatch[0], dispatch[3], dispatch[6]
        error = TaskCancelledError(task_id.hex(), f"task {name} was cancelled with minray.cancel")
        serialized = serialize(error)
        payload = serialized.to_bytes()
        return (task_id, [(ids.return_object_id(task_id, i), ERROR, serialized.metadata,
                           payload, []) for i in range(1, num_returns + 1)], seconds, None)

    def remember_code(self, function_id, pickled):
        """Keep the code a dropped dispatch carried: later dispatches of the
        function come without it."""
        if pickled is not None and function_id not in self.functions:
            self.code[function_id] = pickled

    def resolve_function(self, function_id, pickled, name):
        if function_id is None:                      # a method of our actor
            method = self.methods.get(name)
            if method is None:
                method = self.methods[name] = actor_method(self.instance, name)
            return method
        function = self.functions.get(function_id)
        if function is None:
            if pickled is None:
                pickled = self.code.pop(function_id)
            function = self.functions[function_id] = cloudpickle.loads(pickled)
        return function

    # ------------------------------------------------------------ actors
    def init_actor(self, message):
        (_, actor_id, class_id, pickled, class_name, args, kwarg_names, gpu_ids,
         max_concurrency, is_async) = message
        client = self.client
        client.actor_id = actor_id
        client.start_task(actor_id)
        current_task.set(actor_id)
        if self.output is not None:
            self.output.label = class_name
        self.set_gpus(gpu_ids)            # CUDA_VISIBLE_DEVICES before __init__ runs
        meta = data = error_text = None
        # A constructor waiting in get/wait lends the CPU it was placed with.
        client.executing = True
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
        finally:
            client.executing = False
            self.end_output()
            current_task.set(None)
        if meta is None and (is_async or max_concurrency > 1):
            self.concurrency = ConcurrentCalls(self, max_concurrency, is_async)
            runtime_context.worker.async_actor = is_async
            client.concurrent = True
            client.executing = True
        client.send(("actor_ready", actor_id, meta, data, error_text))

    def exit_actor(self):
        """exit_actor() was called: report finished calls, run the atexit
        handlers (as a process that exits does), tell the node manager, go."""
        self.flush()
        # Before actor_exit: the node manager then kills this process.
        atexit._run_exitfuncs()
        self.end_output()                 # (its output rides ahead of actor_exit)
        self.client.send(("actor_exit",))
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)

    def set_gpus(self, gpu_ids):
        # Set even to "" for a task without GPUs: the worker inherited the
        # node's CUDA_VISIBLE_DEVICES, which names GPUs other tasks hold.
        if gpu_ids != self.gpu_ids:
            self.gpu_ids = list(gpu_ids)
            runtime_context.worker.gpu_ids = self.gpu_ids
            os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(str(g) for g in gpu_ids)

    def argument(self, arg):
        if arg[0] == "v":
            return deserialize(arg[1], arg[2])
        try:
            pinned = self.client.store.get(arg[1])   # ("s", object_id, meta)
        except ObjectNotFoundError:                  # spilled to disk since dispatched
            pinned = self.client.restored_argument(arg[1])
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
                self.client.write_to_store(object_id, serialized)
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
        self.pending = {}               # task id -> its future (threads) or asyncio task
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
            task_id = dispatch[0]
            future = self.pool.submit(self._run_threaded, dispatch)
            future.dispatch = dispatch
            self.pending[task_id] = future
            future.add_done_callback(lambda _: self.pending.pop(task_id, None))

    def cancel(self, task_id):
        """minray.cancel of a call: a threaded call still waiting for a thread
        is dropped (its "done" item is returned, to be sent); an async call is
        cancelled on the loop (asyncio.CancelledError inside it)."""
        if self.is_async:
            self.loop.call_soon_threadsafe(self._cancel_on_loop, task_id)
            return None
        future = self.pending.pop(task_id, None)
        if future is not None and future.cancel():
            return self.executor.cancelled_item(future.dispatch)
        return None

    def _cancel_on_loop(self, task_id):
        task = self.pending.get(task_id)
        if task is not None:
            task.cancel()

    def _run_threaded(self, dispatch):
        item, value = self.executor.execute(dispatch)
        self.executor.client.send(("done", [item]))
        del value                       # after the send: see Executor.flush

    async def _run_async(self, dispatch):
        import asyncio
        task_id = dispatch[0]
        executor = self.executor
        if not executor.cancel.begin(task_id, interruptible=False):
            item, value = executor.cancelled_item(dispatch), None
        else:
            self.pending[task_id] = asyncio.current_task()
            try:
                async with self.limit:
                    item, value = await self._execute_async(dispatch)
            except asyncio.CancelledError:        # minray.cancel of this call
                item, value = None, None
            finally:
                self.pending.pop(task_id, None)
            if executor.cancel.take(task_id) or item is None:
                item, value = executor.cancelled_item(dispatch), None
        executor.client.send(("done", [item]))
        del value                       # after the send: see Executor.flush

    async def _execute_async(self, dispatch):
        # Run the method on the loop; if it is a coroutine, await it here so
        # other calls interleave at its awaits.
        task_id, function_id, pickled, name, args, kwarg_names, num_returns, gpu_ids = dispatch
        executor = self.executor
        return_ids = [ids.return_object_id(task_id, i) for i in range(1, num_returns + 1)]
        current_task.set(task_id)       # this asyncio task's own context
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
        executor.end_output()
        return (task_id, results, time.perf_counter() - started, error_text), result


class Cancellation:
    """minray.cancel inside a worker.

    The node manager sends ("cancel", task_id) for a task it sent here. One
    that has not started is dropped, and its results become
    TaskCancelledError. A plain task that runs gets KeyboardInterrupt in the
    main thread: from SIGINT, but only while the task's own code runs (inside
    minray's code a message could be left half handled; the signal is sent
    again until it lands), or at its next get/wait (the client's
    interrupt_requested). An actor call is not interrupted, its state would
    be left half changed, except an async actor's, whose asyncio task is
    cancelled; a call cancelled while it ran returns TaskCancelledError.
    """

    def __init__(self, executor):
        self.executor = executor
        self.client = executor.client
        # begin/end/take run once per task: they take the condition's lock
        # itself (a C call) rather than the condition (Python-level methods).
        self.lock = threading.Lock()
        self.cond = threading.Condition(self.lock)
        self.requested = collections.OrderedDict()   # ids cancelled (some finished already)
        self.running = None        # the plain task the main thread runs now
        self.target = None         # the running task to interrupt
        self.outbox = []           # "done" items of dropped tasks, sent by our thread
        self.thread = None
        self.main_thread_id = threading.main_thread().ident
        self.client.cancel_handler = self.on_cancel
        signal.signal(signal.SIGINT, self._on_sigint)

    # Called by whichever thread reads the socket; it may hold the send lock,
    # so this never sends: our thread does.
    def on_cancel(self, task_id):
        with self.cond:
            self.requested[task_id] = True
            if len(self.requested) > CANCELLED_REMEMBERED:
                self.requested.popitem(last=False)
            dispatch = self._unqueue(task_id)
            concurrency = self.executor.concurrency
            if dispatch is not None:
                self.outbox.append(self.executor.cancelled_item(dispatch))
            elif self.running == task_id:
                self.target = task_id
                self.client.interrupt_requested = True
            elif concurrency is not None:
                item = concurrency.cancel(task_id)
                if item is None:
                    return
                self.outbox.append(item)
            else:
                return          # a sync actor's running call, or finished: flagged only
            if self.thread is None:
                self.thread = threading.Thread(target=self._serve, daemon=True,
                                               name="minray-cancel")
                self.thread.start()
            self.cond.notify()

    def _unqueue(self, task_id):
        """Take a dispatched task that has not started out of the queue."""
        tasks = self.client.tasks
        for dispatch in list(tasks):
            if dispatch[0] == task_id:
                try:
                    tasks.remove(dispatch)
                except ValueError:
                    return None          # the main thread took it just now: see begin()
                self.executor.remember_code(dispatch[1], dispatch[2])
                return dispatch
        return None

    def begin(self, task_id, interruptible):
        """A task starts: False if it was cancelled already (drop it)."""
        with self.lock:
            if self.requested.pop(task_id, None):
                return False
            if interruptible and self.executor.concurrency is None:
                self.running = task_id
            return True

    def end(self, task_id):
        if self.running == task_id:
            with self.lock:
                self.running = self.target = None
                self.client.interrupt_requested = False

    def is_requested(self, task_id):
        return task_id in self.requested

    def take(self, task_id):
        """Whether the task was cancelled while it ran (forgetting it)."""
        if task_id not in self.requested:
            return False
        with self.lock:
            return self.requested.pop(task_id, None) is not None

    def _interrupt_pending(self):
        return (self.target is not None and self.target == self.running
                and self.client.interrupt_requested)

    def _serve(self):
        while True:
            with self.cond:
                while not self.outbox and not self._interrupt_pending():
                    self.cond.wait()
                items, self.outbox = self.outbox, []
                interrupt = self._interrupt_pending()
            if items:
                try:
                    self.client.send(("done", items))
                except RaySystemError:
                    return              # the node manager is gone
            if interrupt:
                signal.pthread_kill(self.main_thread_id, signal.SIGINT)
                time.sleep(RESIGNAL_S)

    def _on_sigint(self, signum, frame):
        if not self._interrupt_pending():
            return                      # not a cancel (or delivered already): ignored
        if _in_minray_code(frame):
            return                      # _serve signals again shortly
        self.client.interrupt_requested = False
        raise KeyboardInterrupt


def _in_minray_code(frame):
    """Whether the main thread is in minray's own code (not the task's)."""
    task_frame = Executor.execute.__code__
    while frame is not None:
        code = frame.f_code
        if code is task_frame:
            return False
        if code.co_filename.startswith(MINRAY_DIR):
            return True
        frame = frame.f_back
    return True


def run_worker(socket_path, session_dir, store_name, node_id, worker_id, log_file=False):
    """Serve a node manager as a worker. log_file: our stdout and stderr are a
    log file (not the driver's terminal), which keeps a copy of what tasks print."""
    from minray.session import read_token
    try:
        client = core.CoreClient(socket_path, read_token(session_dir), "worker",
                                 {"worker_id": worker_id, "pid": os.getpid()},
                                 root_task_id=bytes(16))
    except (ConnectionRefusedError, FileNotFoundError):
        return      # started as the node manager shut down: its socket or session is gone
    client.attach_store(store_name)
    core.set_current(client)
    runtime_context.worker.node_id = node_id
    runtime_context.worker.worker_id = worker_id
    output, streams = forward_output(client, copy_to_files=log_file)
    try:
        Executor(client, worker_id, output, streams).loop()
    except Exception:
        if client.closed:
            return              # the node manager is gone: so are we
        raise
