"""A policy-gradient agent (REINFORCE) on gymnasium's CartPole whose exploration and learning
rate are damped whenever zetaguard says the policy left STABLE.

Policy-gradient updates are noisy; a run of lucky or unlucky episodes can throw the policy far
off. The guard watches the policy network after each update: on DRIFT or CRITICAL the learning
rate is halved and the entropy bonus (the exploration pressure) is cut, then both recover slowly
while the status stays STABLE.

    python examples/cartpole_policy_gradient.py               # well under a minute on a laptop CPU
    python examples/cartpole_policy_gradient.py --episodes 20 # a quick run
"""

from __future__ import annotations

import argparse

import gymnasium as gym
import torch
from torch import nn
from zetaguard import ZetaGuard


def main(argv: list[str] | None = None) -> dict[str, float]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--episodes", type=int, default=200)
    p.add_argument("--lr", type=float, default=1e-2)
    p.add_argument("--run-dir", default=None)
    args = p.parse_args(argv)

    torch.manual_seed(0)
    env = gym.make("CartPole-v1")
    policy = nn.Sequential(nn.Linear(4, 64), nn.Tanh(), nn.Linear(64, 2))
    opt = torch.optim.Adam(policy.parameters(), lr=args.lr)
    guard = ZetaGuard(warmup_steps=20, auto_recover=False, run_dir=args.run_dir)
    base_lr, entropy_coef, base_entropy = args.lr, 0.01, 0.01
    returns: list[float] = []
    damped = 0
    for episode in range(args.episodes):
        obs, _ = env.reset(seed=episode)
        log_probs, entropies, rewards = [], [], []
        done = False
        while not done:
            logits = policy(torch.as_tensor(obs, dtype=torch.float32))
            dist = torch.distributions.Categorical(logits=logits)
            action = dist.sample()
            log_probs.append(dist.log_prob(action))
            entropies.append(dist.entropy())
            obs, reward, terminated, truncated, _ = env.step(int(action))
            rewards.append(float(reward))
            done = terminated or truncated
        # Discounted returns, normalised: the usual REINFORCE baseline.
        g, discounted = 0.0, []
        for r in reversed(rewards):
            g = r + 0.99 * g
            discounted.append(g)
        ret = torch.tensor(discounted[::-1])
        ret = (ret - ret.mean()) / (ret.std() + 1e-8) if len(ret) > 1 else ret
        loss = -(torch.stack(log_probs) * ret).sum() - entropy_coef * torch.stack(entropies).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
        returns.append(sum(rewards))

        result = guard.monitor(policy, loss=loss)
        lr = opt.param_groups[0]["lr"]
        if result.status != "STABLE":
            damped += 1
            lr, entropy_coef = max(lr * 0.5, base_lr * 0.05), entropy_coef * 0.5
            print(
                f"episode {episode}: {result.status} (zeta {result.zeta_value:.2f}) -> lr {lr:.2e}, "
                f"entropy bonus {entropy_coef:.4f}"
            )
        else:  # recover slowly towards the base settings
            lr, entropy_coef = min(base_lr, lr * 1.05), min(base_entropy, entropy_coef * 1.05)
        for group in opt.param_groups:
            group["lr"] = lr
        if episode % 50 == 0:
            recent = sum(returns[-20:]) / len(returns[-20:])
            print(f"episode {episode}: mean return (last 20) {recent:.1f}, status {result.status}")
    env.close()
    final = sum(returns[-20:]) / len(returns[-20:])
    guard.close()  # commit the run store
    print(f"done: mean return over the last 20 episodes {final:.1f}; damped {damped} times")
    return {"final_return": final, "damped": damped, "episodes": len(returns)}


if __name__ == "__main__":
    main()
