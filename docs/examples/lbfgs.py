"""Batch L-BFGS: a softmax classifier's loss and gradient summed over actors.

The model is multinomial logistic regression (softmax) with a small L2 penalty
on scikit-learn's bundled digits data (1,797 8x8 images, nothing downloaded),
enlarged `--scale` times by repeating it with pixel noise so each evaluation
is big enough for parallelism to matter. The data is split into shards; each
shard is put in the object store once and handed to one `Shard` actor, which
keeps it. `scipy.optimize.fmin_l_bfgs_b` runs on the driver and calls
`loss_and_grad`, which puts the current weights once (one `minray.put` per
evaluation), asks every actor for its shard's loss and gradient and sums them.
The serial run then optimizes the same objective over the whole data in this
process; both must reach the same loss.

    python docs/examples/lbfgs.py              # 150x digits (~270,000 rows)
    python docs/examples/lbfgs.py --smoke      # 10x digits, a few iterations, ~2 s
    python docs/examples/lbfgs.py --scale 400 --num-shards 4 --maxiter 150

Exits non-zero if the two final losses differ by more than 1e-6 (relative).
"""
import argparse
import os
import time

# One BLAS thread per process: the serial run would otherwise use every core
# itself, and the actors' processes would fight over them.
for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import numpy as np
from scipy.optimize import fmin_l_bfgs_b
from sklearn.datasets import load_digits

import minray

NUM_CLASSES = 10
L2 = 1e-4                  # penalty per row, so the optimum does not move with --scale


def make_data(scale, seed=0):
    """Digits features in [0, 1] plus a bias column, repeated `scale` times with noise."""
    digits = load_digits()
    x = digits.data / 16.0
    y = digits.target.astype(np.int64)
    rng = np.random.default_rng(seed)
    if scale > 1:
        x = np.concatenate([x] + [np.clip(x + rng.normal(0, 0.1, x.shape), 0, 1)
                                  for _ in range(scale - 1)])
        y = np.tile(y, scale)
    order = rng.permutation(len(y))
    x = np.hstack([x[order], np.ones((len(y), 1))])
    return np.ascontiguousarray(x), y[order]


def shard_loss_grad(w, x, y):
    """Summed cross-entropy loss and its gradient over the rows (x, y)."""
    w = w.reshape(x.shape[1], NUM_CLASSES)
    logits = x @ w
    logits -= logits.max(axis=1, keepdims=True)
    exp = np.exp(logits)
    total = exp.sum(axis=1, keepdims=True)
    rows = np.arange(len(y))
    loss = float(np.log(total[:, 0]).sum() - logits[rows, y].sum())
    probs = exp / total
    probs[rows, y] -= 1.0
    return loss, (x.T @ probs).ravel()


def objective(loss, grad, w, n):
    """Mean loss plus the L2 penalty, from summed loss and gradient over n rows."""
    return loss / n + 0.5 * L2 * float(w @ w), grad / n + L2 * w


@minray.remote
class Shard:
    """Holds one shard of the data for its whole life; computes loss/grad on it."""

    def __init__(self, x, y):
        self.x = x
        self.y = y

    def loss_grad(self, w):
        return shard_loss_grad(w, self.x, self.y)


class Progress:
    def __init__(self, label, every):
        self.label, self.every, self.calls, self.first = label, every, 0, None

    def __call__(self, loss):
        self.calls += 1
        if self.first is None:
            self.first = loss
        if self.calls % self.every == 0:
            print(f"  {self.label} evaluation {self.calls:4d}: loss {loss:.6f}", flush=True)


def run_lbfgs(fun, dim, maxiter):
    w0 = np.zeros(dim)
    w, loss, info = fmin_l_bfgs_b(fun, w0, maxiter=maxiter, m=10, factr=10.0, pgtol=1e-9)
    return w, loss, info


