"""docs/examples/a3c.py and policy_gradient.py --smoke in real processes: the policies learn."""
import os
import re
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLES = os.path.join(REPO, "docs", "examples")


def run_smoke(script, timeout=180):
    path = os.path.join(EXAMPLES, script)
    proc = subprocess.Popen([sys.executable, path, "--smoke"], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        pytest.fail(f"{script} did not finish in {timeout} s\nstdout:\n{out}\nstderr:\n{err}")
    assert proc.returncode == 0, f"exit {proc.returncode}\nstdout:\n{out}\nstderr:\n{err}"
    rose = re.search(r"smoke: mean reward rose from ([0-9.]+) to ([0-9.]+)", out)
    assert rose, f"stdout:\n{out}\nstderr:\n{err}"
    start, end = float(rose.group(1)), float(rose.group(2))
    assert end > start
    return out


def test_a3c_smoke_reward_rises():
    out = run_smoke("a3c.py")
    # Progress lines: updates applied one at a time as gradients arrive.
    assert re.search(r"\d+ updates, +\d+ steps, +\d+ episodes, mean reward \(last 100\)", out)
    assert "500 updates" in out


def test_policy_gradient_smoke_reward_rises():
    out = run_smoke("policy_gradient.py")
    assert re.search(r"iteration +1: mean reward", out)
