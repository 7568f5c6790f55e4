"""The control store can never freeze a node.

Real clusters (minray.init) whose control-store server is stopped with
SIGSTOP, killed, or killed again while it restarts, while tasks run. Tasks
must keep completing at speed, a failed task's get must return its error,
and once the control store is back it serves again and receives the log.
Also: the supervisor keeps restarting a shard whose restart failed, and the
node manager's log to the control store stays bounded (LineageLog).
"""
import logging
import os
import signal
import threading
import time

import psutil
import pytest

import minray
import minray.state
from minray.gcs import GcsClient, GcsProcesses
from minray.gcs.server import address_file
from minray.gcs.tables import task_id_of_key
from minray.node_manager.lineage import LineageLog
from minray.protocol import TaskSpec
from minray.session import create_session_dir, read_token
from minray_driver import poll

# A rate far below what a healthy node does (thousands of tasks/s) and far
# above what a node blocked on its control store did (a few tasks, then none).
MIN_TASKS_PER_S = 100
FAULT_SECONDS = 5.0       # longer than it took the old node manager to stall (~3 s)


@pytest.fixture
def cluster():
    context = minray.init(num_cpus=2)
    yield context
    minray.shutdown()


def wait_until_logging():
    """Until the node manager's log reaches the control store (started in parallel)."""
    poll(lambda: lineage_stats()["connected"],
         timeout=60, what="the node manager to connect to the control store")


def node_manager_process():
    found = [p for p in psutil.Process().children()
             if "minray.node_manager" in " ".join(p.cmdline())]
    assert len(found) == 1, found
    return found[0]


def gcs_pids():
    """Pids of the control-store server processes (children of the node manager)."""
    pids = []
    for child in node_manager_process().children():
        try:
            if "minray.gcs.server" in " ".join(child.cmdline()):
                pids.append(child.pid)
        except psutil.NoSuchProcess:
            pass
    return pids


@minray.remote
def square(x):
    return x * x


@minray.remote
def fail(marker):
    raise ValueError(marker)


def run_tasks_for(seconds):
    """Submit and get batches of tasks for `seconds`; return how many ran."""
    done = 0
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        refs = [square.remote(i) for i in range(50)]
        assert minray.get(refs, timeout=30) == [i * i for i in range(50)]
        assert minray.get(square.remote(7), timeout=30) == 49      # a round trip
        done += 51
    return done


def check_tasks_and_errors_while_faulty(marker):
    ran = run_tasks_for(FAULT_SECONDS)
    print(f"{ran / FAULT_SECONDS:.0f} tasks/s while the control store was away")
    assert ran >= MIN_TASKS_PER_S * FAULT_SECONDS, f"only {ran} tasks in {FAULT_SECONDS} s"
    refs = [square.remote(i) for i in range(500)]
    assert minray.get(refs, timeout=60) == [i * i for i in range(500)]
    with pytest.raises(ValueError, match=marker):
        minray.get(fail.remote(marker), timeout=30)


def lineage_stats():
    return minray.api._client().request_info("stats")["lineage"]


def assert_control_store_serves_the_log(marker, session_dir):
    """Once back, the control store takes the waiting log, then new records."""
    assert any(marker in e.get("message", "") for e in minray.error_info())
    poll(lambda: lineage_stats()["queued"] == 0, timeout=60,
         what="the node manager's waiting log to be written")
    refs = [square.remote(i) for i in range(20)]
    assert minray.get(refs, timeout=30) == [i * i for i in range(20)]
    wanted = {r.task_id().hex() for r in refs}

    def recorded():
        rows = {r["id"] for r in minray.state.rows("tasks", limit=1_000_000)}
        return wanted <= rows
    poll(recorded, timeout=60, what="new tasks in the control store's tasks table")
    # Records that could not wait (the queue was full) were counted and said.
    if lineage_stats()["dropped"]:
        with open(os.path.join(session_dir, "logs", "node_manager.log")) as f:
            assert "dropped" in f.read()


def test_tasks_keep_running_while_the_control_store_is_stopped(cluster):
    assert minray.get(square.remote(3), timeout=30) == 9
    wait_until_logging()
    pids = gcs_pids()
    assert pids
    marker = f"failed while stopped {os.urandom(4).hex()}"
    for pid in pids:
        os.kill(pid, signal.SIGSTOP)
    try:
        check_tasks_and_errors_while_faulty(marker)
    finally:
        for pid in pids:
            os.kill(pid, signal.SIGCONT)
    assert_control_store_serves_the_log(marker, cluster["session_dir"])


