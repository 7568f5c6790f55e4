"""A3C on CartPole-v1: runner actors compute gradients, the driver applies them as they arrive.

The pattern of the original docs' A3C example (Mnih et al. 2016), at a
CartPole scale, with PyTorch on the CPU (one thread per process):

* Each `Runner` holds --envs-per-worker gymnasium CartPole-v1 environments and
  its own copy of a small policy/value network (4 -> 64 -> 64 tanh, then 2
  action logits and 1 value). `compute_gradient(weights)` loads the weights it
  is sent, continues all its environments together for a partial rollout of
  --rollout-length steps (one batched forward pass per step, across episode
  ends), computes n-step returns bootstrapped from the value of the last
  states, and returns the gradient of
      policy loss (advantage = return - value) + 0.5 * value loss - 0.01 * entropy
  over the envs x steps transitions, plus the rewards of the episodes that
  ended in the rollout. Weights and gradients travel as one flat float32
  vector: one array to serialize, one tensor for the driver's Adam step.
* The driver keeps the master weights and an Adam optimizer. It asks every
  runner actor for a gradient, then loops on `minray.wait(pending,
  num_returns=1)`: whichever gradient comes back first is applied at once, and
  only that runner is sent the fresh weights with its next request. The other
  runners keep working on the weights they were last sent: the asynchrony of
  A3C. Many environments per runner make one gradient 512 transitions, ~15 ms
  of work, against ~1 ms for the call and the driver's update: the runners, not
  the round trip, set the pace, so two of them on two CPUs learn faster.
* --serial runs the same algorithm without minray: one `Runner` object in this
  process computes a gradient, the driver code applies it, and so on. It has
  the same environments per runner, rollout length and step size, so every
  gradient is computed from the same amount of experience as in the parallel
  runs, and never from stale weights. (Giving it num-workers x envs-per-worker
  environments instead would change the batch per update, and with it the
  step size that suits it: a different algorithm, not a serial version.)
  With --num-workers 1 nothing is asynchronous and the actor run repeats the
  serial one exactly, episode for episode. The speed-up of N runners is the
  serial time to target / the parallel one. The script runs one mode, not
  both as lbfgs.py does: the time to target varies from seed to seed (and
  run to run, with the order gradients arrive in) more than one pair of runs
  can settle, so compare medians over a few seeds (docs/examples/README.md).

    python docs/examples/a3c.py                     # 2 runner actors, until mean reward >= 195
    python docs/examples/a3c.py --serial            # the same in one process, no minray
    python docs/examples/a3c.py --smoke             # a few seconds; passes if the reward rose
    python docs/examples/a3c.py --num-workers 4 --target-reward 475

Exits 0 once the mean reward over the last 100 finished episodes reaches
--target-reward, 1 if --max-seconds pass first. With --smoke it applies a
fixed number of gradients and exits 0 if the mean reward of the last episodes
is above that of the first episodes.
"""
import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")

import argparse
import collections
import sys
import time

import numpy as np
import torch
import torch.nn as nn

import minray
from minray.experimental import TorchWeights

torch.set_num_threads(1)

OBS_DIM = 4
NUM_ACTIONS = 2


class PolicyValueNet(nn.Module):
    def __init__(self, hidden=64):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(OBS_DIM, hidden), nn.Tanh(),
                                  nn.Linear(hidden, hidden), nn.Tanh())
        self.policy = nn.Linear(hidden, NUM_ACTIONS)
        self.value = nn.Linear(hidden, 1)
        with torch.no_grad():                   # start near-uniform and near-zero
            self.policy.weight.mul_(0.01)
            self.value.weight.mul_(0.1)

    def forward(self, obs):
        h = self.body(obs)
        return self.policy(h), self.value(h).squeeze(-1)


