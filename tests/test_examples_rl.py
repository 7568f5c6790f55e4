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


def check_a3c_smoke(out):
    """Rewards rose over --smoke's 80 gradients of 16 envs x 32 steps each."""
    rose = re.search(r"smoke: mean reward rose from ([0-9.]+) to ([0-9.]+)", out)
    assert rose, out
    assert float(rose.group(2)) > float(rose.group(1))
    # Progress lines: updates applied one at a time as gradients arrive.
    progress = r" 80 updates, +40960 steps, +\d+ episodes, mean reward \(last 100\)"
    assert re.search(progress, out), out


def test_a3c_smoke_reward_rises():
    out = run_example("a3c.py")
    assert "2 runner actors: 16 envs x 32 steps per gradient" in out
    assert "runner actors ready" in out
    check_a3c_smoke(out)
    # The driver reports its own share of the work, so a slow update loop shows.
    assert re.search(r"driver: [0-9.]+ ms per update outside minray.wait", out), out


def test_a3c_serial_smoke_reward_rises_and_matches_one_runner_actor():
    out = run_example("a3c.py", "--serial")
    assert "serial, one runner in this process: 16 envs x 32 steps per gradient" in out
    assert "minray started" not in out and "runner actors" not in out
    check_a3c_smoke(out)
    # With one runner actor nothing is asynchronous: it is the serial algorithm,
    # through minray, so it must see the very same episodes.
    actor_out = run_example("a3c.py", "--num-workers", "1")
    assert "1 runner actor: 16 envs x 32 steps per gradient" in actor_out

    def results(text):
        return re.findall(r"updates, .*|smoke: .*", text)[-2:]
    assert results(actor_out) == results(out), (out, actor_out)


def test_policy_gradient_smoke_reward_rises():
    out = run_smoke("policy_gradient.py")
    assert re.search(r"iteration +1: mean reward", out)
    # The serial run repeated the parallel run's 20 iterations in the driver and agreed.
    assert re.search(r"parallel: 20 iterations \(200 episodes\)", out), out
    assert re.search(r"serial: +20 iterations \(200 episodes\) in [0-9.]+ s", out), out
    assert re.search(r"speed-up with 2 workers on \d+ CPUs: [0-9.]+x", out), out
    assert re.search(r"parallel and serial runs agree: same episode rewards, weights differ by "
                     r"[0-9.]+e[-+]\d+", out), out
