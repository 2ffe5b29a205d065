"""Validation loss and perplexity on the manifest's validation split."""
from __future__ import annotations

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps

from pretrain.data.loader import TokenLoader
from pretrain.parallel.engine import Engine


@torch.no_grad()
def validation_loss(engine: Engine, loader: TokenLoader, max_batches: int) -> float:
    """Mean next-token loss (without router losses) per real token over the first ``max_batches`` micro-batches
    of each DP rank's share of the validation split, all DP ranks together; identical on every rank. Batches
    weigh by their real tokens (padding labels count nowhere), so a short or padded last batch counts as much as
    it holds."""
    batches = []
    for i, (tokens, labels) in enumerate(loader):
        if i >= max_batches:
            break
        batches.append((tokens.to(engine.device), labels.to(engine.device)))
    total = engine.eval_sums(batches)
    dist.all_reduce(total, group=ps.get_data_parallel_group())
    return (total[0] / total[1].clamp(min=1)).item()
