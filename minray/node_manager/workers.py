"""Worker processes of one node: starting them, admitting their connections,
and tracking what each is doing.

The node manager signals only processes it started. A connection becomes a
worker only if its hello names a worker id the pool asked the zygote for and
is still waiting for, and the process at the other end of the socket (as the
kernel reports it, not as the peer claims) is a child of this pool's zygote.
The worker is then signalled through a handle that can't reach another
process that later reuses its pid (a pidfd on Linux).
"""
import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid

from minray.spawn import python_argv

START_TIMEOUT_S = 30.0


class WorkerRefused(Exception):
    """A connection that says it is a worker can't be admitted as one."""


class WorkerState:
    """What the node manager knows about one worker process."""

    def __init__(self, worker_id, pid, process=None):
        self.worker_id = worker_id
        self.pid = pid
        self.process = process      # ProcessHandle: the only way it is signalled
        self.conn = None
        self.queue = []             # tasks sent to it, oldest (running) first
        self.lease = None           # resources held for the tasks in its queue
        self.lease_shape = None
        self.gpu_ids = []
        self.gpu_share = 0.0        # GPUs it holds: a whole number, or a fraction of one
        # GPU or CPU work, fixed by its first task or actor: a process that
        # touched a GPU keeps its CUDA context (and device memory) until it
        # exits, so it never runs CPU work afterwards (nor the reverse).
        self.kind = None            # None (fresh), "gpu" or "cpu"
        self.calls = {}             # function id -> tasks of it sent here (for max_calls)
        self.retiring = False       # reached a function's max_calls: exits once idle
        self.blocked = False        # inside get/wait: its CPU is lent out
        self.functions = set()      # function ids it has been sent
        self.dead = False
        self.actor = None           # actor id when dedicated to an actor

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

    def admit(self, info, conn):
        """The WorkerState of a connection whose hello says it is a worker, or
        None if it is refused (the connection is then dropped, with the reason
        logged)."""
        try:
            worker_id, process = self._verify(info, conn)
        except WorkerRefused as exc:
            conn.drop(f"refused as a worker: {exc}")
            return None
        del self.starting[worker_id]
        state = WorkerState(worker_id, process.pid, process)
        state.conn = conn
        self.workers[worker_id] = state
        return state

    def _verify(self, info, conn):
        worker_id = info.get("worker_id") if isinstance(info, dict) else None
        if conn.worker is not None:
            raise WorkerRefused(f"the connection is already worker {conn.worker.worker_id}")
        if type(worker_id) is not str or worker_id not in self.starting:
            raise WorkerRefused(f"worker id {worker_id!r} is not one this node manager asked "
                                "for, or it has connected already")
        claimed = info.get("pid")
        pid = conn.peer_pid
        if pid is None:
            # No peer credentials on this platform: the claim is all we have,
            # and the parent check below is what keeps it honest.
            if type(claimed) is not int or claimed <= 0:
                raise WorkerRefused(f"its hello has no valid pid ({claimed!r})")
            pid = claimed
        elif claimed != pid:
            raise WorkerRefused(f"it claims pid {claimed!r} but the process that opened "
                                f"the socket is pid {pid}")
        zygote = self.zygote
        try:
            process = ProcessHandle.of_peer(conn.transport.get_extra_info("socket"), pid)
        except ProcessLookupError:
            raise WorkerRefused(f"its process (pid {pid}) has exited") from None
        try:
            parent = parent_pid(pid)
            if zygote is None or parent != zygote.pid:
                raise WorkerRefused(
                    f"its process (pid {pid}, parent {parent}) was not started by this node's "
                    f"zygote (pid {zygote.pid if zygote else None})")
            # The handle was opened before the parent was read: if its process
            # is still alive, the pid was not reused in between.
            if not process.alive():
                raise WorkerRefused(f"its process (pid {pid}) has exited")
        except BaseException:
            process.close()
            raise
        return worker_id, process

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
            state.process.signal(signal.SIGKILL)
            state.process.close()

    def retire(self, worker_id):
        """Ask a worker to exit (SIGTERM); its connection closing does the rest."""
        state = self.workers.get(worker_id)
        if state is not None:
            state.process.signal(signal.SIGTERM)

    def kill(self, worker_id):
        """Kill a worker now (SIGKILL); its connection closing does the rest."""
        state = self.workers.get(worker_id)
        if state is not None:
            state.process.signal(signal.SIGKILL)

    def stop_all(self):
        self.stopped = True
        for state in self.workers.values():
            state.process.signal(signal.SIGTERM)
            state.process.close()
        self.workers.clear()
        self.starting.clear()
        if self.zygote is not None:
            self.zygote.stdin.close()
            try:
                self.zygote.wait(2.0)
            except subprocess.TimeoutExpired:
                self.zygote.kill()
                self.zygote.wait()


# Linux 6.5+: a pidfd of a Unix socket's peer, straight from the socket.
SO_PEERPIDFD = getattr(socket, "SO_PEERPIDFD", 77 if sys.platform.startswith("linux") else None)


class ProcessHandle:
    """Signals one process, and never another one that later gets its pid.

    On Linux it holds a pidfd (signals to an exited process fail instead of
    reaching a newcomer with the same pid); elsewhere a psutil.Process, which
    checks the process's start time before each signal.
    """

    def __init__(self, pid, pidfd=None, proc=None):
        self.pid = pid
        self.pidfd = pidfd
        self.proc = proc

    @classmethod
    def open(cls, pid):
        """Raises ProcessLookupError if there is no process `pid`."""
        if hasattr(os, "pidfd_open"):
            try:
                return cls(pid, pidfd=os.pidfd_open(pid))
            except ProcessLookupError:
                raise
            except OSError:
                pass                # kernel without pidfds (before 5.3)
        import psutil
        try:
            return cls(pid, proc=psutil.Process(pid))
        except psutil.NoSuchProcess:
            raise ProcessLookupError(pid) from None

    @classmethod
    def of_peer(cls, sock, pid):
        """The process at the other end of a Unix socket, whose peer pid is
        `pid`: from the socket itself where the kernel can (no window for the
        pid to be reused), else by pid."""
        if SO_PEERPIDFD is not None and sock is not None and sock.family == socket.AF_UNIX:
            try:
                pidfd = sock.getsockopt(socket.SOL_SOCKET, SO_PEERPIDFD)
            except OSError:
                pass                # kernel before 6.5
            else:
                return cls(pid, pidfd=pidfd)
        return cls.open(pid)

    def signal(self, sig):
        """Send sig; nothing happens if the process has exited."""
        if self.pidfd is not None:
            try:
                signal.pidfd_send_signal(self.pidfd, sig)
            except ProcessLookupError:
                pass
        elif self.proc is not None:
            import psutil
            try:
                self.proc.send_signal(sig)
            except psutil.NoSuchProcess:
                pass

    def alive(self):
        try:
            if self.pidfd is not None:
                signal.pidfd_send_signal(self.pidfd, 0)
                return True
            return self.proc.is_running()
        except ProcessLookupError:
            return False

    def close(self):
        if self.pidfd is not None:
            os.close(self.pidfd)
            self.pidfd = None


def parent_pid(pid):
    """The parent of process `pid`, or None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except FileNotFoundError:
        if os.path.isdir("/proc/self"):
            return None
    except OSError:
        return None
    else:
        # pid (command) state ppid ...: the command may hold spaces and ")"
        return int(stat[stat.rindex(b")") + 2:].split()[1])
    import psutil               # no /proc (not Linux)
    try:
        return psutil.Process(pid).ppid()
    except psutil.NoSuchProcess:
        return None
