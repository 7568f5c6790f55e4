"""Evolution strategies on CartPole-v1, with worker actors and a shared noise table.

The pattern of the original docs' ES example (Salimans et al. 2017), at a
CartPole scale:

* The driver draws one large block of Gaussian noise and puts it into the
  object store once (`minray.put`); every `Worker` actor receives the same
  ObjectRef in its constructor, so the block is made and shipped once, not
  once per worker.
* Each `Worker` holds a gymnasium CartPole-v1 environment and a linear numpy
  policy (action = 1 if obs . w + b > 0 else 0: five parameters).
* Each iteration the driver puts the current parameters once and hands that one
  ObjectRef to every worker. A worker picks random offsets into the noise table,
  runs the antithetic pair of policies params +/- sigma * eps for each, and
  returns (offset, reward+, reward-) triples: small, because the noise itself
  never travels back.
* The driver rebuilds each eps from its offset, turns the returns into centred
  ranks, estimates the gradient and takes an Adam step. It then evaluates the
  unperturbed policy (episodes split across the workers) and prints the mean.

    python docs/examples/evolution_strategies.py               # until mean eval reward >= 195
    python docs/examples/evolution_strategies.py --smoke       # a few iterations, a few seconds
    python docs/examples/evolution_strategies.py --num-workers 4 --target-reward 475

Exits 0 once the mean evaluation reward reaches --target-reward, 1 if
--max-iterations or --max-seconds run out first. With --smoke it runs a fixed
few iterations and exits 0 if the evaluation reward rose above its start.
"""
import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import argparse
import sys
import time

import numpy as np

import minray

OBS_DIM = 4
NUM_PARAMS = OBS_DIM + 1          # linear policy: weights and a bias


def act(params, obs):
    return 1 if float(obs @ params[:OBS_DIM] + params[OBS_DIM]) > 0.0 else 0


def rollout(env, params, seed, max_steps=500):
    """Total reward of one episode of the deterministic linear policy."""
    obs, _ = env.reset(seed=seed)
    total = 0.0
    for _ in range(max_steps):
        obs, reward, terminated, truncated, _ = env.step(act(params, obs))
        total += reward
        if terminated or truncated:
            break
    return total


@minray.remote
class Worker:
    """A CartPole environment plus read-only access to the shared noise table."""

    def __init__(self, noise, sigma, seed):
        import gymnasium as gym
        self.noise = noise                    # the object store's copy, resolved once
        self.sigma = sigma
        self.rng = np.random.default_rng(seed)
        self.env = gym.make("CartPole-v1")

    def do_rollouts(self, params, num_pairs):
        """Antithetic perturbations: a list of (offset, reward+, reward-) and steps taken."""
        results = []
        for _ in range(num_pairs):
            offset = int(self.rng.integers(0, len(self.noise) - NUM_PARAMS + 1))
            eps = self.noise[offset:offset + NUM_PARAMS]
            # Both halves of a pair see the same start state (common random numbers).
            episode_seed = int(self.rng.integers(2 ** 31))
            plus = rollout(self.env, params + self.sigma * eps, episode_seed)
            minus = rollout(self.env, params - self.sigma * eps, episode_seed)
            results.append((offset, plus, minus))
        return results

    def evaluate(self, params, num_episodes):
        return [rollout(self.env, params, int(self.rng.integers(2 ** 31)))
                for _ in range(num_episodes)]


def centered_ranks(x):
    """Map values to ranks scaled into [-0.5, 0.5] (robust to reward scale and outliers)."""
    ranks = np.empty(x.size, dtype=np.float64)
    ranks[x.ravel().argsort(kind="stable")] = np.arange(x.size)
    return (ranks / (x.size - 1) - 0.5).reshape(x.shape)


class Adam:
    def __init__(self, dim, lr, beta1=0.9, beta2=0.999, epsilon=1e-8):
        self.lr, self.beta1, self.beta2, self.epsilon = lr, beta1, beta2, epsilon
        self.m = np.zeros(dim)
        self.v = np.zeros(dim)
        self.t = 0

    def step(self, params, grad):
        """Ascend: returns params moved along +grad."""
        self.t += 1
        self.m = self.beta1 * self.m + (1 - self.beta1) * grad
        self.v = self.beta2 * self.v + (1 - self.beta2) * grad * grad
        lr_t = self.lr * np.sqrt(1 - self.beta2 ** self.t) / (1 - self.beta1 ** self.t)
        return params + lr_t * self.m / (np.sqrt(self.v) + self.epsilon)


