"""Starting the embedded local cluster that minray.init() gives a driver.

The driver starts one process, the head node manager; it starts the control
store's shard servers and the workers. All of them exit with the driver: on
shutdown(), at interpreter exit, or, if the driver is killed, when the node
manager sees its parent gone. The session directory and the /dev/shm arena are
removed with them.
"""
import json
import os
import subprocess
import time

from minray.exceptions import RaySystemError
from minray.object_store import default_capacity
from minray.resources import check_amount
from minray.session import (
    LOGS_DIR, SESSION_ROOT, UnsafeSessionPathError, check_private, create_session_dir,
    node_socket_path, retire_session_dir,
)
from minray.spawn import log_tail, python_argv, startup_env

START_TIMEOUT_S = 30.0
LATEST_LINK = os.path.join(SESSION_ROOT, "session_latest")


def _check_count(name, value):
    if value is not None:
        check_amount(name, value)


class LocalCluster:
    def __init__(self, num_cpus=None, num_gpus=None, resources=None, object_store_memory=None,
                 num_gcs_shards=1, log_to_driver=True, memory=None, num_workers=None):
        _check_count("num_cpus", num_cpus)
        _check_count("num_gpus", num_gpus)
        _check_count("memory", memory)
        if resources is not None and not isinstance(resources, dict):
            raise ValueError(f"resources must be a dict of name -> amount, got {resources!r}")
        if object_store_memory is not None and (not isinstance(object_store_memory, int)
                                                or object_store_memory < (1 << 20)):
            raise ValueError(f"object_store_memory must be an int of at least 1 MiB, got "
                             f"{object_store_memory!r}")
        if not isinstance(num_gcs_shards, int) or num_gcs_shards < 1:
            raise ValueError(f"num_gcs_shards must be an int >= 1, got {num_gcs_shards!r}")
        if memory is not None and "memory" in (resources or {}):
            raise ValueError("the node's memory was given twice (_memory and "
                             "resources={'memory': ...}); pass one")
        cpus = os.cpu_count() if num_cpus is None else num_cpus
        self.gpu_ids = node_gpu_ids(num_gpus)
        self.resources = {"CPU": float(cpus)}
        if self.gpu_ids:
            self.resources["GPU"] = float(len(self.gpu_ids))
        for name, amount in (resources or {}).items():
            if name in ("CPU", "GPU"):
                raise ValueError(f"use num_cpus / num_gpus instead of resources={{'{name}': ...}}")
            _check_count(f"resource {name!r}", amount)
            self.resources[name] = float(amount)
        self.object_store_memory = object_store_memory or default_capacity()
        if "memory" not in self.resources:
            # As in Ray: the heap memory tasks and actors may reserve with
            # memory=..., by default what the machine has free at start,
            # less the object store.
            self.resources["memory"] = float(
                memory if memory is not None
                else max(0, available_memory() - self.object_store_memory))
        self.num_gcs_shards = num_gcs_shards
        self.log_to_driver = log_to_driver
        # Worker processes to start: one per whole CPU unless given.
        self.num_workers = num_workers or max(1, int(self.resources["CPU"]))
        self.session_dir = None
        self.socket_path = None
        self.process = None

    def start(self):
        # Sessions whose node manager was killed (-9) left their arena in
        # /dev/shm: a new session is when to notice and remove them.
        from minray.node_launcher import clean_stale_sessions  # (it imports this module)
        clean_stale_sessions(include_embedded=True)
        self.session_dir = create_session_dir()
        _point_latest(self.session_dir)
        logs = os.path.join(self.session_dir, LOGS_DIR)
        os.makedirs(logs, mode=0o700, exist_ok=True)
        log_path = os.path.join(logs, "node_manager.log")
        ready = os.path.join(self.session_dir, "node_manager.ready")
        cmd = python_argv(
            "minray.node_manager.__main__:main", "--head", "--embedded",
            "--session-dir", self.session_dir, "--resources", json.dumps(self.resources),
            "--object-store-memory", self.object_store_memory,
            "--num-gcs-shards", self.num_gcs_shards, "--parent-pid", os.getpid(),
            "--ready-file", ready, "--num-workers", self.num_workers,
            "--gpu-ids", json.dumps(self.gpu_ids))
        if not self.log_to_driver:
            cmd.append("--no-log-to-driver")
        # Its own session: Ctrl-C in the driver's terminal interrupts the
        # driver (KeyboardInterrupt) but must not kill the cluster under it.
        # If the driver dies of it, the node manager sees its parent gone.
        self.process = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, start_new_session=True,
                                        env=startup_env(log_path))
        deadline = time.monotonic() + START_TIMEOUT_S
        while not os.path.exists(ready):
            exited = self.process.poll() is not None
            if exited or time.monotonic() > deadline:
                if not exited:
                    _kill_tree(self.process.pid)
                self.stop()
                why = (f"its node manager exited with code {self.process.returncode}" if exited
                       else f"its node manager was not ready within {START_TIMEOUT_S:.0f} s")
                tail = log_tail(log_path)
                raise RaySystemError(
                    f"the local minray cluster failed to start: {why}. The logs are in {logs}"
                    + (f"; the last lines of {log_path}:\n{tail}" if tail else ""))
            time.sleep(0.002)
        with open(ready) as f:
            self.socket_path = f.read().strip()

    def stop(self, timeout=10.0):
        if self.process is not None:
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                _kill_tree(self.process.pid)
                self.process.wait()
        if self.session_dir:
            retire_session_dir(self.session_dir)
            _remove_arenas(self.session_dir)


