"""Aggregate many arrays with a tree of tasks (the tree reduce of the original tutorial).

One task per array generates data; then pairs are summed by tasks until one
array is left. The driver then computes the same sum serially and prints the
speed-up. Nothing waits on the driver: every aggregate_data task is
submitted at once with the refs of its two inputs, and runs as soon as both
exist. Arrays above 100 KB travel through the shared-memory object store
(zero-copy reads); each is freed once its aggregate has consumed it and the
driver no longer holds its ref.

    python docs/examples/tree_reduce.py            # 1,024 arrays of 100,000 floats
    python docs/examples/tree_reduce.py --smoke    # 64 arrays of 1,000 floats
    python docs/examples/tree_reduce.py --num-arrays 100 --size 1000   # the tutorial's sizes
"""
import argparse
import time

import numpy as np

import minray


@minray.remote
def generate_data(seed, size):
    return np.random.default_rng(seed).normal(size=size)


@minray.remote
def aggregate_data(x, y):
    return x + y


def tree_reduce(num_arrays, size):
    data = [generate_data.remote(seed, size) for seed in range(num_arrays)]
    tasks = num_arrays
    # The tutorial's loop: take the two oldest refs, append a ref to their sum.
    while len(data) > 1:
        data.append(aggregate_data.remote(data.pop(0), data.pop(0)))
        tasks += 1
    return minray.get(data[0]), tasks


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--num-arrays", type=int, help="default 1024 (64 with --smoke)")
    parser.add_argument("--size", type=int, help="floats per array: default 100,000 "
                        "(1,000 with --smoke)")
    parser.add_argument("--smoke", action="store_true", help="a quick run: small defaults")
    args = parser.parse_args(argv)
    defaults = (64, 1000) if args.smoke else (1024, 100_000)
    args.num_arrays = args.num_arrays or defaults[0]
    args.size = args.size or defaults[1]
    if args.num_arrays < 1 or args.size < 1:
        parser.error("--num-arrays and --size must be at least 1")

    minray.init()
    cpus = int(minray.cluster_resources().get("CPU", 0))
    print(f"reducing {args.num_arrays} arrays of {args.size:,} floats "
          f"({args.num_arrays * args.size * 8 / 1e6:.1f} MB in all) with a tree of tasks",
          flush=True)
    start = time.perf_counter()
    total, tasks = tree_reduce(args.num_arrays, args.size)
    elapsed = time.perf_counter() - start
    depth = max(1, (args.num_arrays - 1).bit_length())
    print(f"{tasks} tasks ({args.num_arrays} generate, {tasks - args.num_arrays} aggregate, "
          f"tree depth {depth}) in {elapsed:.2f} s")
    minray.shutdown()

    # The same sum computed here, one array at a time, from the same seeds.
    start = time.perf_counter()
    expected = np.zeros(args.size)
    for seed in range(args.num_arrays):
        expected += np.random.default_rng(seed).normal(size=args.size)
    serial_s = time.perf_counter() - start
    print(f"serial: the same sum in this process in {serial_s:.2f} s")
    print(f"speed-up with {cpus} CPUs: {serial_s / elapsed:.2f}x")
    print(f"result: {total.shape[0]:,} floats, sum {total.sum():.6f}, first {total[0]:.6f}")
    if not np.allclose(total, expected):
        raise SystemExit("the tree reduce does not match the serial sum")
    print("matches the serial sum")


if __name__ == "__main__":
    main()
