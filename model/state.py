"""The state of one forward pass, shared by the model's op loop, the routing variants, recursive KV sharing, the
inference caches and sequence sharding.

Two kinds of things live in it. The *carried* tensors — the residual stream ``h``, the router losses ``aux``, the
routing variant's own (expert-choice's kept indices and gates, token-choice's depths ...) and KV sharing's
first-step keys — are what crosses ops and pipeline stages; model/program.py's ``state_spec`` names them and
``pack``/``unpack`` send them between stages. They are reached by name: ``s["h"]``, ``s.update(gate=...)``.
Everything else is local to this process's forward pass and typed here: how it routes, the inference cache, the
RoPE tables it made once, the stream the layers run on now, and the sequence-sharded copy of that stream.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

import torch


@dataclass(eq=False)
class SequenceShard:
    """This rank's slice of the stream the layers run on, between two routing ops (model/seq_sharding.py)."""
    key: str                          # the carried tensor it is a slice of (h, x, y)
    x: torch.Tensor                   # (B, n_local, d)
    n: int                            # the whole stream's length, before padding to a multiple of the ranks
    rope: Any                         # RoPE of the padded positions
    active: Optional[torch.Tensor]    # (B, n_padded) key mask, None: every token
    positions: torch.Tensor           # (B, n_padded)


@dataclass(eq=False)
class ForwardState:
    carried: dict[str, torch.Tensor] = field(default_factory=dict)
    causal: bool = False              # causal routing: every token decides alone (forward(causal_routing=True))
    cache: Any = None                 # the inference KV cache (model/inference/cache.py), if any
    positions: Optional[torch.Tensor] = None  # (B, T) the rows' own positions (with a cache: continuing them)
    valid: Optional[torch.Tensor] = None      # (B, T) with a cache: the real tokens of each row
    rope: Any = None                  # RoPE of ``positions``, made once per forward pass
    stream: Optional[tuple[int, Any]] = None  # (recursion step, routing.Stream) the layer ops run on now
    step_rope: Any = None             # RoPE of that stream's positions, once per recursion step
    shard: Optional[SequenceShard] = None     # the stream split over the sequence (sequence parallelism)
    trace_logits: Optional[torch.Tensor] = None  # expert-choice's router logits, for MoRModel.trace only

    # ---- the carried tensors, by name ----------------------------------------------------------------------
    def __getitem__(self, key: str) -> torch.Tensor:
        return self.carried[key]

    def __setitem__(self, key: str, value: torch.Tensor) -> None:
        self.carried[key] = value

    def __contains__(self, key: str) -> bool:
        return key in self.carried

    def get(self, key: str, default: Optional[torch.Tensor] = None) -> Optional[torch.Tensor]:
        return self.carried.get(key, default)

    def pop(self, key: str, *default):
        return self.carried.pop(key, *default)

    def update(self, *args, **kw) -> None:
        self.carried.update(*args, **kw)
