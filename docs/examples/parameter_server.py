"""Parameter server, synchronous and asynchronous, with the weights sharded.

A softmax classifier on scikit-learn's bundled digits data (nothing
downloaded) is trained with minibatch SGD. Its weight vector is split into
`--num-shards` pieces, each held by one `ParameterServer` actor; `--num-workers`
`Worker` actors each hold a slice of the training data (put once) and compute
gradients, returned as one ObjectRef per weight shard (`num_returns=K`), so each
piece goes only to the server that owns it.

* sync: every round, all workers compute a gradient from the same weights;
  each server averages the workers' pieces for its shard and applies them; the
  new shards are the next round's weights.
* async: every worker computes a gradient as soon as it has weights; the
  driver's `minray.wait` loop takes whichever gradient finishes first, pushes
  its pieces to the servers (each applies it at once and returns its updated
  shard) and hands that worker the fresh shards, without waiting for the others.

Accuracy on a held-out 25 % of the data is printed as training goes.

    python docs/examples/parameter_server.py                # both modes, 300 iterations
    python docs/examples/parameter_server.py --smoke        # both modes, ~2 s
    python docs/examples/parameter_server.py --mode async --num-workers 4 --num-shards 3

Exits non-zero if a mode's final test accuracy is below 0.85 (0.80 with --smoke).
"""
import argparse
import os
import time

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import numpy as np
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

import minray

NUM_CLASSES = 10


def load_data():
    digits = load_digits()
    x = np.hstack([digits.data / 16.0, np.ones((len(digits.target), 1))])
    return train_test_split(x, digits.target.astype(np.int64), test_size=0.25,
                            random_state=0, stratify=digits.target)


def gradient(w, x, y):
    """Mean cross-entropy gradient of the softmax classifier on (x, y)."""
    w = w.reshape(x.shape[1], NUM_CLASSES)
    logits = x @ w
    logits -= logits.max(axis=1, keepdims=True)
    probs = np.exp(logits)
    probs /= probs.sum(axis=1, keepdims=True)
    probs[np.arange(len(y)), y] -= 1.0
    return (x.T @ probs).ravel() / len(y)


def accuracy(w, x, y):
    return float(np.mean((x @ w.reshape(x.shape[1], NUM_CLASSES)).argmax(axis=1) == y))


@minray.remote
class ParameterServer:
    """Holds one shard of the weights; applies gradient pieces for it."""

    def __init__(self, size, lr):
        self.weights = np.zeros(size)
        self.lr = lr
        self.updates = 0

    def get_weights(self):
        return self.weights

    def apply_gradients(self, *pieces):
        """Apply the mean of the given gradient pieces; return the new shard."""
        self.weights = self.weights - self.lr * np.mean(pieces, axis=0)
        self.updates += 1
        return self.weights

    def num_updates(self):
        return self.updates


@minray.remote
class Worker:
    """Holds one slice of the training data; computes minibatch gradients on it."""

    def __init__(self, x, y, bounds, batch_size, seed):
        self.x, self.y = x, y
        self.bounds = bounds          # where the weight vector is cut into shards
        self.batch_size = batch_size
        self.rng = np.random.default_rng(seed)

    def compute_gradients(self, *shards):
        """Gradient at the weights made of `shards`, cut into the same pieces."""
        w = np.concatenate(shards)
        rows = self.rng.choice(len(self.y), size=min(self.batch_size, len(self.y)),
                               replace=False)
        g = gradient(w, self.x[rows], self.y[rows])
        return tuple(g[lo:hi] for lo, hi in zip(self.bounds[:-1], self.bounds[1:]))


def run_sync(servers, workers, k, iterations, report, every):
    shards = [ps.get_weights.remote() for ps in servers]
    for it in range(1, iterations + 1):
        grads = [w.compute_gradients.options(num_returns=k).remote(*shards) for w in workers]
        if k == 1:
            grads = [[g] for g in grads]
        shards = [ps.apply_gradients.remote(*[g[i] for g in grads])
                  for i, ps in enumerate(servers)]
        if it % every == 0 or it == iterations:
            report(it, minray.get(shards))
    return np.concatenate(minray.get(shards))


