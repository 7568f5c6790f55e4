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
run.

The serial comparison: which trial goes on depends on the order in which
segments finish, so a serial run cannot repeat the parallel search's decisions
exactly. It runs the same search instead (the same code, as many segments
submitted at a time, the same budget of segments), computing the segments in
this process one at a time in the order they were submitted, as a single
worker would. Trial n has the same configuration in both, and a segment
depends only on its trial's configuration, seed and previous weights, so every
(trial, segment) both searches trained must reach the same accuracy: the
script checks that. The searches then differ in a few of the configurations
they train (so a step costs a little differently); the speed-up is the time
for the same budget of SGD steps.

Exits with status 1 if a segment's accuracy differs between the two searches,
or if the best validation accuracy is below 0.9 (0.5 with --smoke).
"""
import os

# One BLAS thread per process: the segments already use every CPU, and the
# serial run must not use more than one. minray's workers inherit the
# driver's environment, so this (before numpy loads) covers them too.
for _name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_name, "1")

import argparse  # noqa: E402
import collections  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402

import minray  # noqa: E402
from digits_mlp import accuracy, check_best, describe, init_network, load_digits_split, random_params, sgd  # noqa: E402

FULL_BOUND = 0.9
SMOKE_BOUND = 0.5


def train_segment(data, params, net, steps, seed):
    """One training segment: `steps` SGD steps from `net` (a new network if None).

    Returns (stats, net): the validation accuracy, mean training loss and time,
    and the updated weights. Everything random comes from `seed`.
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


train_segment_task = minray.remote(num_returns=2)(train_segment)   # the same, as a task


class Trial:
    """The driver's record of one configuration: its segments and accuracies."""

    def __init__(self, number, params):
        self.number = number
        self.params = params
        self.accuracies = []
        self.net = None              # the latest weights (a ref, when segments are tasks)

    @property
    def segments(self):
        return len(self.accuracies)


class TaskSegments:
    """Runs segments as minray tasks; hands them back in the order they finish.

    The weights stay in the object store: a trial keeps the ref of its latest
    weights and passes it to its next segment.
    """

    def __init__(self, data_ref, steps):
        self.data_ref, self.steps = data_ref, steps
        self.pending = {}            # stats ref -> trial

    def submit(self, trial, seed):
        stats_ref, trial.net = train_segment_task.remote(
            self.data_ref, trial.params, trial.net, self.steps, seed)
        self.pending[stats_ref] = trial

    def next_finished(self):
        """(trial, stats) of the next segment to finish."""
        [ready], _ = minray.wait(list(self.pending), num_returns=1)
        return self.pending.pop(ready), minray.get(ready)

    def __len__(self):
        return len(self.pending)


class SerialSegments:
    """Runs segments in this process, one at a time, in the order they were submitted."""

    def __init__(self, data, steps):
        self.data, self.steps = data, steps
        self.queue = collections.deque()     # (trial, seed), oldest first

    def submit(self, trial, seed):
        self.queue.append((trial, seed))

    def next_finished(self):
        trial, seed = self.queue.popleft()
        stats, trial.net = train_segment(self.data, trial.params, trial.net, self.steps, seed)
        return trial, stats

    def __len__(self):
        return len(self.queue)


def promotion_bars(history):
    """Per training length, the accuracy that puts a trial in the better half there.

    A length with a single trial has no bar: a trial alone there waits for company.
    """
    bars = {}
    for segments, accuracies in history.items():
        keep = len(accuracies) // 2
        if keep:
            bars[segments] = sorted(accuracies, reverse=True)[keep - 1]
    return bars


def asha(segments, num_starting, total_segments, seed, report=None):
    """Asynchronous successive halving with `num_starting` segments in flight.

    `segments` runs them (TaskSegments or SerialSegments). Calls report(...)
    after each segment if given. Returns (trials, best): every Trial, and the
    best (accuracy, trial, segments trained).
    """
    rng = np.random.default_rng(seed)
    trials = []
    history = {}                     # segments trained -> accuracies of every trial there
    submitted = 0

    def run_segment(trial):
        nonlocal submitted
        submitted += 1
        segments.submit(trial, [seed, trial.number, trial.segments])

    def new_trial():
        trial = Trial(len(trials) + 1, random_params(rng))
        trials.append(trial)
        run_segment(trial)

    for _ in range(num_starting):
        new_trial()
    best = None                      # (accuracy, trial, segments)
    paused = []                      # trials waiting for their next segment
    done = 0
    while len(segments):
        trial, stats = segments.next_finished()
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
            # The longest-trained trial in the better half of its length goes on
            # (best accuracy first) ...
            bars = promotion_bars(history)
            ready = [t for t in paused if t.segments in bars and t.accuracies[-1] >= bars[t.segments]]
            nxt = max(ready, key=lambda t: (t.segments, t.accuracies[-1]), default=None)
            if nxt is trial:
                verdict = "continue"
            elif nxt is not None:
                verdict = f"pause, resume {nxt.number}"
            else:
                verdict = "pause, new trial"
        if report:
            rank = sorted(history[trial.segments], reverse=True).index(stats["accuracy"]) + 1
            report(done, trial, stats, rank, len(history[trial.segments]), verdict, best)
        if nxt is not None:
            paused.remove(nxt)
            run_segment(nxt)
        elif submitted < total_segments:
            new_trial()              # ... else a new configuration takes the slot
    for trial in trials:
        trial.net = None             # drop the weights (the object store frees them)
    return trials, best


