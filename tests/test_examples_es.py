"""docs/examples/evolution_strategies.py --smoke in a real process: the policy learns,
and the serial rerun in the driver reaches the same parameters."""
import re

from minray_driver import run_example


def test_evolution_strategies_smoke_reward_rises_and_serial_run_matches():
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

    # The serial run repeated the same 4 iterations in the driver and agreed.
    serial = re.search(r"serial: +eval reward ([0-9.]+) -> ([0-9.]+) after (\d+) iterations "
                       r"in ([0-9.]+) s", out)
    assert serial, out
    assert (float(serial.group(1)), float(serial.group(2)), int(serial.group(3))) == (start, end, 4)
    speed_up = re.search(r"speed-up with 2 workers on \d+ CPUs: ([0-9.]+)x", out)
    assert speed_up and float(speed_up.group(1)) > 0, out
    assert re.search(r"parallel and serial runs agree: same eval rewards, parameters differ by "
                     r"[0-9.]+e[-+]\d+", out), out
