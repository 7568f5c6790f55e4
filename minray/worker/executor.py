"""The worker loop: take dispatched tasks, run them, send back their results."""
import os
import sys
import time
import traceback

import cloudpickle

from minray import ids
from minray.exceptions import RayTaskError, SerializationError
from minray.object_store import write_serialized
from minray.runtime import core
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
        self.functions = {}
        self.gpu_ids = []
        self.done = []
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
            self.last_send = time.monotonic()

    def run(self, dispatch):
        task_id, function_id, pickled, name, args, kwarg_names, num_returns, gpu_ids = dispatch
        client = self.client
        return_ids = [ids.return_object_id(task_id, i) for i in range(1, num_returns + 1)]
        client.current_task_id = task_id
        client.task_index = 0
        client.put_index = 0
        self.set_gpus(gpu_ids)
        started = time.perf_counter()
        error_text = None
        client.executing = True
        try:
            function = self.functions.get(function_id)
            if function is None:
                function = self.functions[function_id] = cloudpickle.loads(pickled)
            values = [self.argument(a) for a in args]
            split = len(values) - len(kwarg_names)
            result = function(*values[:split], **dict(zip(kwarg_names, values[split:])))
            results = self.encode_returns(name, return_ids, result)
        except Exception as exc:
            error_text, results = self.encode_error(name, return_ids, exc)
        finally:
            client.executing = False
        self.done.append((task_id, results, time.perf_counter() - started, error_text))

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
        results = []
        for object_id, value in zip(return_ids, values):
            serialized = serialize(value)
            if serialized.total_size <= core.INLINE_MAX_BYTES:
                buf = bytearray(serialized.total_size)
                serialized.write_to(memoryview(buf))
                results.append((object_id, "v", serialized.metadata, bytes(buf)))
            else:
                write_serialized(self.client.store, object_id, serialized)
                results.append((object_id, "s", serialized.metadata, serialized.total_size))
        return results

    def encode_error(self, name, return_ids, exc):
        text = traceback.format_exc()
        error = RayTaskError(name, text, exc, os.getpid())
        try:
            serialized = serialize(error)
        except SerializationError:
            # The exception itself cannot travel: send its text instead.
            error = RayTaskError(name, text, RuntimeError(repr(exc)), os.getpid())
            serialized = serialize(error)
        buf = bytearray(serialized.total_size)
        serialized.write_to(memoryview(buf))
        payload = bytes(buf)
        summary = f"task {name} failed (pid={os.getpid()}):\n{text.rstrip()}"
        return summary, [(object_id, "e", serialized.metadata, payload) for object_id in return_ids]


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
