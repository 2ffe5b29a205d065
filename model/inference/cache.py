"""KV caches for decoding: recursion-wise, with recursive KV sharing, preallocated with static shapes.

Every layer op of the unrolled model (model/program.py: ``Op.pos``) that makes keys and values owns one buffer
pair. A recursion step's layers cache only the tokens that ran that step (recursion-wise caching: a token that
stopped at step r is in no cache of the steps after r), so attention at step r over the cache sees exactly the
step-r tokens before it, as the full forward pass with causal routing does. Under recursive KV sharing the layers
of the steps after the first own no buffer: they read the first step's (``Op.kv_from``). Vanilla and plain
recursive models get one ordinary cache per layer op.

Each buffer holds, per sequence of the batch, its tokens packed in arrival order — ``slots`` of them, plus one
scratch slot where tokens that are not cached write their keys so that every write has a static shape — with
their original positions and a count. With ``checks`` off, nothing in a decode step reads a value back to the
host, so the step can be captured in a CUDA graph or compiled; with them on (the default) the cache says so, in
one error, when a sequence passes ``max_len`` or a buffer its slots.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from model.attention import position_mask
from model.config import ModelConfig
from model.program import build_program
from model.routing.base import Op


@dataclass
class _Buffer:
    k: torch.Tensor      # (B, slots + 1, Hkv, D); the last slot is scratch
    v: torch.Tensor
    pos: torch.Tensor    # (B, slots + 1) original position of the token in each slot
    count: torch.Tensor  # (B,) slots in use


class KVCache:
    """Caches for ``batch`` sequences of up to ``max_len`` tokens each.

    ``slots``: tokens each buffer can hold per sequence; by default ``max_len`` for every buffer (always enough).
    A sequence of recursion-step sizes (one per step, e.g. ⌈c_r·max_len⌉ plus a margin) saves memory when the
    realised depths are known to stay below them; writing more raises an error at the end of the forward pass.
    """

    def __init__(self, cfg: ModelConfig, batch: int, max_len: int, *, dtype: torch.dtype = torch.float32,
                 device: torch.device | str = "cpu", slots: Optional[Sequence[int]] = None, checks: bool = True):
        self.cfg, self.batch, self.max_len, self.checks = cfg, batch, max_len, checks
        self.device = torch.device(device)
        self.layer_ops = [op for op in build_program(cfg) if op.kind == "layer"]
        if slots is not None and len(slots) != cfg.num_recursions:
            raise ValueError(f"slots: {len(slots)} sizes for {cfg.num_recursions} recursion steps")
        hkv, hd = cfg.n_kv_heads, cfg.head_dim

        def buffer(*lead: int) -> _Buffer:
            return _Buffer(k=torch.zeros(*lead, hkv, hd, dtype=dtype, device=self.device),
                           v=torch.zeros(*lead, hkv, hd, dtype=dtype, device=self.device),
                           pos=torch.zeros(*lead, dtype=torch.long, device=self.device),
                           count=torch.zeros(*lead[:-1], dtype=torch.long, device=self.device))

        self.buffers: dict[int, _Buffer] = {}
        for op in self.layer_ops:
            if op.kv_from < 0:
                n = max_len if (slots is None or op.step < 0) else min(max_len, slots[op.step])
                self.buffers[op.pos] = buffer(batch, n + 1)
        self.lengths = torch.zeros(batch, dtype=torch.long, device=self.device)  # tokens seen per sequence

    # ---- what the model asks (MoRModel.forward with cache=) ---------------------------------------------------
    def positions(self, n: int) -> torch.Tensor:
        """(B, n) positions of the next ``n`` tokens of every sequence."""
        return self.lengths[:, None] + torch.arange(n, device=self.device)

    def valid(self, n: int, lengths: torch.Tensor) -> torch.Tensor:
        """(B, n): which of the next ``n`` tokens are real; checks that they fit."""
        if self.checks and int((self.lengths + lengths).max()) > self.max_len:
            raise ValueError(f"KV cache full: a sequence would pass max_len={self.max_len} tokens")
        return torch.arange(n, device=self.device) < lengths[:, None]

    def source(self, op: Op, positions: torch.Tensor, write: torch.Tensor) -> "_CacheSource":
        """The key source (model/layers.py: KeySource) of layer op ``op``: it appends the keys of the tokens where
        ``write`` (B, n) is True, then lets the queries at ``positions`` (B, n) attend to the buffer."""
        if op.kv_from >= 0:
            return _CacheSource(self.buffers[op.kv_from], positions, None)
        return _CacheSource(self.buffers[op.pos], positions, write)

    def advance(self, lengths: torch.Tensor) -> None:
        self.lengths += lengths.to(self.lengths)
        if not self.checks:
            return
        over = [pos for pos, buf in self.buffers.items() if int(buf.count.max()) > buf.k.shape[1] - 1]
        if over:
            raise ValueError(f"KV cache: the buffers of layer position(s) {over} overflowed their slots; "
                             "allocate more (KVCache slots=None holds every token)")

    def reset(self, rows: Optional[torch.Tensor] = None) -> None:
        """Empty every sequence, or the rows where ``rows`` (B,) bool is True (a slot reused for a new sequence)."""
        keep = torch.zeros(self.batch, dtype=torch.bool, device=self.device) if rows is None else ~rows.to(self.device)
        self.lengths *= keep
        for buf in self.buffers.values():
            buf.count *= keep

    # ---- size ---------------------------------------------------------------------------------------------
    def _token_bytes(self) -> int:
        """Bytes of one token's keys and values in one buffer."""
        buf = next(iter(self.buffers.values()))
        return 2 * buf.k[0, 0].numel() * buf.k.element_size()

    def allocated_bytes(self) -> int:
        """Bytes of the preallocated key/value buffers (scratch slots included; positions and counts not)."""
        return sum(buf.k.numel() * buf.k.element_size() + buf.v.numel() * buf.v.element_size()
                   for buf in self.buffers.values())

    def index_bytes(self) -> int:
        """Bytes of the bookkeeping beside the keys and values: each slot's position, the counts, the lengths."""
        return sum(buf.pos.numel() * 8 + buf.count.numel() * 8 for buf in self.buffers.values()) + 8 * self.batch

    def used_bytes(self) -> torch.Tensor:
        """(B,) bytes of keys and values each sequence holds now: Σ over buffers of its cached tokens."""
        counts = torch.stack([buf.count for buf in self.buffers.values()]).sum(dim=0)
        return counts * self._token_bytes()

    def full_bytes(self) -> torch.Tensor:
        """(B,) bytes the same sequences would take with every token cached at every layer op (no recursion-wise
        caching, no sharing): the yardstick of ``used_bytes``."""
        return self.lengths * len(self.layer_ops) * self._token_bytes()


