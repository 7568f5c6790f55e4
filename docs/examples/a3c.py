"""A3C on CartPole-v1: runner actors compute gradients, the driver applies them as they arrive.

The pattern of the original docs' A3C example (Mnih et al. 2016), at a
CartPole scale, with PyTorch on the CPU:

* Each `Runner` actor holds a gymnasium CartPole-v1 environment and its own copy
  of a small policy/value network (4 -> 64 -> 64 -> 2 action logits and 1 value).
  `compute_gradient(weights)` loads the weights it is sent, continues its
  environment for a partial rollout of --rollout-length steps (across episode
  boundaries), computes n-step returns bootstrapped from the value of the last
  state, and returns the gradient of
      policy loss (advantage = return - value)  + 0.5 * value loss  - 0.01 * entropy
  as a dict of parameter name -> numpy array, plus the rewards of the episodes
  that finished during the rollout.
* The driver keeps the master network and an Adam optimizer. It asks every
  runner for a gradient, then loops on `minray.wait(pending, num_returns=1)`:
  whichever gradient comes back first is applied at once, and only that runner
  is sent the fresh weights (a dict of name -> ndarray) with its next request.
  The other runners keep working on the weights they were last sent: the
  asynchrony of A3C.

    python docs/examples/a3c.py                     # 2 runners, until mean reward >= 195
    python docs/examples/a3c.py --smoke             # ~15 s; passes if the reward rose
    python docs/examples/a3c.py --num-workers 4 --target-reward 475

Exits 0 once the mean reward over the last 100 finished episodes reaches
--target-reward, 1 if --max-seconds pass first. With --smoke it runs a fixed
number of updates and exits 0 if the mean reward of the last episodes is above
that of the first episodes.
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


def get_weights(net):
    """The network's weights as a dict of name -> numpy array (copies)."""
    return {k: v.detach().cpu().numpy().copy() for k, v in net.state_dict().items()}


def set_weights(net, weights):
    net.load_state_dict({k: torch.tensor(np.asarray(v)) for k, v in weights.items()})


