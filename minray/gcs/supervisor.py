"""Starts the control store's shard server processes and restarts them if they die."""
import logging
import os
import signal
import subprocess
import threading
import time

from minray.gcs.server import address_file, read_address
from minray.gcs.storage import DEFAULT_MAP_BYTES, DEFAULT_MAX_MAP_BYTES
from minray.spawn import python_argv

log = logging.getLogger("minray.gcs")
START_TIMEOUT_S = 30.0
RESTART_DELAY_S = 0.1            # after a failed restart, doubling up to ...
MAX_RESTART_DELAY_S = 10.0


class GcsStartError(RuntimeError):
    pass


def _exit_reason(code):
    if code is not None and code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exited with code {code}"


def shard_map_file(session_dir):
    return os.path.join(session_dir, "gcs", "shards")


def write_shard_map(session_dir, addresses):
    """Record every shard's address, in shard order, for clients to find."""
    path = shard_map_file(session_dir)
    with open(path + ".tmp", "w") as f:
        f.writelines(f"{host}:{port}\n" for host, port in addresses)
    os.replace(path + ".tmp", path)


def read_shard_map(session_dir):
    try:
        with open(shard_map_file(session_dir)) as f:
            lines = [line.strip() for line in f if line.strip()]
    except FileNotFoundError:
        raise FileNotFoundError(
            f"no control store in {session_dir}: the head node is not running there") from None
    return [(host, int(port)) for host, port in (line.rsplit(":", 1) for line in lines)]


class GcsProcesses:
    """The shard servers of one session.

    By default one process serves every shard (one event loop, one core: the
    measured best on a 2-core machine, docs/control-store.md); pass
    shards_per_process=1 to give each shard its own process and core.
    """

    def __init__(self, session_dir, num_shards=1, shards_per_process=None, host="127.0.0.1",
                 map_bytes=DEFAULT_MAP_BYTES, max_map_bytes=DEFAULT_MAX_MAP_BYTES,
                 restart=True, watch_parent=True, ports=None):
        if not isinstance(num_shards, int) or num_shards < 1:
            raise ValueError(f"num_gcs_shards must be a positive int, got {num_shards!r}")
        self.session_dir = session_dir
        self.num_shards = num_shards
        per = shards_per_process or num_shards
        self.groups = [list(range(i, min(i + per, num_shards))) for i in range(0, num_shards, per)]
        self.host = host
        self.map_bytes = map_bytes
        self.max_map_bytes = max_map_bytes
        self.restart = restart
        self.watch_parent = watch_parent
        # 0: any free port; a restarted head passes its shards' old ports,
        # which the other nodes' clients reconnect to.
        self.ports = list(ports) if ports else [0] * num_shards
        if len(self.ports) != num_shards:
            raise ValueError(f"{len(self.ports)} ports for {num_shards} shards")
        self.processes = [None] * len(self.groups)
        self.restarts = 0
        self._stopping = False
        self._stopped = threading.Event()
        self._lock = threading.Lock()
        os.makedirs(os.path.join(session_dir, "gcs"), mode=0o700, exist_ok=True)
        os.makedirs(os.path.join(session_dir, "logs"), mode=0o700, exist_ok=True)

    @property
    def addresses(self):
        return [(self.host, port) for port in self.ports]

    def start(self):
        for index in range(len(self.groups)):
            self._spawn(index)
        for index in range(len(self.groups)):
            self._wait_ready(index)
        write_shard_map(self.session_dir, self.addresses)
        for index in range(len(self.groups)):
            threading.Thread(target=self._watch, args=(index,), daemon=True,
                             name=f"minray-gcs-watch-{index}").start()
        return self

    def _spawn(self, index):
        shards = self.groups[index]
        for shard in shards:
            try:
                os.unlink(address_file(self.session_dir, shard))
            except FileNotFoundError:
                pass
        args = ["--session-dir", self.session_dir,
                "--shards", ",".join(map(str, shards)),
                "--ports", ",".join(str(self.ports[s]) for s in shards),
                "--host", self.host, "--map-bytes", str(self.map_bytes),
                "--max-map-bytes", str(self.max_map_bytes)]
        if self.watch_parent:
            args += ["--parent-pid", str(os.getpid())]
        cmd = python_argv("minray.gcs.server:main", *args)
        log_path = os.path.join(self.session_dir, "logs", f"gcs-{index}.log")
        with open(log_path, "ab") as log_file:
            self.processes[index] = subprocess.Popen(
                cmd, stdin=subprocess.DEVNULL, stdout=log_file, stderr=log_file,
                start_new_session=True)

    def _wait_ready(self, index):
        proc = self.processes[index]
        deadline = time.monotonic() + START_TIMEOUT_S
        for shard in self.groups[index]:
            path = address_file(self.session_dir, shard)
            while not os.path.exists(path):
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise GcsStartError(
                        f"control store shard {shard} did not start "
                        f"(exit code {proc.poll()}); see "
                        f"{os.path.join(self.session_dir, 'logs', f'gcs-{index}.log')}")
                time.sleep(0.005)
            self.ports[shard] = read_address(self.session_dir, shard)[1]

    def _watch(self, index):
        """Restart the index-th server process whenever it dies, until stop().

        A restart that fails (the new process dies or hangs before serving,
        or cannot be started at all) is retried with a growing delay, so a
        shard killed during its own restart still comes back.
        """
        delay = RESTART_DELAY_S
        while True:
            code = self.processes[index].wait()
            with self._lock:
                if self._stopping or not self.restart:
                    return
                log.warning("control store shards %s: server process %s; restarting",
                            self.groups[index], _exit_reason(code))
                self.restarts += 1
                try:
                    self._spawn(index)
                except OSError as exc:
                    failure = f"could not start a server process: {exc}"
                else:
                    failure = None
            if failure is None:
                try:
                    self._wait_ready(index)
                    delay = RESTART_DELAY_S
                    continue
                except GcsStartError as exc:
                    failure = str(exc)
                    proc = self.processes[index]
                    if proc.poll() is None:       # hung before serving: replace it
                        proc.kill()
                        proc.wait()
            log.error("control store shards %s: restart failed (%s); trying again in %.1f s",
                      self.groups[index], failure, delay)
            if self._stopped.wait(delay):
                return
            delay = min(delay * 2, MAX_RESTART_DELAY_S)

    def pids(self):
        return [p.pid for p in self.processes if p is not None]

    def stop(self, timeout=5.0):
        with self._lock:
            self._stopping = True
        self._stopped.set()
        for proc in self.processes:
            if proc is not None and proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.processes:
            if proc is None:
                continue
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