def test_tasks_keep_running_while_the_control_store_is_killed(cluster):
    assert minray.get(square.remote(3), timeout=30) == 9
    wait_until_logging()
    old = gcs_pids()
    assert old
    marker = f"failed while killed {os.urandom(4).hex()}"
    # Kill every control-store process as soon as it appears, restarts
    # included, for the whole run: it is gone for the node manager.
    stop = threading.Event()
    kills = []

    def killer():
        while not stop.is_set():
            for pid in gcs_pids():
                try:
                    os.kill(pid, signal.SIGKILL)
                    kills.append(pid)
                except ProcessLookupError:
                    pass
            stop.wait(0.02)

    thread = threading.Thread(target=killer, daemon=True)
    thread.start()
    try:
        check_tasks_and_errors_while_faulty(marker)
    finally:
        stop.set()
        thread.join()
    assert len(set(kills)) >= 2, kills           # its restarts were killed too
    poll(lambda: gcs_pids() and not set(gcs_pids()) & set(kills), timeout=60,
         what="a control-store process that was not killed")
    assert_control_store_serves_the_log(marker, cluster["session_dir"])


def test_a_shard_killed_during_its_restart_is_restarted_again(tmp_path, caplog):
    session = create_session_dir(root=str(tmp_path))
    g = GcsProcesses(session, num_shards=1).start()
    client = GcsClient(g.addresses, read_token(session), reconnect_timeout=60)
    try:
        client.put("jobs", b"kept", "across restarts")
        client.flush()
        with caplog.at_level(logging.INFO, logger="minray.gcs"):
            seen = {g.processes[0].pid}
            g.processes[0].kill()
            for _ in range(3):
                restarting = poll(lambda: g.processes[0].pid not in seen and g.processes[0],
                                  timeout=30, interval=0.001, what="a restart")
                seen.add(restarting.pid)
                # Its address file appears once it serves: it is still starting.
                assert not os.path.exists(address_file(session, 0))
                restarting.kill()
            assert client.get("jobs", b"kept") == "across restarts"
        assert g.processes[0].pid not in seen
        client.put("jobs", b"new", 1)
        client.flush()
        assert client.get("jobs", b"new") == 1
        failures = [r.getMessage() for r in caplog.records if "restart failed" in r.getMessage()]
        assert len(failures) >= 3 and "did not start" in failures[0], failures
    finally:
        client.close()
        g.stop()


# ------------------------------------------------------------ the log itself

@pytest.fixture
def control_store(tmp_path):
    """(GcsProcesses, GcsClient) of a two-shard control store."""
    session = create_session_dir(root=str(tmp_path))
    g = GcsProcesses(session, num_shards=2).start()
    client = GcsClient(g.addresses, read_token(session), reconnect_timeout=60)
    yield g, client
    client.close()
    g.stop()


def _spec(i, args=()):
    task_id = i.to_bytes(16, "big")
    return TaskSpec(task_id, b"f" * 16, "work", list(args), (), 1, {"CPU": 1.0}, 0, [], 0, None)


def task_record(client, task_id):
    """A task's record in the tasks table (keyed by end time, then task id)."""
    for key, value in client.scan("tasks"):
        if task_id_of_key(key) == task_id:
            return value
    return None


def test_a_full_log_drops_with_a_counted_warning_and_never_blocks(control_store, caplog):
    g, client = control_store
    reachable = threading.Event()

    def connect():                   # the control store is not up yet
        reachable.wait()
        return client

    lineage = LineageLog(os.urandom(16), lambda object_id: False, max_queued=100,
                         gather_s=0.001)
    lineage.start(connect)
    try:
        with caplog.at_level(logging.WARNING, logger="minray.node_manager"):
            for i in range(5000):
                lineage.log_task(_spec(i), "FINISHED")
            lineage.log_error({"message": "kept in memory"})
            lineage.log("actors", b"a" * 16, {"state": "PENDING"})
            lineage.log("actors", b"a" * 16, {"state": "ALIVE"})
        assert lineage.stats()["dropped"] == {"task": 4900, "error": 1}
        warnings = [r.getMessage() for r in caplog.records if "dropped" in r.getMessage()]
        assert len(warnings) == 1, warnings                  # rate-limited
        assert [r["message"] for _, r in lineage.errors()] == ["kept in memory"]
    finally:
        reachable.set()
    # What was not dropped arrives once the control store is reachable, and
    # a coalesced record arrives with its newest value.
    poll(lambda: sum(i["entries"]["tasks"] for i in client.info()) == 100, timeout=60,
         what="100 task records")
    poll(lambda: client.get("actors", b"a" * 16) == {"state": "ALIVE"}, timeout=60,
         what="the actor record")
    assert task_record(client, (99).to_bytes(16, "big"))[0] == "FINISHED"
    assert task_record(client, (100).to_bytes(16, "big")) is None
    lineage.close()


