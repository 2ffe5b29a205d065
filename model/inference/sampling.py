"""Choosing the next token from logits: greedy, temperature, top-k and top-p (nucleus), with a seed."""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Optional

import torch


@dataclass
class Sampling:
    temperature: float = 1.0  # 0: greedy (argmax); otherwise logits are divided by it before sampling
    top_k: int = 0            # keep only the k most likely tokens (0: all)
    top_p: float = 1.0        # keep the smallest set of tokens whose probability reaches p (1.0: all)
    seed: Optional[int] = None  # the sampling generator's seed (None: nondeterministic)

    def __post_init__(self) -> None:
        self.validate()   # a Sampling that exists can sample: no NaN surfacing later in a softmax

    def validate(self) -> "Sampling":
        """ValueError for a value that cannot sample. Each message starts with the field's name (callers that take
        the values as options rename it: pretrain/serve/generate.py)."""
        # NaN fails every comparison, so each check asks for what is valid rather than rejecting what is not.
        # Infinity is refused too: logits / inf are all 0, a uniform draw over the vocabulary whatever the model says.
        if not (isinstance(self.temperature, numbers.Real) and math.isfinite(self.temperature)
                and self.temperature >= 0):
            raise ValueError(f"temperature must be >= 0 and finite (0: greedy), got {self.temperature}")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, numbers.Integral) or self.top_k < 0:
            raise ValueError(f"top_k must be a whole number >= 0 (0: all tokens), got {self.top_k}")
        if not (isinstance(self.top_p, numbers.Real) and 0.0 < self.top_p <= 1.0):
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, numbers.Integral)
                                      or not -2**63 <= self.seed < 2**64):   # what torch.Generator can take
            raise ValueError(f"seed must be a whole number in [-2**63, 2**64) or None, got {self.seed!r}")
        return self

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def make_generator(sampling: Sampling, device: torch.device) -> Optional[torch.Generator]:
    if sampling.seed is None:
        return None
    gen = torch.Generator(device=device)
    gen.manual_seed(sampling.seed)
    return gen


def next_tokens(logits: torch.Tensor, sampling: Sampling, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """logits (B, V) -> (B,) token ids."""
    logits = logits.float()
    if sampling.greedy:
        return logits.argmax(dim=-1)
    # Shifted so that the largest logit is 0 before the division: a tiny temperature (1e-40) then sends the others
    # to -inf (a one-hot softmax) instead of every logit to ±inf (a NaN softmax). Shifting changes no probability.
    logits = (logits - logits.amax(dim=-1, keepdim=True)) / sampling.temperature
    if sampling.top_k > 0 and sampling.top_k < logits.shape[-1]:
        kth = torch.topk(logits, sampling.top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if sampling.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        # drop a token when the tokens before it already reach p (the most likely token always stays)
        drop = probs.cumsum(dim=-1) - probs >= sampling.top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
