"""A GAN whose generator zetaguard watches: on DRIFT the training is rebalanced.

A small GAN learns a ring of eight 2-D Gaussians (generated data, nothing to download). GANs
lose balance when one player runs away from the other; the guard watches the generator's
parameter trajectory and, when its status leaves STABLE, rebalances: the discriminator gets
extra steps and the generator's learning rate is halved for a cool-down period, then restored.

    python examples/gan_rebalance.py              # well under a minute on a laptop CPU
    python examples/gan_rebalance.py --steps 60   # a quick run
    python examples/gan_rebalance.py --run-dir zetaguard_runs   # then: zeta-dashboard
"""

from __future__ import annotations

import argparse
import math

import torch
from torch import nn
from zetaguard import ZetaGuard


def ring_of_gaussians(n: int, gen: torch.Generator) -> torch.Tensor:
    k = torch.randint(0, 8, (n,), generator=gen).float()
    angle = 2 * math.pi * k / 8
    centres = torch.stack([torch.cos(angle), torch.sin(angle)], dim=1) * 2.0
    return centres + 0.05 * torch.randn(n, 2, generator=gen)


def main(argv: list[str] | None = None) -> dict[str, int]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--run-dir", default=None)
    p.add_argument(
        "--g-lr", type=float, default=2e-3, help="a high generator LR makes DRIFT likely"
    )
    args = p.parse_args(argv)

    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    G = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 2))
    D = nn.Sequential(
        nn.Linear(2, 32), nn.LeakyReLU(0.2), nn.Linear(32, 32), nn.LeakyReLU(0.2), nn.Linear(32, 1)
    )
    opt_g = torch.optim.Adam(G.parameters(), lr=args.g_lr, betas=(0.5, 0.999))
    opt_d = torch.optim.Adam(D.parameters(), lr=1e-3, betas=(0.5, 0.999))
    bce = nn.BCEWithLogitsLoss()
    # The guard watches the generator only; recovery is this script's own rebalancing.
    guard = ZetaGuard(warmup_steps=50, auto_recover=False, run_dir=args.run_dir, run_name=None)
    cooldown = 0
    rebalances = 0
    counts = {"STABLE": 0, "DRIFT": 0, "CRITICAL": 0}
    for step in range(args.steps):
        d_steps = 2 if cooldown > 0 else 1
        for _ in range(d_steps):
            real = ring_of_gaussians(128, gen)
            fake = G(torch.randn(128, 8, generator=gen)).detach()
            loss_d = bce(D(real), torch.ones(128, 1)) + bce(D(fake), torch.zeros(128, 1))
            opt_d.zero_grad()
            loss_d.backward()
            opt_d.step()
        fake = G(torch.randn(128, 8, generator=gen))
        loss_g = bce(D(fake), torch.ones(128, 1))
        opt_g.zero_grad()
        loss_g.backward()
        opt_g.step()

        # No loss channel: an adversarial loss is not minimised, so its rises are not alarms.
        result = guard.monitor(G)
        counts[result.status] += 1
        if result.status != "STABLE" and cooldown == 0:
            # Rebalance: the discriminator catches up while the generator slows down.
            rebalances += 1
            cooldown = 50
            for group in opt_g.param_groups:
                group["lr"] = max(group["lr"] * 0.5, args.g_lr * 0.1)
            print(
                f"step {step}: generator {result.status} (zeta {result.zeta_value:.2f}, worst "
                f"{result.worst_group}) -> 2 D steps per G step, G lr {opt_g.param_groups[0]['lr']:.2e}"
            )
        elif cooldown > 0:
            cooldown -= 1
            if cooldown == 0:  # balance restored: the generator gets its speed back
                for group in opt_g.param_groups:
                    group["lr"] = args.g_lr
        if step % 100 == 0:
            print(
                f"step {step}: loss D {loss_d.item():.3f} G {loss_g.item():.3f} status {result.status}"
            )
    with torch.no_grad():
        sample = G(torch.randn(2000, 8, generator=gen))
    radius = sample.norm(dim=1).mean().item()
    guard.close()  # commit the run store
    print(f"done: {counts}, rebalances {rebalances}, mean sample radius {radius:.2f} (target 2.0)")
    return {**counts, "rebalances": rebalances}


if __name__ == "__main__":
    main()
