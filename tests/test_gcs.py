"""The control store: real shard server processes, real LMDB files, real sockets.

Nothing is mocked. Waiting is done on events or by polling with a deadline,
never by sleeping for a guessed time.
"""
import collections
import os
import pickle
import signal
import socket
import stat
import subprocess
import threading
import time
import zlib

import pytest

from conftest import python_child
from minray import wire
from minray.gcs import TABLES, ControlStoreError, GcsClient, GcsProcesses
from minray.gcs.client import shard_for
from minray.session import create_session_dir, read_token

MiB = 1 << 20


# --------------------------------------------------------------- helpers

def wait_for(predicate, timeout=15.0, what="condition"):
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.002)


def log_text(session_dir, index=0):
    path = os.path.join(session_dir, "logs", f"gcs-{index}.log")
    with open(path, errors="replace") as f:
        return f.read()


def wait_for_log(session_dir, text, index=0):
    wait_for(lambda: text in log_text(session_dir, index), what=f"{text!r} in the gcs log")


def raw_connect(address):
    """A plain socket to a shard, past nothing but its hello."""
    sock = socket.create_connection(address, timeout=10)
    wire.recv_exact(sock, wire.HELLO_SIZE)
    return sock


def sealed_link(address, token):
    """An authenticated link to a shard whose frames carry MACs, as every
    TCP client's must; `send_sealed` sends any bytes as one sealed frame."""
    link = wire.SealedSocket(address, token)
    link.send_sealed = lambda data: link.sock.sendall(link.sealer.seal(data))
    return link


def read_until_closed(sock, timeout=10.0):
    """Everything the peer sends until it closes; fails if it never closes."""
    sock.settimeout(timeout)
    data = bytearray()
    try:
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                return bytes(data)
            data += chunk
    except ConnectionResetError:
        return bytes(data)
    except socket.timeout:
        raise AssertionError("the server did not close the connection") from None


def raw_request(link, request_id, op, args):
    link.send((request_id, op, args))
    return link.read()


def frame(payload):
    return wire.FRAME_HEADER.pack(len(payload)) + payload


@pytest.fixture
def session(tmp_path):
    return create_session_dir(root=str(tmp_path))


@pytest.fixture
def cluster(session):
    """cluster(**GcsProcesses kwargs) -> started GcsProcesses; all stopped afterwards."""
    started = []

    def start(**kwargs):
        g = GcsProcesses(session, **kwargs).start()
        started.append(g)
        return g

    yield start
    for g in reversed(started):
        g.stop()


@pytest.fixture
def client(cluster, session):
    """client(g or addresses, **GcsClient kwargs); closed before the servers stop."""
    made = []

    def make(target, token=None, **kwargs):
        addresses = target.addresses if isinstance(target, GcsProcesses) else target
        kwargs.setdefault("reconnect_timeout", 15.0)
        c = GcsClient(addresses, token or read_token(session), **kwargs)
        made.append(c)
        return c

    yield make
    for c in made:
        c.close()


def assert_serving(g, client_factory):
    """A fresh client can still write and read every shard."""
    c = client_factory(g)
    keys = [b"alive-%d" % i for i in range(4 * g.num_shards)]
    for k in keys:
        c.put("nodes", k, k)
    c.flush()
    assert c.get_many("nodes", keys) == keys


# --------------------------------------------------------------- session

def test_token_file_is_private(session):
    token_path = os.path.join(session, "token")
    assert stat.S_IMODE(os.stat(token_path).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(session).st_mode) == 0o700
    assert len(read_token(session)) == 32
    # Every session gets its own random token.
    other = create_session_dir(root=os.path.dirname(session))
    assert read_token(other) != read_token(session)


# --------------------------------------------------------------- routing, reads, scans

