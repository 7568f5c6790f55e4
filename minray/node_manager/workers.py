"""Worker processes of one node: starting them and tracking what each is doing."""
import json
import os
import signal
import subprocess
import time
import uuid

from minray.spawn import python_argv

START_TIMEOUT_S = 30.0


class WorkerState:
    """What the node manager knows about one worker process."""

    def __init__(self, worker_id, pid):
        self.worker_id = worker_id
        self.pid = pid
        self.conn = None
        self.queue = []             # tasks sent to it, oldest (running) first
        self.lease = None           # resources held for the tasks in its queue
        self.lease_shape = None
        self.gpu_ids = []
        self.blocked = False        # inside get/wait: its CPU is lent out
        self.functions = set()      # function ids it has been sent
        self.dead = False
        self.actor = None           # actor id when dedicated to an actor

    @property
    def idle(self):
        return not self.queue and not self.dead and self.actor is None

    def __repr__(self):
        return f"<worker {self.worker_id} pid={self.pid} queue={len(self.queue)}>"


class WorkerPool:
    """Starts worker processes (forked by a zygote) and tracks them by id."""

    def __init__(self, session_dir, socket_path, store_name, node_id, inherit_output=True):
        self.session_dir = session_dir
        self.socket_path = socket_path
        self.store_name = store_name
        self.node_id = node_id
        self.inherit_output = inherit_output
        self.zygote = None
        self.starting = {}          # worker id -> time it was requested
        self.workers = {}           # worker id -> WorkerState (connected)
        self.stopped = False        # stop_all() ran: start nothing any more

    def _ensure_zygote(self):
        if self.zygote is None or self.zygote.poll() is not None:
            self.zygote = subprocess.Popen(
                python_argv("minray.worker.zygote:main"), stdin=subprocess.PIPE,
                stdout=None if self.inherit_output else subprocess.DEVNULL)
        return self.zygote

    def start(self):
        if self.stopped:
            # Shutting down (callbacks still run while the event loop closes):
            # a worker started now would outlive its session directory.
            return None
        worker_id = uuid.uuid4().hex[:12]
        request = {"worker_id": worker_id, "socket": self.socket_path,
                   "session_dir": self.session_dir, "store": self.store_name,
                   "node_id": self.node_id.hex()}
        if not self.inherit_output:
            request["log_file"] = os.path.join(self.session_dir, "logs", f"worker-{worker_id}.log")
        zygote = self._ensure_zygote()
        zygote.stdin.write((json.dumps(request) + "\n").encode())
        zygote.stdin.flush()
        self.starting[worker_id] = time.monotonic()
        return worker_id

    def registered(self, worker_id, pid, conn):
        self.starting.pop(worker_id, None)
        state = WorkerState(worker_id, pid)
        state.conn = conn
        self.workers[worker_id] = state
        return state

    def overdue(self, timeout=START_TIMEOUT_S):
        """Workers requested long ago that never connected (they failed to start)."""
        now = time.monotonic()
        late = [w for w, t in self.starting.items() if now - t > timeout]
        for worker_id in late:
            del self.starting[worker_id]
        if self.zygote is not None and self.zygote.poll() is not None:
            late.extend(self.starting)          # the zygote died: nobody is coming
            self.starting.clear()
        return late

    def remove(self, worker_id):
        state = self.workers.pop(worker_id, None)
        if state is not None:
            _kill(state.pid)

    def stop_all(self):
        self.stopped = True
        for state in self.workers.values():
            _kill(state.pid, signal.SIGTERM)
        self.workers.clear()
        self.starting.clear()
        if self.zygote is not None:
            self.zygote.stdin.close()
            try:
                self.zygote.wait(2.0)
            except subprocess.TimeoutExpired:
                self.zygote.kill()
                self.zygote.wait()


def _kill(pid, sig=signal.SIGKILL):
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass
