"""Group ``gcs``: the control store (minray.gcs: sharded LMDB shard servers).

Every figure runs real shard server processes (GcsProcesses) on a fresh
session directory in /tmp and talks to them over authenticated TCP, the way
the runtime does.

Bars to beat (issue "Control store"):
  gcs_put_per_s >= 50,000 batched small writes/s (one client, one shard),
  gcs_get_per_s >= 100,000/s; the same two with 2 shards.
"""
import contextlib
import os
import shutil
import signal
import statistics
import tempfile
import threading
import time

from . import figure, figures

# What a small control-store write looks like: a 20-byte id and a short record.
_VALUE = {"state": "PENDING", "node": b"n" * 20, "size": 1024}
_GET_BATCH = 1000


@contextlib.contextmanager
def _cluster(num_shards=1, shards_per_process=None):
    """(GcsProcesses, token) on a private session directory, removed afterwards."""
    from minray.gcs import GcsProcesses
    from minray.session import create_session_dir, read_token

    root = tempfile.mkdtemp(prefix="minray-bench-gcs-")
    g = None
    try:
        session = create_session_dir(root=root)
        g = GcsProcesses(session, num_shards=num_shards,
                         shards_per_process=shards_per_process).start()
        yield g, read_token(session)
    finally:
        if g is not None:
            g.stop()
        shutil.rmtree(root, ignore_errors=True)


@contextlib.contextmanager
def _client(g, token, **kwargs):
    from minray.gcs import GcsClient

    c = GcsClient(g.addresses, token, **kwargs)
    try:
        yield c
    finally:
        c.close()


def _ids(n):
    return [os.urandom(20) for _ in range(n)]


def _put_rate(c, keys):
    t0 = time.perf_counter()
    for k in keys:
        c.put("tasks", k, _VALUE)
    c.flush()                       # until every shard acknowledged every write
    return len(keys) / (time.perf_counter() - t0)


def _get_many_rate(c, keys):
    t0 = time.perf_counter()
    for i in range(0, len(keys), _GET_BATCH):
        c.get_many("tasks", keys[i:i + _GET_BATCH])
    return len(keys) / (time.perf_counter() - t0)


def _get_sync_rate(c, keys):
    t0 = time.perf_counter()
    for k in keys:
        c.get("tasks", k)
    return len(keys) / (time.perf_counter() - t0)


def _throughput(quick, num_shards, shards_per_process=None, sync_gets=False):
    n = 30_000 if quick else 200_000
    reps = 2 if quick else 3
    puts, gets, syncs = [], [], []
    with _cluster(num_shards, shards_per_process) as (g, token), _client(g, token) as c:
        _put_rate(c, _ids(5000))                        # warm up: connections, map pages
        for _ in range(reps):
            keys = _ids(n)                              # fresh keys: inserts, not overwrites
            puts.append(_put_rate(c, keys))
            gets.append(_get_many_rate(c, keys))
            if sync_gets:
                syncs.append(_get_sync_rate(c, keys[:3000 if quick else 20_000]))
    return max(puts), max(gets), (max(syncs) if syncs else None)


@figures("gcs", {
    "gcs_put_per_s": "/s",
    "gcs_get_per_s": "/s",
    "gcs_get_sync_per_s": "/s",
}, quick_note="30,000 keys")
def one_shard(quick):
    """One client, one shard. Puts: 200,000 small records under fresh 20-byte
    ids, batched by the client (1,000 per frame), timed until flush() saw every
    acknowledgement. Gets: get_many of the same keys in batches of 1,000.
    Sync gets: one synchronous round trip per get (20,000). Best of 3."""
    put, get, sync = _throughput(quick, 1, sync_gets=True)
    return {"gcs_put_per_s": put, "gcs_get_per_s": get, "gcs_get_sync_per_s": sync}


@figures("gcs", {
    "gcs_put_2shards_per_s": "/s",
    "gcs_get_2shards_per_s": "/s",
}, quick_note="30,000 keys")
def two_shards_one_process(quick):
    """As gcs_put_per_s / gcs_get_per_s, with 2 shards served by one process
    (the default: one event loop)."""
    put, get, _ = _throughput(quick, 2)
    return {"gcs_put_2shards_per_s": put, "gcs_get_2shards_per_s": get}


@figures("gcs", {
    "gcs_put_2procs_per_s": "/s",
    "gcs_get_2procs_per_s": "/s",
}, quick_note="30,000 keys")
def two_shards_two_processes(quick):
    """As gcs_put_per_s / gcs_get_per_s, with 2 shards in 2 processes
    (GcsProcesses(shards_per_process=1))."""
    put, get, _ = _throughput(quick, 2, shards_per_process=1)
    return {"gcs_put_2procs_per_s": put, "gcs_get_2procs_per_s": get}


@figures("gcs", {
    "gcs_pubsub_latency_p50_us": "us",
    "gcs_pubsub_latency_p99_us": "us",
}, quick_note="300 samples")
def pubsub_latency(quick):
    """One client subscribes to a key; a second client (same process, its own
    connections) publishes to it, one message at a time. Latency: from just
    before publish() to the subscriber's callback running. 3,000 samples after
    100 warm-up ones."""
    samples = 300 if quick else 3000
    warmup = 100
    with _cluster(1) as (g, token), _client(g, token) as sub, _client(g, token) as pub:
        arrived = threading.Event()
        latencies = []

        def on_message(table, key, sent):
            if sent is not None:
                latencies.append(time.perf_counter() - sent)
                arrived.set()

        sub.subscribe("events", on_message, key=b"latency")
        for _ in range(warmup + samples):
            arrived.clear()
            pub.publish("events", b"latency", time.perf_counter())
            if not arrived.wait(5):
                raise RuntimeError("a published message never reached the subscriber")
        measured = sorted(latencies[warmup:])
    p50 = statistics.median(measured)
    p99 = measured[min(len(measured) - 1, int(0.99 * len(measured)))]
    return {"gcs_pubsub_latency_p50_us": p50 * 1e6, "gcs_pubsub_latency_p99_us": p99 * 1e6}


@figure("gcs", "gcs_restart_s", unit="s", quick_note="1 restart")
def restart(quick):
    """kill -9 of the (one) shard server process, then a client get() is
    retried until it succeeds: the supervisor notices the death, starts a new
    process, which reopens the LMDB file; the client reconnects (with its
    backoff of 10 ms doubling up to 0.5 s). Median of 5 restarts."""
    runs = 1 if quick else 5
    times = []
    with _cluster(1) as (g, token), _client(g, token) as c:
        c.put("tasks", b"restart-probe", "still here")
        for i in range(2000):                            # some data to reopen
            c.put("tasks", b"restart-%04d" % i, _VALUE)
        c.flush()
        for _ in range(runs):
            pid = g.pids()[0]
            t0 = time.perf_counter()
            os.kill(pid, signal.SIGKILL)
            if c.get("tasks", b"restart-probe") != "still here":
                raise RuntimeError("the restarted shard lost data")
            times.append(time.perf_counter() - t0)
            if g.pids()[0] == pid:
                raise RuntimeError("the shard process was not restarted")
    return statistics.median(times)


def _client_process(addresses, token, n, barrier, results):
    """One writer/reader in its own process (for the two-client figures)."""
    from minray.gcs import GcsClient

    c = GcsClient(addresses, token)
    try:
        keys = _ids(n)
        _put_rate(c, _ids(2000))                         # warm up
        barrier.wait()
        t0 = time.perf_counter()
        for k in keys:
            c.put("tasks", k, _VALUE)
        c.flush()
        t1 = time.perf_counter()
        barrier.wait()
        t2 = time.perf_counter()
        _get_many_rate(c, keys)
        t3 = time.perf_counter()
        results.put((t0, t1, t2, t3))
    finally:
        c.close()


def _two_clients(quick, shards_per_process):
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    n = 30_000 if quick else 100_000
    puts, gets = [], []
    for _ in range(1 if quick else 2):
        with _cluster(2, shards_per_process) as (g, token):
            barrier, results = ctx.Barrier(2), ctx.Queue()
            procs = [ctx.Process(target=_client_process,
                                 args=(g.addresses, token, n, barrier, results))
                     for _ in range(2)]
            for p in procs:
                p.start()
            times = [results.get(timeout=120) for _ in procs]
            for p in procs:
                p.join(30)
            puts.append(2 * n / (max(t[1] for t in times) - min(t[0] for t in times)))
            gets.append(2 * n / (max(t[3] for t in times) - min(t[2] for t in times)))
    return max(puts), max(gets)