@pytest.mark.parametrize("num_shards", [2, 3])
def test_keys_are_routed_by_crc32_and_all_readable(cluster, client, num_shards):
    g = cluster(num_shards=num_shards)
    c = client(g)
    keys = [b"task-%04d" % i for i in range(300)]
    for i, k in enumerate(keys):
        c.put("tasks", k, {"i": i})
    c.flush()

    expected = collections.Counter(zlib.crc32(k) % num_shards for k in keys)
    assert all(shard_for(k, num_shards) == zlib.crc32(k) % num_shards for k in keys)
    info = c.info()
    assert [i["shard"] for i in info] == list(range(num_shards))
    assert len({i["pid"] for i in info}) == 1          # default: one process for all shards
    for number, shard_info in enumerate(info):
        assert shard_info["entries"]["tasks"] == expected[number] > 0

    # Each key lives on exactly its shard: a one-shard client of shard i sees
    # only the keys routed to i.
    for number, address in enumerate(g.addresses):
        only = client([address])
        values = only.get_many("tasks", keys)
        for i, (k, v) in enumerate(zip(keys, values)):
            assert v == ({"i": i} if shard_for(k, num_shards) == number else None)

    assert [c.get("tasks", k) for k in keys] == [{"i": i} for i in range(300)]
    assert c.get_many("tasks", keys) == [{"i": i} for i in range(300)]


def test_scans_prefix_limit_sorted_across_shards(cluster, client):
    g = cluster(num_shards=3)
    c = client(g)
    job_keys = [b"job-%03d" % i for i in range(100)]
    other_keys = [b"other-%03d" % i for i in range(30)]
    for k in reversed(job_keys + other_keys):            # written out of order
        c.put("jobs", k, k.decode())
    c.put("nodes", b"job-999", "a different table")
    c.flush()
    # the job keys really are spread over all three shards
    assert all(i["entries"]["jobs"] > 0 for i in c.info())

    rows = c.scan("jobs", b"job-")
    assert [k for k, _ in rows] == job_keys
    assert all(v == k.decode() for k, v in rows)
    assert c.scan("jobs", b"job-", limit=7) == [(k, k.decode()) for k in job_keys[:7]]
    assert c.scan("jobs", b"job-05") == [(k, k.decode()) for k in job_keys[50:60]]
    assert [k for k, _ in c.scan("jobs")] == sorted(job_keys + other_keys)
    assert c.scan("jobs", b"nothing") == []
    assert c.scan("jobs", b"zzz") == []                   # past the last key
    assert c.scan("events") == []
    assert c.scan("nodes", b"job-") == [(b"job-999", "a different table")]


def test_get_many_missing_keys_and_deletes(cluster, client):
    g = cluster(num_shards=2)
    c = client(g)
    for i in range(0, 20, 2):
        c.put("objects", b"o%02d" % i, i)
    c.flush()
    keys = [b"o%02d" % i for i in range(20)] + [b"o04", b"missing"]
    assert c.get_many("objects", keys) == [
        i if i % 2 == 0 else None for i in range(20)] + [4, None]
    assert c.get_many("objects", []) == []
    assert c.get("objects", b"o03") is None

    c.delete("objects", b"o04")
    c.delete("objects", b"never-existed")                  # deleting nothing is fine
    assert c.get("objects", b"o04") is None                # read-your-writes, no flush needed
    assert c.get_many("objects", [b"o02", b"o04", b"o06"]) == [2, None, 6]
    assert sum(i["entries"]["objects"] for i in c.info()) == 9
    assert [k for k, _ in c.scan("objects")] == [b"o%02d" % i for i in range(0, 20, 2) if i != 4]
    # A value of None is stored as a value, unlike a delete.
    c.put("objects", b"none", None)
    c.flush()
    assert c.scan("objects", b"none") == [(b"none", None)]


# --------------------------------------------------------------- batching

def test_10k_puts_are_sent_in_few_batches(cluster, client):
    g = cluster(num_shards=1)
    c = client(g, batch_size=1000)
    for i in range(10_000):
        c.put("tasks", b"t%05d" % i, ("spec", i))
    c.flush()
    frames_sent = next(c.shards[0].conn.ids) - 1           # request ids count frames
    assert 10 <= frames_sent <= 1000, frames_sent           # batches, not one per put
    keys = [b"t%05d" % i for i in range(10_000)]
    assert c.get_many("tasks", keys) == [("spec", i) for i in range(10_000)]
    assert c.info()[0]["entries"]["tasks"] == 10_000


def test_flusher_thread_sends_writes_without_flush(cluster, client):
    g = cluster(num_shards=2)
    writer = client(g)
    reader = client(g)
    for i in range(50):
        writer.put("nodes", b"n%d" % i, i)                  # no flush() call
    keys = [b"n%d" % i for i in range(50)]
    wait_for(lambda: reader.get_many("nodes", keys) == list(range(50)), timeout=5,
             what="buffered writes to become visible to another client")


