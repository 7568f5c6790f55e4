"""Worker processes of one node: starting them and tracking what each is doing."""
import os
import subprocess
import sys
import time
import uuid


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
    """Starts worker processes and keeps them registered by id."""

    def __init__(self, session_dir, socket_path, store_name, node_id, inherit_output=True):
        self.session_dir = session_dir
        self.socket_path = socket_path
        self.store_name = store_name
        self.node_id = node_id
        self.inherit_output = inherit_output
        self.processes = {}         # worker id -> Popen
        self.starting = set()       # worker ids started but not yet connected
        self.workers = {}           # worker id -> WorkerState (connected)
        self.start_times = {}

    def start(self):
        worker_id = uuid.uuid4().hex[:12]
        env = dict(os.environ)
        env["MINRAY_WORKER_ID"] = worker_id
        cmd = [sys.executable, "-m", "minray.worker", "--socket", self.socket_path,
               "--session-dir", self.session_dir, "--store", self.store_name,
               "--node-id", self.node_id.hex(), "--worker-id", worker_id]
        if self.inherit_output:
            out = None
        else:
            out = open(os.path.join(self.session_dir, "logs", f"worker-{worker_id}.log"), "ab")
        proc = subprocess.Popen(cmd, env=env, stdin=subprocess.DEVNULL, stdout=out,
                                stderr=subprocess.STDOUT if out else None)
        if out:
            out.close()
        self.processes[worker_id] = proc
        self.starting.add(worker_id)
        self.start_times[worker_id] = time.monotonic()
        return worker_id

    def registered(self, worker_id, pid, conn):
        self.starting.discard(worker_id)
        state = WorkerState(worker_id, pid)
        state.conn = conn
        self.workers[worker_id] = state
        return state

    def reap_exited(self):
        """Worker ids whose process exited before connecting (failed to start)."""
        failed = []
        for worker_id in list(self.starting):
            proc = self.processes.get(worker_id)
            if proc is not None and proc.poll() is not None:
                self.starting.discard(worker_id)
                failed.append((worker_id, proc.returncode))
        return failed

    def remove(self, worker_id):
        self.workers.pop(worker_id, None)
        proc = self.processes.pop(worker_id, None)
        if proc is not None and proc.poll() is None:
            proc.kill()
        if proc is not None:
            try:
                proc.wait(timeout=1.0)
            except subprocess.TimeoutExpired:
                pass

    def stop_all(self, timeout=2.0):
        for proc in self.processes.values():
            if proc.poll() is None:
                proc.terminate()
        deadline = time.monotonic() + timeout
        for proc in self.processes.values():
            try:
                proc.wait(timeout=max(0.01, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self.processes.clear()
        self.workers.clear()
        self.starting.clear()
