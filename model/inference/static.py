"""The plain batched decode: every slot advances one token per iteration through every layer, with a static cache.

The baseline a depth-wise engine is measured against (pretrain/serve/bench.py): vanilla and recursive models
need no row gathering, so they get none. One iteration is one call of the model's own forward pass on all
``slots`` rows with a static KV cache (model/inference/cache.py: ``max_len`` positions per slot and layer,
``checks=False``, so nothing in the pass reads a value back to the host); a slot without a sequence (the queue
ran dry) feeds a token that is neither cached nor used, as in any static batch. Slots are refilled from the
queue as their sequences end (model/inference/serving.py), so it is continuous batching at token granularity.

Any model runs here (MoR ones with causal routing and masks, every token through every layer call); realised
depths are counted only for models without a router, where every token runs every step.
"""
from __future__ import annotations

from typing import Optional

import torch

from model.inference.cache import KVCache
from model.inference.decode import decode_step
from model.inference.sampling import Sampling
from model.inference.serving import SlotServer
from model.mor import MoRModel
from model.routing import routing_class


class StaticBatchServer(SlotServer):
    def __init__(self, model: MoRModel, slots: int, max_len: int, *, sampling: Optional[Sampling] = None,
                 eos_id: Optional[int] = None, keep_logits: bool = False, cache_dtype: Optional[torch.dtype] = None):
        super().__init__(model, slots, max_len, sampling=sampling, eos_id=eos_id, keep_logits=keep_logits)
        self.cache = KVCache(self.cfg, slots, max_len, dtype=cache_dtype or self.dtype, device=self.device,
                             checks=False)
        self.live = torch.zeros(slots, dtype=torch.bool, device=self.device)
        self.fixed_depth = None if routing_class(self.cfg).has_router else self.nr

    def new_stats(self):
        stats = super().new_stats()
        if routing_class(self.cfg).has_router:
            stats.depth_counts = None
        return stats

    def _begin(self, slots: list[int]) -> None:
        rows = torch.zeros(self.slots, dtype=torch.bool, device=self.device)
        rows[torch.tensor(slots, device=self.device)] = True
        self.cache.reset(rows)
        self.live |= rows

    def _release(self, slots: list[int]) -> None:
        if slots:
            self.live[torch.tensor(slots, device=self.device)] = False

    def tick(self) -> None:
        logits = decode_step(self.model, self.cache, self.token, self.live)
        rows = [s for s in range(self.slots) if self.owner[s] is not None]
        depths = None if self.fixed_depth is None else [self.fixed_depth] * len(rows)
        self._finish(rows, logits[torch.tensor(rows, device=self.device)], depths)
