"""Estimate pi by Monte Carlo sampling, spread over minray tasks.

Throw random points into the unit square and count how many land inside the
quarter circle: that share tends to pi / 4. Each task draws its own batch of
points with numpy (its own seed) and returns one count; the driver gathers the
counts as tasks finish, printing progress, then runs the same batches one after
another in this process and compares the two wall times. Both runs use the
same seeds, so they must agree exactly.

    python docs/examples/pi.py              # 48 batches of 4 million points
    python docs/examples/pi.py --smoke      # a few small batches, ~1 s
    python docs/examples/pi.py --batches 96 --points 2000000

It uses the embedded default: minray.init() with no arguments starts a local
cluster (one worker per CPU) and stops it when the script ends.
"""
import argparse
import math
import os
import time

import numpy as np

import minray

CHUNK = 1_000_000          # points drawn at once: bounds a task's memory to ~16 MB


def count_inside(seed, points):
    """How many of `points` random points of the unit square fall in the circle."""
    rng = np.random.default_rng(seed)
    inside = 0
    left = points
    while left > 0:
        n = min(CHUNK, left)
        x = rng.random(n)
        y = rng.random(n)
        inside += int(np.count_nonzero(x * x + y * y <= 1.0))
        left -= n
    return inside


# The same function, as a task. (The decorator form, @minray.remote, works too;
# here the plain function is kept for the serial run.)
count_inside_remote = minray.remote(count_inside)


def parallel(seeds, points):
    """Submit every batch at once; collect counts in the order they finish."""
    pending = [count_inside_remote.remote(seed, points) for seed in seeds]
    inside = 0
    done = 0
    step = max(1, len(seeds) // 8)
    while pending:
        ready, pending = minray.wait(pending, num_returns=1)
        inside += minray.get(ready[0])
        done += 1
        if done % step == 0 or not pending:
            estimate = 4.0 * inside / (done * points)
            print(f"  {done:3d}/{len(seeds)} batches done, pi ~ {estimate:.6f}", flush=True)
    return inside


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batches", type=int, help="number of tasks: default 48 (8 with --smoke)")
    parser.add_argument("--points", type=int,
                        help="points per task: default 4,000,000 (200,000 with --smoke)")
    parser.add_argument("--smoke", action="store_true", help="a quick run: small defaults")
    args = parser.parse_args(argv)
    defaults = (8, 200_000) if args.smoke else (48, 4_000_000)
    args.batches = args.batches or defaults[0]
    args.points = args.points or defaults[1]
    if args.batches < 1 or args.points < 1:
        parser.error("--batches and --points must be at least 1")
    seeds = list(range(1, args.batches + 1))
    total = args.batches * args.points

    start = time.perf_counter()
    context = minray.init()
    init_s = time.perf_counter() - start
    cpus = int(minray.cluster_resources().get("CPU", 0))
    print(f"minray started a local cluster with {cpus} CPUs in {init_s:.2f} s "
          f"(session {os.path.basename(context['session_dir'])})")
    print(f"sampling {total:,} points in {args.batches} tasks of {args.points:,}")

    start = time.perf_counter()
    inside = parallel(seeds, args.points)
    parallel_s = time.perf_counter() - start
    pi = 4.0 * inside / total
    print(f"parallel: pi ~ {pi:.6f} (error {abs(pi - math.pi):.1e}) in {parallel_s:.2f} s")

    print("running the same batches one after another in this process ...", flush=True)
    start = time.perf_counter()
    serial_inside = sum(count_inside(seed, args.points) for seed in seeds)
    serial_s = time.perf_counter() - start
    print(f"serial:   pi ~ {4.0 * serial_inside / total:.6f} in {serial_s:.2f} s")

    print(f"speed-up with {cpus} CPUs: {serial_s / parallel_s:.2f}x "
          f"({total / parallel_s / 1e6:.0f} vs {total / serial_s / 1e6:.0f} million points/s)")
    minray.shutdown()
    if serial_inside != inside:
        raise SystemExit(f"parallel and serial counts differ: {inside} != {serial_inside}")
    print("parallel and serial counts agree exactly")


if __name__ == "__main__":
    main()
