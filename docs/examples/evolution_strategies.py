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

After the parallel run, the serial run repeats it in this process: the same
`Worker` class, instantiated here once per actor with the same seeds and
called one after another, for as many iterations as the parallel run took.
Both must end at the same parameters; the script prints both times and the
speed-up.

    python docs/examples/evolution_strategies.py               # until mean eval reward >= 195
    python docs/examples/evolution_strategies.py --smoke       # a few iterations, a few seconds
    python docs/examples/evolution_strategies.py --num-workers 4 --target-reward 475

Exits 0 once the mean evaluation reward reaches --target-reward, 1 if
--max-iterations or --max-seconds run out first. With --smoke it runs a fixed
few iterations and exits 0 if the evaluation reward rose above its start.
Either way it exits 1 if the serial run's parameters differ from the parallel
run's.
"""
import os

# One BLAS thread per process: the serial run would otherwise use several
# cores itself, and the actors' processes would fight over them.
for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

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


class Worker:
    """A CartPole environment plus read-only access to the shared noise table.

    A plain class: the parallel run makes actors of it (`WorkerActor`), the
    serial run instantiates it directly, so both run the same code.
    """

    def __init__(self, noise, sigma, seed):
        import gymnasium as gym
        self.noise = noise                    # resolved once: the object store's copy in an actor
        self.sigma = sigma
        self.rng = np.random.default_rng(seed)
        self.env = gym.make("CartPole-v1")

    def do_rollouts(self, params, num_pairs):
        """Antithetic perturbations: a list of (offset, reward+, reward-)."""
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


WorkerActor = minray.remote(Worker)


class ActorPool:
    """The parallel run: each call goes to every actor at once, the parameters put once."""

    def __init__(self, actors):
        self.actors = actors

    def map(self, method, params, counts):
        params_ref = minray.put(params)       # broadcast: put once, one ref to every worker
        return minray.get([getattr(actor, method).remote(params_ref, n)
                           for actor, n in zip(self.actors, counts) if n > 0])


class SerialPool:
    """The serial run: the same calls on plain Worker objects, one after another."""

    def __init__(self, workers):
        self.workers = workers

    def map(self, method, params, counts):
        return [getattr(worker, method)(params, n)
                for worker, n in zip(self.workers, counts) if n > 0]


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


def split(total, parts):
    """`total` items dealt as evenly as possible into `parts` counts."""
    return [total // parts + (i < total % parts) for i in range(parts)]


def evaluate(pool, params, episodes, num_workers):
    batches = pool.map("evaluate", params, split(episodes, num_workers))
    return float(np.mean([r for batch in batches for r in batch]))


def train(pool, noise, args, max_iterations, stop_at_target, verbose):
    """Run ES with `pool`'s workers; returns (params, eval rewards, iterations, seconds).

    The eval rewards list starts with the unperturbed zero policy's (iteration 0).
    With stop_at_target the run ends at --target-reward or --max-seconds.
    """
    start = time.perf_counter()
    params = np.zeros(NUM_PARAMS)
    optimizer = Adam(NUM_PARAMS, args.lr)
    rewards = [evaluate(pool, params, args.eval_episodes, args.num_workers)]
    if verbose:
        print(f"iteration   0: eval reward {rewards[0]:6.1f}", flush=True)
    iteration = 0
    while iteration < max_iterations:
        if stop_at_target and time.perf_counter() - start > args.max_seconds:
            break
        iteration += 1
        it_start = time.perf_counter()
        batches = pool.map("do_rollouts", params, [args.pairs_per_worker] * args.num_workers)
        results = [r for batch in batches for r in batch]
        offsets = np.array([r[0] for r in results])
        returns = np.array([[r[1], r[2]] for r in results])
        ranked = centered_ranks(returns)
        weights = ranked[:, 0] - ranked[:, 1]
        eps = np.stack([noise[o:o + NUM_PARAMS] for o in offsets]).astype(np.float64)
        grad = weights @ eps / (len(results) * args.sigma)
        params = optimizer.step(params, grad)

        rewards.append(evaluate(pool, params, args.eval_episodes, args.num_workers))
        if verbose:
            print(f"iteration {iteration:3d}: eval reward {rewards[-1]:6.1f}, perturbed mean "
                  f"{returns.mean():6.1f} (max {returns.max():5.0f}), "
                  f"{time.perf_counter() - it_start:.2f} s, "
                  f"{time.perf_counter() - start:.1f} s total", flush=True)
        if stop_at_target and rewards[-1] >= args.target_reward:
            break
    return params, rewards, iteration, time.perf_counter() - start


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--num-workers", type=int, default=2)
    parser.add_argument("--pairs-per-worker", type=int,
                        help="antithetic pairs each worker runs per iteration: default 64 (8 with --smoke)")
    parser.add_argument("--eval-episodes", type=int,
                        help="episodes of the unperturbed policy per iteration: default 10 (4 with --smoke)")
    parser.add_argument("--noise-size", type=int,
                        help="floats in the shared noise table: default 25,000,000 (100 MB; 1,000,000 with --smoke)")
    parser.add_argument("--sigma", type=float, default=0.1, help="perturbation scale")
    parser.add_argument("--lr", type=float, default=0.05, help="Adam step size")
    parser.add_argument("--target-reward", type=float, default=195.0)
    parser.add_argument("--max-iterations", type=int, help="default 200 (4 with --smoke)")
    parser.add_argument("--max-seconds", type=float, default=600.0,
                        help="time limit of the parallel run")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--smoke", action="store_true",
                        help="a fixed few small iterations; pass if the reward rose")
    args = parser.parse_args(argv)
    smoke = args.smoke
    # 64 pairs = 128 episodes per worker per iteration, a few hundred ms once the
    # policy balances: enough that the two round trips per iteration are a small share.
    args.pairs_per_worker = args.pairs_per_worker or (8 if smoke else 64)
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

    worker_seeds = [args.seed * 1000 + i + 1 for i in range(args.num_workers)]
    actors = [WorkerActor.remote(noise_ref, args.sigma, seed) for seed in worker_seeds]
    # A call with no episodes returns once every actor is up (process started,
    # noise table resolved), so the clock below measures training only.
    minray.get([actor.evaluate.remote(np.zeros(NUM_PARAMS), 0) for actor in actors])
    pairs = args.num_workers * args.pairs_per_worker
    print(f"{args.num_workers} workers x {args.pairs_per_worker} antithetic pairs = "
          f"{2 * pairs} episodes per iteration, sigma {args.sigma}, Adam lr {args.lr}")

    limit = args.max_iterations
    params, rewards, iterations, parallel_s = train(
        ActorPool(actors), noise, args, limit, stop_at_target=not smoke, verbose=True)
    minray.shutdown()
    initial, reward = rewards[0], rewards[-1]
    solved = reward >= args.target_reward
    print(f"parallel: eval reward {initial:.1f} -> {reward:.1f} after {iterations} iterations "
          f"in {parallel_s:.2f} s")

    print(f"running the same {iterations} iterations serially in this process ...", flush=True)
    workers = [Worker(noise, args.sigma, seed) for seed in worker_seeds]
    serial_params, serial_rewards, _, serial_s = train(
        SerialPool(workers), noise, args, iterations, stop_at_target=False, verbose=False)
    print(f"serial:   eval reward {serial_rewards[0]:.1f} -> {serial_rewards[-1]:.1f} after "
          f"{iterations} iterations in {serial_s:.2f} s")
    print(f"speed-up with {args.num_workers} workers on {cpus} CPUs: {serial_s / parallel_s:.2f}x "
          f"({serial_s / iterations * 1e3:.0f} ms vs {parallel_s / iterations * 1e3:.0f} ms "
          f"per iteration)")
    # The driver does the same arithmetic on the same episode returns in both
    # runs, so the parameters should agree exactly; allow summation-order noise.
    difference = float(np.max(np.abs(params - serial_params)))
    if serial_rewards != rewards or not np.allclose(params, serial_params, rtol=1e-9, atol=1e-12):
        print(f"parallel and serial runs differ: parameters by up to {difference:.1e}, eval "
              f"rewards {rewards} vs {serial_rewards}", file=sys.stderr)
        return 1
    print(f"parallel and serial runs agree: same eval rewards, parameters differ by "
          f"{difference:.1e}")

    if smoke:
        print(f"smoke: reward rose from {initial:.1f} to {reward:.1f}"
              if reward > initial else
              f"smoke: reward did not rise ({initial:.1f} -> {reward:.1f})")
        return 0 if reward > initial else 1
    if solved:
        print(f"solved: eval reward {reward:.1f} >= {args.target_reward:g} after "
              f"{iterations} iterations in {parallel_s:.1f} s")
        return 0
    print(f"not solved: eval reward {reward:.1f} < {args.target_reward:g} after "
          f"{iterations} iterations in {parallel_s:.1f} s", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
