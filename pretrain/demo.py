"""Smoke demo: build a tiny MoR, train it on a fixed batch of random tokens on CPU, and show it learning.

    python -m pretrain.demo [CONFIG] [key=value ...] [--steps N]

Prints the model's parameter counts and training FLOPs per token (against a vanilla model of equal depth),
then the loss and per-recursion router statistics as it falls. A fixed batch is memorised, so the loss drops
far below ln(vocab) within a few dozen steps.
"""
from __future__ import annotations

import argparse
import json
import math
import time

import torch

from conf import cli_errors, load_config
from model.config import ModelConfig
from model.inspect import describe
from model.mor import MoRModel
from pretrain.parallel import init_single_process


def train_fixed_batch(cfg: ModelConfig, *, steps: int, batch: int = 4, seq_len: int = 64, lr: float = 3e-3,
                      seed: int = 0, log_every: int = 0) -> list[float]:
    """AdamW on one fixed batch of random tokens; returns the loss of every step."""
    torch.manual_seed(seed)
    model = MoRModel(cfg)
    tokens = torch.randint(0, cfg.vocab_size, (batch, seq_len + 1))
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.0)
    losses: list[float] = []
    start = time.perf_counter()
    for step in range(1, steps + 1):
        out = model(tokens[:, :-1], tokens[:, 1:])
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if hasattr(model.router, "update_bias"):
            model.router.update_bias()
        losses.append(out.lm_loss.item())
        if log_every and (step % log_every == 0 or step == 1):
            rate = step * batch * seq_len / (time.perf_counter() - start)
            router = " ".join(f"{k}={v.item():.3g}" for k, v in out.router_stats.items()
                              if k.endswith(("kept_frac", "gate_mean")))
            print(f"step {step:4d}  loss {losses[-1]:.4f}  aux {out.aux_loss.item():.2e}  {rate:,.0f} tok/s  {router}")
    return losses


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m pretrain.demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("config", nargs="?", default="tiny_mor_ec", help="YAML file or preset (default tiny_mor_ec)")
    parser.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. router.alpha=0.2")
    parser.add_argument("--steps", type=int, default=50, help="training steps (default 50)")
    parser.add_argument("--seq-len", type=int, default=64, help="tokens per sequence (default 64)")
    args = parser.parse_args(argv)
    with cli_errors():
        cfg = load_config(args.config, args.overrides)
    init_single_process()
    print(json.dumps(describe(cfg, args.seq_len), indent=2))
    losses = train_fixed_batch(cfg, steps=args.steps, seq_len=args.seq_len, log_every=10)
    print(f"loss {losses[0]:.3f} -> {losses[-1]:.3f} in {len(losses)} steps "
          f"(ln vocab = {math.log(cfg.vocab_size):.3f})")


if __name__ == "__main__":
    main()