@minray.remote
class Runner:
    """One environment and one copy of the network; computes gradients from partial rollouts."""

    def __init__(self, seed, hidden, rollout_length, gamma, entropy_coef, value_coef,
                 reward_scale):
        import gymnasium as gym
        torch.set_num_threads(1)
        torch.manual_seed(seed)
        self.rng = np.random.default_rng(seed)
        self.env = gym.make("CartPole-v1")
        self.obs, _ = self.env.reset(seed=seed)
        self.net = PolicyValueNet(hidden)
        self.rollout_length = rollout_length
        self.gamma = gamma
        self.entropy_coef = entropy_coef
        self.value_coef = value_coef
        self.reward_scale = reward_scale
        self.episode_reward = 0.0
        self.steps = 0

    def compute_gradient(self, weights):
        """Load `weights`, run one partial rollout, return (grads, finished episode rewards, steps)."""
        set_weights(self.net, weights)
        observations, actions, rewards, dones = [], [], [], []
        finished = []
        for _ in range(self.rollout_length):
            with torch.no_grad():
                logits, _ = self.net(torch.as_tensor(self.obs, dtype=torch.float32))
            probs = torch.softmax(logits, -1).numpy().astype(np.float64)
            action = int(self.rng.choice(NUM_ACTIONS, p=probs / probs.sum()))
            next_obs, reward, terminated, truncated, _ = self.env.step(action)
            observations.append(self.obs)
            actions.append(action)
            rewards.append(reward * self.reward_scale)
            self.episode_reward += reward
            self.steps += 1
            if terminated or truncated:
                finished.append(self.episode_reward)
                self.episode_reward = 0.0
                # A time limit is not a failure: bootstrap from the state it cut off at.
                if truncated and not terminated:
                    with torch.no_grad():
                        _, v = self.net(torch.as_tensor(next_obs, dtype=torch.float32))
                    rewards[-1] += self.gamma * float(v)
                dones.append(True)
                next_obs, _ = self.env.reset(seed=int(self.rng.integers(2 ** 31)))
            else:
                dones.append(False)
            self.obs = next_obs

        # n-step returns, bootstrapped from the value of the state the rollout stopped in.
        with torch.no_grad():
            _, last_value = self.net(torch.as_tensor(self.obs, dtype=torch.float32))
        ret = float(last_value)
        returns = np.empty(len(rewards), dtype=np.float32)
        for t in reversed(range(len(rewards))):
            ret = rewards[t] + (0.0 if dones[t] else self.gamma * ret)
            returns[t] = ret

        obs_t = torch.as_tensor(np.array(observations), dtype=torch.float32)
        logits, values = self.net(obs_t)
        log_probs = torch.log_softmax(logits, -1)
        act_t = torch.as_tensor(actions)
        chosen = log_probs.gather(1, act_t[:, None]).squeeze(1)
        returns_t = torch.as_tensor(returns)
        advantages = returns_t - values.detach()
        entropy = -(log_probs.exp() * log_probs).sum(-1).mean()
        policy_loss = -(chosen * advantages).mean()
        value_loss = 0.5 * (returns_t - values).pow(2).mean()
        loss = policy_loss + self.value_coef * value_loss - self.entropy_coef * entropy
        self.net.zero_grad()
        loss.backward()
        grads = {name: p.grad.numpy().copy() for name, p in self.net.named_parameters()}
        return grads, finished, len(rewards)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--num-workers", type=int, default=2)
    parser.add_argument("--target-reward", type=float, default=195.0,
                        help="stop once the mean reward of the last 100 episodes reaches this")
    parser.add_argument("--max-seconds", type=float, default=600.0)
    parser.add_argument("--rollout-length", type=int, default=20, help="steps per gradient")
    parser.add_argument("--lr", type=float, default=1e-3, help="Adam step size")
    parser.add_argument("--hidden", type=int, default=64, help="hidden layer width")
    parser.add_argument("--gamma", type=float, default=0.99)
    parser.add_argument("--entropy-coef", type=float, default=0.01)
    parser.add_argument("--value-coef", type=float, default=0.5)
    parser.add_argument("--reward-scale", type=float, default=0.1,
                        help="rewards are multiplied by this for the losses (reward normalisation)")
    parser.add_argument("--max-grad-norm", type=float, default=1.0)
    parser.add_argument("--smoke-updates", type=int, default=500,
                        help="with --smoke: gradients applied before comparing rewards")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--smoke", action="store_true",
                        help="a fixed number of updates; pass if the reward rose")
    args = parser.parse_args(argv)
    if min(args.num_workers, args.rollout_length, args.hidden) < 1:
        parser.error("--num-workers, --rollout-length, --hidden must be >= 1")
    smoke = args.smoke

    start = time.perf_counter()
    minray.init()
    cpus = int(minray.cluster_resources().get("CPU", 0))
    print(f"minray started a local cluster with {cpus} CPUs in {time.perf_counter() - start:.2f} s")

    torch.manual_seed(args.seed)
    master = PolicyValueNet(args.hidden)
    optimizer = torch.optim.Adam(master.parameters(), lr=args.lr)
    runners = [Runner.remote(args.seed * 1000 + i + 1, args.hidden, args.rollout_length,
                             args.gamma, args.entropy_coef, args.value_coef, args.reward_scale)
               for i in range(args.num_workers)]
    print(f"{args.num_workers} runners, rollouts of {args.rollout_length} steps, "
          f"hidden {args.hidden}, Adam lr {args.lr}, reward scale {args.reward_scale}", flush=True)

    run_start = time.perf_counter()
    weights = get_weights(master)
    pending = {r.compute_gradient.remote(weights): r for r in runners}
    episodes = []                         # every finished episode's reward, in arrival order
    recent = collections.deque(maxlen=100)
    updates = steps = 0
    last_report = run_start
    solved = False
    while True:
        ready, _ = minray.wait(list(pending), num_returns=1)
        ref = ready[0]
        runner = pending.pop(ref)
        grads, finished, n = minray.get(ref)
        # Apply this runner's gradient to the master network at once ...
        optimizer.zero_grad()
        for name, p in master.named_parameters():
            p.grad = torch.tensor(grads[name])
        nn.utils.clip_grad_norm_(master.parameters(), args.max_grad_norm)
        optimizer.step()
        updates += 1
        steps += n
        episodes.extend(finished)
        recent.extend(finished)
        mean100 = float(np.mean(recent)) if recent else 0.0
        now = time.perf_counter()
        elapsed = now - run_start
        if not smoke and len(recent) == 100 and mean100 >= args.target_reward:
            solved = True
            break
        if smoke and updates >= args.smoke_updates:
            break
        if not smoke and elapsed > args.max_seconds:
            break
        # ... and send the fresh weights to that runner only, with its next request.
        pending[runner.compute_gradient.remote(get_weights(master))] = runner
        if now - last_report >= (2.0 if smoke else 5.0):
            last_report = now
            print(f"{elapsed:6.1f} s: {updates:6d} updates, {steps:7d} steps, "
                  f"{len(episodes):5d} episodes, mean reward (last 100) {mean100:6.1f}", flush=True)

    elapsed = time.perf_counter() - run_start
    # Let the runners finish their last rollouts before shutting down.
    if pending:
        minray.wait(list(pending), num_returns=len(pending), timeout=30)
    minray.shutdown()
    print(f"{elapsed:6.1f} s: {updates:6d} updates, {steps:7d} steps, "
          f"{len(episodes):5d} episodes, mean reward (last 100) {mean100:6.1f}", flush=True)
    if smoke:
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
    if solved:
        print(f"solved: mean reward of the last 100 episodes {mean100:.1f} >= "
              f"{args.target_reward:g} after {len(episodes)} episodes, {steps} steps, "
              f"{updates} updates in {elapsed:.1f} s")
        return 0
    print(f"not solved: mean reward of the last 100 episodes {mean100:.1f} < "
          f"{args.target_reward:g} after {len(episodes)} episodes in {elapsed:.1f} s",
          file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
