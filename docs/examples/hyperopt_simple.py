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

    python docs/examples/hyperopt_simple.py                        # 32 trials of 1,500 steps
    python docs/examples/hyperopt_simple.py --smoke                # 6 trials of 300 steps
    python docs/examples/hyperopt_simple.py --trials 5 --steps 10  # the original's command

Exits with status 1 if the best validation accuracy is below 0.9 (0.5 with
--smoke, whose trials are short).
"""
import os

# One BLAS thread per process: the trials already use every CPU. minray's
# workers inherit the driver's environment, so this (before numpy loads)
# covers them too.
for _name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_name, "1")

import argparse  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402

import minray  # noqa: E402
from digits_mlp import accuracy, check_best, describe, init_network, load_digits_split, random_params, sgd  # noqa: E402

FULL_BOUND = 0.9
SMOKE_BOUND = 0.5


@minray.remote
def train_and_validate(data, params, steps, seed):
    """Train a fresh network for `steps` SGD steps; return (params, accuracy, loss, seconds)."""
    start = time.perf_counter()
    rng = np.random.default_rng(seed)
    net = init_network(rng, data["x_train"].shape[1], params["hidden"], data["classes"])
    loss = sgd(net, data, params, steps, rng)
    acc = accuracy(net, data["x_val"], data["y_val"])
    return params, acc, loss, time.perf_counter() - start


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
    rng = np.random.default_rng(args.seed)

    start = time.perf_counter()
    minray.init()
    cpus = int(minray.cluster_resources().get("CPU", 1))
    in_flight = min(args.in_flight or cpus, args.trials)
    data = load_digits_split()
    print(f"digits: {len(data['y_train'])} training and {len(data['y_val'])} validation images; "
          f"{args.trials} trials of {args.steps} SGD steps, {in_flight} at a time on {cpus} CPUs",
          flush=True)
    data_ref = minray.put(data)

    launched = 0
    pending = {}

    def launch():
        nonlocal launched
        launched += 1
        params = random_params(rng)
        ref = train_and_validate.remote(data_ref, params, args.steps, args.seed * 100_003 + launched)
        pending[ref] = launched

    for _ in range(in_flight):
        launch()
    results = []
    while pending:
        ready, _ = minray.wait(list(pending), num_returns=1)
        trial = pending.pop(ready[0])
        params, acc, loss, seconds = minray.get(ready[0])
        results.append((acc, trial, params))
        best = max(results, key=lambda r: r[0])
        print(f"trial {trial:3d} done ({len(results):3d}/{args.trials}): accuracy {acc:.4f} "
              f"train loss {loss:.3f} in {seconds:.2f} s  [{describe(params)}]  best so far {best[0]:.4f}",
              flush=True)
        if launched < args.trials:
            launch()           # keep every CPU busy until all trials are launched
    wall = time.perf_counter() - start
    minray.shutdown()

    acc, trial, params = max(results, key=lambda r: r[0])
    print(f"best configuration: trial {trial}: {describe(params)}")
    print(f"best validation accuracy {acc:.4f} ({len(results)} trials in {wall:.1f} s)")
    check_best(acc, bound)


if __name__ == "__main__":
    main()
