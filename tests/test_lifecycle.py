"""Starting, joining and stopping clusters: init twice, joining a cluster
another driver started, and that nothing is left behind (processes, the
/dev/shm arena, the session directory but its logs) after shutdown(), interpreter exit,
or a driver killed with SIGKILL.

Every test runs its drivers in fresh processes, with MINRAY_SESSION_ROOT
pointing into the test's tmp dir so that "auto" and the session files are
this test's own even when other minray clusters run on the machine.
"""
import json
import os
import signal
import subprocess

import shutil
import tempfile

import psutil
import pytest

from minray_driver import poll, run_driver, session_retired, start_driver

# Prints, as one JSON line: the session dir, the arena files and every
# process of the cluster (all descendants of this driver).
REPORT = """
import glob, json, os, psutil
def cluster_report(session_dir):
    base = os.path.basename(session_dir)
    return {"session_dir": session_dir,
            "shm": glob.glob(f"/dev/shm/minray-{base}-*"),
            "pids": [p.pid for p in psutil.Process().children(recursive=True)]}
"""


@pytest.fixture
def session_root():
    # Short: the node manager's Unix socket path lives inside it (108 bytes max).
    root = tempfile.mkdtemp(prefix="mr-", dir="/tmp")
    yield {"MINRAY_SESSION_ROOT": root}
    shutil.rmtree(root, ignore_errors=True)


def _report(stdout):
    for line in stdout.splitlines():
        if line.startswith("REPORT "):
            return json.loads(line[len("REPORT "):])
    raise AssertionError(f"no REPORT line in:\n{stdout}")


def _gone(pid):
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def _assert_nothing_left(report, timeout=20.0):
    assert report["pids"], "the report saw no cluster processes"
    assert report["shm"], "the report saw no arena file"
    poll(lambda: all(_gone(pid) for pid in report["pids"]), timeout,
         what=f"cluster processes {report['pids']} to exit")
    poll(lambda: not any(os.path.exists(f) for f in report["shm"]), timeout,
         what=f"arena files {report['shm']} to be removed")
    poll(lambda: session_retired(report["session_dir"]), timeout,
         what=f"session dir {report['session_dir']} to be emptied but for its logs")


def test_shutdown_leaves_nothing_behind(session_root):
    proc = run_driver(REPORT + """
import minray
context = minray.init(num_cpus=2)
assert minray.is_initialized()

@minray.remote
def f(x):
    return x

import numpy as np
assert minray.get(f.remote(np.ones(1_000_000)))[0] == 1.0     # uses the arena
report = cluster_report(context["session_dir"])
print("REPORT", json.dumps(report))
minray.shutdown()
assert not minray.is_initialized()
# shutdown() returns after the cluster is gone: nothing of it is left now.
left = [p for p in psutil.Process().children(recursive=True)]
assert not left, left
assert os.listdir(report["session_dir"]) == ["logs"], report["session_dir"]
assert not any(os.path.exists(f) for f in report["shm"]), report["shm"]
print("CLEAN")
""", env=session_root)
    assert "CLEAN" in proc.stdout
    _assert_nothing_left(_report(proc.stdout))


def test_exit_with_tasks_running_and_queued_leaves_nothing_behind(session_root, tmp_path):
    # No shutdown() call: the interpreter exits with tasks still running,
    # blocked in a nested get, and queued. Nothing is printed about it.
    proc = run_driver(REPORT + f"""
import time
import minray
from minray.exceptions import GetTimeoutError
context = minray.init(num_cpus=2)

@minray.remote
def forever(path):
    open(path, "w").close()
    while True:
        time.sleep(0.01)

@minray.remote
def impatient(path):
    try:
        minray.get(forever.remote(path), timeout=0.2)
    except GetTimeoutError:
        return "timed out"

running = {str(tmp_path / "running")!r}
assert minray.get(impatient.remote(running)) == "timed out"
queued = [forever.remote(running + str(i)) for i in range(4)]
print("REPORT", json.dumps(cluster_report(context["session_dir"])))
""", env=session_root)
    assert "Traceback" not in proc.stderr, proc.stderr
    _assert_nothing_left(_report(proc.stdout))