def test_a_write_only_client_does_not_keep_every_batch(cluster, client):
    # Acknowledgements must be consumed even if the client never reads.
    g = cluster(num_shards=1)
    c = client(g, batch_size=100)
    for i in range(30_000):
        c.put("events", b"e%06d" % i, i)
    shard = c.shards[0]
    with shard.lock:
        held = sum(len(batch) for batch in shard.unacked.values())
    assert held <= 100 * 100, held
    c.flush()
    assert c.info()[0]["entries"]["events"] == 30_000


# --------------------------------------------------------------- pub/sub

def test_key_subscription_gets_current_value_then_changes_and_deletes(cluster, client):
    g = cluster(num_shards=2)
    c = client(g)
    writer = client(g)
    writer.put("objects", b"obj", {"loc": "n1"})
    writer.flush()

    got = []
    changed = threading.Condition()

    def on_change(table, key, value):
        with changed:
            got.append((table, key, value))
            changed.notify_all()

    c.subscribe("objects", on_change, key=b"obj")
    assert got == [("objects", b"obj", {"loc": "n1"})]     # delivered before subscribe returns

    missing = []
    c.subscribe("objects", lambda t, k, v: missing.append(v), key=b"not-yet")
    assert missing == [None]

    writer.put("objects", b"obj", {"loc": "n2"})
    writer.put("objects", b"other", "not watched")
    writer.flush()
    writer.delete("objects", b"obj")
    writer.flush()
    with changed:
        assert changed.wait_for(lambda: len(got) >= 3, timeout=10)
    assert got == [("objects", b"obj", {"loc": "n1"}),
                   ("objects", b"obj", {"loc": "n2"}),
                   ("objects", b"obj", None)]                # a delete arrives as None
    writer.put("objects", b"not-yet", 5)
    writer.flush()
    wait_for(lambda: missing == [None, 5], what="the second key subscription")


def test_table_subscription_and_publish(cluster, client):
    g = cluster(num_shards=3)
    c = client(g)
    writer = client(g)
    got = {}
    lock = threading.Lock()

    def on_change(table, key, value):
        with lock:
            got[key] = (table, value)

    c.subscribe("nodes", on_change)
    keys = [b"node-%d" % i for i in range(30)]
    assert len({shard_for(k, 3) for k in keys}) == 3
    for k in keys:
        writer.put("nodes", k, {"alive": True})
    writer.put("actors", b"not-this-table", 1)
    writer.flush()
    wait_for(lambda: len(got) == 30, what="30 table changes")
    assert got == {k: ("nodes", {"alive": True}) for k in keys}

    writer.publish("nodes", b"ephemeral", "heartbeat")     # pushed, not stored
    wait_for(lambda: b"ephemeral" in got, what="a published message")
    assert got[b"ephemeral"] == ("nodes", "heartbeat")
    assert writer.get("nodes", b"ephemeral") is None
    assert b"not-this-table" not in got


def test_unsubscribe_stops_delivery(cluster, client):
    g = cluster(num_shards=1)
    c = client(g)
    writer = client(g)
    by_key, by_table = [], []
    sub_key = c.subscribe("actors", lambda t, k, v: by_key.append(v), key=b"a")
    sub_table = c.subscribe("actors", lambda t, k, v: by_table.append((k, v)))
    writer.put("actors", b"a", 1)
    writer.flush()
    wait_for(lambda: by_key == [None, 1] and by_table == [(b"a", 1)], what="first changes")

    sub_key.unsubscribe()
    sub_table.unsubscribe()
    marker = threading.Event()
    c.subscribe("actors", lambda t, k, v: v == "end" and marker.set(), key=b"z")
    writer.put("actors", b"a", 2)
    writer.put("actors", b"z", "end")
    writer.flush()
    assert marker.wait(10)              # pushes on one connection arrive in order
    assert by_key == [None, 1]
    assert by_table == [(b"a", 1)]


def test_pubsub_under_load_delivers_every_change_in_order(cluster, client):
    g = cluster(num_shards=2)
    c = client(g)
    writer = client(g)
    per_key = collections.defaultdict(list)
    lock = threading.Lock()
    count = [0]
    done = threading.Event()
    total = 5000

    def on_change(table, key, value):
        with lock:
            per_key[key].append(value)
            count[0] += 1
            if count[0] == total:
                done.set()

    c.subscribe("tasks", on_change)
    keys = [b"task-%02d" % i for i in range(100)]
    for version in range(50):
        for k in keys:
            writer.put("tasks", k, version)
    writer.flush()
    assert done.wait(30), f"only {count[0]} of {total} changes delivered"
    assert sorted(per_key) == keys
    for k in keys:
        assert per_key[k] == list(range(50)), k


