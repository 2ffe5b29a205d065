"""A tiny MoR must be able to learn: memorising one fixed batch halves its loss well within 200 steps."""
from __future__ import annotations

import pytest

from pretrain.demo import train_fixed_batch
from tests.model.helpers import tiny


@pytest.mark.parametrize("routing", ["expert_choice", "token_choice"])
def test_tiny_mor_overfits_a_fixed_batch(routing):
    losses = train_fixed_batch(tiny(routing=routing), steps=200, batch=4, seq_len=32)
    assert losses[-1] < 0.5 * losses[0], (losses[0], losses[-1])
