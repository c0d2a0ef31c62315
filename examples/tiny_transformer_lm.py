"""A tiny transformer language model trained with zetaguard's gradient clipping advice and
periodic per-layer diagnostics.

Each step: backward, then ``guard.should_clip_gradients(grad_norm)`` decides whether this
step's gradient norm is out of line with the recent ones, and ``guard.recommended_clip_value()``
says where to clip; every ``--diag-every`` steps ``guard.full_diagnostics(model)`` prints the
per-layer table. The corpus is generated (a small synthetic grammar), so nothing downloads.

    python examples/tiny_transformer_lm.py              # well under a minute on a laptop CPU
    python examples/tiny_transformer_lm.py --steps 40   # a quick run
"""

from __future__ import annotations

import argparse
import math
import random

import torch
from torch import nn
from zetaguard import ZetaGuard

SUBJECTS = ["the cat", "a dog", "the bird", "my friend", "the robot"]
VERBS = ["sees", "likes", "chases", "finds", "helps"]
OBJECTS = ["the ball", "a fish", "the moon", "some bread", "the tree"]


def corpus(n: int, seed: int = 0) -> str:
    rng = random.Random(seed)
    return " ".join(
        f"{rng.choice(SUBJECTS)} {rng.choice(VERBS)} {rng.choice(OBJECTS)}." for _ in range(n)
    )


class TinyLM(nn.Module):
    def __init__(self, vocab: int, dim: int = 64, layers: int = 2, context: int = 64) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.pos = nn.Parameter(torch.zeros(context, dim))
        block = nn.TransformerEncoderLayer(
            dim, nhead=4, dim_feedforward=4 * dim, batch_first=True, dropout=0.0
        )
        self.blocks = nn.TransformerEncoder(block, num_layers=layers, enable_nested_tensor=False)
        self.head = nn.Linear(dim, vocab)
        mask = torch.triu(torch.full((context, context), float("-inf")), diagonal=1)
        self.register_buffer("mask", mask)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        t = idx.shape[1]
        h = self.embed(idx) + self.pos[:t]
        h = self.blocks(h, mask=self.mask[:t, :t], is_causal=True)
        return self.head(h)


def main(argv: list[str] | None = None) -> dict[str, float]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=250)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--diag-every", type=int, default=100)
    p.add_argument("--run-dir", default=None)
    args = p.parse_args(argv)

    torch.manual_seed(0)
    text = corpus(2000)
    chars = sorted(set(text))
    data = torch.tensor([chars.index(c) for c in text])
    context, batch = 64, 32
    model = TinyLM(len(chars), dim=48, context=context)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr)
    guard = ZetaGuard(warmup_steps=30, auto_recover=False, run_dir=args.run_dir)
    gen = torch.Generator().manual_seed(0)
    clipped = 0
    loss_value = math.nan
    for step in range(args.steps):
        starts = torch.randint(0, len(data) - context - 1, (batch,), generator=gen)
        x = torch.stack([data[s : s + context] for s in starts])
        y = torch.stack([data[s + 1 : s + context + 1] for s in starts])
        loss = nn.functional.cross_entropy(model(x).reshape(-1, len(chars)), y.reshape(-1))
        opt.zero_grad()
        loss.backward()
        grad_norm = float(nn.utils.clip_grad_norm_(model.parameters(), math.inf))
        if guard.should_clip_gradients(grad_norm):
            limit = guard.recommended_clip_value()
            if limit is not None:
                nn.utils.clip_grad_norm_(model.parameters(), limit)
                clipped += 1
        opt.step()
        result = guard.monitor(model, loss=loss, grad_norm=grad_norm)
        loss_value = float(loss.detach())
        if step % 50 == 0:
            clip = guard.recommended_clip_value()
            clip_text = "n/a" if clip is None else f"{clip:.3f}"
            print(
                f"step {step}: loss {loss_value:.3f} grad {grad_norm:.3f} clip at {clip_text} {result.status}"
            )
        if args.diag_every and step > 0 and step % args.diag_every == 0:
            print(guard.full_diagnostics(model))
    guard.close()  # commit the run store
    print(
        f"done: final loss {loss_value:.3f} (uniform would be {math.log(len(chars)):.3f}); clipped {clipped} steps"
    )
    return {"final_loss": loss_value, "clipped": clipped, "vocab": len(chars)}


if __name__ == "__main__":
    main()