@figures("gcs", {
    "gcs_put_2shards_2clients_per_s": "/s",
    "gcs_get_2shards_2clients_per_s": "/s",
    "gcs_put_2procs_2clients_per_s": "/s",
    "gcs_get_2procs_2clients_per_s": "/s",
}, quick_note="30,000 keys per client")
def two_clients(quick):
    """Aggregate rates of two client processes working at once (each 100,000
    puts, then get_many of its keys; started together at a barrier), against
    2 shards in one server process and against 2 shards in 2 processes. With
    one client the client is the bottleneck; this is the load where spreading
    shards over processes could pay. Best of 2."""
    put1, get1 = _two_clients(quick, None)
    put2, get2 = _two_clients(quick, 1)
    return {"gcs_put_2shards_2clients_per_s": put1, "gcs_get_2shards_2clients_per_s": get1,
            "gcs_put_2procs_2clients_per_s": put2, "gcs_get_2procs_2clients_per_s": get2}


def _lmdb_bytes(session_dir):
    """Bytes of every shard's LMDB file: LMDB grows its file page by page as
    the tree grows (pages freed by deletes are reused), so this is the
    high-water mark of what the control store holds."""
    root = os.path.join(session_dir, "gcs")
    return sum(os.path.getsize(os.path.join(root, shard, "data.mdb"))
               for shard in os.listdir(root)
               if os.path.isdir(os.path.join(root, shard)))


def _settled(measure, what, timeout=120.0):
    """Poll measure() until two readings 0.5 s apart agree; return the reading."""
    deadline = time.monotonic() + timeout
    previous = measure()
    while True:
        time.sleep(0.5)
        current = measure()
        if current == previous:
            return current
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what} still changing after {timeout:.0f} s")
        previous = current


def _end_time(record):
    """A task record's end time: (state, time, node, spec), or a dict with
    "time" as minray wrote it before (kept so the figure can be compared)."""
    return record["time"] if isinstance(record, dict) else record[1]


@figures("gcs", {
    "gcs_task_record_bytes": "B",
    "gcs_bytes_per_task_50k": "B",
    "gcs_task_records_after_50k": "records",
}, quick_note="20,000 tasks")
def bytes_per_task(quick):
    """What the control store keeps per finished task, through minray.init,
    for tasks add(i, 1) (two small inline arguments; the result is dropped
    at once). gcs_task_record_bytes: the mean size of one task's record, key
    and value, as sent and stored (over the 5,000 newest). After 50,000 such
    tasks: gcs_bytes_per_task_50k, the growth of the shards' LMDB files
    divided by 50,000 (LMDB's own overhead included: pages part full, and
    pages copied by each write transaction), and gcs_task_records_after_50k,
    the records still in the tasks table (docs/control-store.md, "What is
    kept")."""
    import minray
    from minray.gcs.tables import encode_value

    total = 20_000 if quick else 50_000
    minray.init(num_cpus=2)
    try:
        @minray.remote
        def add(x, y):
            return x + y

        gcs = minray.api._runtime_gcs_client()
        session_dir = minray.api._State.session_dir

        def task_records():
            return sum(info["entries"]["tasks"] for info in gcs.info())

        minray.get([add.remote(i, 1) for i in range(200)])      # workers, function, node
        _settled(task_records, "the tasks table")
        base_bytes = _settled(lambda: _lmdb_bytes(session_dir), "the LMDB files")
        for done in range(0, total, 1000):
            minray.get([add.remote(i, 1) for i in range(1000)])
        records = _settled(task_records, "the tasks table")
        grown = _settled(lambda: _lmdb_bytes(session_dir), "the LMDB files")
        rows = sorted(gcs.scan("tasks"), key=lambda kv: _end_time(kv[1]))
        sizes = [len(key) + len(encode_value(value)) for key, value in rows[-5000:]]
        return {"gcs_task_record_bytes": statistics.mean(sizes),
                "gcs_bytes_per_task_50k": (grown - base_bytes) / total,
                "gcs_task_records_after_50k": records}
    finally:
        minray.shutdown()
