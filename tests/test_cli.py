"""`minray start / status / list / stop` as a user runs them.

Each test runs the command line in fresh processes with MINRAY_SESSION_ROOT
in its own temporary directory, so `minray stop` and "auto" only ever see
this test's nodes, never other clusters on the machine. Heads listen on
127.0.0.1 with a port the system picks (--port 0).
"""
import glob
import os
import re
import secrets
import shutil
import subprocess
import sys
import tempfile

import psutil
import pytest

from minray_driver import REPO, gone, poll, run_driver, session_retired, start_driver

CLI = [sys.executable, "-m", "minray.scripts.cli"]
NODE_OPTIONS = ["--num-cpus", "1", "--object-store-memory", str(64 << 20)]


@pytest.fixture
def session_root():
    # Short: the node manager's Unix socket path lives inside it (108 bytes max).
    root = tempfile.mkdtemp(prefix="mr-", dir="/tmp")
    env = dict(os.environ, MINRAY_SESSION_ROOT=root, PYTHONPATH=REPO, PYTHONUNBUFFERED="1")
    env.pop("MINRAY_TOKEN", None)
    yield env
    # Whatever a failed test left running is stopped here, not leaked.
    subprocess.run(CLI + ["stop", "--force"], env=env, cwd=REPO, capture_output=True,
                   timeout=60)
    shutil.rmtree(root, ignore_errors=True)


def minray_cli(env, *args, check=True, timeout=90):
    proc = subprocess.run(CLI + list(args), env=env, cwd=REPO, capture_output=True, text=True,
                          timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"minray {' '.join(args)} exited with {proc.returncode}\n"
                             f"--- stdout\n{proc.stdout}\n--- stderr\n{proc.stderr}")
    return proc


def start_head(env, *extra):
    out = minray_cli(env, "start", "--head", "--port", "0", *NODE_OPTIONS, *extra).stdout
    address = re.search(r"Started the minray head \w+ at (\S+) \(pid (\d+)\)", out)
    token_path = re.search(r"Cluster token: +(\S+)", out).group(1)
    assert f"minray start --address {address.group(1)}" in out, out
    assert f'minray.init(address="{address.group(1)}")' in out, out
    return address.group(1), int(address.group(2)), token_path, out


def cluster_processes(root):
    """Every process on this machine started for a session under `root`
    (node managers, control store shards, workers), with their children."""
    found = {}
    for proc in psutil.process_iter(["pid", "cmdline"]):
        try:
            if any(root in part for part in proc.info["cmdline"] or ()):
                found[proc.pid] = proc
                for child in proc.children(recursive=True):
                    found[child.pid] = child
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return found


def arenas_of(root):
    names = [os.path.basename(p) for p in glob.glob(os.path.join(root, "session-*"))]
    return [f for name in names for f in glob.glob(f"/dev/shm/minray-{name}-*")]


def live_sessions(root):
    return [p for p in glob.glob(os.path.join(root, "session-*"))
            if os.path.exists(os.path.join(p, "token"))]


NO_RAW_VALUES = re.compile(r"b'|b\"|\\x[0-9a-f]{2}|\b1[0-9]{9}\.[0-9]+\b|<object at|\(\(")


def assert_readable(text):
    """No bytes reprs, pickles or epoch floats in a listing."""
    assert not NO_RAW_VALUES.search(text), text


