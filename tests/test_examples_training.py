"""The PyTorch data-parallel and nested-experiments examples, each run with --smoke in a real process."""
import os
import re

import pytest

from minray_driver import run_example


def test_data_parallel_torch_training_learns_and_matches_serial():
    out = run_example("data_parallel.py")
    assert re.search(r"minray started \d+ CPUs and 2 Worker actors", out), out
    accs = [float(a) for a in re.findall(r"parallel epoch +[0-9.]+: .*test accuracy ([0-9.]+)", out)]
    assert len(accs) >= 3, out
    par = re.search(r"parallel: test accuracy ([0-9.]+) -> ([0-9.]+) in (\d+) steps", out)
    ser = re.search(r"serial: +test accuracy ([0-9.]+) -> ([0-9.]+) in (\d+) steps", out)
    assert par and ser, out
    first, final = float(par.group(1)), float(par.group(2))
    assert final > first + 0.1                                    # accuracy rose
    assert par.group(3) == ser.group(3)                           # same number of steps
    # Same initial weights and minibatches: both runs end at about the same accuracy.
    assert float(ser.group(2)) == pytest.approx(final, abs=0.05)
    diff = float(re.search(r"final weights differ by at most ([0-9.e+-]+)", out).group(1))
    assert diff < 1e-2, out
    assert re.search(r"speed-up with 2 workers on \d+ CPUs: [0-9.]+x", out)
    assert "test accuracy rose" in out


def test_data_parallel_three_workers():
    out = run_example("data_parallel.py", "--num-workers", "3", "--batch-size", "16")
    assert "3 shards" in out and "3 Worker actors" in out, out
    assert "test accuracy rose" in out


def test_nested_experiments_launch_inner_tasks_and_match_serial():
    out = run_example("nested_experiments.py")
    assert "2 experiments (hidden sizes [16, 64]), each launching 4 inner tasks" in out, out
    done = re.findall(r"experiment hidden= *(\d+) finished after .*\((\d+) inner tasks, pid (\d+)\)"
                      r".*best lr [0-9.]+ -> ([0-9.]+)", out)
    assert sorted(int(h) for h, *_ in done) == [16, 64], out
    assert all(int(n) == 4 for _, n, _, _ in done)
    assert all(int(pid) != os.getpid() for _, _, pid, _ in done)
    assert "2 experiments, 10 tasks in" in out
    assert "all scores match" in out
    best = float(re.search(r"best: hidden=\d+ lr=[0-9.]+, mean validation accuracy ([0-9.]+)",
                           out).group(1))
    assert best > 0.5
