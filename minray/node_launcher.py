"""Starting and stopping node managers that live on their own.

`minray start` and minray.cluster_utils.Cluster use this: a node started here
is not tied to any driver (no --embedded, no parent to watch), runs in its own
process session, and keeps running until `minray stop` (or stop_node) ends it.

Every node has a session directory of its own (sockets, arena, logs). A head
makes a fresh cluster token there; a joining node gets a copy of the
cluster's token written into its new session directory before its node
manager starts, so the token never travels on a command line. When ready the
node manager writes <session>/node.json (its id, TCP address, the head's
address, pid) and then its ready file.
"""
import contextlib
import json
import os
import signal
import socket
import subprocess
import time

from minray.exceptions import RaySystemError
from minray.local_cluster import (
    LATEST_LINK, START_TIMEOUT_S, LocalCluster, _point_latest, _remove_arenas,
)
from minray.session import (
    LOGS_DIR, NODE_FILE, SESSION_ROOT, TOKEN_FILE, UnsafeSessionPathError, check_private,
    create_session_dir, read_token, retire_session_dir,
)
from minray.spawn import log_tail, python_argv, startup_env

# The launcher's own record of the process it started, written before the
# node manager is ready, so that `minray stop` finds a node stuck in startup.
LAUNCH_FILE = "launched.json"
READY_FILE = "node_manager.ready"
NODE_MANAGER_ENTRY = "minray.node_manager.__main__:main"
# What `minray start --head` listens on unless told: next to Redis' (and
# Ray's) 6379, so both can run on one machine.
DEFAULT_HEAD_PORT = 6380
TOKEN_ENV = "MINRAY_TOKEN"
# The namespace of the connections minray's tools make (minray status/list):
# `minray list jobs` leaves them out.
TOOL_NAMESPACE = "_minray_tools"
# How long a node manager has to stop on SIGTERM before it is killed.
STOP_GRACE_S = 10.0
# A join the head refuses ends in this exit code (the node manager's contract).
JOIN_REFUSED_EXIT = 2
# How much longer than the node manager's own join timeout we wait for it.
JOIN_GRACE_S = 15.0


class NodeStartError(RaySystemError):
    """A node manager could not be started, or could not join its cluster."""


class Node:
    """A running node manager: what start_node returns and stop_node takes."""

    def __init__(self, session_dir, pid, address, node_id, is_head, head_address,
                 socket_path, process=None):
        self.session_dir = session_dir
        self.pid = pid
        self.address = address              # "ip:port" its peers reach it on
        self.node_id = node_id              # hex
        self.is_head = is_head
        self.head_address = head_address
        self.socket_path = socket_path      # where local drivers connect
        self.process = process              # subprocess.Popen when started here

    def __repr__(self):
        role = "head" if self.is_head else "node"
        return f"<minray {role} {self.node_id and self.node_id[:12]} at {self.address} pid {self.pid}>"


def parse_address(address):
    """("host", port) from "host:port", or ValueError saying what is wrong."""
    if not isinstance(address, str) or ":" not in address:
        raise ValueError(f"a cluster address is HOST:PORT (such as 127.0.0.1:"
                         f"{DEFAULT_HEAD_PORT}), got {address!r}")
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"a cluster address is HOST:PORT with a port from 1 to 65535 "
                         f"(such as 127.0.0.1:{DEFAULT_HEAD_PORT}), got {address!r}")
    return host, int(port)


def normalize_address(address):
    """"host:port" with the host resolved to an IPv4 address where it resolves
    ("localhost:6380" and "127.0.0.1:6380" name the same node)."""
    host, port = parse_address(address)
    try:
        host = socket.gethostbyname(host)
    except OSError:
        pass
    return f"{host}:{port}"