def test_key_subscription_never_goes_back_in_time(cluster, client, session):
    # The current value is delivered before any change pushed after it, even
    # while the key is being written as fast as possible.
    g = cluster(num_shards=1)
    writer = client(g, flush_delay=0)
    stop = threading.Event()

    def write():
        i = 0
        while not stop.is_set():          # pipelined: pushes arrive back to back
            for _ in range(100):
                i += 1
                writer.put("objects", b"hot", i)
            writer.flush(wait=False)

    thread = threading.Thread(target=write)
    thread.start()
    try:
        for _ in range(40):
            c = GcsClient(g.addresses, read_token(session))
            seen = []
            c.subscribe("objects", lambda t, k, v, seen=seen: seen.append(v), key=b"hot")
            assert seen                                    # the current value, already
            n = len(seen)
            wait_for(lambda: len(seen) > n + 2, what="more changes")
            c.close()
            values = [v for v in list(seen) if v is not None]
            assert values == sorted(values), values[:10]
    finally:
        stop.set()
        thread.join()


# --------------------------------------------------------------- durability, restarts

def test_kill9_restart_keeps_data_reconnects_and_resubscribes(cluster, client):
    g = cluster(num_shards=2, shards_per_process=1)
    assert len(set(g.pids())) == 2
    c = client(g)
    writer = client(g)
    keys = [b"spec-%04d" % i for i in range(2000)]
    for i, k in enumerate(keys):
        c.put("tasks", k, {"i": i})
    c.flush()

    watched = []
    c.subscribe("objects", lambda t, k, v: watched.append(v), key=b"watched")
    table_changes = []
    c.subscribe("errors", lambda t, k, v: table_changes.append(v))
    assert watched == [None]

    old = g.pids()
    for pid in old:
        os.kill(pid, signal.SIGKILL)
    # The next request reconnects transparently once the supervisor restarted the shard.
    assert c.get("tasks", b"spec-0007") == {"i": 7}
    wait_for(lambda: g.restarts == 2 and not set(g.pids()) & set(old), what="both restarts")
    assert c.get_many("tasks", keys) == [{"i": i} for i in range(2000)]
    assert sum(i["entries"]["tasks"] for i in c.info()) == 2000
    assert {i["pid"] for i in c.info()} == set(g.pids())

    # Key subscription resumed: a change after the restart is delivered.
    writer.put("objects", b"watched", "after restart")
    writer.flush()
    wait_for(lambda: watched and watched[-1] == "after restart", what="the key subscription")
    # Table subscription resumed (it only sees changes made after it re-subscribed).
    n = 0
    deadline = time.monotonic() + 15
    while not table_changes:
        assert time.monotonic() < deadline, "the table subscription never resumed"
        writer.put("errors", b"err-%d" % n, n)
        writer.flush()
        n += 1
        time.sleep(0.01)


def test_writes_in_flight_during_kill9_are_not_lost(cluster, client):
    g = cluster(num_shards=1)
    c = client(g, batch_size=100)
    n = 30_000
    for i in range(n):
        c.put("tasks", b"k%06d" % i, i)
        if i in (8_000, 20_000):
            before = g.restarts
            os.kill(g.pids()[0], signal.SIGKILL)
        if i in (9_000, 21_000):
            wait_for(lambda: g.restarts == before + 1, what="the restart")
    c.flush()
    values = c.get_many("tasks", [b"k%06d" % i for i in range(n)])
    missing = [i for i, v in enumerate(values) if v != i]
    assert not missing, f"{len(missing)} writes lost, first {missing[:5]}"
    assert g.restarts == 2


def test_new_processes_on_the_same_session_serve_the_old_data(cluster, client, session):
    g = cluster(num_shards=2)
    c = client(g)
    for i in range(500):
        c.put("functions", b"f%03d" % i, ("code", i))
    c.delete("functions", b"f007")
    c.flush()
    c.close()
    g.stop()

    g2 = cluster(num_shards=2)
    c2 = client(g2)
    values = c2.get_many("functions", [b"f%03d" % i for i in range(500)])
    assert values == [None if i == 7 else ("code", i) for i in range(500)]
    # and a client can find the new processes from the session directory alone
    c3 = GcsClient.from_session(session)
    try:
        assert c3.get("functions", b"f499") == ("code", 499)
    finally:
        c3.close()


