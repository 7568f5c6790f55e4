"""The runnable task examples in docs/examples, each run with --smoke in a real process."""
import math
import os
import re
import shutil
import tempfile

import pytest

from minray_driver import run_example, run_example_process, session_retired


def test_pi_estimates_pi_in_parallel_and_matches_serial():
    out = run_example("pi.py")
    assert "minray started a local cluster" in out
    progress = re.findall(r"(\d+)/(\d+) batches done", out)
    assert progress and progress[-1][0] == progress[-1][1] == "8"
    estimate = float(re.search(r"parallel: pi ~ ([0-9.]+)", out).group(1))
    assert abs(estimate - math.pi) < 0.01
    assert re.search(r"speed-up with \d+ CPUs: [0-9.]+x", out)
    assert "parallel and serial counts agree exactly" in out


def test_tree_reduce_matches_serial_sum():
    out = run_example("tree_reduce.py")
    assert "127 tasks (64 generate, 63 aggregate, tree depth 6)" in out
    assert re.search(r"serial: the same sum in this process in [0-9.]+ s", out)
    assert re.search(r"speed-up with \d+ CPUs: [0-9.]+x", out)
    assert "matches the serial sum" in out


def test_tree_reduce_with_the_tutorials_sizes():
    out = run_example("tree_reduce.py", "--num-arrays", "100", "--size", "1000")
    assert "199 tasks (100 generate, 99 aggregate" in out
    assert "matches the serial sum" in out


def test_wait_loop_processes_every_experiment_once():
    out = run_example("wait_loop.py")
    done = re.findall(r"experiment +(\d+) done as #(\d+) *: accuracy ([0-9.]+)", out)
    assert len(done) == 8
    assert sorted(int(n) for n, _, _ in done) == list(range(1, 9))
    assert [int(k) for _, k, _ in done] == list(range(1, 9))
    assert all(0.0 <= float(a) <= 1.0 for _, _, a in done)
    best = float(re.search(r"best accuracy ([0-9.]+)", out).group(1))
    assert best > 0.8            # two separable-ish Gaussian classes


@pytest.mark.parametrize("name", ["pi.py", "tree_reduce.py", "wait_loop.py"])
def test_example_leaves_nothing_behind(name):
    # A short root: the node manager's Unix socket lives under it (108-byte limit).
    root = tempfile.mkdtemp(prefix="mr-ex-", dir="/tmp")
    try:
        env = dict(os.environ, MINRAY_SESSION_ROOT=root)
        _, pid = run_example_process(name, (), 120, env)
        # The session directory holds nothing but its logs ...
        sessions = [e for e in os.listdir(root) if e != "session_latest"]
        assert len(sessions) == 1 and session_retired(os.path.join(root, sessions[0])), sessions
    finally:
        shutil.rmtree(root, ignore_errors=True)
    # ... and so is the object store's arena (its name carries the driver's pid).
    assert [f for f in os.listdir("/dev/shm") if f.startswith("minray-session-")
            and f"-{pid}-" in f] == []