def start_node(*, head, head_address=None, token=None, node_ip_address="127.0.0.1", port=0,
               num_cpus=None, num_gpus=None, resources=None, object_store_memory=None,
               num_gcs_shards=1, num_workers=None, memory=None, timeout=START_TIMEOUT_S,
               keep_process=False, resume_session=None):
    """Start a detached node manager; return its Node once it is ready.

    head=True starts a new cluster (its token is made here), or with
    resume_session (the session directory of a head that died) takes that
    cluster over: the same token, control store, address (unless `port` is
    given) and shard ports, so the other nodes link to it again. Otherwise
    `head_address` ("host:port" of the head's node manager) and the cluster's
    `token` (bytes) are required. Raises NodeStartError (quoting the node
    manager's log) if it exits or is not ready in time; nothing is left
    running then. keep_process=True keeps the Popen so the caller can reap it.
    """
    if head and head_address is not None:
        raise ValueError("a head starts a new cluster: do not pass head_address")
    if not head:
        if head_address is None:
            raise ValueError("a node that is not the head needs head_address (HOST:PORT)")
        parse_address(head_address)
        if not isinstance(token, bytes) or not token:
            raise ValueError("a node joining a cluster needs the cluster's token (bytes)")
    if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port < 65536:
        raise ValueError(f"port must be an int from 0 (any free port) to 65535, got {port!r}")
    if not isinstance(node_ip_address, str) or not node_ip_address:
        raise ValueError(f"node_ip_address must be an IP address such as 127.0.0.1, "
                         f"got {node_ip_address!r}")
    # LocalCluster checks the options and works out the node's resources the
    # same way init() does.
    config = LocalCluster(num_cpus=num_cpus, num_gpus=num_gpus, resources=resources,
                          object_store_memory=object_store_memory,
                          num_gcs_shards=num_gcs_shards, log_to_driver=False, memory=memory,
                          num_workers=num_workers)
    if resume_session is not None:
        if not head:
            raise ValueError("resume_session is for a head taking over a dead head's cluster")
        session_dir = resume_session
        restart_lock = _lock_restart(session_dir)      # held until the new head is ready
        port = _resumable_head_port(session_dir, port)
        _kill_leftovers(session_dir)
        for name in (READY_FILE, NODE_FILE):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(os.path.join(session_dir, name))
    else:
        clean_stale_sessions(include_embedded=True, include_heads=head)
        session_dir = create_session_dir(token=None if head else token)
    logs = os.path.join(session_dir, LOGS_DIR)
    os.makedirs(logs, mode=0o700, exist_ok=True)
    log_path = os.path.join(logs, "node_manager.log")
    ready = os.path.join(session_dir, READY_FILE)
    argv = python_argv(
        NODE_MANAGER_ENTRY, "--session-dir", session_dir,
        "--resources", json.dumps(config.resources),
        "--object-store-memory", config.object_store_memory,
        "--num-workers", config.num_workers, "--gpu-ids", json.dumps(config.gpu_ids),
        "--node-ip-address", node_ip_address, "--port", port,
        "--ready-file", ready, "--no-log-to-driver")
    if head:
        argv += ["--head", "--num-gcs-shards", str(config.num_gcs_shards)]
        if resume_session is not None:
            argv.append("--resume")
    else:
        argv += ["--head-address", head_address]
    env = startup_env(log_path)
    env.pop(TOKEN_ENV, None)        # it is in the session's token file
    try:
        with open(os.path.join(logs, "node_manager.out"), "ab") as out:
            # Its own process session: the terminal that ran `minray start`
            # may close, and Ctrl-C there must not reach the node.
            process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=out,
                                       start_new_session=True, env=env, close_fds=True)
    except BaseException:
        if resume_session is None:
            _clean_session(session_dir)
        raise
    _write_json(os.path.join(session_dir, LAUNCH_FILE),
                {"pid": process.pid, "head": bool(head), "head_address": head_address})
    if not head:
        # A joining node manager gives up on an unreachable head by itself,
        # saying why (exit code 2): wait for that rather than kill it first.
        timeout = max(timeout, _join_timeout() + JOIN_GRACE_S)
    deadline = time.monotonic() + timeout
    try:
        while not os.path.exists(ready):
            exit_code = process.poll()
            if exit_code is not None or time.monotonic() > deadline:
                raise NodeStartError(_start_failure(head, head_address, exit_code, timeout,
                                                    log_path))
            time.sleep(0.01)
    except BaseException:               # failed, or Ctrl-C while waiting: leave nothing
        _stop_tree(process.pid, force=True, process=process)
        if resume_session is None:      # (a dead head's session stays for another try)
            _clean_session(session_dir)
        raise
    with open(ready) as f:
        socket_path = f.read().strip()
    # node.json is written before the ready file; this wait only covers a
    # node manager that wrote them in the other order.
    info_path = os.path.join(session_dir, NODE_FILE)
    while not os.path.exists(info_path) and process.poll() is None \
            and time.monotonic() < deadline:
        time.sleep(0.01)
    node = _node_from_session(session_dir, socket_path, process.pid)
    node.process = process if keep_process else None
    if head or not _latest_is_live(node.head_address):
        _point_latest(session_dir)
    if resume_session is not None:
        restart_lock.close()
    return node


RESTART_LOCK = "restart.lock"