class Runner:
    """Several environments and one copy of the network; computes gradients from partial rollouts.

    A plain class: --serial uses it directly, the parallel run as `minray.remote(Runner)`.
    """

    def __init__(self, seed, num_envs, hidden, rollout_length, gamma, entropy_coef, value_coef,
                 reward_scale):
        import gymnasium as gym
        torch.set_num_threads(1)
        self.rng = np.random.default_rng(seed)
        self.envs = [gym.make("CartPole-v1") for _ in range(num_envs)]
        self.obs = np.array([env.reset(seed=seed * 100 + i)[0]
                             for i, env in enumerate(self.envs)], dtype=np.float32)
        self.net = PolicyValueNet(hidden)
        self.rollout_length = rollout_length
        self.gamma = gamma
        self.entropy_coef = entropy_coef
        self.value_coef = value_coef
        self.reward_scale = reward_scale
        self.episode_rewards = np.zeros(num_envs)

    def ready(self):
        """Returns once the runner exists (the driver starts its clock after that)."""
        return len(self.envs)

    def compute_gradient(self, weights):
        """Load `weights`, continue every env for one partial rollout.

        Returns (flat gradient, rewards of the episodes that ended, transitions used).
        """
        TorchWeights(self.net).set_flat(weights)
        num_envs, length = len(self.envs), self.rollout_length
        observations = np.empty((length, num_envs, OBS_DIM), dtype=np.float32)
        actions = np.empty((length, num_envs), dtype=np.int64)
        rewards = np.empty((length, num_envs), dtype=np.float32)
        dones = np.zeros((length, num_envs), dtype=bool)
        finished = []
        for t in range(length):
            with torch.no_grad():
                logits, _ = self.net(torch.from_numpy(self.obs))
            probs = torch.softmax(logits, -1).numpy()
            # Sample one action per env: the first action whose cumulative probability exceeds u.
            u = self.rng.random((num_envs, 1))
            action = np.minimum((u > probs.cumsum(-1)).sum(-1), NUM_ACTIONS - 1)
            observations[t] = self.obs
            actions[t] = action
            for i, env in enumerate(self.envs):
                next_obs, reward, terminated, truncated, _ = env.step(int(action[i]))
                rewards[t, i] = reward * self.reward_scale
                self.episode_rewards[i] += reward
                if terminated or truncated:
                    finished.append(float(self.episode_rewards[i]))
                    self.episode_rewards[i] = 0.0
                    dones[t, i] = True
                    # A time limit is not a failure: bootstrap from the state it cut off at.
                    if truncated and not terminated:
                        with torch.no_grad():
                            _, v = self.net(torch.as_tensor(next_obs, dtype=torch.float32))
                        rewards[t, i] += self.gamma * float(v)
                    next_obs, _ = env.reset(seed=int(self.rng.integers(2 ** 31)))
                self.obs[i] = next_obs

        # n-step returns, bootstrapped from the values of the states the rollout stopped in.
        with torch.no_grad():
            _, ret = self.net(torch.from_numpy(self.obs))
        ret = ret.numpy()
        returns = np.empty_like(rewards)
        for t in reversed(range(length)):
            ret = rewards[t] + np.where(dones[t], 0.0, self.gamma * ret)
            returns[t] = ret

        logits, values = self.net(torch.from_numpy(observations.reshape(-1, OBS_DIM)))
        log_probs = torch.log_softmax(logits, -1)
        chosen = log_probs.gather(1, torch.from_numpy(actions.reshape(-1, 1))).squeeze(1)
        returns_t = torch.from_numpy(returns.reshape(-1))
        advantages = returns_t - values.detach()
        entropy = -(log_probs.exp() * log_probs).sum(-1).mean()
        policy_loss = -(chosen * advantages).mean()
        value_loss = 0.5 * (returns_t - values).pow(2).mean()
        loss = policy_loss + self.value_coef * value_loss - self.entropy_coef * entropy
        self.net.zero_grad()
        loss.backward()
        # In get_flat's order: the net has no buffers, so its parameters come in
        # state_dict order.
        gradient = torch.cat([p.grad.reshape(-1) for p in self.net.parameters()]).numpy()
        return gradient, finished, length * num_envs


