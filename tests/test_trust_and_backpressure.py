"""Trust boundaries and backpressure, with real processes and sockets.

A peer that holds the token but lies about who it is must not get another
process killed; session paths other users control are refused; a burst of
connections all get through the listen backlog; a flood of bad connections
can't flood the log; a peer that stops reading can't make the node manager
buffer without bound, and everyone else keeps working.
"""
import os
import re
import select
import signal
import socket
import subprocess
import time

import psutil
import pytest

import minray
from minray import wire
from minray.runtime import core
from minray.node_manager.workers import ProcessHandle
from minray.session import (
    UnsafeSessionPathError, create_session_dir, node_socket_path, read_token,
)
from minray_driver import poll, run_driver, wait_for_file

MiB = 1 << 20


# --------------------------------------------------------------- helpers

class Cluster:
    """The in-process driver's cluster, seen from outside: its socket, token,
    log and processes."""

    def __init__(self, context):
        self.session_dir = context["session_dir"]
        self.token = read_token(self.session_dir)
        self.socket_path = node_socket_path(self.session_dir)
        self.log_path = os.path.join(self.session_dir, "logs", "node_manager.log")
        self.node_manager = next(p for p in psutil.Process().children()
                                 if "minray.node_manager" in " ".join(p.cmdline()))

    def log(self):
        with open(self.log_path, errors="replace") as f:
            return f.read()

    def wait_for_log(self, text, timeout=30.0):
        poll(lambda: text in self.log(), timeout, what=f"{text!r} in the node manager log")

    def zygote(self):
        return next(p for p in self.node_manager.children()
                    if "minray.worker.zygote" in " ".join(p.cmdline()))

    def connect(self, hello=None):
        """An authenticated raw socket, after an optional hello message."""
        sock = wire.connect(self.socket_path, self.token)
        if hello is not None:
            sock.sendall(wire.encode(hello))
        return sock


@pytest.fixture
def cluster(monkeypatch):
    """cluster(**env) -> Cluster of a fresh minray.init(num_cpus=2) in this
    process, its node manager started with env set; shut down afterwards."""

    def start(**env):
        for name, value in env.items():
            monkeypatch.setenv(name, value)
        return Cluster(minray.init(num_cpus=2))

    yield start
    if minray.is_initialized():
        minray.shutdown()


def read_until_closed(sock, timeout=30.0):
    """Bytes the peer sent until it closed; fails if it never closes."""
    sock.settimeout(timeout)
    total = 0
    try:
        while True:
            chunk = sock.recv(1 << 20)
            if not chunk:
                return total
            total += len(chunk)
    except ConnectionResetError:
        return total
    except socket.timeout:
        raise AssertionError("the node manager did not close the connection") from None


@minray.remote
def echo(x):
    return x


def assert_serving():
    assert minray.get([echo.remote(i) for i in range(20)]) == list(range(20))


# --------------------------------------------------------------- hostile worker hellos

def test_a_hello_claiming_another_pid_never_gets_that_process_killed(cluster):
    c = cluster()
    victim = subprocess.Popen(["sleep", "600"])
    try:
        # 1. A worker id nobody asked for, claiming the victim's pid.
        sock = c.connect(("hello", "worker", {"worker_id": "0123456789ab", "pid": victim.pid}))
        read_until_closed(sock)
        sock.close()
        c.wait_for_log("worker id '0123456789ab' is not one this node manager asked for")

        # 2. A worker id the node manager did ask for, stolen on its way to
        # the zygote: stop the zygote, kill a worker, and take the request for
        # its replacement out of the zygote's stdin pipe.
        poll(lambda: core.current().request_info("stats")["workers"] == 2,
             what="both workers to connect")
        zygote = c.zygote()
        worker = zygote.children()[0]
        zygote.suspend()
        try:
            worker.kill()
            request = _read_line(f"/proc/{zygote.pid}/fd/0")
            worker_id = re.search(rb'"worker_id": "(\w+)"', request).group(1).decode()

            sock = c.connect(("hello", "worker", {"worker_id": worker_id, "pid": victim.pid}))
            read_until_closed(sock)
            sock.close()
            c.wait_for_log(f"it claims pid {victim.pid} but the process that opened the "
                           f"socket is pid {os.getpid()}")

            # 3. The same stolen id, honestly claiming our own pid: we are no
            # child of the zygote.
            sock = c.connect(("hello", "worker", {"worker_id": worker_id, "pid": os.getpid()}))
            read_until_closed(sock)
            sock.close()
            c.wait_for_log(f"its process (pid {os.getpid()}, parent {os.getppid()}) was not "
                           f"started by this node's zygote (pid {zygote.pid})")
            # Give the request back: the real worker still gets that id.
            with open(f"/proc/{zygote.pid}/fd/0", "wb") as pipe:
                pipe.write(request)
        finally:
            zygote.resume()

        assert_serving()                 # after the refused connections were closed
        assert victim.poll() is None, "the node manager killed a process it never started"
        assert "Traceback" not in c.log()
    finally:
        victim.kill()
        victim.wait()