# --------------------------------------------------------------- concurrency

CHILD = """
import sys
from minray.gcs import GcsClient
session, tag, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
c = GcsClient.from_session(session)
key = lambda i: f"{tag}-{i:05d}".encode()
for i in range(n):
    c.put("tasks", key(i), (tag, i))
    if i % 100 == 99:
        assert c.get("tasks", key(i)) == (tag, i)
c.flush()
assert c.get_many("tasks", [key(i) for i in range(n)]) == [(tag, i) for i in range(n)]
c.close()
print("ok", flush=True)
"""


def test_concurrent_threads_and_processes(cluster, client, session):
    g = cluster(num_shards=2)
    shared = client(g)
    n = 1000
    children = [python_child(CHILD, session, f"proc{p}", n, stdout=subprocess.PIPE)
                for p in range(3)]
    errors = []

    def work(tag, c):
        try:
            key = lambda i: f"{tag}-{i:05d}".encode()
            for i in range(n):
                c.put("tasks", key(i), (tag, i))
                if i % 50 == 49:
                    assert c.get("tasks", key(i)) == (tag, i)    # read-your-writes
                    assert c.get_many("tasks", [key(i - 1), key(i)]) == [(tag, i - 1), (tag, i)]
            c.flush()
        except Exception as exc:                                  # reported below
            errors.append((tag, repr(exc)))

    threads = [threading.Thread(target=work, args=(f"thr{t}", shared if t < 2 else client(g)))
               for t in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    for child in children:
        out, _ = child.communicate(timeout=60)
        assert child.returncode == 0 and out.strip() == b"ok"
    assert not errors, errors
    tags = [f"thr{t}" for t in range(4)] + [f"proc{p}" for p in range(3)]
    rows = shared.scan("tasks")
    assert len(rows) == len(tags) * n
    assert sorted(rows) == sorted((f"{tag}-{i:05d}".encode(), (tag, i))
                                  for tag in tags for i in range(n))


# --------------------------------------------------------------- authentication and bad peers

def test_wrong_token_is_rejected_and_logged(cluster, client, session):
    g = cluster(num_shards=2)
    with pytest.raises(wire.AuthenticationError, match="rejected"):
        wire.connect(g.addresses[0], b"\x00" * 32)
    wait_for_log(session, "wrong cluster token")

    started = time.monotonic()
    bad = GcsClient(g.addresses, os.urandom(32), reconnect_timeout=20)
    try:
        with pytest.raises(ControlStoreError, match="rejected"):
            bad.get("nodes", b"x")
    finally:
        bad.close()
    assert time.monotonic() - started < 10           # not retried until the timeout
    assert_serving(g, client)


def test_client_refuses_a_server_without_the_token():
    # Mutual authentication: a fake service that cannot prove the token.
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)

    def fake_server():
        conn, _ = listener.accept()
        _, hello = wire.server_hello()
        conn.sendall(hello)
        wire.recv_exact(conn, wire.REPLY_SIZE)
        conn.sendall(os.urandom(wire.DIGEST_SIZE))
        conn.recv(1)
        conn.close()

    thread = threading.Thread(target=fake_server)
    thread.start()
    try:
        with pytest.raises(wire.AuthenticationError, match="failed to prove"):
            wire.connect(listener.getsockname(), os.urandom(32))
    finally:
        thread.join(10)
        listener.close()


def test_garbage_instead_of_the_handshake(cluster, client, session):
    g = cluster(num_shards=1)
    sock = raw_connect(g.addresses[0])
    sock.sendall(os.urandom(wire.REPLY_SIZE + 100))
    assert read_until_closed(sock) in (wire.REJECTED, b"")
    sock.close()
    wait_for_log(session, "wrong cluster token")

    # Not a minray client at all: an HTTP request.
    sock = raw_connect(g.addresses[0])
    sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n" + b"x" * 64)
    read_until_closed(sock)
    sock.close()
    assert_serving(g, client)


class _RunsCode:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (os.system, (f"touch {self.path}",))


