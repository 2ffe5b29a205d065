"""Next-token cross-entropy over (possibly vocab-parallel) logits."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

from model.layers import tp_group, tp_world_size

# The label of a position that counts nowhere: the padding of a split's last sample (pretrain/data/readers.py).
# torch's own default ignore_index, so F.cross_entropy needs no extra argument to agree.
IGNORE_INDEX = -100


def lm_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, *, loss_mask: Optional[torch.Tensor] = None,
                     reduction: str = "none", force_vocab_parallel: bool = False) -> torch.Tensor:
    """Next-token loss from logits (B, T, V / TP) and labels (B, T), computed in fp32.

    ``reduction="none"``: the per-token loss (B, T), 0 (with no gradient) where the label is ``IGNORE_INDEX``.
    ``reduction="mean"``: the mean over the labels that count, weighted by ``loss_mask`` when given; padding
    never enters the count, so a batch holding padding weighs its real tokens as one without.

    With the vocabulary split over tensor-parallel ranks this is megatron-core's vocab-parallel cross-entropy.
    With one rank it is torch's own, which torch.compile fuses into a few passes over the logits instead of the
    many separate fp32 passes the parallel version makes; the tests check the two agree.
    """
    if reduction not in ("none", "mean"):
        raise ValueError(f"reduction={reduction!r}: expected 'none' or 'mean'")
    ignored = labels == IGNORE_INDEX
    if tp_world_size() > 1 or force_vocab_parallel:
        logits32 = logits.float()
        # megatron's version knows no ignore index: a label outside a rank's vocabulary slice reads as "another
        # rank's", so -100 would give log-sum-exp as the loss, not 0. Give it a valid label and drop the result.
        # It also writes into its input: hand it a private copy (one copy, not two).
        per_token = vocab_parallel_cross_entropy(logits32 if logits32 is not logits else logits.clone(),
                                                 labels.masked_fill(ignored, 0)).masked_fill(ignored, 0.0)
    else:
        per_token = F.cross_entropy(logits.flatten(0, -2).float(), labels.flatten(), ignore_index=IGNORE_INDEX,
                                    reduction="none").view(labels.shape)
    if reduction == "none":
        return per_token
    weight = label_weights(labels, loss_mask)
    # clamp: a batch of nothing but padding (impossible from our shards, which keep a real label in the padded
    # sample) gives 0, not NaN; no host sync either way
    return (per_token * weight).sum() / weight.sum().clamp(min=1.0)


def label_weights(labels: torch.Tensor, loss_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """(B, T) fp32: each label's weight in the mean loss — ``loss_mask`` (1 without one), 0 for IGNORE_INDEX."""
    weight = (labels != IGNORE_INDEX).float()
    return weight if loss_mask is None else weight * loss_mask.float()


def label_is_argmax(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """(B, T) bool: the label's logit is the largest of its row (lm-eval's ``is_greedy``, token by token), over the
    whole vocabulary when it is split over tensor-parallel ranks. Exact: the label's logit is one of the values the
    maximum is taken over, and the ranks that do not hold it add zeros. ``IGNORE_INDEX`` labels give False."""
    logits = logits.float()
    ignored = labels == IGNORE_INDEX
    if tp_world_size() == 1:
        picked = logits.gather(-1, labels.masked_fill(ignored, 0)[..., None])[..., 0]
        top = logits.amax(dim=-1)
    else:
        group = tp_group()
        width = logits.shape[-1]
        first = torch.distributed.get_rank(group) * width       # this rank's slice of the (padded) vocabulary
        local = labels - first
        mine = (local >= 0) & (local < width) & ~ignored
        picked = logits.gather(-1, local.clamp(0, width - 1)[..., None])[..., 0].masked_fill(~mine, 0.0)
        top = logits.amax(dim=-1)
        torch.distributed.all_reduce(picked, group=group)
        torch.distributed.all_reduce(top, op=torch.distributed.ReduceOp.MAX, group=group)
    return (picked >= top) & ~ignored
