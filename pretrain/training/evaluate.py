"""Validation loss and perplexity on the manifest's validation split."""
from __future__ import annotations

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps
from megatron.core.pipeline_parallel import get_forward_backward_func

from model.program import packed_rows
from pretrain.data.loader import TokenLoader, label_count
from pretrain.parallel.pipeline import forward_step


@torch.no_grad()
def validation_loss(trainer, max_batches: int) -> float:
    """Mean next-token loss (without router losses) per real token over the first ``max_batches`` micro-batches
    of each DP rank's share of the validation split, all DP ranks together; identical on every rank. Batches
    weigh by their real tokens (padding labels count nowhere), so a short or padded last batch counts as much as
    it holds."""
    cfg = trainer.cfg
    loader = TokenLoader(cfg.data.path, split="val", micro_batch_size=cfg.parallel.micro_batch_size, seed=0,
                         dp_rank=ps.get_data_parallel_rank(), dp_size=trainer.layout.dp, num_workers=0,
                         shuffle=False, epochs=1)
    model = trainer.model
    model.eval()
    total = torch.zeros(2, device=trainer.device)  # sum of per-token losses, real tokens
    batches = []
    for i, (tokens, labels) in enumerate(loader):
        if i >= max_batches:
            break
        batches.append((tokens.to(trainer.device), labels.to(trainer.device)))
    if trainer.layout.pp > 1:
        # The pipeline's p2p buffers have one shape per schedule call: a short last batch gets a call of its own.
        for shape in dict.fromkeys(bt[0].shape for bt in batches):
            group = [bt for bt in batches if bt[0].shape == shape]
            b, t = shape
            results = get_forward_backward_func()(
                forward_step_func=forward_step, data_iterator=iter(group), model=[model],
                num_microbatches=len(group), seq_length=packed_rows(model.cfg, model.pp_size, b, t),
                micro_batch_size=b, forward_only=True)
            for r, (_, labels) in zip(results, group):   # only the last stage has results
                n = label_count(labels).float()
                total += torch.stack([r["lm_loss"].float().to(trainer.device) * n, n])
        dist.all_reduce(total, group=ps.get_pipeline_model_parallel_group())
    else:
        for tokens, labels in batches:
            out = trainer.engine(tokens, labels)
            n = label_count(labels).float()
            total += torch.stack([out.lm_loss.detach().float() * n, n])
    dist.all_reduce(total, group=ps.get_data_parallel_group())
    model.train()
    return (total[0] / total[1].clamp(min=1)).item()
