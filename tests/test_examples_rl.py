"""docs/examples/a3c.py and policy_gradient.py --smoke in real processes: the policies learn."""
import re

from minray_driver import run_example


def run_smoke(script, timeout=180):
    out = run_example(script, timeout=timeout)
    rose = re.search(r"smoke: mean reward rose from ([0-9.]+) to ([0-9.]+)", out)
    assert rose, out
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
