"""Policy gradient (REINFORCE with a baseline) on CartPole-v1, episodes run by worker actors.

The original docs' Pong example (Karpathy's "Pong from pixels" policy network,
parallelised), on an environment that installs without downloads:

* The policy is a two-layer numpy network, as in the original: 4 observations
  -> --hidden ReLU units -> one sigmoid output, the probability of pushing right.
* Each `PGWorker` actor holds a gymnasium CartPole-v1 environment. Each
  iteration the driver puts the current weights into the object store once
  (`minray.put`) and hands that one ObjectRef to every worker; a worker runs
  full episodes with those weights and, for each, returns the gradient of
  sum_t log pi(a_t | s_t) * (G_t - b_t) with the episode reward. G_t is the
  discounted return; the baseline b_t is the mean return at step t over the
  iteration's episodes, which the driver sends with the weights (the previous
  iteration's, a running estimate), and the advantages are scaled by their
  spread as in the original.
* The driver averages the gradients of the iteration's episodes and takes one
  Adam step (the original used RMSProp), then prints the iteration's mean
  episode reward and the mean over the last 100 episodes.

After the parallel run, the serial run repeats it in this process: the same
`PGWorker` class, instantiated here once per actor with the same seeds and
called one after another, for as many iterations as the parallel run took.
Both must end at the same weights; the script prints both times and the
speed-up.

    python docs/examples/policy_gradient.py             # until the mean reward of the last 100 episodes >= 195
    python docs/examples/policy_gradient.py --smoke     # a few iterations; passes if the reward rose

Exits 0 once the mean reward of the last 100 episodes reaches
--target-reward, 1 if --max-iterations or --max-seconds run out first, and 1
if the serial run's weights differ from the parallel run's.
"""
import os

# One BLAS thread per process: the serial run would otherwise use several
# cores itself, and the actors' processes would fight over them.
for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import argparse
import collections
import sys
import time

import numpy as np

import minray

OBS_DIM = 4
MAX_STEPS = 500


def init_model(hidden, rng):
    return {"W1": rng.standard_normal((hidden, OBS_DIM)) / np.sqrt(OBS_DIM),
            "W2": rng.standard_normal(hidden) / np.sqrt(hidden) * 0.1}


def policy_forward(model, x):
    h = np.maximum(model["W1"] @ x, 0.0)
    logit = float(model["W2"] @ h)
    return 1.0 / (1.0 + np.exp(-logit)), h


def discounted_returns(rewards, gamma):
    out = np.zeros(len(rewards))
    running = 0.0
    for t in reversed(range(len(rewards))):
        running = rewards[t] + gamma * running
        out[t] = running
    return out


class PGWorker:
    """A CartPole environment; runs full episodes and returns their policy gradients.

    A plain class: the parallel run makes actors of it (`PGWorkerActor`), the
    serial run instantiates it directly, so both run the same code.
    """

    def __init__(self, seed, gamma):
        import gymnasium as gym
        self.env = gym.make("CartPole-v1")
        self.rng = np.random.default_rng(seed)
        self.gamma = gamma

    def run_episodes(self, model, baseline, num_episodes):
        """[(grad dict, episode reward, discounted returns)] for num_episodes episodes."""
        results = []
        for _ in range(num_episodes):
            obs, _ = self.env.reset(seed=int(self.rng.integers(2 ** 31)))
            xs, hs, dlogps, rewards = [], [], [], []
            for _ in range(MAX_STEPS):
                p, h = policy_forward(model, obs)
                action = 1 if self.rng.random() < p else 0
                xs.append(obs)
                hs.append(h)
                dlogps.append(action - p)          # d log pi(a) / d logit
                obs, reward, terminated, truncated, _ = self.env.step(action)
                rewards.append(reward)
                if terminated or truncated:
                    break
            returns = discounted_returns(rewards, self.gamma)
            b = baseline[:len(returns)] if baseline is not None else np.zeros(len(returns))
            if len(b) < len(returns):
                b = np.concatenate([b, np.zeros(len(returns) - len(b))])
            adv = returns - b
            adv /= adv.std() + 1e-8 if len(adv) > 1 else 1.0
            eph, epx = np.array(hs), np.array(xs)
            epdlogp = np.array(dlogps) * adv
            dW2 = eph.T @ epdlogp
            dh = np.outer(epdlogp, model["W2"])
            dh[eph <= 0] = 0.0
            dW1 = dh.T @ epx
            results.append(({"W1": dW1, "W2": dW2}, float(sum(rewards)), returns))
        return results


