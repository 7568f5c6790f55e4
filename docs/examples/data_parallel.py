"""Data-parallel training of a small PyTorch CNN: gradients from actors, averaged.

The original docs' ResNet example, smaller: a convolutional network on
scikit-learn's bundled 8x8 digits (nothing downloaded), on the CPU. The
training images are cut into `--num-workers` shards; each `Worker` actor holds
one shard (put once) and its own copy of the network. Every step the driver
puts the current weights once (`minray.experimental.TorchWeights.get_weights`,
a dict of numpy arrays), every worker loads them, computes the gradient of the
cross-entropy on a minibatch of `--batch-size` images from its shard and
returns it as numpy arrays; the driver averages the gradients and takes an Adam
step. Test accuracy (450 held-out images) is printed after every epoch.

The serial run then trains the same network from the same initial weights in
this process, on exactly the same minibatches (each step: the union of the
workers' minibatches), so both runs should end at the same accuracy; the
difference in time is the speed-up. Every process uses one torch thread
(`torch.set_num_threads(1)`), so the serial run is really serial.

    python docs/examples/data_parallel.py                  # 2 workers, 30 epochs
    python docs/examples/data_parallel.py --smoke          # a few steps, ~5 s
    python docs/examples/data_parallel.py --num-workers 4 --batch-size 32 --epochs 20

Exits non-zero if the final test accuracy of the parallel run is below 0.9
(with --smoke: if the accuracy did not rise).
"""
import argparse
import os
import time

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import numpy as np
import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

import minray
from minray.experimental import TorchWeights

NUM_CLASSES = 10


def load_data():
    """Digits as (N, 1, 8, 8) float32 images in [0, 1]; 75 % train, 25 % test, stratified."""
    digits = load_digits()
    x = (digits.images / 16.0).astype(np.float32)[:, None, :, :]
    y = digits.target.astype(np.int64)
    return train_test_split(x, y, test_size=0.25, random_state=0, stratify=y)


def make_net(width):
    """Two 3x3 convolutions (width, 2*width channels), a max-pool, two dense layers."""
    return torch.nn.Sequential(
        torch.nn.Conv2d(1, width, 3, padding=1), torch.nn.ReLU(),
        torch.nn.Conv2d(width, 2 * width, 3, padding=1), torch.nn.ReLU(),
        torch.nn.MaxPool2d(2),                                   # 8x8 -> 4x4
        torch.nn.Flatten(),
        torch.nn.Linear(2 * width * 4 * 4, 128), torch.nn.ReLU(),
        torch.nn.Linear(128, NUM_CLASSES),
    )


def loss_and_gradients(net, x, y):
    """Mean cross-entropy on (x, y) and its gradient, one numpy array per parameter."""
    net.zero_grad()
    loss = torch.nn.functional.cross_entropy(net(torch.from_numpy(x)), torch.from_numpy(y))
    loss.backward()
    return loss.item(), [p.grad.numpy().copy() for p in net.parameters()]


def accuracy(net, x, y):
    with torch.no_grad():
        return float((net(torch.from_numpy(x)).argmax(dim=1).numpy() == y).mean())


@minray.remote
class Worker:
    """Holds one shard of the training data and a copy of the network."""

    def __init__(self, x, y, width, batch_size, seed):
        torch.set_num_threads(1)
        self.x, self.y = x, y
        self.net = make_net(width)
        self.weights = TorchWeights(self.net)
        self.batch_size = batch_size
        self.rng = np.random.default_rng(seed)

    def ready(self):
        return len(self.y)

    def compute_gradients(self, weights):
        """Load `weights`, return (loss, gradients) on a fresh minibatch of this shard."""
        self.weights.set_weights(weights)
        idx = self.rng.choice(len(self.y), self.batch_size, replace=False)
        return loss_and_gradients(self.net, self.x[idx], self.y[idx])


def apply_gradients(optimizer, net, grads):
    for p, g in zip(net.parameters(), grads):
        p.grad = torch.from_numpy(g)
    optimizer.step()


