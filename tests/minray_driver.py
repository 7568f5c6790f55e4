"""Helpers for the task/API/lifecycle tests: run a driver script in a fresh
Python process (for special init arguments, or to watch shutdown and kills
from outside), and poll for a condition with a deadline instead of sleeping."""
import os
import subprocess
import sys
import tempfile
import textwrap
import time

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def session_retired(session_dir):
    """A finished session keeps its logs and nothing else (no token, sockets, LMDB)."""
    return os.path.isdir(session_dir) and os.listdir(session_dir) == ["logs"]


def run_driver(code, timeout=60, env=None, check=True):
    """Run `code` (dedented) as a driver script; return the CompletedProcess.

    With check=True a non-zero exit fails the test, showing both streams.
    """
    full_env = dict(os.environ)
    full_env.update(env or {})
    full_env.setdefault("PYTHONUNBUFFERED", "1")
    # Files, not pipes: a leftover grandchild (a bug under test) holding a
    # pipe open would make us wait for it instead of failing the test.
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=REPO,
                              stdout=out, stderr=err, text=True, timeout=timeout, env=full_env)
        out.seek(0)
        err.seek(0)
        proc.stdout, proc.stderr = out.read(), err.read()
    if check and proc.returncode != 0:
        raise AssertionError(f"driver exited with {proc.returncode}\n--- stdout\n{proc.stdout}"
                             f"\n--- stderr\n{proc.stderr}")
    return proc


def start_driver(code, env=None, **popen_kwargs):
    """Start `code` as a driver script in the background (a Popen)."""
    full_env = dict(os.environ)
    full_env.update(env or {})
    full_env.setdefault("PYTHONUNBUFFERED", "1")
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(code)], cwd=REPO,
                            env=full_env, text=True, **popen_kwargs)


def poll(predicate, timeout=20.0, interval=0.02, what="condition"):
    """Call predicate() until it returns something truthy; return that value."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


def gone(pid):
    """True once a process has exited (a zombie counts as gone)."""
    import psutil
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


EXAMPLES = os.path.join(REPO, "docs", "examples")


def run_example(name, *args, timeout=180, env=None):
    """Run docs/examples/<name> --smoke; return its stdout (asserting exit status 0)."""
    return run_example_process(name, args, timeout, env)[0]


def run_example_process(name, args=(), timeout=180, env=None):
    """Like run_example, returning (stdout, pid of the example's process)."""
    import pytest
    proc = subprocess.Popen(
        [sys.executable, os.path.join(EXAMPLES, name), "--smoke", *args],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        stdout, stderr = proc.communicate()
        pytest.fail(f"{name} did not finish in {timeout} s\nstdout:\n{stdout}\nstderr:\n{stderr}")
    assert proc.returncode == 0, (
        f"{name} exited with {proc.returncode}\nstdout:\n{stdout}\nstderr:\n{stderr}")
    return stdout, proc.pid


def wait_for_file(path, limit=30.0):
    """Block until `path` exists (used inside gated actor methods)."""
    deadline = time.monotonic() + limit
    while not os.path.exists(path):
        if time.monotonic() > deadline:
            raise TimeoutError(f"{path} never appeared")
        time.sleep(0.005)


def module_cluster(**init_kwargs):
    """An autouse fixture: one local cluster shared by a test module's tests."""
    @pytest.fixture(scope="module", autouse=True)
    def cluster():
        import minray
        minray.init(**init_kwargs)
        yield
        minray.shutdown()
    return cluster