def _lock_restart(session_dir):
    """An exclusive lock on a dead head's session while a head takes it over
    (another restart, or a new head cleaning stale sessions, keeps off it)."""
    import fcntl
    lock = open(os.path.join(session_dir, RESTART_LOCK), "a")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.close()
        raise ValueError(f"another restart of the head of {session_dir} is under way") from None
    return lock


def _restart_under_way(session_dir):
    import fcntl
    try:
        with open(os.path.join(session_dir, RESTART_LOCK), "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    except OSError:
        pass
    return False


def _resumable_head_port(session_dir, port):
    """The port a head taking over `session_dir` listens on: `port`, else the
    dead head's. ValueError if the session is not a dead head's."""
    if not os.path.exists(os.path.join(session_dir, TOKEN_FILE)):
        raise ValueError(f"{session_dir} is not the session of a head that can be restarted "
                         "(it has no token: it ended, or was cleaned up by `minray stop`)")
    info = read_node_info(session_dir) or _launch_info(session_dir) or {}
    if not _is_detached_head(info):
        raise ValueError(f"{session_dir} is not a head's session")
    if _is_node_manager(info.get("pid"), session_dir):
        raise ValueError(f"the head of {session_dir} is still running (pid {info.get('pid')})")
    if port:
        return port
    address = info.get("address")
    if not address:
        raise ValueError(f"the head of {session_dir} never got ready: start a new head")
    return int(address.rpartition(":")[2])


def _join_timeout():
    from minray.node_manager.membership import JOIN_TIMEOUT_S
    return JOIN_TIMEOUT_S


def _start_failure(head, head_address, code, timeout, log_path):
    """What went wrong, for a node manager that exited with `code` (None: it
    was killed here after `timeout` seconds without getting ready)."""
    tail = log_tail(log_path)
    if not head and code == JOIN_REFUSED_EXIT:
        tail = log_tail(log_path, lines=200)     # the cause may precede a traceback
        marker = "cannot join the cluster at "
        line = next((line for line in reversed(tail.splitlines()) if marker in line), None)
        if line is not None:
            # "... cannot join the cluster at HOST:PORT: <reason>" -> <reason>
            reason = line[line.index(marker) + len(marker):].split(": ", 1)[-1].strip()
            # What failed on the way (a refused token, say) is logged before it.
            earlier = next((l for l in reversed(tail.splitlines())
                            if " ERROR " in l and marker not in l
                            and not l.rstrip().endswith("the node manager failed")), None)
            if earlier is not None:
                reason += f" (before that: {earlier.split(' ERROR ', 1)[1].strip()})"
            return (f"the node could not join the minray cluster at {head_address}: {reason}. "
                    "Check the address (the head prints it at `minray start --head`) and "
                    "the token (--token-file or MINRAY_TOKEN must hold the head's token). "
                    "Nothing was left running.")
    why = (f"its node manager exited with code {code}" if code is not None
           else f"its node manager was not ready within {timeout:.0f} s")
    return (f"the minray {'head' if head else 'node'} failed to start: {why}. Nothing was "
            f"left running. The last lines of {log_path}:\n{tail}" if tail else
            f"the minray {'head' if head else 'node'} failed to start: {why}. Nothing was "
            f"left running; its log {log_path} is empty.")


def _node_from_session(session_dir, socket_path, pid):
    info = read_node_info(session_dir) or {}
    return Node(session_dir, info.get("pid", pid), info.get("address"), info.get("node_id"),
                bool(info.get("is_head")), info.get("head_address"),
                info.get("socket", socket_path))


def read_node_info(session_dir):
    """The node.json a node manager wrote when ready, or None."""
    try:
        with open(os.path.join(session_dir, NODE_FILE)) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _write_json(path, value):
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(value, f)


# ------------------------------------------------------------ finding nodes

def local_sessions():
    """The session directories under the session root, oldest first (none if
    the root does not exist; UnsafeSessionPathError if it is not private)."""
    if not os.path.isdir(SESSION_ROOT):
        return []
    check_private(SESSION_ROOT, "session root")
    return [os.path.join(SESSION_ROOT, name) for name in sorted(os.listdir(SESSION_ROOT))
            if name.startswith("session-") and not os.path.islink(os.path.join(SESSION_ROOT, name))]


def local_nodes(detached_only=False):
    """Nodes running on this machine (a live session with a node.json whose
    pid runs), oldest first. detached_only: only those `minray start` or
    cluster_utils started, not the clusters drivers embed."""
    nodes = []
    for session_dir in local_sessions():
        if not os.path.exists(os.path.join(session_dir, TOKEN_FILE)):
            continue                        # finished session: only logs left
        info = read_node_info(session_dir)
        if info is None or not _pid_runs(info.get("pid")):
            continue
        if detached_only and info.get("embedded"):
            continue
        nodes.append(Node(session_dir, info["pid"], info.get("address"), info.get("node_id"),
                          bool(info.get("is_head")), info.get("head_address"),
                          info.get("socket")))
    return nodes


def find_local_node(address):
    """The session directory of a node on this machine for cluster `address`
    ("host:port"): the node listening there, else any local node whose head
    listens there; None if there is none."""
    wanted = normalize_address(address)
    nodes = local_nodes()
    for node in reversed(nodes):            # newest first
        if node.address and normalize_address(node.address) == wanted:
            return node.session_dir
    for node in reversed(nodes):
        if node.head_address and normalize_address(node.head_address) == wanted:
            return node.session_dir
    return None


def find_cluster_token(address):
    """The token of the cluster whose node listens at `address`, read from a
    local node's session, or None when no node of it runs on this machine."""
    session_dir = find_local_node(address)
    return read_token(session_dir) if session_dir else None


def _latest_is_live(head_address):
    """True if session_latest points at a running node of this cluster (then a
    joining node leaves it: "auto" keeps naming the node it named)."""
    if not os.path.islink(LATEST_LINK):
        return False
    session_dir = os.path.realpath(LATEST_LINK)
    info = read_node_info(session_dir)
    return (info is not None and _pid_runs(info.get("pid"))
            and os.path.exists(os.path.join(session_dir, TOKEN_FILE))
            and (head_address is None or info.get("head_address") == head_address))


def _pid_runs(pid):
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return False                        # not ours: not a node we started
    return True


# ------------------------------------------------------------ stopping

def stop_node(node, force=False, grace_s=STOP_GRACE_S):
    """Stop a node (a Node or its session directory) and clean up after it:
    SIGTERM (or SIGKILL with force=True), SIGKILL after grace_s, then its
    arena and session (the logs stay). Returns True if a process was running."""
    if isinstance(node, str):
        session_dir, process = node, None
        info = read_node_info(session_dir) or _launch_info(session_dir) or {}
        pid = info.get("pid")
    else:
        session_dir, process, pid = node.session_dir, node.process, node.pid
    was_running = False
    if pid is not None and _is_node_manager(pid, session_dir):
        was_running = True
        _stop_tree(pid, force=force, grace_s=grace_s, process=process)
    elif process is not None:
        process.poll()
    _clean_session(session_dir)
    return was_running


def clean_stale_sessions(include_embedded=False, include_heads=False):
    """Clean up after nodes started here whose node manager is gone (killed,
    or crashed): their session (the logs stay) and arena. With
    include_embedded, also the clusters drivers started with init() whose
    node manager is gone (a node manager killed with -9 can't remove its
    own arena). A dead head keeps its session (token, control store), which
    `minray start --head --restart` takes over, unless include_heads (a new
    head, `minray stop`); only its arena goes. Returns how many."""
    cleaned = 0
    for session_dir in local_sessions():
        if not os.path.exists(os.path.join(session_dir, TOKEN_FILE)):
            continue
        info = read_node_info(session_dir) or _launch_info(session_dir)
        if info is None:
            continue                        # a driver's cluster still starting
        if info.get("embedded") and not include_embedded:
            continue
        if not _is_node_manager(info.get("pid"), session_dir):
            if _is_detached_head(info) and _restart_under_way(session_dir):
                continue                    # (a new head is starting in it)
            if _is_detached_head(info) and not include_heads:
                _remove_arenas(session_dir)
                continue
            _clean_session(session_dir)
            cleaned += 1
    return cleaned


def _is_detached_head(info):
    return bool(info.get("is_head", info.get("head"))) and not info.get("embedded")


def dead_head_session():
    """The newest session of a head started here (minray start, cluster_utils)
    whose node manager is gone, or None."""
    for session_dir in reversed(local_sessions()):
        if not os.path.exists(os.path.join(session_dir, TOKEN_FILE)):
            continue
        info = read_node_info(session_dir) or _launch_info(session_dir)
        if info is not None and _is_detached_head(info) \
                and not _is_node_manager(info.get("pid"), session_dir):
            return session_dir
    return None


def _kill_leftovers(session_dir, timeout=10.0):
    """SIGKILL the minray services a dead node manager left running for its
    session (its control store shards: processes of ours started with
    `--session-dir` it), and wait until they are gone: a head taking the
    session over needs their ports and LMDB files. (Its workers end on
    their own when the node manager's socket closes.)"""
    import psutil
    victims = []
    for proc in psutil.process_iter(["uids", "cmdline"]):
        uids, argv = proc.info["uids"], proc.info["cmdline"] or []
        if proc.pid == os.getpid() or uids is None or uids.effective != os.getuid():
            continue
        if any(argv[i] == "--session-dir" and argv[i + 1] == session_dir
               for i in range(len(argv) - 1)):
            try:
                proc.kill()
                victims.append(proc)
            except psutil.Error:            # gone, or not ours to kill after all
                pass
    deadline = time.monotonic() + timeout
    for proc in victims:
        while time.monotonic() < deadline:
            try:
                if proc.status() == psutil.STATUS_ZOMBIE:
                    break                   # a zombie holds nothing (its parent reaps it)
            except psutil.NoSuchProcess:
                break
            time.sleep(0.01)


def _launch_info(session_dir):
    try:
        with open(os.path.join(session_dir, LAUNCH_FILE)) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _is_node_manager(pid, session_dir):
    """True if `pid` runs the node manager of `session_dir` (not some other
    process that got the pid after the node ended)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            argv = f.read().split(b"\0")
    except OSError:
        return False
    return NODE_MANAGER_ENTRY.encode() in argv and os.fsencode(session_dir) in argv


def _stop_tree(pid, force=False, grace_s=STOP_GRACE_S, process=None):
    """End a node manager and every process under it (control store shards,
    workers): those are gathered first, as they outlive a parent killed -9."""
    import psutil
    try:
        root = psutil.Process(pid)
        tree = [root] + root.children(recursive=True)
    except psutil.NoSuchProcess:
        if process is not None:
            process.wait()
        return
    if not force:
        try:
            root.send_signal(signal.SIGTERM)
        except psutil.NoSuchProcess:
            pass
        _wait(root, process, grace_s)
        # A node manager that stopped cleanly has stopped its workers too;
        # give them a moment before the stragglers are killed.
        psutil.wait_procs(tree[1:], timeout=2.0 if not root.is_running() else 0)
    for proc in tree:
        try:
            proc.kill()
        except psutil.NoSuchProcess:
            pass
    _wait(root, process, 10.0)
    psutil.wait_procs(tree[1:], timeout=10.0)


def _wait(root, process, timeout):
    import psutil
    if process is not None:                 # our child: reap it
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            pass
        return
    try:
        root.wait(timeout)
    except (psutil.TimeoutExpired, psutil.NoSuchProcess):
        pass


def _clean_session(session_dir):
    retire_session_dir(session_dir)
    _remove_arenas(session_dir)


@contextlib.contextmanager
def tool_client(session_dir):
    """A short-lived connection to the node manager of a local session, for
    tools (minray status/list, cluster_utils) that are not drivers of the
    user's: it holds no objects and runs nothing."""
    from minray import ids
    from minray.local_cluster import find_node_socket
    from minray.runtime import core
    session_dir, socket_path = find_node_socket(session_dir)
    job_id = os.urandom(ids.JOB_ID_SIZE)
    client = core.CoreClient(socket_path, read_token(session_dir), "driver",
                             {"pid": os.getpid(), "job_id": job_id, "tool": True,
                              "namespace": TOOL_NAMESPACE, "anonymous_namespace": True,
                              "code_paths": []},
                             root_task_id=ids.driver_task_id(job_id))
    try:
        if not client.wait_until(lambda: client.welcome is not None, 30.0):
            raise RaySystemError(f"the node manager of {session_dir} did not answer within 30 s")
        yield client
    finally:
        client.close()


def query_node(session_dir, what, timeout=30.0):
    """One info request to the node manager of a local session."""
    with tool_client(session_dir) as client:
        return client.request_info(what, timeout)


def read_token_file(path):
    """The token in a file given with --token-file (hex, as the head's
    session holds it); it must be a private file of the user's."""
    try:
        check_private(path, "token file", directory=False)
        with open(path) as f:
            text = f.read().strip()
    except FileNotFoundError:
        raise FileNotFoundError(f"no token file at {path}") from None
    return parse_token(text, f"the token file {path}")


def parse_token(text, where):
    try:
        token = bytes.fromhex(text)
    except ValueError:
        token = b""
    if not token:
        raise ValueError(f"{where} does not hold a cluster token (the hex text of the head's "
                         "session token file)")
    return token


__all__ = ["DEFAULT_HEAD_PORT", "Node", "NodeStartError", "TOKEN_ENV", "find_cluster_token",
           "find_local_node", "local_nodes", "parse_address", "read_node_info",
           "read_token_file", "start_node", "stop_node", "UnsafeSessionPathError"]
