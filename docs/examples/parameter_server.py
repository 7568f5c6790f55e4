"""Parameter server, synchronous and asynchronous, with the weights sharded.

A network with one hidden ReLU layer (`--hidden` units) and a softmax output
is trained with minibatch SGD on scikit-learn's bundled digits (nothing
downloaded). The training 75 % is enlarged `--scale` times by repeating it
with pixel noise, so that a worker's minibatch (`--batch-size` rows) is fresh
data and its gradient is worth sending to another process (tens of ms with
the defaults). The flat parameter vector is cut into `--num-shards` slices,
each held by one `ParameterServer` actor; `--num-workers` `Worker` actors each
hold a slice of the training rows (put once) and return each gradient as one
ObjectRef per weight shard (`num_returns=K`), so each piece goes only to the
server that owns it.

* sync: every round, all workers compute a gradient from the same weights;
  each server averages the workers' pieces for its shard and applies them; the
  new shards are the next round's weights.
* async: every worker computes a gradient as soon as it has weights; the
  driver's `minray.wait` loop takes whichever gradient finishes first, pushes
  its pieces to the servers (each applies it at once and returns its updated
  shard) and hands that worker the fresh shards, without waiting for the others.
  Each gradient is applied alone with lr / num_workers, so that a round of
  num_workers gradients moves the weights as far as one sync step.

The serial version then runs sync SGD in this process, without actors: the
same initial weights, the same minibatches from the same seeded generators,
each worker's gradient computed one after the other, averaged and applied. It
must end at the same weights and test accuracy as sync (up to the order of
float sums); the ratio of the two times is the speed-up. Async applies every
gradient alone, to weights that may be a few updates old, so it follows a
different path: it is compared with the serial version by gradients per
second, with both accuracies after the same number of gradients shown.
Every process uses one BLAS thread, so the serial version is really serial.

    python docs/examples/parameter_server.py                # sync, async, serial; a worker per CPU
    python docs/examples/parameter_server.py --smoke        # small network, 40 rounds, a few s
    python docs/examples/parameter_server.py --mode async --num-workers 4 --num-shards 3

Exits non-zero if sync and serial end at different weights or accuracies, or
if a mode's final test accuracy is below 0.9 (0.8 with --smoke).
"""
import argparse
import os
import time

# One BLAS thread per process: the serial version would otherwise use every
# core itself, and the actors' processes would fight over them.
for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import numpy as np
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

import minray

NUM_FEATURES = 64
NUM_CLASSES = 10
WEIGHT_TOLERANCE = 1e-6    # sync vs serial: only the order of float sums may differ


def load_data(scale, seed=0):
    """Digits in [0, 1], split 75/25 (stratified); the training part repeated with noise."""
    digits = load_digits()
    x_train, x_test, y_train, y_test = train_test_split(
        digits.data / 16.0, digits.target.astype(np.int64), test_size=0.25,
        random_state=0, stratify=digits.target)
    rng = np.random.default_rng(seed)
    noisy = [np.clip(x_train + rng.normal(0, 0.1, x_train.shape), 0, 1) for _ in range(scale - 1)]
    x_train = np.concatenate([x_train] + noisy)
    y_train = np.tile(y_train, scale)
    order = rng.permutation(len(y_train))
    return np.ascontiguousarray(x_train[order]), y_train[order], x_test, y_test


def parameter_shapes(hidden):
    """Shapes of w1, b1, w2, b2, in their order in the flat parameter vector."""
    return [(NUM_FEATURES, hidden), (hidden,), (hidden, NUM_CLASSES), (NUM_CLASSES,)]


def unflatten(flat, hidden):
    parts, start = [], 0
    for shape in parameter_shapes(hidden):
        size = int(np.prod(shape))
        parts.append(flat[start:start + size].reshape(shape))
        start += size
    return parts


def initial_weights(hidden, seed):
    """He-initialised weights, zero biases, as one flat vector."""
    rng = np.random.default_rng(seed)
    return np.concatenate([
        rng.normal(0, np.sqrt(2 / NUM_FEATURES), NUM_FEATURES * hidden), np.zeros(hidden),
        rng.normal(0, np.sqrt(2 / hidden), hidden * NUM_CLASSES), np.zeros(NUM_CLASSES)])


