"""Random hyperparameter search with minray tasks, processing results as they finish.

Each trial trains a small neural network (plain numpy: one hidden ReLU layer, a
softmax output, minibatch SGD with L2 regularisation) on scikit-learn's bundled
8x8 digits (1,797 images, nothing downloaded) and returns its accuracy on a
held-out validation split. The hyperparameters are drawn at random: learning
rate, hidden-layer size, L2 strength and batch size.

The driver keeps one trial per CPU running. Whenever one finishes, minray.wait
hands it back: the driver prints its accuracy and starts a new trial, until
--trials trials are done. This is the original's hyperopt_simple.py. The data
set is put into the object store once; every task gets the same ref.

Then the same trials (same configurations, same seeds) run again one after
another in this process, for the time comparison. A trial depends only on its
configuration and seed, so each must reach exactly the same accuracy and
training loss as in the parallel search.

    python docs/examples/hyperopt_simple.py                        # 32 trials of 1,500 steps
    python docs/examples/hyperopt_simple.py --smoke                # 6 trials of 300 steps
    python docs/examples/hyperopt_simple.py --trials 5 --steps 10  # the original's command

Exits with status 1 if a serial trial's result differs from its parallel run,
or if the best validation accuracy is below 0.9 (0.5 with --smoke, whose
trials are short).
"""
import os

# One BLAS thread per process: the trials already use every CPU, and the serial
# run must not use more than one. minray's workers inherit the driver's
# environment, so this (before numpy loads) covers them too.
for _name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_name, "1")

import argparse  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402

import minray  # noqa: E402
from digits_mlp import accuracy, check_best, describe, init_network, load_digits_split, random_params, sgd  # noqa: E402

FULL_BOUND = 0.9
SMOKE_BOUND = 0.5


def train_and_validate(data, params, steps, seed):
    """Train a fresh network for `steps` SGD steps; return (accuracy, loss, seconds).

    Everything random comes from `seed`, so the result depends on nothing else.
    """
    start = time.perf_counter()
    rng = np.random.default_rng(seed)
    net = init_network(rng, data["x_train"].shape[1], params["hidden"], data["classes"])
    loss = sgd(net, data, params, steps, rng)
    acc = accuracy(net, data["x_val"], data["y_val"])
    return acc, loss, time.perf_counter() - start


train_task = minray.remote(train_and_validate)   # the same function, as a minray task


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, help="trials to run: default 32 (6 with --smoke)")
    parser.add_argument("--steps", type=int,
                        help="SGD steps per trial: default 1,500 (300 with --smoke)")
    parser.add_argument("--in-flight", type=int,
                        help="trials running at once (default: the cluster's CPUs)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the search (default 0)")
    parser.add_argument("--smoke", action="store_true", help="a quick run: small defaults")
    args = parser.parse_args(argv)
    defaults = (6, 300) if args.smoke else (32, 1500)
    args.trials = args.trials or defaults[0]
    args.steps = args.steps or defaults[1]
    bound = SMOKE_BOUND if args.smoke else FULL_BOUND
    if args.trials < 1 or args.steps < 1 or (args.in_flight is not None and args.in_flight < 1):
        parser.error("--trials, --steps and --in-flight must be at least 1")
    # Every trial's configuration and seed, drawn up front: the serial run repeats them.
    rng = np.random.default_rng(args.seed)
    configs = {trial: random_params(rng) for trial in range(1, args.trials + 1)}
    seeds = {trial: args.seed * 100_003 + trial for trial in configs}

    start = time.perf_counter()
    minray.init()
    cpus = int(minray.cluster_resources().get("CPU", 1))
    in_flight = min(args.in_flight or cpus, args.trials)
    data = load_digits_split()
    data_ref = minray.put(data)
    print(f"digits: {len(data['y_train'])} training and {len(data['y_val'])} validation images; "
          f"{args.trials} trials of {args.steps} SGD steps, {in_flight} at a time on {cpus} CPUs "
          f"(cluster up and data put in {time.perf_counter() - start:.2f} s)", flush=True)

    start = time.perf_counter()
    to_launch = iter(configs)
    pending = {}

    def launch():
        trial = next(to_launch, None)
        if trial is not None:
            pending[train_task.remote(data_ref, configs[trial], args.steps, seeds[trial])] = trial

    for _ in range(in_flight):
        launch()
    results = {}                 # trial -> (accuracy, loss)
    task_seconds = 0.0
    while pending:
        [ready], _ = minray.wait(list(pending), num_returns=1)
        trial = pending.pop(ready)
        acc, loss, seconds = minray.get(ready)
        results[trial] = (acc, loss)
        task_seconds += seconds
        best = max(results, key=lambda t: results[t][0])
        print(f"trial {trial:3d} done ({len(results):3d}/{args.trials}): accuracy {acc:.4f} "
              f"train loss {loss:.3f} in {seconds:.2f} s  [{describe(configs[trial])}]  "
              f"best so far {results[best][0]:.4f}", flush=True)
        launch()                 # keep every CPU busy until all trials are launched
    search_s = time.perf_counter() - start
    minray.shutdown()
    print(f"search: {args.trials} trials in {search_s:.2f} s "
          f"({task_seconds:.2f} s of training summed over the tasks)")

    # The same trials one after another in this process: same configurations and
    # seeds, so the same accuracies and losses, bit for bit.
    print("running the same trials serially in this process ...", flush=True)
    start = time.perf_counter()
    differ = []
    for trial, params in configs.items():
        acc, loss, _ = train_and_validate(data, params, args.steps, seeds[trial])
        if (acc, loss) != results[trial]:
            differ.append(trial)
            print(f"  trial {trial}: serial (accuracy, loss) {(acc, loss)!r}, "
                  f"parallel {results[trial]!r}")
    serial_s = time.perf_counter() - start
    print(f"serial: {args.trials} trials in {serial_s:.2f} s; search {search_s:.2f} s; "
          f"speed-up {serial_s / search_s:.2f}x with {in_flight} in flight on {cpus} CPUs")
    if differ:
        print(f"FAILED: {len(differ)} of {args.trials} trials differ from their parallel run")
        raise SystemExit(1)
    print(f"all {args.trials} serial accuracies and losses match the parallel search's")

    best = max(results, key=lambda t: results[t][0])
    print(f"best configuration: trial {best}: {describe(configs[best])}")
    print(f"best validation accuracy {results[best][0]:.4f} "
          f"({args.trials} trials in {search_s:.1f} s)")
    check_best(results[best][0], bound)


if __name__ == "__main__":
    main()