def _read_line(path, timeout=20.0):
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    data = b""
    deadline = time.monotonic() + timeout
    try:
        while not data.endswith(b"\n"):
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                raise AssertionError(f"nothing arrived on {path} in {timeout} s")
            data += os.read(fd, 1)      # one byte at a time: leave the rest in the pipe
    finally:
        os.close(fd)
    return data


def test_a_process_handle_never_signals_a_process_that_exited():
    process = subprocess.Popen(["sleep", "600"])
    handle = ProcessHandle.open(process.pid)
    assert handle.alive()
    process.kill()
    process.wait()                      # reaped: its pid may go to anyone now
    assert not handle.alive()
    handle.signal(signal.SIGKILL)       # no error, and no signal to a newcomer
    handle.close()


# --------------------------------------------------------------- session paths

def test_session_roots_other_users_could_control_are_refused(tmp_path):
    open_root = tmp_path / "open"
    open_root.mkdir()
    os.chmod(open_root, 0o777)
    with pytest.raises(UnsafeSessionPathError, match=r"open to other users \(mode 0777\)"
                                                     r".*chmod 700"):
        create_session_dir(root=str(open_root))
    assert os.listdir(open_root) == []          # nothing was made inside it

    link = tmp_path / "link"
    private = tmp_path / "private"
    private.mkdir(mode=0o700)
    link.symlink_to(private)
    with pytest.raises(UnsafeSessionPathError, match="a symbolic link"):
        create_session_dir(root=str(link))

    session = create_session_dir(root=str(private))     # the fix works
    assert len(read_token(session)) == 32
    os.chmod(os.path.join(session, "token"), 0o644)
    with pytest.raises(UnsafeSessionPathError, match="cluster token file.*mode 0644"):
        read_token(session)


@pytest.mark.skipif(os.getuid() != 0, reason="giving a directory to another user needs root")
def test_a_session_root_owned_by_another_user_is_refused(tmp_path):
    foreign = tmp_path / "foreign"
    foreign.mkdir(mode=0o700)
    os.chown(foreign, 65534, 65534)
    with pytest.raises(UnsafeSessionPathError, match="owned by uid 65534, not by you"):
        create_session_dir(root=str(foreign))


def _init_auto(root):
    """Run init(address="auto") with this session root; return its stderr."""
    proc = run_driver("""
        import minray
        minray.init(address="auto")
    """, env={"MINRAY_SESSION_ROOT": str(root)}, check=False, timeout=60)
    assert proc.returncode != 0, proc.stdout
    return proc.stderr


def test_init_auto_does_not_follow_a_planted_session_latest(tmp_path):
    # The attack: another user makes a world-writable root (or a link in
    # ours) pointing at a "session" whose token they know.
    planted = tmp_path / "planted"
    planted.mkdir()
    os.chmod(planted, 0o777)
    session = tmp_path / "planted" / "session-x"
    session.mkdir(mode=0o700)
    (session / "token").write_text("00" * 32)
    os.chmod(session / "token", 0o600)
    (planted / "session_latest").symlink_to(session)
    assert "minray refuses the session root" in _init_auto(planted)

    # Our own private root, but its link leads outside it.
    ours = tmp_path / "ours"
    ours.mkdir(mode=0o700)
    (ours / "session_latest").symlink_to(session)
    assert "outside the session root" in _init_auto(ours)

    # Inside our root, but to a session directory open to others.
    os.unlink(ours / "session_latest")
    inside = ours / "session-y"
    inside.mkdir()
    os.chmod(inside, 0o755)
    (ours / "session_latest").symlink_to(inside)
    err = _init_auto(ours)
    assert "minray refuses the session directory" in err and "mode 0755" in err


