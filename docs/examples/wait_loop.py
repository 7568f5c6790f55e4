"""Process results as they finish with minray.wait: a random hyperparameter search.

A logistic-regression model (plain numpy, gradient descent) is trained with
random learning rates, regularisation strengths and numbers of epochs. A few
experiments run at once; whenever one finishes, minray.wait hands it back, the
driver prints its accuracy and starts the next, so the CPUs never idle while a
slow experiment holds up fast ones. This is the wait loop of the original
tutorial.

The data set is put into the object store once (minray.put); every task gets
the same ref and reads the arrays zero-copy instead of receiving a copy.

    python docs/examples/wait_loop.py            # 32 experiments
    python docs/examples/wait_loop.py --smoke    # 8 small experiments
"""
import argparse
import os
import time

# One BLAS thread per process: the tasks already use every CPU, and several
# multi-threaded BLAS calls fighting over 2 cores run many times slower. Ray
# sets this in its workers; minray does not yet, but its workers inherit the
# driver's environment, so setting it here (before numpy loads) covers them.
for _name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_name, "1")

import numpy as np  # noqa: E402

import minray  # noqa: E402


def make_data(rng, n, features):
    """Two overlapping Gaussian classes; returns train and validation splits."""
    w_true = rng.normal(size=features)
    x = rng.normal(size=(n, features))
    y = (x @ w_true + 0.5 * rng.normal(size=n) > 0).astype(np.float64)
    split = int(0.8 * n)
    return {"x_train": x[:split], "y_train": y[:split],
            "x_val": x[split:], "y_val": y[split:]}


@minray.remote
def train(data, params):
    """Train with the given hyperparameters; return (params, accuracy, seconds)."""
    start = time.perf_counter()
    x, y = data["x_train"], data["y_train"]
    w = np.zeros(x.shape[1])
    for _ in range(params["epochs"]):
        p = 1.0 / (1.0 + np.exp(-(x @ w)))
        grad = x.T @ (p - y) / len(y) + params["l2"] * w
        w -= params["lr"] * grad
    predictions = (data["x_val"] @ w) > 0
    accuracy = float(np.mean(predictions == (data["y_val"] > 0.5)))
    return params, accuracy, time.perf_counter() - start


def random_params(rng, max_epochs):
    return {"lr": float(10 ** rng.uniform(-3, 0.5)),
            "l2": float(10 ** rng.uniform(-5, -1)),
            "epochs": int(rng.integers(max_epochs // 10, max_epochs + 1))}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--experiments", type=int, help="default 32 (8 with --smoke)")
    parser.add_argument("--in-flight", type=int, default=4,
                        help="experiments running or queued at any time (default 4)")
    parser.add_argument("--samples", type=int, help="default 10,000 (2,000 with --smoke)")
    parser.add_argument("--max-epochs", type=int, help="default 200 (50 with --smoke)")
    parser.add_argument("--smoke", action="store_true", help="a quick run: small defaults")
    args = parser.parse_args(argv)
    defaults = (8, 2_000, 50) if args.smoke else (32, 10_000, 200)
    args.experiments = args.experiments or defaults[0]
    args.samples = args.samples or defaults[1]
    args.max_epochs = args.max_epochs or defaults[2]
    if min(args.experiments, args.in_flight, args.samples) < 1 or args.max_epochs < 10:
        parser.error("sizes must be at least 1 (--max-epochs at least 10)")
    rng = np.random.default_rng(0)

    minray.init()
    data_ref = minray.put(make_data(rng, args.samples, features=50))
    print(f"{args.experiments} experiments, {args.in_flight} in flight, "
          f"{args.samples:,} samples", flush=True)

    start = time.perf_counter()
    submitted = 0
    order = {}                      # ref -> submission number
    remaining = []
    while submitted < min(args.in_flight, args.experiments):
        ref = train.remote(data_ref, random_params(rng, args.max_epochs))
        order[ref] = submitted
        remaining.append(ref)
        submitted += 1

    best = None
    finished = 0
    out_of_order = 0
    while remaining:
        # Block until one experiment is done; the others keep running.
        ready, remaining = minray.wait(remaining, num_returns=1)
        params, accuracy, seconds = minray.get(ready[0])
        number = order.pop(ready[0])
        out_of_order += number != finished
        finished += 1
        print(f"  experiment {number + 1:2d} done as #{finished:<2d}: accuracy {accuracy:.3f} "
              f"(lr {params['lr']:.3g}, l2 {params['l2']:.1e}, {params['epochs']} epochs, "
              f"{seconds:.2f} s)", flush=True)
        if best is None or accuracy > best[1]:
            best = (params, accuracy)
        if submitted < args.experiments:   # keep the pipeline full
            ref = train.remote(data_ref, random_params(rng, args.max_epochs))
            order[ref] = submitted
            remaining.append(ref)
            submitted += 1
    elapsed = time.perf_counter() - start
    minray.shutdown()

    params, accuracy = best
    print(f"{finished} experiments in {elapsed:.2f} s; {out_of_order} finished out of "
          f"submission order")
    print(f"best accuracy {accuracy:.3f} with lr {params['lr']:.3g}, l2 {params['l2']:.1e}, "
          f"{params['epochs']} epochs")


if __name__ == "__main__":
    main()
