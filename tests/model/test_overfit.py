"""A tiny MoR must be able to learn: memorising one fixed batch halves its loss well within 200 steps."""
from __future__ import annotations

import pytest
import torch

from model.config import ModelConfig
from model.mor import MoRModel
from tests.model.helpers import tiny


def train_fixed_batch(cfg: ModelConfig, *, steps: int, batch: int = 4, seq_len: int = 32, lr: float = 3e-3,
                      seed: int = 0) -> list[float]:
    """AdamW on one fixed batch of random tokens; returns the loss of every step."""
    torch.manual_seed(seed)
    model = MoRModel(cfg)
    tokens = torch.randint(0, cfg.vocab_size, (batch, seq_len + 1))
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.0)
    losses = []
    for step in range(steps):
        model.begin_step(step)
        out = model(tokens[:, :-1], tokens[:, 1:])
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        model.end_step()
        losses.append(out.lm_loss.item())
    return losses


@pytest.mark.slow
@pytest.mark.parametrize("routing", ["expert_choice", "token_choice"])
def test_tiny_mor_overfits_a_fixed_batch(routing):
    losses = train_fixed_batch(tiny(routing=routing), steps=200)
    assert losses[-1] < 0.5 * losses[0], (losses[0], losses[-1])
