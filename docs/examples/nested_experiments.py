"""Nested experiments: tasks that launch tasks (the pattern of the original tutorial).

The driver starts several experiments at once, each a task. An experiment here
is a small hyperparameter search for one network size: it launches one inner
task per (learning rate, cross-validation fold), waits for them inside the task,
averages each learning rate's validation accuracy over the folds and returns
its best learning rate. The driver prints each experiment as it finishes (a
`minray.wait` loop), then the best of all. The data is put once by the driver;
its ref is passed to every experiment, which passes it on to its inner tasks.

While an experiment task waits for its inner tasks it gives its CPU back, so
the inner tasks run even when every CPU holds an experiment (see
docs/architecture.md, "Blocking inside a task").

The model is the one the hyperparameter-search examples train (digits_mlp.py
beside this script: a one-hidden-layer numpy network, minibatch SGD, on
scikit-learn's bundled digits).

    python docs/examples/nested_experiments.py            # 4 sizes x 4 rates x 3 folds, 1,500 steps
    python docs/examples/nested_experiments.py --smoke    # 2 sizes x 2 rates x 2 folds, 200 steps

The same evaluations are then run serially in the driver (same seeds, so the
same scores) for the time comparison.

Exits non-zero if the nested and serial scores differ, or if the best mean validation accuracy is below 0.9 (0.5 with --smoke).
"""
import argparse
import os
import time

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import numpy as np

import minray
from digits_mlp import accuracy, init_network, load_digits_split, sgd


def fold_split(data, fold, num_folds):
    """Training rows minus the fold-th slice, and that slice for validation."""
    x, y = data["x_train"], data["y_train"]
    bounds = np.linspace(0, len(y), num_folds + 1).astype(int)
    lo, hi = bounds[fold], bounds[fold + 1]
    keep = np.r_[0:lo, hi:len(y)]
    return {"x_train": x[keep], "y_train": y[keep]}, x[lo:hi], y[lo:hi]


def evaluate_config(data, hidden, lr, fold, num_folds, steps, seed):
    """Train on all folds but one, return the accuracy on that one (the inner task)."""
    train, x_val, y_val = fold_split(data, fold, num_folds)
    rng = np.random.default_rng(seed)
    net = init_network(rng, x_val.shape[1], hidden, data["classes"])
    sgd(net, train, {"lr": lr, "l2": 1e-4, "batch_size": 32}, steps, rng)
    return accuracy(net, x_val, y_val)


evaluate = minray.remote(evaluate_config)


@minray.remote
def run_experiment(data, hidden, lrs, num_folds, steps, seed):
    """The outer task: one inner task per (lr, fold), then aggregate them here."""
    start = time.perf_counter()
    refs = {(lr, fold): evaluate.remote(data, hidden, lr, fold, num_folds, steps, seed + fold)
            for lr in lrs for fold in range(num_folds)}
    scores = dict(zip(refs, minray.get(list(refs.values()))))   # blocks inside this task
    by_lr = {lr: float(np.mean([scores[lr, f] for f in range(num_folds)])) for lr in lrs}
    best = max(by_lr, key=by_lr.get)
    return {"hidden": hidden, "by_lr": by_lr, "best_lr": best, "best": by_lr[best],
            "inner_tasks": len(refs), "seconds": time.perf_counter() - start,
            "pid": os.getpid()}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hidden", type=int, nargs="+",
                        help="one experiment per hidden size: default 16 32 64 128 (16 64 with --smoke)")
    parser.add_argument("--lrs", type=float, nargs="+",
                        help="learning rates each experiment tries: default 0.01 0.03 0.1 0.3 "
                             "(0.03 0.3 with --smoke)")
    parser.add_argument("--folds", type=int, help="cross-validation folds: default 3 (2 with --smoke)")
    parser.add_argument("--steps", type=int, help="SGD steps per inner task: default 1500 "
                        "(200 with --smoke)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--smoke", action="store_true", help="a quick run: small defaults")
    args = parser.parse_args(argv)
    args.hidden = args.hidden or ([16, 64] if args.smoke else [16, 32, 64, 128])
    args.lrs = args.lrs or ([0.03, 0.3] if args.smoke else [0.01, 0.03, 0.1, 0.3])
    args.folds = args.folds or (2 if args.smoke else 3)
    args.steps = args.steps or (200 if args.smoke else 1500)
    if args.folds < 2 or args.steps < 1 or min(args.hidden) < 1:
        parser.error("--folds must be at least 2, --steps and --hidden at least 1")
    threshold = 0.5 if args.smoke else 0.9

    data = load_digits_split(seed=args.seed)
    minray.init()
    cpus = int(minray.cluster_resources().get("CPU", 0))
    data_ref = minray.put(data)
    inner = len(args.lrs) * args.folds
    print(f"{len(args.hidden)} experiments (hidden sizes {args.hidden}), each launching {inner} "
          f"inner tasks ({len(args.lrs)} learning rates x {args.folds} folds, {args.steps} SGD "
          f"steps each) on {cpus} CPUs", flush=True)

    start = time.perf_counter()
    pending = {run_experiment.remote(data_ref, h, args.lrs, args.folds, args.steps, args.seed): h
               for h in args.hidden}
    results = []
    while pending:
        [done], _ = minray.wait(list(pending), num_returns=1)
        del pending[done]
        r = minray.get(done)
        results.append(r)
        rates = ", ".join(f"{lr:g}: {acc:.4f}" for lr, acc in r["by_lr"].items())
        print(f"  experiment hidden={r['hidden']:3d} finished after "
              f"{time.perf_counter() - start:5.2f} s ({r['inner_tasks']} inner tasks, pid "
              f"{r['pid']}): mean validation accuracy by lr {{{rates}}}; best lr {r['best_lr']:g} "
              f"-> {r['best']:.4f}", flush=True)
    elapsed = time.perf_counter() - start
    minray.shutdown()

    best = max(results, key=lambda r: r["best"])
    print(f"{len(results)} experiments, {len(results) * (inner + 1)} tasks in {elapsed:.2f} s")

    # The same evaluations one after another in this process: same seeds, so same scores.
    print("running the same evaluations serially in this process ...", flush=True)
    start = time.perf_counter()
    mismatches = 0
    for r in sorted(results, key=lambda r: r["hidden"]):
        for lr in args.lrs:
            serial = np.mean([evaluate_config(data, r["hidden"], lr, fold, args.folds, args.steps,
                                              args.seed + fold) for fold in range(args.folds)])
            mismatches += serial != r["by_lr"][lr]
    serial_s = time.perf_counter() - start
    print(f"serial: {serial_s:.2f} s; speed-up {serial_s / elapsed:.2f}x on {cpus} CPUs; "
          f"{'all scores match' if not mismatches else f'{mismatches} scores differ'}")
    if mismatches:
        raise SystemExit("the nested run's scores differ from the serial run's")
    print(f"best: hidden={best['hidden']} lr={best['best_lr']:g}, mean validation accuracy "
          f"{best['best']:.4f} over {args.folds} folds")
    if best["best"] < threshold:
        raise SystemExit(f"best accuracy {best['best']:.4f} is below {threshold}")


if __name__ == "__main__":
    main()
