"""Adaptive hyperparameter search: train in segments, stop poor trials early.

The same model and data as hyperopt_simple.py (a one-hidden-layer numpy network
with a softmax output, minibatch SGD, on scikit-learn's bundled digits; nothing
downloaded), the same random search space (learning rate, hidden size, L2,
batch size). But training is cut into segments of --steps-per-segment SGD steps.
A segment is a task that takes the network's weights (None to start a new one)
and returns two refs: its statistics and the updated weights. The driver only
fetches the statistics; the weights go from one segment to the next through the
object store.

Whenever a segment finishes (minray.wait), the driver ranks its validation
accuracy among every trial trained for the same number of segments. If it is in
the better half there, the trial goes on with another segment; otherwise it is
paused (its weights stay in the object store) and the slot goes to a paused
trial that has since made it into the better half of its own training length,
or else to a new random configuration. This is the original's
hyperopt_adaptive.py, made concrete as asynchronous successive halving (ASHA):
at every training length only the better half goes further, so the compute goes
to the promising configurations and poor ones stop after a segment or two.

    python docs/examples/hyperopt_adaptive.py          # 8 slots, 8 + 312 segments of 150 steps
    python docs/examples/hyperopt_adaptive.py --smoke  # 4 slots, 4 + 12 segments of 50 steps
    python docs/examples/hyperopt_adaptive.py --num-starting-segments 5 \\
        --num-segments 10 --steps-per-segment 20       # the original's command

--num-starting-segments trials start at once (and that many stay in flight);
--num-segments more segments run after them. The full run's budget, 320
segments of 150 steps, is the 48,000 SGD steps of hyperopt_simple.py's full
run. Exits with status 1 if the best validation accuracy is below 0.9 (0.5
with --smoke).
"""
import os

# One BLAS thread per process: the segments already use every CPU. minray's
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


@minray.remote(num_returns=2)
def train_segment(data, params, net, steps, seed):
    """One training segment: `steps` SGD steps from `net` (a new network if None).

    Returns (stats, net): the validation accuracy, mean training loss and time,
    and the updated weights.
    """
    start = time.perf_counter()
    rng = np.random.default_rng(seed)
    if net is None:
        net = init_network(rng, data["x_train"].shape[1], params["hidden"], data["classes"])
    else:
        # Arrays read from the object store are read-only views: copy to update them.
        net = {name: np.array(value) for name, value in net.items()}
    loss = sgd(net, data, params, steps, rng)
    acc = accuracy(net, data["x_val"], data["y_val"])
    return {"accuracy": acc, "loss": loss, "seconds": time.perf_counter() - start}, net


class Trial:
    """The driver's record of one configuration: its segments and accuracies."""

    def __init__(self, number, params):
        self.number = number
        self.params = params
        self.accuracies = []
        self.net_ref = None          # the latest weights, still in the object store

    @property
    def segments(self):
        return len(self.accuracies)


