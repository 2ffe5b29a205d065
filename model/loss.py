"""Next-token cross-entropy over (possibly vocab-parallel) logits."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

from model.layers import tp_world_size


def lm_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, *, force_vocab_parallel: bool = False) -> torch.Tensor:
    """Per-token loss (B, T) from logits (B, T, V / TP), computed in fp32.

    With the vocabulary split over tensor-parallel ranks this is megatron-core's vocab-parallel cross-entropy.
    With one rank it is torch's own, which torch.compile fuses into a few passes over the logits instead of the
    many separate fp32 passes the parallel version makes; the tests check the two agree.
    """
    if tp_world_size() > 1 or force_vocab_parallel:
        logits32 = logits.float()
        # megatron's version writes into its input: hand it a private copy (one copy, not two).
        return vocab_parallel_cross_entropy(logits32 if logits32 is not logits else logits.clone(), labels)
    return F.cross_entropy(logits.flatten(0, -2).float(), labels.flatten(), reduction="none").view(labels.shape)
