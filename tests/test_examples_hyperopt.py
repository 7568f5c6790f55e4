"""The hyperparameter search examples in docs/examples, each run with --smoke in a real process."""
import os
import re
import subprocess
import sys

from minray_driver import EXAMPLES, REPO, run_example

SMOKE_BOUND = 0.5        # the scripts' own bound with --smoke


def best_accuracy(out):
    return float(re.search(r"best validation accuracy ([0-9.]+)", out).group(1))


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
