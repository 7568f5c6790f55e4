"""docs/examples/evolution_strategies.py --smoke in a real process: the policy learns."""
import os
import re
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, "docs", "examples", "evolution_strategies.py")


def test_evolution_strategies_smoke_reward_rises():
    proc = subprocess.Popen([sys.executable, SCRIPT, "--smoke"], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        out, err = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        pytest.fail(f"evolution_strategies.py did not finish in 120 s\nstdout:\n{out}\nstderr:\n{err}")
    assert proc.returncode == 0, f"exit {proc.returncode}\nstdout:\n{out}\nstderr:\n{err}"
    assert "shared noise table:" in out and "put once" in out
    iterations = re.findall(r"iteration +(\d+): eval reward +([0-9.]+)", out)
    assert [int(i) for i, _ in iterations] == [0, 1, 2, 3, 4]
    rose = re.search(r"smoke: reward rose from ([0-9.]+) to ([0-9.]+)", out)
    assert rose, out
    start, end = float(rose.group(1)), float(rose.group(2))
    assert start == float(iterations[0][1])
    assert end == float(iterations[-1][1])
    assert end > start