def run_async(servers, workers, k, iterations, report, every):
    """`iterations` counts rounds of len(workers) gradients, to compare with sync."""
    total = iterations * len(workers)
    shards = [ps.get_weights.remote() for ps in servers]
    pending = {}
    for w in workers:
        grads = w.compute_gradients.options(num_returns=k).remote(*shards)
        grads = [grads] if k == 1 else grads
        pending[grads[0]] = (w, grads)
    applied = 0
    while applied < total:
        [ready], _ = minray.wait(list(pending), num_returns=1)
        worker, grads = pending.pop(ready)
        # Push this gradient now; each server returns its updated shard.
        shards = [ps.apply_gradients.remote(grads[i]) for i, ps in enumerate(servers)]
        applied += 1
        if applied + len(pending) < total:      # pull fresh weights, compute the next one
            new = worker.compute_gradients.options(num_returns=k).remote(*shards)
            new = [new] if k == 1 else new
            pending[new[0]] = (worker, new)
        if applied % (every * len(workers)) == 0 or applied == total:
            report(applied / len(workers), minray.get(shards))
    return np.concatenate(minray.get(shards))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mode", choices=["sync", "async", "both"], default="both")
    parser.add_argument("--num-workers", type=int, default=4)
    parser.add_argument("--num-shards", type=int, default=2, help="ParameterServer actors")
    parser.add_argument("--iterations", type=int,
                        help="rounds (one gradient per worker each): default 300 (40 with --smoke)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=0.5)
    parser.add_argument("--smoke", action="store_true", help="a quick run: small defaults")
    args = parser.parse_args(argv)
    args.iterations = args.iterations or (40 if args.smoke else 300)
    if min(args.num_workers, args.num_shards, args.iterations, args.batch_size) < 1:
        parser.error("--num-workers, --num-shards, --iterations and --batch-size must be >= 1")
    threshold = 0.80 if args.smoke else 0.85

    x_train, x_test, y_train, y_test = load_data()
    dim = x_train.shape[1] * NUM_CLASSES
    k = min(args.num_shards, dim)
    bounds = np.linspace(0, dim, k + 1).astype(int)
    print(f"digits: {len(y_train)} training rows, {len(y_test)} held out; {dim} weights in "
          f"{k} shards of ~{dim // k}")

    start = time.perf_counter()
    context = minray.init()
    cpus = int(minray.cluster_resources().get("CPU", 0))
    print(f"minray started a local cluster with {cpus} CPUs in {time.perf_counter() - start:.2f} s "
          f"(session {os.path.basename(context['session_dir'])})")

    every = max(1, args.iterations // 10)
    modes = ["sync", "async"] if args.mode == "both" else [args.mode]
    results = {}
    for mode in modes:
        servers = [ParameterServer.remote(int(hi - lo), args.lr)
                   for lo, hi in zip(bounds[:-1], bounds[1:])]
        rows = np.array_split(np.arange(len(y_train)), args.num_workers)
        workers = [Worker.remote(minray.put(x_train[r]), minray.put(y_train[r]), bounds,
                                 args.batch_size, seed)
                   for seed, r in enumerate(rows)]
        print(f"{mode}: {k} ParameterServer actors, {args.num_workers} Worker actors, "
              f"{args.iterations} rounds", flush=True)

        def report(it, shards, mode=mode):
            acc = accuracy(np.concatenate(shards), x_test, y_test)
            print(f"  {mode:5s} round {it:6.1f}: test accuracy {acc:.4f}", flush=True)

        begin = time.perf_counter()
        run = run_sync if mode == "sync" else run_async
        w = run(servers, workers, k, args.iterations, report, every)
        elapsed = time.perf_counter() - begin
        updates = minray.get(servers[0].num_updates.remote())
        acc = accuracy(w, x_test, y_test)
        results[mode] = acc
        print(f"{mode}: final test accuracy {acc:.4f} after {updates} updates per server, "
              f"{elapsed:.2f} s", flush=True)
        for actor in servers + workers:
            minray.kill(actor)
    minray.shutdown()

    failed = [m for m, a in results.items() if a < threshold]
    if failed:
        raise SystemExit(f"final test accuracy below {threshold} for: {', '.join(failed)}")
    print(f"every mode reached test accuracy >= {threshold}")


if __name__ == "__main__":
    main()
