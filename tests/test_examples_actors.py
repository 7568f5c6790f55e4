"""The runnable actor examples in docs/examples, each run with --smoke in a real process."""
import re

import pytest

from minray_driver import run_example


def test_lbfgs_over_actor_shards_matches_serial_and_loss_falls():
    out = run_example("lbfgs.py")
    assert "minray started a local cluster" in out
    assert re.search(r"\d+ Shard actors hold", out)
    par = re.search(r"parallel: loss ([0-9.]+) -> ([0-9.]+) in (\d+) iterations", out)
    ser = re.search(r"serial: +loss ([0-9.]+) -> ([0-9.]+) in (\d+) iterations", out)
    assert par and ser, out
    first, final = float(par.group(1)), float(par.group(2))
    assert first == pytest.approx(2.302585, abs=1e-5)        # log(10) at zero weights
    assert final < 0.5 * first                               # the loss fell
    assert float(ser.group(2)) == pytest.approx(final, rel=1e-6)
    assert re.search(r"speed-up with \d+ actors on \d+ CPUs: [0-9.]+x", out)
    assert "parallel and serial losses agree" in out


def test_parameter_server_sync_and_async_learn():
    out = run_example("parameter_server.py", "--num-workers", "3", "--num-shards", "3")
    assert "3 ParameterServer actors, 3 Worker actors" in out
    for mode in ("sync", "async"):
        accs = [float(a) for a in re.findall(rf"{mode} +round +[0-9.]+: test accuracy ([0-9.]+)",
                                             out)]
        assert len(accs) >= 5, out
        final = float(re.search(rf"{mode}: final test accuracy ([0-9.]+)", out).group(1))
        assert final > 0.8 and final > accs[0] - 0.05, out
    assert "every mode reached test accuracy >= 0.8" in out