# --------------------------------------------------------------- connection bursts and log floods

def test_a_burst_of_300_connections_all_complete_the_handshake(cluster):
    c = cluster()
    socks = []
    try:
        for _ in range(300):
            # Non-blocking, as a client with a connect timeout: a full listen
            # backlog fails at once ("Resource temporarily unavailable").
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.setblocking(False)
            socks.append(sock)
            sock.connect(c.socket_path)
        for sock in socks:
            sock.setblocking(True)
            sock.settimeout(30)
            reply, expected = wire.client_reply(c.token, wire.recv_exact(sock, wire.HELLO_SIZE))
            sock.sendall(reply)
            assert wire.recv_exact(sock, wire.DIGEST_SIZE) == expected
    finally:
        for sock in socks:
            sock.close()
    assert_serving()


def test_garbage_connections_are_logged_at_a_bounded_rate(cluster):
    c = cluster()
    connections = 1000
    started = time.monotonic()
    for _ in range(connections):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(30)
        sock.connect(c.socket_path)
        wire.recv_exact(sock, wire.HELLO_SIZE)
        sock.sendall(os.urandom(wire.REPLY_SIZE))
        assert read_until_closed(sock) in (len(wire.REJECTED), 0)
        sock.close()
    elapsed = time.monotonic() - started

    def accounted():
        # Every rejection is either logged or counted in a "left out" line.
        log = c.log()
        logged = log.count("rejecting connection from")
        left_out = sum(int(n) for n in re.findall(r"(\d+) more warnings like the above", log))
        return (logged, left_out) if logged + left_out == connections else None

    logged, left_out = poll(accounted, timeout=3 * wire.WARNING_INTERVAL_S,
                            what="every rejection to be logged or counted")
    windows = elapsed / wire.WARNING_INTERVAL_S + 2
    assert logged <= windows * wire.WARNINGS_PER_INTERVAL, (logged, elapsed)
    assert left_out >= connections - windows * wire.WARNINGS_PER_INTERVAL
    assert len(c.log()) < 200 * windows * (wire.WARNINGS_PER_INTERVAL + 1)
    assert_serving()


# --------------------------------------------------------------- frame size limits

def test_frames_over_their_kind_limit_drop_only_that_peer(cluster):
    c = cluster()
    # A first frame (the hello) over its limit: dropped before the body is read.
    sock = c.connect()
    sock.sendall(wire.FRAME_HEADER.pack(wire.FIRST_MAX_FRAME + 1))
    read_until_closed(sock)
    c.wait_for_log(f"exceeds the {wire.FIRST_MAX_FRAME} byte limit")

    # An ordinary message over the ordinary limit, after a proper hello.
    sock = c.connect(("hello", "driver", {}))
    sock.sendall(wire.encode(("info", 1, "x" * (wire.ORDINARY_MAX_FRAME + 10))))
    read_until_closed(sock)
    c.wait_for_log("'info' message of")
    assert f"over the {wire.ORDINARY_MAX_FRAME}-byte limit for it" in c.log()

    # A message that may be large (exported code with a big closure) passes.
    captured = os.urandom(5 * MiB)

    @minray.remote
    def closure_size():
        return len(captured)

    assert minray.get(closure_size.remote()) == 5 * MiB
    assert_serving()


# --------------------------------------------------------------- peers that stop reading

@minray.remote
def value_after(blocker, i):
    return bytes([i % 256]) * 90_000        # inline (under 100 KB), pushed to owners


@minray.remote
def wait_for(path):
    wait_for_file(path, 60)


