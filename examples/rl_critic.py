"""A CrossQ-style critic: Batch Renorm in a SAC critic, BatchNorm for a warm-up, then rmax 3 / dmax 5.

CrossQ (Bhatt et al., ICLR 2024) drops SAC's target networks and normalizes the critics with Batch
Renorm. Two things make that work, and both are below:

- the current (s, a) and next (s', a') batches go through each critic in ONE training forward, so both
  halves are normalized with the same statistics (the target is then taken from the detached second half);
- the renorm layers train as plain BatchNorm for W optimizer steps while the moving averages settle, then
  switch to rmax 3, dmax 5 at once (`RenormScheduler.warmup`; CrossQ uses W = 100k).

The transitions come from a made-up linear system and the next actions from a fixed random policy, so no
simulator is needed: this shows the critic update, not a full agent.

    python examples/rl_critic.py                       # 600 updates, warm-up 400
    python examples/rl_critic.py --steps 30 --warmup 20 --hidden 32 --batch 64
"""

from __future__ import annotations

import argparse
import math

import torch
from torch import nn

import brn_cli


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=600, help="critic updates (optimizer steps)")
    p.add_argument("--warmup", type=int, default=400, help="BatchNorm steps before rmax 3 / dmax 5")
    p.add_argument("--batch", type=int, default=256, help="transitions per update")
    p.add_argument("--hidden", type=int, default=256, help="width of the critic's two hidden layers")
    p.add_argument("--obs-dim", type=int, default=17)
    p.add_argument("--act-dim", type=int, default=6)
    p.add_argument("--log-every", type=int, default=100)
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args()


def make_critic(in_features: int, hidden: int) -> nn.Sequential:
    """CrossQ's Q-network: a renorm layer on the (s, a) input, then Linear -> ReLU -> renorm, twice."""
    return nn.Sequential(
        brn_cli.BatchRenorm1d(in_features, momentum=0.01),  # CrossQ's momentum 0.99 in Flax's convention
        nn.Linear(in_features, hidden),
        nn.ReLU(),
        brn_cli.BatchRenorm1d(hidden, momentum=0.01),
        nn.Linear(hidden, hidden),
        nn.ReLU(),
        brn_cli.BatchRenorm1d(hidden, momentum=0.01),
        nn.Linear(hidden, 1),
    )


class ReplayBuffer:
    """Random transitions of s' = A s + B a + noise, reward -0.1 (mean s^2 + 0.1 mean a^2)."""

    def __init__(self, size: int, obs_dim: int, act_dim: int, gen: torch.Generator) -> None:
        a_matrix = torch.randn(obs_dim, obs_dim, generator=gen) * 0.9 / math.sqrt(obs_dim)
        b_matrix = torch.randn(act_dim, obs_dim, generator=gen) * 0.5
        self.obs = torch.randn(size, obs_dim, generator=gen) * 2.0 + 1.0
        self.act = torch.rand(size, act_dim, generator=gen) * 2 - 1
        noise = torch.randn(size, obs_dim, generator=gen) * 0.1
        self.next_obs = self.obs @ a_matrix + self.act @ b_matrix + noise
        self.reward = -0.1 * (
            self.obs.pow(2).mean(1, keepdim=True) + 0.1 * self.act.pow(2).mean(1, keepdim=True)
        )
        self.done = (torch.rand(size, 1, generator=gen) < 0.01).float()

    def sample(self, batch: int, gen: torch.Generator) -> tuple[torch.Tensor, ...]:
        i = torch.randint(0, len(self.obs), (batch,), generator=gen)
        return self.obs[i], self.act[i], self.reward[i], self.next_obs[i], self.done[i]


def policy_sample(policy: nn.Module, obs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A tanh-Gaussian action and its log-probability, as SAC's actor draws them."""
    mean, log_std = policy(obs).chunk(2, dim=-1)
    std = log_std.clamp(-5, 2).exp()
    u = mean + std * torch.randn_like(mean)
    action = torch.tanh(u)
    log_prob = torch.distributions.Normal(mean, std).log_prob(u) - torch.log1p(-action.pow(2) + 1e-6)
    return action, log_prob.sum(-1, keepdim=True)


def main() -> None:
    args = parse_args()
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    gamma, alpha = 0.99, 0.1  # discount, entropy temperature (fixed here)

    buffer = ReplayBuffer(50_000, args.obs_dim, args.act_dim, gen)
    policy = nn.Sequential(nn.Linear(args.obs_dim, 64), nn.ReLU(), nn.Linear(64, 2 * args.act_dim))
    critics = nn.ModuleList(make_critic(args.obs_dim + args.act_dim, args.hidden) for _ in range(2))
    optimizer = torch.optim.Adam(critics.parameters(), lr=1e-3, betas=(0.5, 0.999))  # CrossQ's Adam betas
    scheduler = brn_cli.RenormScheduler.warmup(
        critics, optimizer, warmup_steps=args.warmup, rmax=3.0, dmax=5.0
    )

    critics.train()
    for step in range(args.steps):
        obs, act, reward, next_obs, done = buffer.sample(args.batch, gen)
        with torch.no_grad():
            next_act, next_log_prob = policy_sample(policy, next_obs)
        # One forward per critic over [(s, a); (s', a')]: both halves share the batch statistics.
        joint = torch.cat([torch.cat([obs, act], 1), torch.cat([next_obs, next_act], 1)])
        q_now, q_next = zip(*(critic(joint).split(args.batch) for critic in critics), strict=True)
        next_value = torch.min(torch.stack(q_next), dim=0).values - alpha * next_log_prob
        target = (reward + gamma * (1.0 - done) * next_value).detach()  # no target network in CrossQ
        loss = sum(nn.functional.mse_loss(q, target) for q in q_now)

        rmax, dmax = scheduler.values()  # the limits this update trains with
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()  # advances the scheduler
        if step % args.log_every == 0 or step == args.steps - 1:
            telemetry = brn_cli.collect_telemetry(critics)
            print(
                f"update {step:5d}  rmax {rmax:g} dmax {dmax:g}  critic loss {loss.item():10.4f}  "
                f"mean |log r| {telemetry['mean_abs_log_r']:.3f}  mean |d| {telemetry['mean_abs_d']:.3f}"
            )

    rmax, dmax = scheduler.values()
    print(
        f"after {scheduler.step} updates: rmax {rmax:g}, dmax {dmax:g} (BatchNorm for the first {args.warmup})"
    )
    print(f"final critic loss {loss.item():.4f} ({'finite' if math.isfinite(loss.item()) else 'NOT finite'})")


if __name__ == "__main__":
    main()