PGWorkerActor = minray.remote(PGWorker)


class ActorPool:
    """The parallel run: every actor runs its share of the episodes at once."""

    def __init__(self, actors):
        self.actors = actors

    def run_episodes(self, model, baseline, counts):
        model_ref = minray.put(model)          # broadcast: put once, one ref to every worker
        return minray.get([actor.run_episodes.remote(model_ref, baseline, n)
                           for actor, n in zip(self.actors, counts) if n > 0])


class SerialPool:
    """The serial run: the same calls on plain PGWorker objects, one after another."""

    def __init__(self, workers):
        self.workers = workers

    def run_episodes(self, model, baseline, counts):
        return [worker.run_episodes(model, baseline, n)
                for worker, n in zip(self.workers, counts) if n > 0]


def train(pool, args, max_iterations, stop_at_target, verbose):
    """REINFORCE with `pool`'s workers: returns (model, mean reward per iteration,
    mean of the last 100 episodes, seconds). With stop_at_target the run ends at
    --target-reward or --max-seconds."""
    start = time.perf_counter()
    model = init_model(args.hidden, np.random.default_rng(args.seed))
    adam_m = {k: np.zeros_like(v) for k, v in model.items()}
    adam_v = {k: np.zeros_like(v) for k, v in model.items()}
    n, w = args.episodes_per_iteration, args.num_workers
    per_worker = [n // w + (i < n % w) for i in range(w)]
    baseline = None
    rewards_by_iteration = []
    recent = collections.deque(maxlen=100)
    mean100 = 0.0
    iteration = 0
    while iteration < max_iterations:
        if stop_at_target and time.perf_counter() - start > args.max_seconds:
            break
        iteration += 1
        it_start = time.perf_counter()
        results = [r for batch in pool.run_episodes(model, baseline, per_worker) for r in batch]
        grad = {k: sum(g[k] for g, _, _ in results) / len(results) for k in model}
        for k in model:                        # Adam ascent step
            adam_m[k] = 0.9 * adam_m[k] + 0.1 * grad[k]
            adam_v[k] = 0.999 * adam_v[k] + 0.001 * grad[k] ** 2
            m_hat = adam_m[k] / (1 - 0.9 ** iteration)
            v_hat = adam_v[k] / (1 - 0.999 ** iteration)
            model[k] = model[k] + args.lr * m_hat / (np.sqrt(v_hat) + 1e-8)
        # Baseline for the next iteration: the mean discounted return at each time step.
        longest = max(len(r) for _, _, r in results)
        padded = np.full((len(results), longest), np.nan)
        for i, (_, _, r) in enumerate(results):
            padded[i, :len(r)] = r
        baseline = np.nan_to_num(np.nanmean(padded, axis=0))
        rewards = [ep for _, ep, _ in results]
        recent.extend(rewards)
        mean100 = float(np.mean(recent))
        rewards_by_iteration.append(float(np.mean(rewards)))
        if verbose:
            print(f"iteration {iteration:3d}: mean reward {rewards_by_iteration[-1]:6.1f} "
                  f"(min {min(rewards):3.0f}, max {max(rewards):3.0f}), last 100 episodes "
                  f"{mean100:6.1f}, {time.perf_counter() - it_start:.2f} s, "
                  f"{time.perf_counter() - start:.1f} s total", flush=True)
        if stop_at_target and len(recent) == 100 and mean100 >= args.target_reward:
            break
    return model, rewards_by_iteration, mean100, time.perf_counter() - start


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--num-workers", type=int, default=2)
    parser.add_argument("--episodes-per-iteration", type=int,
                        help="episodes per gradient step, split across the workers: "
                             "default 40 (10 with --smoke)")
    parser.add_argument("--hidden", type=int, default=32)
    parser.add_argument("--lr", type=float, default=0.03, help="Adam step size")
    parser.add_argument("--gamma", type=float, default=0.99)
    parser.add_argument("--target-reward", type=float, default=195.0)
    parser.add_argument("--max-iterations", type=int, help="default 300 (20 with --smoke)")
    parser.add_argument("--max-seconds", type=float, default=600.0,
                        help="time limit of the parallel run")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--smoke", action="store_true",
                        help="a fixed few iterations; pass if the reward rose")
    args = parser.parse_args(argv)
    smoke = args.smoke
    # 40 episodes (20 per worker) make an iteration long enough that its round trip
    # and the workers' uneven episode lengths cost less; with lr 0.03 CartPole is
    # solved in ~25 iterations (~1,000 episodes).
    args.episodes_per_iteration = args.episodes_per_iteration or (10 if smoke else 40)
    args.max_iterations = args.max_iterations or (20 if smoke else 300)
    if min(args.num_workers, args.episodes_per_iteration, args.hidden, args.max_iterations) < 1:
        parser.error("--num-workers, --episodes-per-iteration, --hidden, --max-iterations must be >= 1")

    start = time.perf_counter()
    minray.init()
    cpus = int(minray.cluster_resources().get("CPU", 0))
    print(f"minray started a local cluster with {cpus} CPUs in {time.perf_counter() - start:.2f} s")

    worker_seeds = [args.seed * 1000 + i + 1 for i in range(args.num_workers)]
    actors = [PGWorkerActor.remote(seed, args.gamma) for seed in worker_seeds]
    # A call with no episodes returns once every actor is up (process started,
    # gymnasium imported), so the clock below measures training only.
    minray.get([actor.run_episodes.remote(None, None, 0) for actor in actors])
    print(f"{args.num_workers} workers, {args.episodes_per_iteration} episodes per iteration, "
          f"hidden {args.hidden}, Adam lr {args.lr}", flush=True)

    model, rewards_by_iteration, mean100, parallel_s = train(
        ActorPool(actors), args, args.max_iterations, stop_at_target=not smoke, verbose=True)
    minray.shutdown()
    iterations = len(rewards_by_iteration)
    episodes = iterations * args.episodes_per_iteration
    solved = not smoke and episodes >= 100 and mean100 >= args.target_reward
    print(f"parallel: {iterations} iterations ({episodes} episodes) in {parallel_s:.2f} s")

    print(f"running the same {iterations} iterations serially in this process ...", flush=True)
    workers = [PGWorker(seed, args.gamma) for seed in worker_seeds]
    serial_model, serial_rewards, _, serial_s = train(
        SerialPool(workers), args, iterations, stop_at_target=False, verbose=False)
    print(f"serial:   {iterations} iterations ({episodes} episodes) in {serial_s:.2f} s")
    print(f"speed-up with {args.num_workers} workers on {cpus} CPUs: {serial_s / parallel_s:.2f}x "
          f"({serial_s / iterations * 1e3:.0f} ms vs {parallel_s / iterations * 1e3:.0f} ms "
          f"per iteration)")
    # Same episodes, same gradients summed in the same order: the weights should
    # agree exactly; allow summation-order noise.
    difference = max(float(np.max(np.abs(model[k] - serial_model[k]))) for k in model)
    agree = serial_rewards == rewards_by_iteration and all(
        np.allclose(model[k], serial_model[k], rtol=1e-9, atol=1e-12) for k in model)
    if not agree:
        print(f"parallel and serial runs differ: weights by up to {difference:.1e}, mean rewards "
              f"{rewards_by_iteration} vs {serial_rewards}", file=sys.stderr)
        return 1
    print(f"parallel and serial runs agree: same episode rewards, weights differ by "
          f"{difference:.1e}")

    if smoke:
        k = max(1, iterations // 4)
        first = float(np.mean(rewards_by_iteration[:k]))
        last = float(np.mean(rewards_by_iteration[-k:]))
        if last > first:
            print(f"smoke: mean reward rose from {first:.1f} to {last:.1f} "
                  f"(first vs last {k} iterations)")
            return 0
        print(f"smoke: mean reward did not rise ({first:.1f} -> {last:.1f})")
        return 1
    if solved:
        print(f"solved: mean reward of the last 100 episodes {mean100:.1f} >= "
              f"{args.target_reward:g} after {iterations} iterations ({episodes} episodes) "
              f"in {parallel_s:.1f} s")
        return 0
    print(f"not solved: mean reward of the last 100 episodes {mean100:.1f} < "
          f"{args.target_reward:g} after {iterations} iterations in {parallel_s:.1f} s",
          file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