def logits(flat, x, hidden):
    w1, b1, w2, b2 = unflatten(flat, hidden)
    return np.maximum(x @ w1 + b1, 0.0) @ w2 + b2


def gradient(flat, x, y, hidden):
    """Flat gradient of the mean cross-entropy of the network at `flat` on (x, y)."""
    w1, b1, w2, b2 = unflatten(flat, hidden)
    h = np.maximum(x @ w1 + b1, 0.0)
    z = h @ w2 + b2
    z -= z.max(axis=1, keepdims=True)
    d_z = np.exp(z)
    d_z /= d_z.sum(axis=1, keepdims=True)
    d_z[np.arange(len(y)), y] -= 1.0
    d_z /= len(y)
    d_h = (d_z @ w2.T) * (h > 0)
    return np.concatenate([(x.T @ d_h).ravel(), d_h.sum(axis=0),
                           (h.T @ d_z).ravel(), d_z.sum(axis=0)])


def accuracy(flat, x, y, hidden):
    return float(np.mean(logits(flat, x, hidden).argmax(axis=1) == y))


def sgd_step(weights, lr, gradients):
    """The update both the servers and the serial version apply: the mean gradient, times lr."""
    return weights - lr * np.mean(gradients, axis=0)


class DataShard:
    """One worker's training rows and minibatch generator (plain Python: serial uses it too)."""

    def __init__(self, x, y, batch_size, seed, hidden):
        self.x, self.y = x, y
        self.batch_size = batch_size
        self.rng = np.random.default_rng(seed)
        self.hidden = hidden
        self.gradients = 0
        self.busy_seconds = 0.0       # time spent computing gradients, to tell it from overhead

    def next_gradient(self, weights):
        start = time.perf_counter()
        rows = self.rng.integers(0, len(self.y), self.batch_size)
        g = gradient(weights, self.x[rows], self.y[rows], self.hidden)
        self.gradients += 1
        self.busy_seconds += time.perf_counter() - start
        return g


@minray.remote
class ParameterServer:
    """Holds one shard of the weights; applies gradient pieces for it."""

    def __init__(self, weights, lr):
        self.weights = weights
        self.lr = lr
        self.updates = 0

    def get_weights(self):
        return self.weights

    def apply_gradients(self, *pieces):
        """Apply the mean of the given gradient pieces; return the new shard."""
        self.weights = sgd_step(self.weights, self.lr, pieces)
        self.updates += 1
        return self.weights

    def num_updates(self):
        return self.updates


@minray.remote
class Worker:
    """Holds one slice of the training data; computes minibatch gradients on it."""

    def __init__(self, x, y, batch_size, seed, hidden, bounds):
        self.data = DataShard(x, y, batch_size, seed, hidden)
        self.bounds = bounds          # where the weight vector is cut into shards

    def num_rows(self):
        return len(self.data.y)

    def busy(self):
        """(gradients computed, seconds spent computing them)."""
        return self.data.gradients, self.data.busy_seconds

    def compute_gradients(self, *shards):
        """Gradient at the weights made of `shards`, cut into the same pieces."""
        g = self.data.next_gradient(np.concatenate(shards))
        pieces = tuple(g[lo:hi] for lo, hi in zip(self.bounds[:-1], self.bounds[1:]))
        return pieces if len(pieces) > 1 else pieces[0]     # num_returns=1: the value itself


def gradient_refs(worker, shards, k):
    """Start one gradient on `worker`; its K ObjectRefs, one per weight shard, as a list."""
    refs = worker.compute_gradients.options(num_returns=k).remote(*shards)
    return [refs] if k == 1 else refs


def run_sync(servers, workers, k, rounds, report, every):
    shards = [ps.get_weights.remote() for ps in servers]
    for it in range(1, rounds + 1):
        grads = [gradient_refs(w, shards, k) for w in workers]
        shards = [ps.apply_gradients.remote(*[g[i] for g in grads])
                  for i, ps in enumerate(servers)]
        if it % every == 0 or it == rounds:
            report(it, np.concatenate(minray.get(shards)))
    return np.concatenate(minray.get(shards))


