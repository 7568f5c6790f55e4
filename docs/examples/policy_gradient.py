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
* The driver sums the gradients of the iteration's episodes and takes one Adam
  step (the original used RMSProp), then prints the iteration's mean episode reward and the mean over the
  last 100 episodes.

    python docs/examples/policy_gradient.py             # until the mean reward of the last 100 episodes >= 195
    python docs/examples/policy_gradient.py --smoke     # a few iterations; passes if the reward rose

Exits 0 once the mean reward of the last 100 episodes reaches
--target-reward, 1 if --max-iterations or --max-seconds run out first.
"""
import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

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


@minray.remote
class PGWorker:
    """A CartPole environment; runs full episodes and returns their policy gradients."""

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


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--num-workers", type=int, default=2)
    parser.add_argument("--episodes-per-iteration", type=int, default=10)
    parser.add_argument("--hidden", type=int, default=32)
    parser.add_argument("--lr", type=float, default=0.01, help="Adam step size")
    parser.add_argument("--gamma", type=float, default=0.99)
    parser.add_argument("--target-reward", type=float, default=195.0)
    parser.add_argument("--max-iterations", type=int, help="default 300 (30 with --smoke)")
    parser.add_argument("--max-seconds", type=float, default=600.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--smoke", action="store_true",
                        help="a fixed few iterations; pass if the reward rose")
    args = parser.parse_args(argv)
    smoke = args.smoke
    args.max_iterations = args.max_iterations or (30 if smoke else 300)
    if min(args.num_workers, args.episodes_per_iteration, args.hidden, args.max_iterations) < 1:
        parser.error("--num-workers, --episodes-per-iteration, --hidden, --max-iterations must be >= 1")

    start = time.perf_counter()
    minray.init()
    cpus = int(minray.cluster_resources().get("CPU", 0))
    print(f"minray started a local cluster with {cpus} CPUs in {time.perf_counter() - start:.2f} s")

    rng = np.random.default_rng(args.seed)
    model = init_model(args.hidden, rng)
    adam_m = {k: np.zeros_like(v) for k, v in model.items()}
    adam_v = {k: np.zeros_like(v) for k, v in model.items()}
    workers = [PGWorker.remote(args.seed * 1000 + i + 1, args.gamma) for i in range(args.num_workers)]
    n, w = args.episodes_per_iteration, args.num_workers
    per = [n // w + (i < n % w) for i in range(w)]
    print(f"{w} workers, {n} episodes per iteration, hidden {args.hidden}, Adam lr {args.lr}",
          flush=True)

    run_start = time.perf_counter()
    baseline = None
    rewards_by_iteration = []
    solved = False
    iteration = 0
    total_episodes = 0
    recent = collections.deque(maxlen=100)
    while iteration < args.max_iterations:
        if not smoke and time.perf_counter() - run_start > args.max_seconds:
            break
        iteration += 1
        it_start = time.perf_counter()
        model_ref = minray.put(model)          # broadcast: put once, one ref to every worker
        refs = [wk.run_episodes.remote(model_ref, baseline, k) for wk, k in zip(workers, per) if k > 0]
        results = [r for batch in minray.get(refs) for r in batch]
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
        total_episodes += len(rewards)
        recent.extend(rewards)
        mean100 = float(np.mean(recent))
        mean_reward = float(np.mean(rewards))
        rewards_by_iteration.append(mean_reward)
        elapsed = time.perf_counter() - run_start
        print(f"iteration {iteration:3d}: mean reward {mean_reward:6.1f} "
              f"(min {min(rewards):3.0f}, max {max(rewards):3.0f}), last 100 episodes {mean100:6.1f}, "
              f"{time.perf_counter() - it_start:.2f} s, {elapsed:.1f} s total", flush=True)
        if not smoke and len(recent) == 100 and mean100 >= args.target_reward:
            solved = True
            break

    elapsed = time.perf_counter() - run_start
    minray.shutdown()
    if smoke:
        k = max(1, len(rewards_by_iteration) // 4)
        first = float(np.mean(rewards_by_iteration[:k]))
        last = float(np.mean(rewards_by_iteration[-k:]))
        if last > first:
            print(f"smoke: mean reward rose from {first:.1f} to {last:.1f} "
                  f"(first vs last {k} iterations)")
            return 0
        print(f"smoke: mean reward did not rise ({first:.1f} -> {last:.1f})")
        return 1
    if solved:
        print(f"solved: mean reward of the last 100 episodes {mean100:.1f} >= {args.target_reward:g} after "
              f"{iteration} iterations ({total_episodes} episodes) in {elapsed:.1f} s")
        return 0
    print(f"not solved: mean reward of the last 100 episodes {np.mean(recent) if recent else 0:.1f} "
          f"< {args.target_reward:g} after {iteration} iterations in {elapsed:.1f} s",
          file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