def test_driver_killed_with_sigkill_leaves_nothing_behind(session_root, tmp_path):
    driver = start_driver(REPORT + f"""
import sys, time
import minray
context = minray.init(num_cpus=2)

@minray.remote
def busy(path):
    # Running when the driver dies.
    open(path, "w").close()
    while True:
        time.sleep(0.01)

ref = busy.remote({str(tmp_path / "running")!r})
while not os.path.exists({str(tmp_path / "running")!r}):
    time.sleep(0.005)
print("REPORT", json.dumps(cluster_report(context["session_dir"])), flush=True)
time.sleep(120)
""", env=session_root, stdout=subprocess.PIPE)
    try:
        line = driver.stdout.readline()
        report = _report(line)
        assert len(report["pids"]) >= 3          # node manager, control store, workers
        os.kill(driver.pid, signal.SIGKILL)
        driver.wait(10)
    finally:
        if driver.poll() is None:
            driver.kill()
            driver.wait()
        driver.stdout.close()
    _assert_nothing_left(report)


def test_init_twice_is_an_error_unless_ignore_reinit_error(session_root):
    proc = run_driver("""
import minray
first = minray.init(num_cpus=1)
try:
    minray.init(num_cpus=1)
except RuntimeError as exc:
    assert "ignore_reinit_error" in str(exc), exc
    print("REINIT ERROR")
again = minray.init(num_cpus=1, ignore_reinit_error=True)
assert again["session_dir"] == first["session_dir"]
assert minray.cluster_resources()["CPU"] == 1.0

@minray.remote
def f():
    return "still works"

print(minray.get(f.remote()))
minray.shutdown()
minray.shutdown()                      # a second shutdown is harmless
# After shutdown a new cluster can be started, with other resources.
second = minray.init(num_cpus=2)
assert second["session_dir"] != first["session_dir"]
assert minray.cluster_resources()["CPU"] == 2.0
print(minray.get(f.remote()))
""", env=session_root)
    assert "REINIT ERROR" in proc.stdout
    assert proc.stdout.count("still works") == 2


