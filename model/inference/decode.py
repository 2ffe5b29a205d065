"""Generation: prefill a batch of prompts, then decode token by token with the model's KV cache.

Routing is the causal, per-token rule (``MoRModel.forward(..., causal_routing=True)``), so a prompt's logits do
not depend on what follows it, nor on the other prompts of the batch. Prompts of different lengths are prefilled
together, right-padded (the padding is neither cached nor attended to); a sequence that has stopped (EOS or its
length) feeds no more tokens while the others go on.
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch

from model.inference.cache import KVCache
from model.inference.sampling import Sampling, make_generator, next_tokens
from model.mor import MoRModel


def prefill(model: MoRModel, cache: KVCache, prompts: Sequence[Sequence[int]]) -> torch.Tensor:
    """Run the prompts (one per cache row) through the model into the cache; (B, P, V) logits of the padded
    batch (row b's prompt logits are the first len(prompts[b]))."""
    device = cache.device
    lengths = torch.tensor([len(p) for p in prompts], device=device)
    tokens = torch.zeros(len(prompts), int(lengths.max()), dtype=torch.long, device=device)
    for i, p in enumerate(prompts):
        tokens[i, :len(p)] = torch.tensor(list(p), dtype=torch.long)
    return model(tokens, cache=cache, lengths=lengths).logits


def decode_step(model: MoRModel, cache: KVCache, tokens: torch.Tensor, live: torch.Tensor) -> torch.Tensor:
    """One token per sequence, (B,), cached where ``live`` (B,) bool is True; (B, V) logits."""
    return model(tokens[:, None], cache=cache, lengths=live.long()).logits[:, 0]


@torch.no_grad()
def generate(model: MoRModel, prompts: Sequence[Sequence[int]], max_new_tokens: int, *,
             sampling: Optional[Sampling] = None, eos_id: Optional[int] = None,
             on_token: Optional[Callable[[int, int], None]] = None,
             cache_dtype: Optional[torch.dtype] = None) -> list[list[int]]:
    """The new tokens of each prompt (EOS included when it stops there); a sequence also stops at the model's
    ``max_seq_len``. ``on_token(i, token)`` is called for every token as it is made, prompt ``i`` of the batch."""
    sampling = (sampling or Sampling()).validate()
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    limit = model.cfg.max_seq_len
    if max(len(p) for p in prompts) > limit:
        raise ValueError(f"a prompt is longer than the model's max_seq_len={limit} tokens")
    was_training = model.training
    model.eval()
    param = next(model.parameters())
    generator = make_generator(sampling, param.device)
    max_len = min(limit, max(len(p) for p in prompts) + max_new_tokens)
    cache = KVCache(model.cfg, len(prompts), max_len, dtype=cache_dtype or param.dtype, device=param.device)
    out: list[list[int]] = [[] for _ in prompts]
    lengths = torch.tensor([len(p) for p in prompts], device=param.device)
    try:
        logits = prefill(model, cache, prompts)
        last = logits[torch.arange(len(prompts), device=param.device), lengths - 1]
        live = torch.ones(len(prompts), dtype=torch.bool, device=param.device)
        for _ in range(max_new_tokens):
            new = next_tokens(last, sampling, generator)
            for i, tok in enumerate(new.tolist()):
                if not live[i]:
                    continue
                out[i].append(tok)
                if on_token is not None:
                    on_token(i, tok)
                if (eos_id is not None and tok == eos_id) or len(prompts[i]) + len(out[i]) >= max_len:
                    live[i] = False
            if not bool(live.any()):
                break
            last = decode_step(model, cache, new, live)
    finally:
        model.train(was_training)
    return out