def run_async(servers, workers, k, rounds, report, every):
    """`rounds` counts len(workers) gradients each, to compare with sync."""
    total = rounds * len(workers)
    shards = [ps.get_weights.remote() for ps in servers]
    pending = {}
    for w in workers:
        grads = gradient_refs(w, shards, k)
        pending[grads[0]] = (w, grads)
    applied = 0
    while applied < total:
        [ready], _ = minray.wait(list(pending), num_returns=1)
        worker, grads = pending.pop(ready)
        # Push this gradient now; each server returns its updated shard.
        shards = [ps.apply_gradients.remote(grads[i]) for i, ps in enumerate(servers)]
        applied += 1
        if applied + len(pending) < total:      # pull fresh weights, compute the next one
            new = gradient_refs(worker, shards, k)
            pending[new[0]] = (worker, new)
        if applied % (every * len(workers)) == 0 or applied == total:
            report(applied / len(workers), np.concatenate(minray.get(shards)))
    return np.concatenate(minray.get(shards))


def run_serial(weights, data_shards, lr, rounds, report, every):
    """Sync SGD without actors: each round, every shard's gradient in turn, averaged."""
    for it in range(1, rounds + 1):
        weights = sgd_step(weights, lr, [d.next_gradient(weights) for d in data_shards])
        if it % every == 0 or it == rounds:
            report(it, weights)
    return weights


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mode", choices=["sync", "async", "both"], default="both")
    parser.add_argument("--num-workers", type=int, help="Worker actors: default one per CPU")
    parser.add_argument("--num-shards", type=int, default=2, help="ParameterServer actors")
    parser.add_argument("--iterations", type=int,
                        help="rounds (one gradient per worker each): default 100 (40 with --smoke)")
    parser.add_argument("--hidden", type=int, help="hidden units: default 1024 (128 with --smoke)")
    parser.add_argument("--batch-size", type=int,
                        help="rows per worker per gradient: default 2048 (256 with --smoke)")
    parser.add_argument("--scale", type=int,
                        help="copies of the training rows (all noisy but one): "
                             "default 20 (2 with --smoke)")
    parser.add_argument("--lr", type=float, default=0.5)
    parser.add_argument("--smoke", action="store_true", help="a quick run: small defaults")
    args = parser.parse_args(argv)
    args.iterations = args.iterations or (40 if args.smoke else 100)
    args.hidden = args.hidden or (128 if args.smoke else 1024)
    args.batch_size = args.batch_size or (256 if args.smoke else 2048)
    args.scale = args.scale or (2 if args.smoke else 20)
    sizes = [args.num_shards, args.iterations, args.hidden, args.batch_size, args.scale]
    if min(sizes) < 1 or (args.num_workers is not None and args.num_workers < 1):
        parser.error("--num-workers, --num-shards, --iterations, --hidden, --batch-size and "
                     "--scale must be >= 1")
    threshold = 0.80 if args.smoke else 0.90

    x_train, y_train, x_test, y_test = load_data(args.scale)
    weights0 = initial_weights(args.hidden, seed=0)
    dim = len(weights0)
    k = min(args.num_shards, dim)
    bounds = np.linspace(0, dim, k + 1).astype(int)
    print(f"digits: {len(y_train):,} training rows ({args.scale} copies, noisy but one), "
          f"{len(y_test)} held out; network 64-{args.hidden}-10: {dim:,} weights in {k} shards "
          f"of ~{dim // k:,}")

    start = time.perf_counter()
    context = minray.init()
    cpus = int(minray.cluster_resources().get("CPU", 0))
    num_workers = args.num_workers or max(1, cpus)
    print(f"minray started a local cluster with {cpus} CPUs in {time.perf_counter() - start:.2f} s "
          f"(session {os.path.basename(context['session_dir'])})")
    row_slices = np.array_split(np.arange(len(y_train)), num_workers)
    seeds = range(1, num_workers + 1)
    every = max(1, args.iterations // 10)

    def reporter(label):
        def report(it, weights):
            acc = accuracy(weights, x_test, y_test, args.hidden)
            print(f"  {label:6s} round {it:6.1f}: test accuracy {acc:.4f}", flush=True)
        return report

    modes = ["sync", "async"] if args.mode == "both" else [args.mode]
    results = {}                      # mode -> (final weights, test accuracy, seconds)
    for mode in modes:
        # Async applies each gradient alone: lr / workers keeps a round's step as sync's.
        lr = args.lr if mode == "sync" else args.lr / num_workers
        servers = [ParameterServer.remote(weights0[lo:hi], lr)
                   for lo, hi in zip(bounds[:-1], bounds[1:])]
        workers = [Worker.remote(minray.put(x_train[r]), minray.put(y_train[r]), args.batch_size,
                                 seed, args.hidden, bounds)
                   for seed, r in zip(seeds, row_slices)]
        # Wait until every actor is up and holds its data: time the training only.
        minray.get([w.num_rows.remote() for w in workers] +
                   [ps.num_updates.remote() for ps in servers])
        print(f"{mode}: {k} ParameterServer actors, {num_workers} Worker actors "
              f"(~{len(row_slices[0]):,} rows and {args.batch_size} per minibatch each), "
              f"{args.iterations} rounds, lr {lr:g}", flush=True)
        reporter(mode)(0, weights0)
        begin = time.perf_counter()
        run = run_sync if mode == "sync" else run_async
        final = run(servers, workers, k, args.iterations, reporter(mode), every)
        elapsed = time.perf_counter() - begin
        updates = minray.get(servers[0].num_updates.remote())
        count, busy = np.sum(minray.get([worker.busy.remote() for worker in workers]), axis=0)
        acc = accuracy(final, x_test, y_test, args.hidden)
        results[mode] = (final, acc, elapsed)
        print(f"{mode}: final test accuracy {acc:.4f} after {updates} updates per server, "
              f"{elapsed:.2f} s ({busy / count * 1e3:.1f} ms per gradient in the workers)",
              flush=True)
        for actor in servers + workers:
            minray.kill(actor)
    minray.shutdown()

    print("running sync SGD on the same minibatches in this process (serial) ...", flush=True)
    data_shards = [DataShard(x_train[r], y_train[r], args.batch_size, seed, args.hidden)
                   for seed, r in zip(seeds, row_slices)]
    reporter("serial")(0, weights0)
    begin = time.perf_counter()
    w_serial = run_serial(weights0, data_shards, args.lr, args.iterations, reporter("serial"),
                          every)
    serial_s = time.perf_counter() - begin
    serial_acc = accuracy(w_serial, x_test, y_test, args.hidden)
    gradients = args.iterations * num_workers
    busy = sum(d.busy_seconds for d in data_shards)
    print(f"serial: final test accuracy {serial_acc:.4f} after {args.iterations} updates, "
          f"{serial_s:.2f} s ({busy / gradients * 1e3:.1f} ms per gradient)")

    problems = []
    if "sync" in results:
        w_sync, sync_acc, sync_s = results["sync"]
        diff = float(np.max(np.abs(w_sync - w_serial)))
        print(f"sync vs serial: test accuracy {sync_acc:.4f} vs {serial_acc:.4f}, "
              f"weights differ by at most {diff:.1e}")
        print(f"speed-up of sync with {num_workers} workers on {cpus} CPUs: "
              f"{serial_s / sync_s:.2f}x ({serial_s:.2f} s serial vs {sync_s:.2f} s; "
              f"{serial_s / args.iterations * 1e3:.1f} vs {sync_s / args.iterations * 1e3:.1f} "
              f"ms per round)")
        if diff > WEIGHT_TOLERANCE or abs(sync_acc - serial_acc) > 1e-9:
            problems.append("sync and serial runs ended at different weights or accuracies")
        else:
            print("sync matches serial")
    if "async" in results:
        w_async, async_acc, async_s = results["async"]
        print(f"async vs serial: {gradients / async_s:.1f} vs {gradients / serial_s:.1f} "
              f"gradients/s ({serial_s / async_s:.2f}x); after {gradients} gradients: test "
              f"accuracy {async_acc:.4f} vs {serial_acc:.4f}, weights differ by up to "
              f"{np.max(np.abs(w_async - w_serial)):.1e} (a different path)")

    low = [m for m, (_, acc, _) in results.items() if acc < threshold]
    if low:
        problems.append(f"final test accuracy below {threshold} for: {', '.join(low)}")
    if problems:
        raise SystemExit("; ".join(problems))
    print(f"every mode reached test accuracy >= {threshold}")


if __name__ == "__main__":
    main()