def test_joining_a_cluster_started_by_another_driver(session_root):
    head = start_driver("""
import os, sys
import minray
context = minray.init(num_cpus=2, resources={"joined": 1})

@minray.remote
def who():
    return "head task"

assert minray.get(who.remote()) == "head task"
shards = os.path.join(context["session_dir"], "gcs", "shards")
import time
deadline = time.monotonic() + 20
while not os.path.exists(shards):
    assert time.monotonic() < deadline
    time.sleep(0.01)
with open(shards) as f:
    address = f.read().split()[0]
print("ADDRESS", address, context["session_dir"], flush=True)
sys.stdin.readline()                    # until the test is done joining
print("HEAD", minray.get(who.remote()), flush=True)
""", env=session_root, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        _, address, session_dir = head.stdout.readline().split()
        joiner = """
import minray
context = minray.init({how})
assert context["session_dir"] == {session_dir!r}, context
assert minray.cluster_resources().get("joined") == 1.0, minray.cluster_resources()

@minray.remote(resources={{"joined": 1}})
def square(x):
    return x * x

assert minray.get([square.remote(i) for i in range(5)]) == [0, 1, 4, 9, 16]
assert minray.get(minray.put("joined value")) == "joined value"
assert len(minray.nodes()) == 1
print("JOINED")
minray.shutdown()                      # leaves the cluster running
"""
        for how in (f"redis_address={address!r}", f"address={address!r}", 'address="auto"',
                    f"address={session_dir!r}"):
            proc = run_driver(joiner.format(how=how, session_dir=session_dir), env=session_root)
            assert "JOINED" in proc.stdout, how
        # A joining driver cannot set the cluster's resources.
        proc = run_driver("""
import minray
try:
    minray.init(address="auto", num_cpus=4)
except ValueError as exc:
    assert "num_cpus" in str(exc)
    print("REFUSED")
""", env=session_root)
        assert "REFUSED" in proc.stdout
        # The head's cluster still works after the others left.
        head.stdin.write("go\n")
        head.stdin.flush()
        assert head.stdout.readline().strip() == "HEAD head task"
        assert head.wait(30) == 0
    finally:
        if head.poll() is None:
            head.kill()
            head.wait()
        head.stdin.close()
        head.stdout.close()


def test_joining_nothing_is_a_clear_error(session_root, tmp_path):
    proc = run_driver(f"""
import minray
for address in ("auto", "127.0.0.1:1", {str(tmp_path)!r}):
    try:
        minray.init(address=address)
    except ConnectionError as exc:
        print("NO CLUSTER", address)
assert not minray.is_initialized()
""", env=session_root)
    assert proc.stdout.count("NO CLUSTER") == 3, proc.stdout


def test_node_manager_killed_gives_a_clear_error_and_shutdown_cleans_up(session_root, tmp_path):
    proc = run_driver(REPORT + f"""
import signal, time
import minray
from minray.exceptions import RaySystemError
context = minray.init(num_cpus=1)

@minray.remote
def forever(path):
    open(path, "w").close()
    while True:
        time.sleep(0.01)

running = {str(tmp_path / "running")!r}
ref = forever.remote(running)
while not os.path.exists(running):
    time.sleep(0.005)
report = cluster_report(context["session_dir"])
print("REPORT", json.dumps(report))
node_manager = [p for p in psutil.Process().children()
                if "minray.node_manager" in " ".join(p.cmdline())]
assert len(node_manager) == 1, node_manager
os.kill(node_manager[0].pid, signal.SIGKILL)
started = time.monotonic()
try:
    minray.get(ref, timeout=30)
except RaySystemError as exc:
    assert time.monotonic() - started < 20
    print("LOST", exc)
minray.shutdown()
assert os.listdir(report["session_dir"]) == ["logs"], report["session_dir"]
assert not any(os.path.exists(f) for f in report["shm"]), report["shm"]
""", env=session_root)
    assert "LOST" in proc.stdout and "gone" in proc.stdout
    _assert_nothing_left(_report(proc.stdout))


def test_ctrl_c_interrupts_the_driver_not_the_cluster(session_root, tmp_path):
    # SIGINT to the driver's whole process group is what Ctrl-C in a terminal
    # does. The driver gets KeyboardInterrupt and carries on; the cluster,
    # and the task it was running, are untouched. The driver runs in its own
    # session here so the signal reaches nothing else.
    gate = str(tmp_path / "gate")
    driver = start_driver(REPORT + f"""
import signal, threading
import minray
context = minray.init(num_cpus=2)

@minray.remote
def gated(path):
    import time
    while not os.path.exists(path):
        time.sleep(0.005)
    return "done"

@minray.remote
def f():
    return "after"

ref = gated.remote({gate!r})
threading.Timer(0.2, lambda: os.killpg(0, signal.SIGINT)).start()
try:
    minray.get(ref, timeout=30)
    print("NOT INTERRUPTED")
except KeyboardInterrupt:
    print("INTERRUPTED")
print(minray.get(f.remote(), timeout=30))
open({gate!r}, "w").close()
print(minray.get(ref, timeout=30))
print("REPORT", json.dumps(cluster_report(context["session_dir"])))
""", env=session_root, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    try:
        out, err = driver.communicate(timeout=60)
    finally:
        if driver.poll() is None:
            driver.kill()
            driver.wait()
        open(gate, "w").close()
    assert driver.returncode == 0, err
    assert out.splitlines()[:3] == ["INTERRUPTED", "after", "done"], (out, err)
    assert "Traceback" not in err, err
    _assert_nothing_left(_report(out))


def test_a_killed_node_managers_shortened_socket_is_removed_with_its_session(tmp_path):
    # A session path too long for a Unix socket puts the node manager's
    # socket in /tmp; it must go with the session even when the node manager
    # could not remove it itself.
    root = tmp_path / ("long-session-root-" + "r" * 60)
    proc = run_driver("""
import os, signal, psutil
import minray
from minray.session import node_socket_path
context = minray.init(num_cpus=1)
socket_path = node_socket_path(context["session_dir"])
assert socket_path.startswith("/tmp/minray-") and os.path.exists(socket_path), socket_path
node_manager = [p for p in psutil.Process().children()
                if "minray.node_manager" in " ".join(p.cmdline())]
os.kill(node_manager[0].pid, signal.SIGKILL)
psutil.wait_procs(node_manager, timeout=20)
assert os.path.exists(socket_path)      # (nobody removed it yet)
minray.shutdown()
print("GONE" if not os.path.exists(socket_path) else "LEFT", socket_path)
""", env={"MINRAY_SESSION_ROOT": str(root)}, check=False)
    assert "GONE /tmp/minray-" in proc.stdout, proc.stdout + proc.stderr