def test_records_are_trimmed_except_what_lineage_needs(control_store):
    g, client = control_store
    held = set()             # object ids "held on the node"
    lineage = LineageLog(os.urandom(16), held.__contains__, task_history=100,
                         object_history=50, error_history=10, gather_s=0.001)
    lineage.start(lambda: client)
    try:
        # Task 1 made an object that task 2 took as argument; only task 2's
        # result is still held: both records are lineage.
        held.add((2).to_bytes(16, "big") + (1).to_bytes(4, "big"))
        lineage.log_task(_spec(1), "FINISHED")
        lineage.log_task(_spec(2, [("r", (1).to_bytes(16, "big") + (1).to_bytes(4, "big"))]),
                         "FINISHED")
        for i in range(3, 1003):
            lineage.log_task(_spec(i, [("v", b"", b"x" * 100)]), "FINISHED")
        for i in range(200):
            lineage.log_error({"message": str(i)})

        def counts():
            return {t: sum(i["entries"][t] for i in client.info())
                    for t in ("tasks", "errors")}
        def trimmed():
            # The last error was written in the same batch as its trimming,
            # after every task record.
            errors = [v["message"] for _, v in client.scan("errors")]
            return "199" in errors and counts() == {"tasks": 100, "errors": 10}
        poll(trimmed, timeout=60, what=f"trimmed tables (now {counts()})")
        # Keyed by end time first: the table is in the order tasks ended
        # (writes append to its end, trimming takes from its start).
        rows = client.scan("tasks")
        assert [value[1] for _, value in rows] == sorted(value[1] for _, value in rows)
        assert [task_id_of_key(key) for key, value in rows] == [v[4][0] for _, v in rows]
        kept = [task_record(client, (i).to_bytes(16, "big")) for i in (1, 2, 3, 902, 1002)]
        assert kept[0][4][0] == (1).to_bytes(16, "big")        # pinned by task 2
        assert kept[1][0] == "FINISHED"                      # result held
        assert kept[2] is None                                     # oldest, not needed
        assert kept[3] is None and kept[4][4][3][0][2] == b"x" * 100
        errors = [v["message"] for _, v in client.scan("errors")]
        assert sorted(errors, key=int) == [str(i) for i in range(190, 200)]
        # Dropping the held result lets task 2's record go, and with it task
        # 1's. Records lineage needed went to the back of the line: once 100
        # newer ones came after them, they are the oldest.
        held.clear()
        for i in range(1003, 1203):
            lineage.log_task(_spec(i), "FINISHED")
        poll(lambda: task_record(client, (2).to_bytes(16, "big")) is None, timeout=60,
             what="task 2's record to be trimmed")
        for i in range(1203, 1403):
            lineage.log_task(_spec(i), "FINISHED")
        poll(lambda: task_record(client, (1).to_bytes(16, "big")) is None, timeout=60,
             what="task 1's record to be trimmed")
        assert counts()["tasks"] == 100
    finally:
        lineage.close()


def test_big_inline_arguments_shorten_the_kept_history(control_store):
    g, client = control_store
    lineage = LineageLog(os.urandom(16), lambda object_id: False, task_history=1000,
                         task_history_bytes=200 * 1024, gather_s=0.001)
    lineage.start(lambda: client)
    try:
        for i in range(100):                # 10 KB inline argument each
            lineage.log_task(_spec(i, [("v", b"", os.urandom(10 * 1024))]), "FINISHED")

        def records():
            return sum(info["entries"]["tasks"] for info in client.info())
        # 200 KB hold 19 records of 10 KB + the record itself (200 B).
        poll(lambda: task_record(client, (99).to_bytes(16, "big")) is not None
             and records() == 19, timeout=60, what=f"19 records (now {records()})")
        assert task_record(client, (99).to_bytes(16, "big"))[0] == "FINISHED"
        assert task_record(client, (80).to_bytes(16, "big")) is None
    finally:
        lineage.close()