def _remove_arenas(session_dir):
    """The node manager unlinks its arena as it exits; if it was killed, we do."""
    prefix = f"minray-{os.path.basename(session_dir)}-"
    try:
        names = os.listdir("/dev/shm")
    except OSError:
        return
    for name in names:
        if name.startswith(prefix):
            try:
                os.unlink(os.path.join("/dev/shm", name))
            except OSError:
                pass


def _kill_tree(pid):
    import psutil  # lazily: most processes never need it
    try:
        parent = psutil.Process(pid)
        for child in parent.children(recursive=True):
            child.kill()
        parent.kill()
    except psutil.NoSuchProcess:
        pass


def visible_gpu_ids():
    """The GPU ids CUDA_VISIBLE_DEVICES allows (ints, or the strings it
    holds, such as GPU UUIDs), or None if it is not set."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is None:
        return None
    return [int(g) if g.isdigit() else g for g in (part.strip() for part in visible.split(","))
            if g]


def node_gpu_ids(num_gpus):
    """The ids of the GPUs a node started from this process hands out.

    They come from CUDA_VISIBLE_DEVICES when it is set: a task must never get
    a GPU the user did not allow. Without it, num_gpus GPUs are numbered from 0.
    """
    visible = visible_gpu_ids()
    if num_gpus is None:
        return visible or []
    if num_gpus != int(num_gpus):
        raise ValueError(f"num_gpus of a node must be a whole number, got {num_gpus!r}")
    if visible is None:
        return list(range(int(num_gpus)))
    if num_gpus > len(visible):
        raise ValueError(
            f"num_gpus={num_gpus!r} but CUDA_VISIBLE_DEVICES="
            f"{os.environ['CUDA_VISIBLE_DEVICES']!r} allows only {len(visible)} GPU(s); "
            "lower num_gpus or allow more devices in CUDA_VISIBLE_DEVICES")
    return visible[:int(num_gpus)]


def available_memory():
    """Bytes of memory free for use on this machine now (MemAvailable)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (OSError, ValueError):
        return 0


def _point_latest(session_dir):
    tmp = f"{LATEST_LINK}.{os.getpid()}"
    try:
        os.symlink(session_dir, tmp)
        os.replace(tmp, LATEST_LINK)
    except OSError:
        pass


def find_node_socket(address):
    """(session dir, node manager socket) of a running cluster on this machine.

    `address` is "auto" (the latest session), a session directory, or a
    "host:port": a node manager's (that node, if it runs here, else any node
    of its cluster on this machine) or the control store's.
    """
    if address == "auto":
        session_dir = latest_session()
    elif os.path.isdir(address):
        session_dir = address
    else:
        from minray.node_launcher import find_local_node, parse_address
        if os.sep in address:
            raise ConnectionError(f"no minray session directory at {address}")
        parse_address(address)          # ValueError saying what an address looks like
        session_dir = find_local_node(address) or _session_of_gcs(address)
    if not os.path.isdir(session_dir):
        raise ConnectionError(
            f"no minray node is running for {address!r} (its session {session_dir} is gone); "
            "start one with `minray start --head`, or minray.init() in another process, first")
    check_private(session_dir, "session directory")
    socket_path = node_socket_path(session_dir)
    if not os.path.exists(socket_path):
        raise ConnectionError(
            f"no minray node is running for {address!r} (no socket at {socket_path}); "
            "start one with `minray start --head`, or minray.init() in another process, first")
    return session_dir, socket_path


def latest_session():
    """Where session_latest points, if the link and its target are safe to follow:
    the link is ours, in a private root, and points at a session inside it."""
    if not os.path.lexists(LATEST_LINK):
        raise ConnectionError(
            f"no minray node is running for 'auto' (no {LATEST_LINK}); "
            "start one with `minray start --head`, or minray.init() in another process, first")
    check_private(SESSION_ROOT, "session root")
    link = os.lstat(LATEST_LINK)
    if not os.path.islink(LATEST_LINK) or link.st_uid != os.getuid():
        raise UnsafeSessionPathError(
            f"minray refuses to follow {LATEST_LINK}: it is not a symbolic link made by you "
            f"(uid {os.getuid()}). Remove it, or pass the session directory as the address.")
    session_dir = os.path.realpath(LATEST_LINK)
    if os.path.dirname(session_dir) != os.path.realpath(SESSION_ROOT):
        raise UnsafeSessionPathError(
            f"minray refuses to follow {LATEST_LINK}: it points at {session_dir}, outside "
            f"the session root {SESSION_ROOT}. Remove it, or pass the session directory as "
            "the address.")
    return session_dir


def _session_of_gcs(address):
    if os.path.isdir(SESSION_ROOT):
        check_private(SESSION_ROOT, "session root")
    for entry in sorted(os.listdir(SESSION_ROOT)) if os.path.isdir(SESSION_ROOT) else []:
        shard_map = os.path.join(SESSION_ROOT, entry, "gcs", "shards")
        try:
            with open(shard_map) as f:
                if address in f.read().split():
                    return os.path.join(SESSION_ROOT, entry)
        except OSError:
            continue
    raise ConnectionError(
        f"no node of the minray cluster at {address} runs on this machine (no node listens "
        "there and no local node belongs to that cluster, nor is its control store there); "
        f"join this machine first with `minray start --address {address}`")