def promotable(trial, history):
    """In the better half of every trial trained for as many segments?"""
    peers = sorted(history[trial.segments], reverse=True)
    keep = len(peers) // 2           # a trial alone at its length waits for company
    return keep > 0 and trial.accuracies[-1] >= peers[keep - 1]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--num-starting-segments", type=int,
                        help="trials started at once, and kept in flight: default 8 (4 with --smoke)")
    parser.add_argument("--num-segments", type=int,
                        help="segments to run after the starting ones: default 312 (12 with --smoke)")
    parser.add_argument("--steps-per-segment", type=int,
                        help="SGD steps per segment: default 150 (50 with --smoke)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the search (default 0)")
    parser.add_argument("--smoke", action="store_true", help="a quick run: small defaults")
    args = parser.parse_args(argv)
    defaults = (4, 12, 50) if args.smoke else (8, 312, 150)
    args.num_starting_segments = args.num_starting_segments or defaults[0]
    if args.num_segments is None:
        args.num_segments = defaults[1]
    args.steps_per_segment = args.steps_per_segment or defaults[2]
    if args.num_starting_segments < 1 or args.num_segments < 0 or args.steps_per_segment < 1:
        parser.error("--num-starting-segments and --steps-per-segment must be at least 1, "
                     "--num-segments at least 0")
    bound = SMOKE_BOUND if args.smoke else FULL_BOUND
    rng = np.random.default_rng(args.seed)
    total_segments = args.num_starting_segments + args.num_segments

    start = time.perf_counter()
    minray.init()
    cpus = int(minray.cluster_resources().get("CPU", 1))
    data = load_digits_split()
    print(f"digits: {len(data['y_train'])} training and {len(data['y_val'])} validation images; "
          f"{total_segments} segments of {args.steps_per_segment} SGD steps, "
          f"{args.num_starting_segments} in flight on {cpus} CPUs", flush=True)
    data_ref = minray.put(data)

    trials = []
    history = {}                     # segments trained -> accuracies of every trial there
    pending = {}                     # stats ref -> trial
    submitted = 0

    def run_segment(trial):
        nonlocal submitted
        submitted += 1
        seed = [args.seed, trial.number, trial.segments]
        stats_ref, trial.net_ref = train_segment.remote(
            data_ref, trial.params, trial.net_ref, args.steps_per_segment, seed)
        pending[stats_ref] = trial

    def new_trial():
        trial = Trial(len(trials) + 1, random_params(rng))
        trials.append(trial)
        run_segment(trial)

    for _ in range(args.num_starting_segments):
        new_trial()
    best = None                      # (accuracy, trial, segments)
    paused = []                      # trials waiting, their weights in the object store
    done = 0
    while pending:
        ready, _ = minray.wait(list(pending), num_returns=1)
        trial = pending.pop(ready[0])
        stats = minray.get(ready[0])
        done += 1
        trial.accuracies.append(stats["accuracy"])
        history.setdefault(trial.segments, []).append(stats["accuracy"])
        if best is None or stats["accuracy"] > best[0]:
            best = (stats["accuracy"], trial, trial.segments)
        paused.append(trial)
        if submitted >= total_segments:
            verdict = "done"
            nxt = None
        else:
            # The longest-trained promotable trial goes on (best accuracy first) ...
            ready_trials = [t for t in paused if promotable(t, history)]
            nxt = max(ready_trials, key=lambda t: (t.segments, t.accuracies[-1]), default=None)
            if nxt is trial:
                verdict = "continue"
            elif nxt is not None:
                verdict = f"pause, resume {nxt.number}"
            else:
                verdict = "pause, new trial"
        print(f"segment {done:3d}/{total_segments}: trial {trial.number:3d} after "
              f"{trial.segments:2d} segment(s): accuracy {stats['accuracy']:.4f} "
              f"(rank {sorted(history[trial.segments], reverse=True).index(stats['accuracy']) + 1}"
              f"/{len(history[trial.segments])})  {verdict:<18s} "
              f"[{describe(trial.params)}]  best {best[0]:.4f}", flush=True)
        if nxt is not None:
            paused.remove(nxt)
            run_segment(nxt)
        elif submitted < total_segments:
            new_trial()              # ... else a new configuration takes the slot
    for trial in trials:
        trial.net_ref = None         # drop the weights: the object store frees them
    wall = time.perf_counter() - start
    minray.shutdown()

    acc, trial, segments = best
    steps = segments * args.steps_per_segment
    spent = total_segments * args.steps_per_segment
    lengths = np.bincount([t.segments for t in trials])
    print(f"{len(trials)} configurations tried; segments trained: " + ", ".join(
        f"{n} trained {k}" for k, n in enumerate(lengths) if n and k))
    print(f"training all {len(trials)} for {steps} steps would take {len(trials) * steps:,} "
          f"steps; the search spent {spent:,}")
    print(f"best configuration: trial {trial.number} after {segments} segment(s) "
          f"({steps} steps): {describe(trial.params)}")
    print(f"best validation accuracy {acc:.4f} ({total_segments} segments in {wall:.1f} s)")
    check_best(acc, bound)


if __name__ == "__main__":
    main()