def train(label, steps, steps_per_epoch, net, lr, step_fn, x_test, y_test):
    """Run `steps` steps of `step_fn(net) -> (loss, grads)` with Adam; time only the steps."""
    optimizer = torch.optim.Adam(net.parameters(), lr=lr)
    accs = [accuracy(net, x_test, y_test)]
    print(f"  {label} epoch  0: test accuracy {accs[0]:.4f}", flush=True)
    elapsed, losses = 0.0, []
    for step in range(1, steps + 1):
        start = time.perf_counter()
        loss, grads = step_fn(net)
        apply_gradients(optimizer, net, grads)
        elapsed += time.perf_counter() - start
        losses.append(loss)
        if step % steps_per_epoch == 0 or step == steps:
            accs.append(accuracy(net, x_test, y_test))
            print(f"  {label} epoch {step / steps_per_epoch:4.1f}: train loss "
                  f"{np.mean(losses[-steps_per_epoch:]):.4f}, test accuracy {accs[-1]:.4f} "
                  f"({elapsed:.2f} s)", flush=True)
    return accs, elapsed


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--num-workers", type=int, default=2, help="worker actors (default 2)")
    parser.add_argument("--batch-size", type=int,
                        help="images per worker per step: default 64 (32 with --smoke)")
    parser.add_argument("--epochs", type=float,
                        help="passes over the training data: default 30 (with --smoke: 15 steps)")
    parser.add_argument("--width", type=int, default=32,
                        help="channels of the first convolution (default 32)")
    parser.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate (default 1e-3)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--smoke", action="store_true", help="a quick run: a few steps")
    args = parser.parse_args(argv)
    args.batch_size = args.batch_size or (32 if args.smoke else 64)
    if args.num_workers < 1 or args.batch_size < 1 or args.width < 1:
        parser.error("--num-workers, --batch-size and --width must be at least 1")

    torch.set_num_threads(1)
    x_train, x_test, y_train, y_test = load_data()
    bounds = np.linspace(0, len(y_train), args.num_workers + 1).astype(int)
    shards = [(x_train[lo:hi], y_train[lo:hi]) for lo, hi in zip(bounds[:-1], bounds[1:])]
    if min(len(s[1]) for s in shards) < args.batch_size:
        parser.error(f"--batch-size {args.batch_size} is larger than a worker's shard")
    global_batch = args.num_workers * args.batch_size
    steps_per_epoch = max(1, round(len(y_train) / global_batch))
    if args.smoke and args.epochs is None:
        steps, steps_per_epoch = 15, 5
    else:
        steps = max(1, round((args.epochs or 30) * steps_per_epoch))
    torch.manual_seed(args.seed)
    net0 = make_net(args.width)
    initial = TorchWeights(net0).get_weights()
    print(f"data: {len(y_train)} training images in {args.num_workers} shards, {len(y_test)} test; "
          f"network: {TorchWeights(net0).flat_size():,} weights; {steps} steps of "
          f"{args.num_workers} x {args.batch_size} images ({steps_per_epoch} steps per epoch)")

    start = time.perf_counter()
    minray.init()
    cpus = int(minray.cluster_resources().get("CPU", 0))
    seeds = [args.seed * 1000 + i for i in range(args.num_workers)]
    workers = [Worker.remote(minray.put(x), minray.put(y), args.width, args.batch_size, s)
               for (x, y), s in zip(shards, seeds)]
    minray.get([w.ready.remote() for w in workers])    # every actor holds its shard
    print(f"minray started {cpus} CPUs and {args.num_workers} Worker actors in "
          f"{time.perf_counter() - start:.2f} s", flush=True)

    def distributed_step(net):
        weights_ref = minray.put(TorchWeights(net).get_weights())     # broadcast once
        results = minray.get([w.compute_gradients.remote(weights_ref) for w in workers])
        loss = float(np.mean([r[0] for r in results]))
        return loss, [np.mean(g, axis=0) for g in zip(*(r[1] for r in results))]

    net = make_net(args.width)
    TorchWeights(net).set_weights(initial)
    par_accs, par_s = train("parallel", steps, steps_per_epoch, net, args.lr, distributed_step,
                            x_test, y_test)
    par_flat = TorchWeights(net).get_flat()
    minray.shutdown()
    print(f"parallel: test accuracy {par_accs[0]:.4f} -> {par_accs[-1]:.4f} in {steps} steps, "
          f"{par_s:.2f} s ({par_s / steps * 1e3:.1f} ms per step)", flush=True)

    print("running the same steps on the same minibatches in this process ...", flush=True)
    rngs = [np.random.default_rng(s) for s in seeds]

    def serial_step(net):
        idx = [rng.choice(len(y), args.batch_size, replace=False)
               for rng, (_, y) in zip(rngs, shards)]
        x = np.concatenate([xs[i] for i, (xs, _) in zip(idx, shards)])
        y = np.concatenate([ys[i] for i, (_, ys) in zip(idx, shards)])
        return loss_and_gradients(net, x, y)

    net = make_net(args.width)
    TorchWeights(net).set_weights(initial)
    ser_accs, ser_s = train("serial", steps, steps_per_epoch, net, args.lr, serial_step,
                            x_test, y_test)
    print(f"serial:   test accuracy {ser_accs[0]:.4f} -> {ser_accs[-1]:.4f} in {steps} steps, "
          f"{ser_s:.2f} s ({ser_s / steps * 1e3:.1f} ms per step)")
    print(f"final weights differ by at most "
          f"{np.max(np.abs(par_flat - TorchWeights(net).get_flat())):.1e}")
    print(f"speed-up with {args.num_workers} workers on {cpus} CPUs: {ser_s / par_s:.2f}x")

    final = par_accs[-1]
    if args.smoke:
        if not final > par_accs[0] + 0.1:
            raise SystemExit(f"test accuracy did not rise: {par_accs[0]:.4f} -> {final:.4f}")
        print(f"test accuracy rose: {par_accs[0]:.4f} -> {final:.4f}")
    elif final < 0.9:
        raise SystemExit(f"final test accuracy {final:.4f} is below 0.9")
    else:
        print(f"final test accuracy {final:.4f} >= 0.9")


if __name__ == "__main__":
    main()
