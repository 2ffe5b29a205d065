"""Greedy sampling for demos and smoke checks.

Each new token reruns the model over the whole prefix (no KV cache). Routing is the training routing applied to
the known prefix, so no position ever sees a token that comes after the prefix; the cached, per-token causal
inference path is separate work.
"""
from __future__ import annotations

import torch

from model.mor import MoRModel


@torch.no_grad()
def greedy(model: MoRModel, prompt: list[int], max_new_tokens: int, *, eos_id: int | None = None) -> list[int]:
    """Token ids of ``prompt`` followed by up to ``max_new_tokens`` greedy continuations (stops at eos)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    ids = list(prompt)
    for _ in range(max_new_tokens):
        window = ids[-model.cfg.max_seq_len:]
        logits = model(torch.tensor([window], device=device)).logits[0, -1]
        nxt = int(logits.argmax())
        ids.append(nxt)
        if eos_id is not None and nxt == eos_id:
            break
    model.train(was_training)
    return ids