def evaluate(workers, params_ref, episodes):
    per = [episodes // len(workers) + (i < episodes % len(workers)) for i in range(len(workers))]
    refs = [w.evaluate.remote(params_ref, n) for w, n in zip(workers, per) if n > 0]
    rewards = [r for batch in minray.get(refs) for r in batch]
    return float(np.mean(rewards))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--num-workers", type=int, default=2)
    parser.add_argument("--pairs-per-worker", type=int,
                        help="antithetic pairs each worker runs per iteration: default 16 (8 with --smoke)")
    parser.add_argument("--eval-episodes", type=int,
                        help="episodes of the unperturbed policy per iteration: default 10 (4 with --smoke)")
    parser.add_argument("--noise-size", type=int,
                        help="floats in the shared noise table: default 25,000,000 (100 MB; 1,000,000 with --smoke)")
    parser.add_argument("--sigma", type=float, default=0.1, help="perturbation scale")
    parser.add_argument("--lr", type=float, default=0.05, help="Adam step size")
    parser.add_argument("--target-reward", type=float, default=195.0)
    parser.add_argument("--max-iterations", type=int, help="default 200 (4 with --smoke)")
    parser.add_argument("--max-seconds", type=float, default=600.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--smoke", action="store_true",
                        help="a fixed few small iterations; pass if the reward rose")
    args = parser.parse_args(argv)
    smoke = args.smoke
    args.pairs_per_worker = args.pairs_per_worker or (8 if smoke else 16)
    args.eval_episodes = args.eval_episodes or (4 if smoke else 10)
    args.noise_size = args.noise_size or (1_000_000 if smoke else 25_000_000)
    args.max_iterations = args.max_iterations or (4 if smoke else 200)
    if min(args.num_workers, args.pairs_per_worker, args.eval_episodes, args.max_iterations) < 1:
        parser.error("--num-workers, --pairs-per-worker, --eval-episodes, --max-iterations must be >= 1")
    if args.noise_size < NUM_PARAMS:
        parser.error(f"--noise-size must be at least {NUM_PARAMS}")

    start = time.perf_counter()
    minray.init()
    cpus = int(minray.cluster_resources().get("CPU", 0))
    print(f"minray started a local cluster with {cpus} CPUs in {time.perf_counter() - start:.2f} s")

    t0 = time.perf_counter()
    noise = np.random.default_rng(args.seed).standard_normal(args.noise_size, dtype=np.float32)
    noise_ref = minray.put(noise)             # the one copy every worker reads
    print(f"shared noise table: {args.noise_size:,} floats ({noise.nbytes / 1e6:.0f} MB), "
          f"put once in {time.perf_counter() - t0:.2f} s")

    workers = [Worker.remote(noise_ref, args.sigma, args.seed * 1000 + i + 1)
               for i in range(args.num_workers)]
    params = np.zeros(NUM_PARAMS)
    optimizer = Adam(NUM_PARAMS, args.lr)
    pairs = args.num_workers * args.pairs_per_worker
    print(f"{args.num_workers} workers x {args.pairs_per_worker} antithetic pairs = "
          f"{2 * pairs} episodes per iteration, sigma {args.sigma}, Adam lr {args.lr}")

    run_start = time.perf_counter()
    initial = evaluate(workers, minray.put(params), args.eval_episodes)
    print(f"iteration   0: eval reward {initial:6.1f}", flush=True)
    reward = initial
    solved = False
    iteration = 0
    while iteration < args.max_iterations:
        if not smoke and time.perf_counter() - run_start > args.max_seconds:
            break
        iteration += 1
        it_start = time.perf_counter()
        params_ref = minray.put(params)       # broadcast: put once, one ref to every worker
        batches = minray.get([w.do_rollouts.remote(params_ref, args.pairs_per_worker)
                              for w in workers])
        results = [r for batch in batches for r in batch]
        offsets = np.array([r[0] for r in results])
        returns = np.array([[r[1], r[2]] for r in results])
        ranked = centered_ranks(returns)
        weights = ranked[:, 0] - ranked[:, 1]
        eps = np.stack([noise[o:o + NUM_PARAMS] for o in offsets]).astype(np.float64)
        grad = weights @ eps / (len(results) * args.sigma)
        params = optimizer.step(params, grad)

        reward = evaluate(workers, minray.put(params), args.eval_episodes)
        elapsed = time.perf_counter() - run_start
        print(f"iteration {iteration:3d}: eval reward {reward:6.1f}, perturbed mean "
              f"{returns.mean():6.1f} (max {returns.max():5.0f}), "
              f"{time.perf_counter() - it_start:.2f} s, {elapsed:.1f} s total", flush=True)
        if not smoke and reward >= args.target_reward:
            solved = True
            break

    elapsed = time.perf_counter() - run_start
    minray.shutdown()
    if smoke:
        print(f"smoke: reward rose from {initial:.1f} to {reward:.1f}"
              if reward > initial else
              f"smoke: reward did not rise ({initial:.1f} -> {reward:.1f})")
        return 0 if reward > initial else 1
    if solved:
        print(f"solved: eval reward {reward:.1f} >= {args.target_reward:g} after "
              f"{iteration} iterations in {elapsed:.1f} s")
        return 0
    print(f"not solved: eval reward {reward:.1f} < {args.target_reward:g} after "
          f"{iteration} iterations in {elapsed:.1f} s", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