def test_start_head_status_list_and_stop(session_root, gate):
    root = session_root["MINRAY_SESSION_ROOT"]
    address, pid, token_path, out = start_head(session_root)
    # The head lives on its own: the command that started it has exited.
    assert not gone(pid)
    assert oct(os.stat(token_path).st_mode & 0o777) == oct(0o600)
    assert token_path in out
    assert os.path.realpath(os.path.join(root, "session_latest")) == os.path.dirname(token_path)

    # A driver connects by address, leaves a detached named actor, a finished
    # task, a failed one and an object behind, and exits.
    run_driver(f"""
import minray
minray.init(address={address!r}, namespace="cli")

@minray.remote
def square_it(x):
    return x * x

@minray.remote
def fails_loudly():
    raise ValueError("first line of the failure\\nsecond line")

@minray.remote
class Keeper:
    def ping(self):
        return "pong"

keeper = Keeper.options(name="keeper", lifetime="detached").remote()
assert minray.get(keeper.ping.remote()) == "pong"
assert minray.get(square_it.remote(7)) == 49
try:
    minray.get(fails_loudly.remote())
except ValueError:
    pass
print("DRIVER DONE")
""", env=session_root)

    # A second driver holds a task running while we look.
    holder = start_driver(f"""
import os, time
import minray
minray.init(address="auto")

@minray.remote
def held_open(gate):
    while not os.path.exists(gate):
        time.sleep(0.02)
    return "released"

ref = held_open.remote({gate!r})
print("SUBMITTED", flush=True)
assert minray.get(ref) == "released"
""", env=session_root, stdout=subprocess.PIPE)
    try:
        assert holder.stdout.readline().strip() == "SUBMITTED"
        listing = poll(lambda: (lambda text: "RUNNING" in text and text)(
            minray_cli(session_root, "list", "tasks").stdout), what="a RUNNING task listed")
        assert "held_open" in listing
        assert "square_it" in poll(lambda: (lambda text: "square_it" in text and text)(
            minray_cli(session_root, "list", "tasks").stdout), what="finished task listed")
        assert_readable(listing)

        status = minray_cli(session_root, "status").stdout
        assert address in status and "ALIVE" in status, status
        assert "1 node(s) alive" in status, status
        assert re.search(r"CPU +1 / 1", status), status      # held_open holds the one CPU
        assert re.search(r"Tasks: \d+ pending, 1 running", status), status
        assert "object store" in status
        assert_readable(status)
    finally:
        open(gate, "w").close()
        assert holder.wait(60) == 0
        holder.stdout.close()

    names = minray_cli(session_root, "list", "names").stdout
    assert re.search(r"keeper +cli +Keeper +ALIVE", names), names
    actors = minray_cli(session_root, "list", "actors").stdout
    assert "Keeper" in actors and "yes" in actors, actors       # detached
    errors = poll(lambda: (lambda text: "first line of the failure" in text and text)(
        minray_cli(session_root, "list", "errors").stdout), what="the error listed")
    assert "second line" not in errors
    for table in ("objects", "nodes", "jobs", "actors", "names"):
        assert_readable(minray_cli(session_root, "list", table).stdout)
    assert_readable(errors)
    assert re.search(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d", errors)    # a local time

    processes = cluster_processes(root)
    assert pid in processes and len(processes) >= 2     # node manager, shards, workers
    stopped = minray_cli(session_root, "stop").stdout
    assert f"Stopped the minray head at {address}" in stopped
    poll(lambda: all(gone(p) for p in processes), what="every process of the node gone")
    assert arenas_of(root) == []
    assert session_retired(os.path.dirname(token_path))
    assert "No minray nodes" in minray_cli(session_root, "stop").stdout
    # With nothing running, status says how to start something.
    failed = minray_cli(session_root, "status", check=False)
    assert failed.returncode != 0 and "minray start --head" in failed.stderr


def test_join_with_a_wrong_token_is_refused_and_starts_nothing(session_root, tmp_path):
    root = session_root["MINRAY_SESSION_ROOT"]
    address, head_pid, token_path, _ = start_head(session_root)
    wrong = tmp_path / "wrong-token"
    wrong.write_text(secrets.token_hex(32))
    wrong.chmod(0o600)
    failed = minray_cli(session_root, "start", "--address", address, *NODE_OPTIONS,
                        "--token-file", str(wrong), check=False)
    assert failed.returncode != 0
    assert f"could not join the minray cluster at {address}" in failed.stderr, failed.stderr
    assert "token" in failed.stderr and "Nothing was left running" in failed.stderr
    assert "Traceback" not in failed.stderr
    env = dict(session_root, MINRAY_TOKEN=secrets.token_hex(32))
    failed = minray_cli(env, "start", "--address", address, *NODE_OPTIONS, check=False)
    assert failed.returncode != 0 and "could not join" in failed.stderr, failed.stderr
    # Nothing of the refused nodes runs (every process is the head's), and
    # only the head's session is live.
    head_tree = {head_pid} | {p.pid for p in psutil.Process(head_pid).children(recursive=True)}
    assert set(cluster_processes(root)) <= head_tree
    assert live_sessions(root) == [os.path.dirname(token_path)]
    assert len(arenas_of(root)) == 1
    # A token file others can read is refused before anything starts.
    wrong.chmod(0o644)
    failed = minray_cli(session_root, "start", "--address", address, "--token-file", str(wrong),
                        check=False)
    assert failed.returncode != 0 and "chmod 600" in failed.stderr, failed.stderr
    # The head is unharmed.
    assert not gone(head_pid)
    assert "1 node(s) alive" in minray_cli(session_root, "status").stdout


def test_join_a_wrong_address_is_a_clear_error(session_root, tmp_path):
    root = session_root["MINRAY_SESSION_ROOT"]
    import socket
    # A port nothing listens on: bound, never listened, held until the end.
    blocker = socket.socket()
    blocker.bind(("127.0.0.1", 0))
    address = f"127.0.0.1:{blocker.getsockname()[1]}"
    try:
        env = dict(session_root, MINRAY_TOKEN=secrets.token_hex(32))
        failed = minray_cli(env, "start", "--address", address, *NODE_OPTIONS, check=False)
        assert failed.returncode != 0
        assert f"could not join the minray cluster at {address}" in failed.stderr, failed.stderr
        assert "Traceback" not in failed.stderr
        # Without a token there is nothing to try: it says how to pass one.
        failed = minray_cli(session_root, "start", "--address", address, check=False)
        assert failed.returncode != 0 and "--token-file" in failed.stderr
        failed = minray_cli(env, "start", "--address", "127.0.0.1", check=False)
        assert failed.returncode != 0 and "HOST:PORT" in failed.stderr
    finally:
        blocker.close()
    assert cluster_processes(root) == {}
    assert live_sessions(root) == [] and arenas_of(root) == []
    # The token is never accepted as an argument.
    failed = minray_cli(session_root, "start", "--address", address, "--token", "00",
                        check=False)
    assert failed.returncode != 0 and "--token-file" in failed.stderr


def test_nodes_join_three_ways_and_the_token_is_on_no_command_line(session_root, tmp_path):
    root = session_root["MINRAY_SESSION_ROOT"]
    address, _, token_path, _ = start_head(session_root)
    token = open(token_path).read().strip()
    copy = tmp_path / "token"
    shutil.copy(token_path, copy)
    copy.chmod(0o600)
    # On the head's machine no token option is needed; elsewhere a file or
    # the environment carries it.
    joined = [minray_cli(session_root, "start", "--address", address, *NODE_OPTIONS,
                         "--node-ip-address", "127.0.0.2").stdout,
              minray_cli(session_root, "start", "--address", address, *NODE_OPTIONS,
                         "--token-file", str(copy)).stdout,
              minray_cli(dict(session_root, MINRAY_TOKEN=token), "start", "--address",
                         address, *NODE_OPTIONS).stdout]
    for out in joined:
        assert f"joined to the cluster at {address}" in out, out
    # "auto" still names the head.
    assert os.path.realpath(os.path.join(root, "session_latest")) == os.path.dirname(token_path)

    for proc in psutil.process_iter(["cmdline"]):
        assert token not in " ".join(proc.info["cmdline"] or ()), proc
    # Nor in the environment of the nodes started with MINRAY_TOKEN set.
    for proc in cluster_processes(root).values():
        try:
            assert "MINRAY_TOKEN" not in proc.environ(), proc
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    for log in glob.glob(os.path.join(root, "session-*", "logs", "*")):
        with open(log, errors="replace") as f:
            assert token not in f.read(), log

    status = poll(lambda: (lambda text: "4 node(s) alive" in text and text)(
        minray_cli(session_root, "status").stdout), what="four nodes alive")
    assert status.count("ALIVE") == 4 and "127.0.0.2:" in status
    assert re.search(r"CPU +0 / 4", status), status
    processes = cluster_processes(root)
    stopped = minray_cli(session_root, "stop").stdout
    assert stopped.count("Stopped the minray node") == 3
    assert stopped.rstrip().splitlines()[-1].startswith("Stopped the minray head")
    poll(lambda: all(gone(p) for p in processes), what="every node's processes gone")
    assert live_sessions(root) == [] and arenas_of(root) == []


def test_a_killed_head_is_restarted_with_its_cluster(session_root):
    root = session_root["MINRAY_SESSION_ROOT"]
    refused = minray_cli(session_root, "start", "--head", "--restart", "--port", "0",
                         *NODE_OPTIONS, check=False)
    assert refused.returncode != 0 and "nothing to restart" in refused.stderr
    address, pid, token_path, _ = start_head(session_root)
    joined = minray_cli(dict(session_root, MINRAY_HEAD_TIMEOUT_S="60"), "start", "--address",
                        address, *NODE_OPTIONS, "--node-ip-address", "127.0.0.2").stdout
    assert f"joined to the cluster at {address}" in joined
    os.kill(pid, 9)
    poll(lambda: gone(pid), what="the head gone")

    out = minray_cli(session_root, "start", "--head", "--restart", *NODE_OPTIONS).stdout
    match = re.search(r"Restarted the minray head \w+ at (\S+) \(pid (\d+)\) in (\S+):", out)
    assert match, out
    assert match.group(1) == address                     # same address, same session
    assert match.group(3) == os.path.dirname(token_path)
    # The node that was there links to it again, and drivers use both.
    poll(lambda: "2 node(s) alive" in minray_cli(session_root, "status").stdout,
         what="the node linked to the restarted head")
    run_driver(f"""
import minray
minray.init(address={address!r})

@minray.remote(num_cpus=1)
def node():
    import time
    time.sleep(0.2)
    return minray.get_runtime_context().get_node_id()

assert len(set(minray.get([node.remote() for _ in range(8)]))) == 2
print("DRIVER DONE")
""", env=session_root)
    minray_cli(session_root, "stop")
    assert live_sessions(root) == []