class Learner:
    """The master weights, their Adam optimizer, and the training statistics."""

    def __init__(self, args):
        torch.manual_seed(args.seed)
        self.weights = nn.Parameter(
            torch.from_numpy(TorchWeights(PolicyValueNet(args.hidden)).get_flat()))
        self.optimizer = torch.optim.Adam([self.weights], lr=args.lr)
        self.max_grad_norm = args.max_grad_norm
        self.episodes = []                      # every finished episode's reward, in arrival order
        self.recent = collections.deque(maxlen=100)
        self.updates = self.steps = 0
        self.busy_seconds = 0.0                 # time spent in apply()

    def current_weights(self):
        # A copy: the optimizer updates self.weights in place.
        return self.weights.detach().numpy().copy()

    def apply(self, gradient, finished, steps):
        start = time.perf_counter()
        grad = torch.tensor(gradient)
        norm = float(grad.norm())
        if norm > self.max_grad_norm:
            grad.mul_(self.max_grad_norm / norm)
        self.weights.grad = grad
        self.optimizer.step()
        self.updates += 1
        self.steps += steps
        self.episodes.extend(finished)
        self.recent.extend(finished)
        self.busy_seconds += time.perf_counter() - start

    def mean100(self):
        return float(np.mean(self.recent)) if self.recent else 0.0

    def solved(self, target):
        return len(self.recent) == 100 and self.mean100() >= target

    def report(self, elapsed):
        print(f"{elapsed:6.1f} s: {self.updates:6d} updates, {self.steps:8d} steps, "
              f"{len(self.episodes):5d} episodes, mean reward (last 100) {self.mean100():6.1f}",
              flush=True)


def train_parallel(args, learner, runner_kwargs, done):
    """Runner actors compute gradients; each is applied as it arrives. Returns seconds elapsed."""
    start = time.perf_counter()
    minray.init()
    cpus = int(minray.cluster_resources().get("CPU", 0))
    print(f"minray started a local cluster with {cpus} CPUs in {time.perf_counter() - start:.2f} s")
    RemoteRunner = minray.remote(Runner)
    runners = [RemoteRunner.remote(args.seed * 1000 + i + 1, **runner_kwargs)
               for i in range(args.num_workers)]
    # Each runner process imports torch and gymnasium first (seconds); the clock starts after.
    minray.get([r.ready.remote() for r in runners])
    print(f"runner actors ready after {time.perf_counter() - start:.1f} s", flush=True)

    run_start = last_report = time.perf_counter()
    weights = learner.current_weights()
    pending = {r.compute_gradient.remote(weights): r for r in runners}
    driver_seconds = 0.0                        # get + apply + send, outside minray.wait
    while True:
        ready, _ = minray.wait(list(pending), num_returns=1)
        got = time.perf_counter()
        runner = pending.pop(ready[0])
        learner.apply(*minray.get(ready[0]))    # apply this runner's gradient at once ...
        now = time.perf_counter()
        if done(now - run_start):
            break
        # ... and send the fresh weights to that runner only, with its next request.
        pending[runner.compute_gradient.remote(learner.current_weights())] = runner
        driver_seconds += time.perf_counter() - got
        if now - last_report >= args.report_seconds:
            last_report = now
            learner.report(now - run_start)
    elapsed = time.perf_counter() - run_start
    sent = max(1, learner.updates - 1)          # the last update sends no weights
    print(f"driver: {1e3 * driver_seconds / sent:.2f} ms per update outside minray.wait "
          f"({1e3 * learner.busy_seconds / learner.updates:.2f} ms applying the gradient), "
          f"{100 * driver_seconds / elapsed:.0f}% of the run")
    # Let the runners finish their last rollouts before shutting down.
    if pending:
        minray.wait(list(pending), num_returns=len(pending), timeout=30)
    minray.shutdown()
    return elapsed