def summarize(label, trials, best, steps_per_segment, total_segments, seconds):
    """Print what a search tried and found."""
    acc, trial, segments = best
    lengths = np.bincount([t.segments for t in trials])
    steps = total_segments * steps_per_segment
    print(f"{label}: {len(trials)} configurations tried; segments trained: " + ", ".join(
        f"{n} trained {k}" for k, n in enumerate(lengths) if n and k))
    print(f"{label}: {total_segments} segments ({steps:,} SGD steps) in {seconds:.2f} s, "
          f"{steps / seconds:,.0f} steps/s; best trial {trial.number} after {segments} segment(s) "
          f"({segments * steps_per_segment} steps): accuracy {acc:.4f} [{describe(trial.params)}]")


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
    total_segments = args.num_starting_segments + args.num_segments

    start = time.perf_counter()
    minray.init()
    cpus = int(minray.cluster_resources().get("CPU", 1))
    data = load_digits_split()
    data_ref = minray.put(data)
    print(f"digits: {len(data['y_train'])} training and {len(data['y_val'])} validation images; "
          f"{total_segments} segments of {args.steps_per_segment} SGD steps, "
          f"{args.num_starting_segments} in flight on {cpus} CPUs "
          f"(cluster up and data put in {time.perf_counter() - start:.2f} s)", flush=True)

    task_seconds = 0.0

    def report(done, trial, stats, rank, peers, verdict, best):
        nonlocal task_seconds
        task_seconds += stats["seconds"]
        print(f"segment {done:3d}/{total_segments}: trial {trial.number:3d} after "
              f"{trial.segments:2d} segment(s): accuracy {stats['accuracy']:.4f} "
              f"(rank {rank}/{peers})  {verdict:<18s} "
              f"[{describe(trial.params)}]  best {best[0]:.4f}", flush=True)

    start = time.perf_counter()
    trials, best = asha(TaskSegments(data_ref, args.steps_per_segment), args.num_starting_segments,
                        total_segments, args.seed, report)
    search_s = time.perf_counter() - start
    minray.shutdown()
    print(f"search: {total_segments} segments in {search_s:.2f} s "
          f"({task_seconds:.2f} s of training summed over the tasks)")
    acc, trial, segments = best
    steps = segments * args.steps_per_segment
    print(f"training all {len(trials)} for {steps} steps would take {len(trials) * steps:,} "
          f"steps; the search spent {total_segments * args.steps_per_segment:,}")

    # The same search with the segments run here one at a time, as one worker would.
    print("running the same search serially in this process ...", flush=True)
    start = time.perf_counter()
    serial_trials, serial_best = asha(SerialSegments(data, args.steps_per_segment),
                                      args.num_starting_segments, total_segments, args.seed)
    serial_s = time.perf_counter() - start
    summarize("parallel", trials, best, args.steps_per_segment, total_segments, search_s)
    summarize("serial  ", serial_trials, serial_best, args.steps_per_segment, total_segments,
              serial_s)

    # Trial n is the same configuration in both searches, and its k-th segment
    # depends only on that and on its own earlier segments: both must agree there.
    compared, differ = 0, []
    for par, ser in zip(trials, serial_trials):
        assert par.params == ser.params
        for k, (a, b) in enumerate(zip(par.accuracies, ser.accuracies), 1):
            compared += 1
            if a != b:
                differ.append(f"trial {par.number} segment {k}: {a!r} vs {b!r}")
    same = sum(p.segments == s.segments for p, s in zip(trials, serial_trials))
    print(f"{compared} (trial, segment) pairs trained by both searches; "
          f"{same} trials trained for as many segments in both")
    print(f"speed-up for the same budget: {serial_s / search_s:.2f}x on {cpus} CPUs "
          f"(serial {serial_s:.2f} s, search {search_s:.2f} s)")
    if differ:
        print(f"FAILED: {len(differ)} segments differ between the searches: " + "; ".join(differ[:5]))
        raise SystemExit(1)
    print(f"all {compared} of them reached the same accuracy in both")

    print(f"best configuration: trial {trial.number} after {segments} segment(s) "
          f"({steps} steps): {describe(trial.params)}")
    print(f"best validation accuracy {acc:.4f} ({total_segments} segments in {search_s:.1f} s)")
    check_best(acc, bound)


if __name__ == "__main__":
    main()
