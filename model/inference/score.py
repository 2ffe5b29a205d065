"""Loglikelihood scoring of continuations, as few-shot evaluation asks of a model (lm-eval's ``loglikelihood``).

Each request is a context and a continuation (token ids). The model reads context + continuation with causal
routing through the KV cache's prefill (model/inference/decode.py), so no reported number comes from routing that
reads the future; requests are batched by length (longest first, right-padded: padding is neither cached nor
seen) and returned in their own order. A request longer than the model's ``max_seq_len`` keeps its last
``max_seq_len`` + 1 tokens, as lm-eval does; a continuation longer than that window (lm-eval refuses it) is scored
on the tokens the window holds after its first, and ``tokens`` says how many.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch

from model.inference.cache import KVCache
from model.inference.decode import prefill
from model.mor import MoRModel


@dataclass
class Scored:
    logprob: float   # Σ over the continuation's tokens of log p(token | everything before it)
    greedy: bool     # every continuation token is the most likely one (lm-eval's is_greedy)
    tokens: int      # continuation tokens scored


def window(context: Sequence[int], continuation: Sequence[int], max_seq_len: int, index: int = 0
           ) -> tuple[list[int], int]:
    """(ids, n): the last ``max_seq_len`` + 1 tokens of context + continuation (the last token is only a target)
    and how many of their last tokens are the continuation's that get scored. ``index`` names the request in
    errors."""
    if not continuation:
        raise ValueError(f"request {index}: an empty continuation")
    if not context:
        raise ValueError(f"request {index}: a continuation needs at least one token before it (the context)")
    ids = (list(context) + list(continuation))[-(max_seq_len + 1):]
    return ids, min(len(continuation), len(ids) - 1)


@torch.no_grad()
def score(model: MoRModel, requests: Sequence[tuple[Sequence[int], Sequence[int]]], *, batch_size: int = 16,
          progress: Optional[Callable[[int], None]] = None) -> list[Scored]:
    """Scores of (context, continuation) pairs; ``progress(n)`` after each batch of n requests."""
    seqs = [window(context, continuation, model.cfg.max_seq_len, i) for i, (context, continuation)
            in enumerate(requests)]
    order = sorted(range(len(seqs)), key=lambda i: -len(seqs[i][0]))
    out: list[Optional[Scored]] = [None] * len(seqs)
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    try:
        for start in range(0, len(order), batch_size):
            batch = order[start:start + batch_size]
            inputs = [seqs[i][0][:-1] for i in batch]             # the model predicts ids[1:] from ids[:-1]
            cache = KVCache(model.cfg, len(batch), max(len(x) for x in inputs), device=device,
                            dtype=next(model.parameters()).dtype)
            logprobs = torch.log_softmax(prefill(model, cache, inputs).float(), dim=-1)
            for row, i in enumerate(batch):
                ids, n = seqs[i]
                targets = torch.tensor(ids[-n:], device=device)
                lp = logprobs[row, len(ids) - 1 - n:len(ids) - 1]      # the positions that predict the targets
                out[i] = Scored(float(lp.gather(-1, targets[:, None]).sum()),
                                bool((lp.argmax(dim=-1) == targets).all()), n)
            if progress is not None:
                progress(len(batch))
    finally:
        model.train(was_training)
    return out  # type: ignore[return-value]