def train_serial(args, learner, runner_kwargs, done):
    """The same algorithm in this process: compute a gradient, apply it, repeat."""
    runner = Runner(args.seed * 1000 + 1, **runner_kwargs)
    run_start = last_report = time.perf_counter()
    while True:
        learner.apply(*runner.compute_gradient(learner.current_weights()))
        now = time.perf_counter()
        if done(now - run_start):
            break
        if now - last_report >= args.report_seconds:
            last_report = now
            learner.report(now - run_start)
    return time.perf_counter() - run_start


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--num-workers", type=int, default=2, help="runner actors")
    parser.add_argument("--serial", action="store_true",
                        help="run one Runner in this process instead of actors (no minray; "
                             "--num-workers is ignored)")
    parser.add_argument("--target-reward", type=float, default=195.0,
                        help="stop once the mean reward of the last 100 episodes reaches this")
    parser.add_argument("--max-seconds", type=float, default=600.0)
    parser.add_argument("--envs-per-worker", type=int, default=16,
                        help="environments each runner steps together")
    parser.add_argument("--rollout-length", type=int, default=32,
                        help="steps per environment per gradient")
    parser.add_argument("--lr", type=float, default=3e-3, help="Adam step size")
    parser.add_argument("--hidden", type=int, default=64, help="hidden layer width")
    parser.add_argument("--gamma", type=float, default=0.99)
    parser.add_argument("--entropy-coef", type=float, default=0.01)
    parser.add_argument("--value-coef", type=float, default=0.5)
    parser.add_argument("--reward-scale", type=float, default=0.1,
                        help="rewards are multiplied by this for the losses (reward normalisation)")
    parser.add_argument("--max-grad-norm", type=float, default=1.0)
    parser.add_argument("--smoke-updates", type=int, default=80,
                        help="with --smoke: gradients applied before comparing rewards")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--smoke", action="store_true",
                        help="a fixed number of updates; pass if the reward rose")
    args = parser.parse_args(argv)
    if min(args.num_workers, args.envs_per_worker, args.rollout_length, args.hidden) < 1:
        parser.error("--num-workers, --envs-per-worker, --rollout-length, --hidden must be >= 1")
    args.report_seconds = 2.0 if args.smoke else 5.0

    runner_kwargs = dict(num_envs=args.envs_per_worker, hidden=args.hidden,
                         rollout_length=args.rollout_length, gamma=args.gamma,
                         entropy_coef=args.entropy_coef, value_coef=args.value_coef,
                         reward_scale=args.reward_scale)
    learner = Learner(args)
    if args.serial:
        mode = "serial, one runner in this process"
    else:
        mode = f"{args.num_workers} runner actor" + ("s" if args.num_workers > 1 else "")
    print(f"{mode}: {args.envs_per_worker} envs x {args.rollout_length} steps per gradient, "
          f"hidden {args.hidden}, Adam lr {args.lr}, reward scale {args.reward_scale}", flush=True)

    def done(elapsed):
        if args.smoke:
            return learner.updates >= args.smoke_updates
        return learner.solved(args.target_reward) or elapsed > args.max_seconds

    train = train_serial if args.serial else train_parallel
    elapsed = train(args, learner, runner_kwargs, done)
    learner.report(elapsed)

    episodes = learner.episodes
    if args.smoke:
        k = max(1, min(20, len(episodes) // 3))
        first = float(np.mean(episodes[:k])) if episodes else 0.0
        last = float(np.mean(episodes[-k:])) if episodes else 0.0
        if len(episodes) >= 2 and last > first:
            print(f"smoke: mean reward rose from {first:.1f} to {last:.1f} "
                  f"(first vs last {k} episodes)")
            return 0
        print(f"smoke: mean reward did not rise ({first:.1f} -> {last:.1f}, "
              f"first vs last {k} episodes)")
        return 1
    if learner.solved(args.target_reward):
        print(f"solved: mean reward of the last 100 episodes {learner.mean100():.1f} >= "
              f"{args.target_reward:g} after {len(episodes)} episodes, {learner.steps} steps, "
              f"{learner.updates} updates")
        print(f"time to target: {elapsed:.1f} s ({mode})")
        return 0
    print(f"not solved: mean reward of the last 100 episodes {learner.mean100():.1f} < "
          f"{args.target_reward:g} after {len(episodes)} episodes in {elapsed:.1f} s",
          file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