def _bad_frames(tmp_path):
    marker = tmp_path / "pwned"
    return {
        "garbage frame": (frame(os.urandom(200)), "undecodable frame"),
        "huge length prefix": (wire.FRAME_HEADER.pack(wire.MAX_FRAME + 1) + b"xx",
                               "exceeds the"),
        "global reference": (frame(pickle.dumps(os.system)), "only plain data"),
        "code on unpickle": (frame(pickle.dumps((1, "get", _RunsCode(marker)))),
                             "only plain data"),
        "not a request": (wire.encode(["get", "tasks", b"k"]), "must be (request_id, op, args)"),
    }, marker


@pytest.mark.parametrize("case", ["garbage frame", "huge length prefix", "global reference",
                                  "code on unpickle", "not a request", "unsealed"])
def test_authenticated_peer_sending_bad_frames_is_dropped(cluster, client, session, tmp_path,
                                                          case):
    g = cluster(num_shards=1)
    token = read_token(session)
    bystander = client(g)
    bystander.put("tasks", b"k", "v")
    bystander.flush()

    # The raw path works when used properly (so the failures below mean something).
    link = sealed_link(g.addresses[0], token)
    assert raw_request(link, 7, "get", ("tasks", b"k"))[:2] == (7, True)

    frames, marker = _bad_frames(tmp_path)
    if case == "unsealed":
        # A well-formed request without its MAC (injected on the path): never read.
        link.sock.sendall(wire.encode((8, "write", [("tasks", b"k", b"\x01" + pickle.dumps(0))])))
        reason = "MAC is wrong"
    else:
        payload, reason = frames[case]
        link.send_sealed(payload)
    read_until_closed(link.sock)
    link.close()
    wait_for_log(session, reason)
    assert not marker.exists()                          # nothing was unpickled into code
    assert bystander.get("tasks", b"k") == "v"          # its connection survived
    assert_serving(g, client)


