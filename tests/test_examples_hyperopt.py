"""The hyperparameter search examples in docs/examples, each run with --smoke in a real process."""
import os
import re
import subprocess
import sys

from minray_driver import EXAMPLES, REPO, run_driver, run_example

SMOKE_BOUND = 0.5        # the scripts' own bound with --smoke


def best_accuracy(out):
    return float(re.search(r"best validation accuracy ([0-9.]+)", out).group(1))


def assert_speedup_is_the_ratio(speedup, serial_s, parallel_s):
    """speed-up == serial / parallel, up to the rounding of the printed numbers (2 decimals)."""
    low = (serial_s - 0.005) / (parallel_s + 0.005) - 0.005
    high = (serial_s + 0.005) / (parallel_s - 0.005) + 0.005
    assert low <= speedup <= high, (speedup, serial_s, parallel_s)


def test_hyperopt_simple_runs_every_trial_and_finds_a_good_configuration():
    out = run_example("hyperopt_simple.py")
    done = re.findall(r"trial +(\d+) done \( *(\d+)/(\d+)\): accuracy ([0-9.]+)", out)
    assert len(done) == 6
    assert sorted(int(t) for t, _, _, _ in done) == list(range(1, 7))
    assert [int(k) for _, k, _, _ in done] == list(range(1, 7))
    assert all(0.0 <= float(a) <= 1.0 for _, _, _, a in done)
    best = best_accuracy(out)
    assert best == max(float(a) for _, _, _, a in done)
    assert best > SMOKE_BOUND
    assert re.search(r"best configuration: trial \d+: lr=[0-9.]+ hidden= *\d+ l2=\S+ batch= *\d+",
                     out)
    assert "OK: best accuracy is at least 0.5" in out
    # The same 6 trials then ran serially in the driver, with the same results.
    serial = re.search(r"serial: 6 trials in ([0-9.]+) s; search ([0-9.]+) s; speed-up ([0-9.]+)x",
                       out)
    assert serial, out
    serial_s, search_s, speedup = map(float, serial.groups())
    assert_speedup_is_the_ratio(speedup, serial_s, search_s)
    assert "all 6 serial accuracies and losses match the parallel search's" in out
    assert "FAILED" not in out


def run_with_serial_results_perturbed(script, function, perturb):
    """Run `script` --smoke in a driver whose serial run gets `function`'s results
    changed by `perturb` (the source of a function of one result); return the process.

    Only the driver's module attribute is replaced: the parallel run's tasks were
    made from the original function, and the workers import the script afresh.
    """
    code = f"""
        import {script} as example
        original = example.{function}
        perturb = {perturb}
        example.{function} = lambda *args: perturb(original(*args))
        example.main(["--smoke"])
    """
    path = os.pathsep.join(filter(None, [EXAMPLES, os.environ.get("PYTHONPATH")]))
    return run_driver(code, timeout=120, check=False, env={"PYTHONPATH": path})


def test_hyperopt_simple_exits_nonzero_when_a_serial_trial_differs():
    proc = run_with_serial_results_perturbed(
        "hyperopt_simple", "train_and_validate",
        "lambda result: (result[0] + 1e-9, *result[1:])")        # (accuracy, loss, seconds)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "FAILED: 6 of 6 trials differ from their parallel run" in proc.stdout


def test_hyperopt_simple_exits_nonzero_below_the_bound():
    # One trial of one step cannot reach 0.9: the full-run bound applies without --smoke.
    proc = subprocess.run(
        [sys.executable, os.path.join(EXAMPLES, "hyperopt_simple.py"),
         "--trials", "1", "--steps", "1"],
        cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "FAILED: best accuracy" in proc.stdout


def test_hyperopt_adaptive_stops_poor_trials_and_trains_good_ones_longer():
    out = run_example("hyperopt_adaptive.py")
    segments = re.findall(
        r"segment +(\d+)/(\d+): trial +(\d+) after +(\d+) segment\(s\): accuracy ([0-9.]+)", out)
    assert len(segments) == 16                       # 4 starting + 12 more
    assert [int(k) for k, _, _, _, _ in segments] == list(range(1, 17))
    lengths = {}
    for _, _, trial, after, _ in segments:           # each trial's segments come in order
        assert int(after) == lengths.get(trial, 0) + 1
        lengths[trial] = int(after)
    assert len(lengths) > 4                          # poor trials were replaced by new ones
    assert max(lengths.values()) > 1                 # and good ones trained further
    assert "pause, new trial" in out
    best = best_accuracy(out)
    assert best == max(float(a) for _, _, _, _, a in segments)
    assert best > SMOKE_BOUND
    assert "OK: best accuracy is at least 0.5" in out
    # The same search then ran serially, one segment at a time, with the same budget ...
    runs = dict(re.findall(r"(parallel|serial) *: 16 segments \(800 SGD steps\) in ([0-9.]+) s", out))
    assert set(runs) == {"parallel", "serial"}, out
    speedup = float(re.search(r"speed-up for the same budget: ([0-9.]+)x", out).group(1))
    assert_speedup_is_the_ratio(speedup, float(runs["serial"]), float(runs["parallel"]))
    # ... and every (trial, segment) both trained reached the same accuracy: at
    # least the 4 starting trials' first segments are common to both.
    common = re.search(r"(\d+) \(trial, segment\) pairs trained by both searches", out)
    assert int(common.group(1)) >= 4
    assert f"all {common.group(1)} of them reached the same accuracy in both" in out
    assert "FAILED" not in out


def test_hyperopt_adaptive_exits_nonzero_when_a_serial_segment_differs():
    proc = run_with_serial_results_perturbed(
        "hyperopt_adaptive", "train_segment",
        "lambda result: ({**result[0], 'accuracy': result[0]['accuracy'] + 1e-9}, result[1])")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert re.search(r"FAILED: \d+ segments differ between the searches: trial 1 segment 1:",
                     proc.stdout), proc.stdout
