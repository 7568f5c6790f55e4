"""tools/bench.py: the store group runs end to end and the CLI rejects bad names.

Timing is never asserted here: figures are recorded in docs/benchmarks.md.
"""
import json
import math
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(REPO, "tools", "bench.py")

STORE_FIGURES = [
    "store_put_256mb_gbps",
    "memcpy_256mb_gbps",
    "store_put_vs_memcpy_ratio",
    "store_get_256mb_us",
    "store_put_small_per_s",
    "store_get_small_per_s",
    "store_alloc_free_per_s",
    "store_fragmentation_pct",
]


def bench(*args, timeout=300):
    return subprocess.run(
        [sys.executable, BENCH, *args],
        cwd=REPO, capture_output=True, text=True, timeout=timeout,
    )


def test_quick_store_group_writes_every_figure(tmp_path):
    out = tmp_path / "bench.json"
    proc = bench("--quick", "--only", "store", "--json", str(out))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    data = json.loads(out.read_text())
    for name in STORE_FIGURES:
        assert name in data, f"{name} missing from {sorted(data)}"
        value = data[name]
        assert isinstance(value, (int, float)) and math.isfinite(value), (name, value)
        if name == "store_fragmentation_pct":
            assert 0 <= value <= 100, (name, value)  # may be exactly 0
        else:
            assert value > 0, (name, value)
    # one "name value unit" line per figure, after the machine description
    lines = proc.stdout.splitlines()
    assert lines[0].startswith("# machine:")
    for name in STORE_FIGURES:
        row = [line.split() for line in lines if line.split()[:1] == [name]]
        assert len(row) == 1 and len(row[0]) >= 3, (name, proc.stdout)
        float(row[0][1])


def test_unknown_group_is_an_error_listing_valid_groups():
    proc = bench("--only", "nosuchgroup", timeout=60)
    assert proc.returncode != 0
    assert "nosuchgroup" in proc.stderr
    assert "valid groups:" in proc.stderr and "store" in proc.stderr


def test_list_shows_store_figures():
    proc = bench("--list", timeout=60)
    assert proc.returncode == 0, proc.stderr
    for name in STORE_FIGURES:
        assert name in proc.stdout