def test_truncated_frame_then_close(cluster, client, session):
    g = cluster(num_shards=1)
    link = sealed_link(g.addresses[0], read_token(session))
    whole = link.sealer.seal(wire.encode((1, "write", [("tasks", b"half",
                                                        b"\x01" + pickle.dumps(1))])))
    link.sock.sendall(whole[:len(whole) // 2])
    link.close()
    c = client(g)
    assert c.get("tasks", b"half") is None                   # never applied
    assert_serving(g, client)
    assert "Traceback" not in log_text(session)


def test_bad_requests_get_error_replies_and_keep_the_connection(cluster, client, session):
    g = cluster(num_shards=1)
    link = sealed_link(g.addresses[0], read_token(session))

    def ask(request_id, op, args):
        return raw_request(link, request_id, op, args)

    assert ask(0, "write", [("tasks", b"row", b"\x01" + pickle.dumps(0))]) == (0, True, 1)
    assert ask(1, "no-such-op", ()) == (1, False, "unknown operation 'no-such-op'")
    assert ask(2, "get", ("nope", b"k"))[1:] == (False, f"unknown table 'nope'; tables are "
                                                        f"{', '.join(TABLES)}")
    assert "keys must be bytes" in ask(3, "get", ("tasks", "str key"))[2]
    assert "1 to 511 bytes" in ask(4, "write", [("tasks", b"x" * 600, b"v")])[2]
    assert "1 to 511 bytes" in ask(5, "get", ("tasks", b""))[2]
    assert "values must be bytes" in ask(6, "write", [("tasks", b"k", 5)])[2]
    assert "malformed" in ask(7, "get", ("tasks",))[2]
    assert "malformed" in ask(8, "scan", ("tasks", b"", "ten"))[2]
    # A bad item fails its whole batch: nothing of it is applied.
    reply = ask(9, "write", [("tasks", b"good", b"\x01" + pickle.dumps(1)), ("nope", b"k", b"v")])
    assert reply[1] is False
    assert ask(10, "get", ("tasks", b"good")) == (10, True, None)
    assert ask(11, "info", ())[1] is True                  # still connected and served
    link.close()
    assert "Traceback" not in log_text(session)


def test_bad_input_from_the_python_api(cluster, client):
    g = cluster(num_shards=2)
    c = client(g)
    for call in (lambda: c.put("bogus", b"k", 1), lambda: c.get("bogus", b"k"),
                 lambda: c.get_many("bogus", [b"k"]), lambda: c.scan("bogus"),
                 lambda: c.delete("bogus", b"k"),
                 lambda: c.subscribe("bogus", lambda *a: None),
                 lambda: c.subscribe("bogus", lambda *a: None, key=b"k")):
        with pytest.raises(ValueError) as info:
            call()
        assert "bogus" in str(info.value)
        assert all(name in str(info.value) for name in TABLES)
    for key in ("str", 5, bytearray(b"k"), memoryview(b"k"), None):
        with pytest.raises(TypeError, match="bytes"):
            c.put("tasks", key, 1)
        with pytest.raises(TypeError, match="bytes"):
            c.get("tasks", key)
    with pytest.raises(ValueError, match="511"):
        c.put("tasks", b"x" * 512, 1)
    with pytest.raises(ValueError, match="511"):
        c.get("tasks", b"")
    c.put("tasks", b"x" * 511, "longest key")
    c.flush()
    assert c.get("tasks", b"x" * 511) == "longest key"
    with pytest.raises(ValueError):
        GcsClient([], b"t" * 32)


# --------------------------------------------------------------- a full map

def test_full_map_fails_cleanly_and_keeps_serving(cluster, client):
    g = cluster(num_shards=1, map_bytes=1 * MiB, max_map_bytes=1 * MiB)
    c = client(g, batch_size=1_000_000, flush_delay=5.0)
    for i in range(100):
        c.put("objects", b"small-%03d" % i, i)
    c.flush()
    pid = g.pids()[0]

    big = [b"big-%03d" % i for i in range(200)]
    for k in big:                                      # ~1.6 MB in one batch
        c.put("objects", k, os.urandom(8192))
    with pytest.raises(ControlStoreError, match="full"):
        c.flush()
    assert g.pids() == [pid] and g.restarts == 0       # the server stayed up
    assert c.get_many("objects", big) == [None] * 200  # nothing of the batch applied
    assert c.get_many("objects", [b"small-%03d" % i for i in range(100)]) == list(range(100))
    assert c.info()[0]["entries"]["objects"] == 100
    assert c.info()[0]["map_bytes"] == 1 * MiB

    # Sent by the flusher instead: the error surfaces on the next request.
    c2 = client(g)
    c2.put("objects", b"huge", os.urandom(2 * MiB))
    with pytest.raises(ControlStoreError, match="full"):
        c2.get("objects", b"small-001")
    assert c2.get("objects", b"small-001") == 1        # reported once; the client goes on
    c2.put("objects", b"fits", "yes")
    c2.flush()
    assert c2.get("objects", b"fits") == "yes"
    assert_serving(g, client)


def test_map_grows_and_keeps_its_data_after_restart(cluster, client):
    g = cluster(num_shards=1, map_bytes=1 * MiB, max_map_bytes=64 * MiB)
    c = client(g, batch_size=100)
    keys = [b"blob-%03d" % i for i in range(600)]
    blobs = {k: os.urandom(10_000) for k in keys}     # ~6 MB, six times the initial map
    for k in keys:
        c.put("functions", k, blobs[k])
    c.flush()
    grown = c.info()[0]["map_bytes"]
    assert grown >= 8 * MiB
    c.close()
    g.stop()

    g2 = cluster(num_shards=1, map_bytes=1 * MiB, max_map_bytes=64 * MiB)
    c2 = client(g2)
    assert c2.get_many("functions", keys) == [blobs[k] for k in keys]
    assert c2.info()[0]["map_bytes"] >= 6 * MiB
    c2.put("functions", b"one-more", os.urandom(2 * MiB))
    c2.flush()
    assert len(c2.get("functions", b"one-more")) == 2 * MiB


def test_a_hung_shard_gives_an_error_not_a_hang(tmp_path):
    """A stopped (not dead) server: requests fail within their timeouts."""
    session = create_session_dir(root=str(tmp_path))
    gcs = GcsProcesses(session, num_shards=1, restart=False).start()
    client = GcsClient(gcs.addresses, read_token(session), reconnect_timeout=1.0,
                       request_timeout=0.5)
    try:
        client.put("jobs", b"j", 1)
        client.flush()
        os.kill(gcs.pids()[0], signal.SIGSTOP)
        start = time.monotonic()
        with pytest.raises(ControlStoreError):
            client.get("jobs", b"j")
        assert time.monotonic() - start < 10
    finally:
        os.kill(gcs.pids()[0], signal.SIGCONT)
        client.close()
        gcs.stop()