def accuracy(w, x, y):
    return float(np.mean((x @ w.reshape(x.shape[1], NUM_CLASSES)).argmax(axis=1) == y))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scale", type=int,
                        help="repeat digits this many times with noise: default 150 (10 with --smoke)")
    parser.add_argument("--num-shards", type=int,
                        help="data shards, one actor each: default one per CPU")
    parser.add_argument("--maxiter", type=int,
                        help="L-BFGS iterations: default 100 (15 with --smoke)")
    parser.add_argument("--smoke", action="store_true", help="a quick run: small defaults")
    args = parser.parse_args(argv)
    args.scale = args.scale or (10 if args.smoke else 150)
    args.maxiter = args.maxiter or (15 if args.smoke else 100)
    if args.scale < 1 or args.maxiter < 1 or (args.num_shards is not None and args.num_shards < 1):
        parser.error("--scale, --maxiter and --num-shards must be at least 1")

    x, y = make_data(args.scale)
    n, d = x.shape
    dim = d * NUM_CLASSES
    print(f"data: {n:,} rows x {d} features ({x.nbytes / 1e6:.0f} MB), {NUM_CLASSES} classes, "
          f"{dim} weights")

    start = time.perf_counter()
    context = minray.init()
    cpus = int(minray.cluster_resources().get("CPU", 0))
    num_shards = args.num_shards or max(1, cpus)
    print(f"minray started a local cluster with {cpus} CPUs in {time.perf_counter() - start:.2f} s "
          f"(session {os.path.basename(context['session_dir'])})")

    bounds = np.linspace(0, n, num_shards + 1).astype(int)
    actors = [Shard.remote(minray.put(x[lo:hi]), minray.put(y[lo:hi]))
              for lo, hi in zip(bounds[:-1], bounds[1:])]
    # Wait until every actor holds its shard, so the timing below is the optimization only.
    minray.get([a.loss_grad.remote(np.zeros(dim)) for a in actors])
    print(f"{num_shards} Shard actors hold {n // num_shards:,} rows each")

    every = 5 if args.smoke else 20
    progress = Progress("parallel", every)

    def distributed(w):
        w_ref = minray.put(w)                          # broadcast the weights once
        results = minray.get([a.loss_grad.remote(w_ref) for a in actors])
        loss = sum(r[0] for r in results)
        grad = np.sum([r[1] for r in results], axis=0)
        value, gradient = objective(loss, grad, w, n)
        progress(value)
        return value, gradient

    start = time.perf_counter()
    w_par, loss_par, info_par = run_lbfgs(distributed, dim, args.maxiter)
    parallel_s = time.perf_counter() - start
    print(f"parallel: loss {progress.first:.6f} -> {loss_par:.8f} in {info_par['nit']} iterations "
          f"({info_par['funcalls']} evaluations), {parallel_s:.2f} s, "
          f"train accuracy {accuracy(w_par, x, y):.4f}")
    minray.shutdown()

    print("running the same optimization over the whole data in this process ...", flush=True)
    serial_progress = Progress("serial", every)

    def serial(w):
        value, gradient = objective(*shard_loss_grad(w, x, y), w, n)
        serial_progress(value)
        return value, gradient

    start = time.perf_counter()
    w_ser, loss_ser, info_ser = run_lbfgs(serial, dim, args.maxiter)
    serial_s = time.perf_counter() - start
    print(f"serial:   loss {serial_progress.first:.6f} -> {loss_ser:.8f} in {info_ser['nit']} "
          f"iterations ({info_ser['funcalls']} evaluations), {serial_s:.2f} s")

    rel = abs(loss_par - loss_ser) / max(abs(loss_ser), 1e-300)
    print(f"final losses differ by {rel:.1e} (relative); solutions differ by at most "
          f"{np.max(np.abs(w_par - w_ser)):.1e}")
    print(f"speed-up with {num_shards} actors on {cpus} CPUs: {serial_s / parallel_s:.2f}x "
          f"({serial_s / info_ser['funcalls'] * 1e3:.1f} ms vs "
          f"{parallel_s / info_par['funcalls'] * 1e3:.1f} ms per evaluation)")
    if rel > 1e-6:
        raise SystemExit(f"parallel and serial losses differ: {loss_par} vs {loss_ser}")
    print("parallel and serial losses agree")


if __name__ == "__main__":
    main()
