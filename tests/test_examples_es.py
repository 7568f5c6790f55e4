"""docs/examples/evolution_strategies.py --smoke in a real process: the policy learns."""
import re

from minray_driver import run_example


def test_evolution_strategies_smoke_reward_rises():
    out = run_example("evolution_strategies.py", timeout=120)
    assert "shared noise table:" in out and "put once" in out
    iterations = re.findall(r"iteration +(\d+): eval reward +([0-9.]+)", out)
    assert [int(i) for i, _ in iterations] == [0, 1, 2, 3, 4]
    rose = re.search(r"smoke: reward rose from ([0-9.]+) to ([0-9.]+)", out)
    assert rose, out
    start, end = float(rose.group(1)), float(rose.group(2))
    assert start == float(iterations[0][1])
    assert end == float(iterations[-1][1])
    assert end > start
