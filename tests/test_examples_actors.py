"""The runnable actor examples in docs/examples, each run with --smoke in a real process."""
import re

import pytest

from minray_driver import EXAMPLES, run_driver, run_example


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

    def accuracies(label):
        return [float(a) for a in
                re.findall(rf"^ +{label} +round +[0-9.]+: test accuracy ([0-9.]+)", out, re.M)]

    for mode in ("sync", "async", "serial"):
        accs = accuracies(mode)
        assert len(accs) >= 5, out
        final = float(re.search(rf"^{mode}: final test accuracy ([0-9.]+)", out, re.M).group(1))
        assert final == accs[-1] and final > 0.8 and final > accs[0] + 0.5, out    # it learned
    # Sync and serial take the same steps on the same minibatches: the same path.
    assert accuracies("sync") == accuracies("serial"), out
    diff = re.search(r"sync vs serial: .* weights differ by at most ([0-9.e+-]+)", out)
    assert diff and float(diff.group(1)) <= 1e-6, out
    assert "sync matches serial" in out
    assert re.search(r"speed-up of sync with 3 workers on \d+ CPUs: [0-9.]+x", out), out
    assert re.search(r"async vs serial: [0-9.]+ vs [0-9.]+ gradients/s", out), out
    assert "every mode reached test accuracy >= 0.8" in out

    # The comparison can fail: serial weights nudged by 1e-3 in the driver make it exit 1
    # (with one shard, the path where each gradient is a single ObjectRef).
    proc = run_driver("""
        import parameter_server as example
        original = example.run_serial
        example.run_serial = lambda *args: original(*args) + 1e-3
        example.main(["--smoke", "--mode", "sync", "--iterations", "5", "--num-shards", "1"])
    """, check=False, env={"PYTHONPATH": EXAMPLES})
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "weights differ by at most 1.0e-03" in proc.stdout
    assert "sync and serial runs ended at different weights or accuracies" in proc.stderr
