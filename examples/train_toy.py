"""Train a toy model whose attention layer is the generated NSA layer, and print a falling loss.

    python examples/train_toy.py [spec.yaml]      # default specs/nsa_small.yaml

The task: each sequence repeats a random 8-token pattern, so from the second period on the next token is the one
8 positions back; a one-layer model learns to copy it through attention. On the CPU the few steps see one fixed
batch (the loss falls as the model fits it); on a GPU every step draws a fresh batch. `specgen.load` builds the spec's module
(FlashInfer-style JIT, cached) and `NSAttention` is a full layer: q/k/v/o projections, the branch gates and, for a
`pool: linear` spec, the learned pool. Without a GPU the kernels run under Triton's CPU interpreter at tiny shapes
(about a minute); on a GPU the same script trains at larger shapes under bf16 autocast.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before any kernel is defined

import specgen  # noqa: E402


class ToyModel(torch.nn.Module):
    def __init__(self, nsa, vocab: int, hidden: int):
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, hidden)
        self.norm1 = torch.nn.RMSNorm(hidden)
        self.attn = nsa.NSAttention(hidden)          # the generated layer: hidden -> hidden
        self.norm2 = torch.nn.RMSNorm(hidden)
        self.mlp = torch.nn.Sequential(torch.nn.Linear(hidden, 4 * hidden), torch.nn.GELU(),
                                       torch.nn.Linear(4 * hidden, hidden))
        self.head = torch.nn.Linear(hidden, vocab)

    def forward(self, tokens):
        x = self.embed(tokens)
        x = x + self.attn(self.norm1(x))
        x = x + self.mlp(self.norm2(x))
        return self.head(x)


def batch(B: int, T: int, vocab: int, period: int, device, gen):
    pattern = torch.randint(0, vocab, (B, period), generator=gen)
    tokens = pattern.repeat(1, -(-(T + 1) // period))[:, :T + 1].to(device)
    return tokens[:, :-1], tokens[:, 1:]


def main() -> None:
    spec = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().parent.parent / "specs/nsa_small.yaml"
    nsa = specgen.load(spec)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    # CPU (interpreter): one batch of 2 x 32 tokens, 10 steps. GPU: 8 x 2048 fresh tokens a step, 200 steps, bf16
    # autocast.
    B, T, steps, lr = (2, 32, 10, 3e-3) if device == "cpu" else (8, 2048, 200, 3e-3)
    vocab, hidden, period = 16, 64, 8
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    model = ToyModel(nsa, vocab, hidden).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    print(f"spec {nsa.SPEC_NAME} ({nsa.DTYPE}), device {device}, B={B}, T={T}")
    inputs, targets = batch(B, T, vocab, period, device, gen)
    for step in range(steps):
        start = time.time()
        if device == "cuda":
            inputs, targets = batch(B, T, vocab, period, device, gen)
        with torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=device == "cuda"):
            logits = model(inputs)
        # Only positions after the first period are predictable.
        loss = torch.nn.functional.cross_entropy(logits[:, period:].float().flatten(0, 1), targets[:, period:].flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        print(f"step {step:3d}  loss {loss.item():.4f}  ({time.time() - start:.1f} s)")


if __name__ == "__main__":
    main()