def _send_until_blocked(sock, frame, count, stall_s=5.0):
    """Send frame count times without reading; return how many went out
    before the socket stayed full for stall_s."""
    sock.setblocking(False)
    data = memoryview(frame * count)
    sent = 0
    poller = select.poll()
    poller.register(sock, select.POLLOUT)
    while sent < len(data):
        try:
            sent += sock.send(data[sent:])
        except BlockingIOError:
            if not poller.poll(stall_s * 1000):
                break
    return sent // len(frame)


def test_a_peer_that_stops_reading_is_paused_then_dropped(cluster, tmp_path):
    c = cluster(MINRAY_MAX_OUTPUT_BACKLOG=str(8 * MiB))
    value = minray.put(b"v" * 90_000)          # inline: each "sub" answer is ~90 KB
    baseline = c.node_manager.memory_info().rss

    # A peer asks for the value 20,000 times (1.8 GB of answers) and never
    # reads: the node manager stops reading its requests instead of
    # buffering the answers.
    greedy = c.connect(("hello", "driver", {}))
    requests = 20_000
    taken = _send_until_blocked(greedy, wire.encode(("sub", [value.binary()])), requests)
    assert taken < requests, "the node manager kept reading a peer that reads nothing"
    assert_serving()                            # everyone else is served meanwhile
    grown = c.node_manager.memory_info().rss - baseline
    assert grown < 150 * MiB, f"the node manager grew by {grown / MiB:.0f} MiB"

    # A peer that subscribed to results and stops reading while others make
    # them: pushed output piles up past the limit, and it is dropped.
    gate = str(tmp_path / "gate")
    blocker = wait_for.remote(gate)
    refs = [value_after.remote(blocker, i) for i in range(300)]       # 27 MB in all
    subscriber = c.connect(("hello", "driver", {}))
    subscriber.sendall(wire.encode(("sub", [r.binary() for r in refs])))
    assert_serving()                            # the "sub" was read before the results exist
    open(gate, "w").close()
    values = minray.get(refs, timeout=120)
    assert [v[0] for v in values] == [i % 256 for i in range(300)]
    assert all(len(v) == 90_000 for v in values)
    c.wait_for_log("it stopped reading")
    received = read_until_closed(subscriber)  # what was in flight, then the close
    assert received < 27_000_000
    greedy.close()
    subscriber.close()
    assert_serving()
    assert "Traceback" not in c.log()


def test_a_worker_that_submits_without_reading_is_not_deadlocked(cluster):
    # The node manager stops reading a peer whose output piles up; a worker
    # that only submits (and so never reads) must read while its sends wait.
    c = cluster()

    @minray.remote
    def child(i):
        return bytes([i % 256]) * 20_000

    @minray.remote
    def parent(n):
        refs = [child.remote(i) for i in range(n)]       # results pour in meanwhile
        return sum(v[0] for v in minray.get(refs))

    n = 3000                                  # 60 MB of results for the parent
    assert minray.get(parent.remote(n), timeout=180) == sum(i % 256 for i in range(n))
    assert "stopped reading" not in c.log()


def test_a_control_store_subscriber_that_stops_reading_is_dropped(tmp_path, monkeypatch):
    from minray.gcs import GcsClient, GcsProcesses
    monkeypatch.setenv("MINRAY_MAX_OUTPUT_BACKLOG", str(4 * MiB))
    session = create_session_dir(root=str(tmp_path))
    token = read_token(session)
    shards = GcsProcesses(session, num_shards=1).start()
    writer = GcsClient(shards.addresses, token, reconnect_timeout=15.0)
    try:
        stalled = wire.SealedSocket(shards.addresses[0], token)
        stalled.send((1, "sub", ("tasks", None)))
        assert stalled.read() == (1, True, None)

        # 40 MB of changes it never reads, one published frame per write
        # (each flushed on its own): dropped once 4 MiB more pile up.
        value = os.urandom(100_000)
        for i in range(400):
            writer.put("tasks", b"k%d" % i, value)
            writer.flush(wait=True)
        log_path = os.path.join(session, "logs", "gcs-0.log")
        poll(lambda: "it stopped reading" in open(log_path).read(), 30,
             what="the stalled subscriber to be dropped")
        assert read_until_closed(stalled.sock) < 40_000_000
        stalled.close()
        assert writer.get("tasks", b"k399") == value       # the others are served
    finally:
        writer.close()
        shards.stop()