def cache_bytes(cfg: ModelConfig, depths: torch.Tensor, dtype: torch.dtype = torch.float32) -> int:
    """Bytes of keys and values a sequence whose tokens ran ``depths`` (T,) recursion steps (1..Nr) holds in the
    cache: every token in the prelude and coda layers; in the layers of step r, the tokens with depth ≥ r —
    or, with recursive KV sharing, only the first step's (every token that ran step 1)."""
    per_token = 2 * cfg.n_kv_heads * cfg.head_dim * torch.tensor([], dtype=dtype).element_size()
    ops = [op for op in build_program(cfg) if op.kind == "layer" and op.kv_from < 0]
    tokens = sum(int(depths.numel()) if op.step < 0 else int((depths > op.step).sum()) for op in ops)
    return tokens * per_token


class _CacheSource:
    def __init__(self, buf: _Buffer, positions: torch.Tensor, write: Optional[torch.Tensor]):
        self.buf, self.positions, self.write = buf, positions, write

    def __call__(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        buf = self.buf
        if self.write is not None:
            scratch = buf.k.shape[1] - 1
            w = self.write
            # the i-th written token of a row goes to slot count + i; the others to the scratch slot
            dest = torch.where(w, buf.count[:, None] + w.long().cumsum(dim=1) - 1, scratch).clamp(max=scratch)
            idx = dest[..., None, None].expand_as(k)
            buf.k.scatter_(1, idx, k.detach().to(buf.k.dtype))  # a cache is state, never part of a graph
            buf.v.scatter_(1, idx, v.detach().to(buf.v.dtype))
            buf.pos.scatter_(1, dest, self.positions)
            buf.count += w.sum(dim=1)
        slot = torch.arange(buf.k.shape[1], device=k.device)
        in_use = slot[None, :] < buf.count[:, None]
        mask = position_mask(self.positions, buf.pos, in_use)
        return buf.k.to(k.dtype), buf.v.to(v.dtype), mask
