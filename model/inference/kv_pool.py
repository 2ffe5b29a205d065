"""Recursion-wise KV pools for the serving engine: deeper recursion steps get fewer cache positions, shared by
every slot.

A static cache (cache.py) gives every sequence ``max_len`` positions in every layer, so an MoR model allocates as
much as a vanilla one of the same unrolled depth, although a token that stopped at step r is cached in no layer of
the steps after r. Here each recursion step r that owns caches (every step; only the first under recursive KV
sharing) owns a *pool* of token positions, sized ``c_r × slots × max_len`` from the step's capacity c_r (the
share of tokens the model was trained to send through it), never less than ``max_len`` so that one sequence
always fits. The j-th layer of the block keeps one key/value tensor over all the pools (step r's positions are one
contiguous range of it, then one scratch position), so a call of the block's j-th layer reads and writes rows at
different steps at once. A per-step index map ``index[r, slot, p]`` names the pool position of the token at
position p of the slot's sequence (``scratch`` where that token did not run step r): the layers of one step hold
the same tokens, so one map serves all of them.

Why token granularity and not pages of several tokens: a token's depth is decided as it is made, and a sequence's
step-3 tokens are scattered along it; pages would be mostly empty at the deep steps, which is where the saving
is. The price is a gather of each row's keys through its map at every layer call, which the static cache's row
selection pays too.

Positions are taken from a free list per step as rows run the step, and returned when a sequence ends or is
preempted. The engine (engine.py) admits a request only when every pool keeps room for the expected share of it
and of the sequences in flight (``admits``), and when a pool is full all the same (the realised depths exceed
the capacities) it preempts the youngest sequences deterministically; see engine.py. The unique layers outside
the recursions (every token runs them) keep a static ``max_len`` row per slot.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch

from model.attention import position_mask
from model.config import ModelConfig
from model.program import build_program
from model.routing import routing_class


def default_capacities(cfg: ModelConfig) -> list[float]:
    """Each recursion step's share of tokens: the router's capacities; 1 for every step of a model without a
    router (every token runs every step)."""
    return list(cfg.capacities) if routing_class(cfg).has_router else [1.0] * cfg.num_recursions


def _owner_steps(cfg: ModelConfig) -> list[int]:
    return [0] if cfg.kv_sharing else list(range(cfg.num_recursions))


def pool_sizes(cfg: ModelConfig, slots: int, max_len: int, capacities: Optional[Sequence[float]] = None) -> list[int]:
    """Positions of the pool of each step that owns caches: ⌈c_r · slots · max_len⌉, at least ``max_len`` (one
    sequence always fits), at most ``slots · max_len`` (every token of every slot)."""
    caps = list(capacities) if capacities is not None else default_capacities(cfg)
    if len(caps) != cfg.num_recursions or not all(0 < c <= 1 for c in caps):
        raise ValueError(f"capacities: {cfg.num_recursions} shares in (0, 1], got {caps}")
    return [min(slots * max_len, max(max_len, math.ceil(caps[r] * slots * max_len - 1e-9))) for r in _owner_steps(cfg)]


def pool_bytes(cfg: ModelConfig, slots: int, max_len: int, capacities: Optional[Sequence[float]] = None,
               dtype: torch.dtype = torch.float32) -> int:
    """What ``KVPool(...).allocated_bytes() + index_bytes()`` will be, without allocating: sizes --batch max."""
    per_token = 2 * cfg.n_kv_heads * cfg.head_dim * torch.tensor([], dtype=dtype).element_size()
    ops = [op for op in build_program(cfg) if op.kind == "layer"]
    outside = sum(1 for op in ops if op.step < 0)
    block = cfg.layers_per_recursion if any(op.step >= 0 for op in ops) else 0
    sizes = pool_sizes(cfg, slots, max_len, capacities) if block else []
    kv = outside * slots * max_len * per_token + block * (sum(sizes) + 1) * per_token
    index = 8 * (len(sizes) * slots * max_len + sum(sizes) + slots)
    return kv + index


def server_bytes(cfg: ModelConfig, slots: int, max_len: int, *, pooled: bool,
                 dtype: torch.dtype = torch.float32) -> int:
    """Cache bytes (keys, values and their index) of ``slots`` sequences of up to ``max_len`` tokens: in the
    depth-wise engine's pools (``pooled``), or in the static cache of the plain batched decode (static.py)."""
    if pooled:
        return pool_bytes(cfg, slots, max_len, dtype=dtype)
    from model.inference.cache import KVCache
    one = KVCache(cfg, 1, max_len, dtype=dtype, device="meta")
    return slots * (one.allocated_bytes() + one.index_bytes())


def max_slots(cfg: ModelConfig, budget: float, max_len: int, *, pooled: bool,
              dtype: torch.dtype = torch.float32) -> int:
    """The most slots whose caches (``server_bytes``) fit in ``budget`` bytes; 0 when not even one does."""
    def fits(s: int) -> bool:
        return server_bytes(cfg, s, max_len, pooled=pooled, dtype=dtype) <= budget

    if not fits(1):
        return 0
    lo, hi = 1, 2
    while fits(hi):
        lo, hi = hi, hi * 2
    while hi - lo > 1:   # the bytes grow with the slots: bisect for the largest count that fits
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo


class KVPool:
    """Key/value storage of ``slots`` sequences of up to ``max_len`` tokens for DepthBatchServer."""

    def __init__(self, cfg: ModelConfig, slots: int, max_len: int, *, capacities: Optional[Sequence[float]] = None,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"):
        self.cfg, self.slots, self.max_len = cfg, slots, max_len
        self.device = torch.device(device)
        self.capacities = list(capacities) if capacities is not None else default_capacities(cfg)
        hkv, hd = cfg.n_kv_heads, cfg.head_dim
        ops = [op for op in build_program(cfg) if op.kind == "layer"]

        def zeros(*lead: int) -> torch.Tensor:
            return torch.zeros(*lead, hkv, hd, dtype=dtype, device=self.device)

        # outside the recursions: a static row per slot, indexed by position (every token is cached there)
        self.static = {op.pos: (zeros(slots, max_len), zeros(slots, max_len)) for op in ops if op.step < 0}
        self.owners = _owner_steps(cfg) if any(op.step >= 0 for op in ops) else []
        self.sizes = pool_sizes(cfg, slots, max_len, self.capacities) if self.owners else []
        self.offsets = [sum(self.sizes[:i]) for i in range(len(self.sizes))]
        self.scratch = sum(self.sizes)   # the position that rows which cache nothing write to
        per_step = cfg.layers_per_recursion if self.owners else 0
        self.k = [zeros(self.scratch + 1) for _ in range(per_step)]
        self.v = [zeros(self.scratch + 1) for _ in range(per_step)]
        self.index = torch.full((len(self.owners), slots, max_len), self.scratch, dtype=torch.long,
                                device=self.device)
        # free positions of each pool, a stack whose live part is [:top]; held: positions each slot holds (host)
        self.free_stack = [torch.arange(o, o + n, device=self.device) for o, n in zip(self.offsets, self.sizes)]
        self.top = list(self.sizes)
        self.held = [[0] * slots for _ in self.owners]
        self._arange = torch.arange(max_len, device=self.device)

    # ---- positions ------------------------------------------------------------------------------------------
    def free(self, r: int) -> int:
        """Free positions in the pool of owner step ``r``."""
        return self.top[r]

    def share(self, r: int, tokens: int) -> int:
        """Positions of pool ``r`` that a sequence of ``tokens`` tokens takes at its step's capacity."""
        return min(tokens, math.ceil(self.capacities[self.owners[r]] * tokens - 1e-9))

    def admits(self, tokens: int, in_flight: Sequence[tuple[int, int]]) -> bool:
        """Whether every pool holds the expected share of a new sequence of ``tokens`` tokens besides what the
        sequences in flight, (slot, their tokens) pairs, are still expected to take."""
        for r in range(len(self.owners)):
            promised = sum(max(0, self.share(r, n) - self.held[r][s]) for s, n in in_flight)
            if self.top[r] - promised < self.share(r, tokens):
                return False
        return True

    def take(self, owner: list[int], slots: list[int], positions: torch.Tensor) -> torch.Tensor:
        """Give each row a position in the pool of its owner step (``owner`` index into ``self.owners``; -1: the
        row caches nothing and gets the scratch position); records it in the index map at the row's sequence
        position ``positions`` (n,). The caller checked that the pools have room. Returns (n,) positions."""
        n = len(owner)
        dest = torch.full((n,), self.scratch, dtype=torch.long, device=self.device)
        own = torch.tensor(owner, device=self.device)
        slot_t = torch.tensor(slots, device=self.device)
        for r in range(len(self.owners)):
            rows = [i for i, o in enumerate(owner) if o == r]
            if not rows:
                continue
            if len(rows) > self.top[r]:
                raise RuntimeError(f"KV pool of step {self.owners[r] + 1} has {self.top[r]} free positions for "
                                   f"{len(rows)} tokens")
            self.top[r] -= len(rows)
            dest[own == r] = self.free_stack[r][self.top[r]:self.top[r] + len(rows)]
            for i in rows:
                self.held[r][slots[i]] += 1
        writes = own >= 0
        if bool(writes.any()):
            self.index[own[writes], slot_t[writes], positions[writes]] = dest[writes]
        return dest

    def release(self, slots: list[int]) -> None:
        """Return every position the sequences in ``slots`` hold to the free lists."""
        if not slots or not self.owners:
            return
        s = torch.tensor(slots, device=self.device)
        for r in range(len(self.owners)):
            n = sum(self.held[r][x] for x in slots)
            if n:
                rows = self.index[r, s]
                self.free_stack[r][self.top[r]:self.top[r] + n] = rows[rows != self.scratch]
                self.top[r] += n
                for x in slots:
                    self.held[r][x] = 0
        self.index[:, s] = self.scratch

    # ---- key sources (model/layers.py: KeySource) ----------------------------------------------------------------
    def static_source(self, pos: int, rows: torch.Tensor, positions: torch.Tensor) -> "_StaticSource":
        k, v = self.static[pos]
        return _StaticSource(k, v, rows, positions, self._arange)

    def block_source(self, j: int, index_rows: torch.Tensor, dest: Optional[torch.Tensor],
                     positions: torch.Tensor) -> "_PoolSource":
        """Layer j of the block for rows whose maps are ``index_rows`` (n, max_len), writing their keys at
        ``dest`` (n,) (scratch: not cached; None: nothing written)."""
        return _PoolSource(self.k[j], self.v[j], index_rows, dest, positions, self.scratch, self._arange)

    # ---- size ---------------------------------------------------------------------------------------------------
    def allocated_bytes(self) -> int:
        """Bytes of the key/value tensors (scratch position included)."""
        tensors = [t for pair in self.static.values() for t in pair] + self.k + self.v
        return sum(t.numel() * t.element_size() for t in tensors)

    def index_bytes(self) -> int:
        """Bytes of the bookkeeping on the device: index maps and free lists."""
        return sum(t.numel() * t.element_size() for t in [self.index, *self.free_stack]) + 8 * self.slots

    def used_positions(self) -> list[int]:
        """Positions in use in each owner step's pool."""
        return [n - t for n, t in zip(self.sizes, self.top)]


class _StaticSource:
    def __init__(self, k_buf, v_buf, rows, positions, arange):
        self.k_buf, self.v_buf, self.rows, self.positions, self.arange = k_buf, v_buf, rows, positions, arange

    def __call__(self, k: torch.Tensor, v: torch.Tensor):
        p = self.positions[:, 0]
        self.k_buf[self.rows, p] = k[:, 0].detach().to(self.k_buf.dtype)
        self.v_buf[self.rows, p] = v[:, 0].detach().to(self.v_buf.dtype)
        # every earlier token of the sequence ran this layer: the keys up to the row's position are its own
        mask = self.arange[None, None, :] <= self.positions[:, :, None]
        return self.k_buf[self.rows].to(k.dtype), self.v_buf[self.rows].to(v.dtype), mask


class _PoolSource:
    def __init__(self, k_buf, v_buf, index_rows, dest, positions, scratch, arange):
        self.k_buf, self.v_buf, self.index_rows, self.dest = k_buf, v_buf, index_rows, dest
        self.positions, self.scratch, self.arange = positions, scratch, arange

    def __call__(self, k: torch.Tensor, v: torch.Tensor):
        if self.dest is not None:
            self.k_buf[self.dest] = k[:, 0].detach().to(self.k_buf.dtype)
            self.v_buf[self.dest] = v[:, 0].detach().to(self.v_buf.dtype)
        keys, values = self.k_buf[self.index_rows], self.v_buf[self.index_rows]   # (n, max_len, Hkv, D)
        valid = self.index_rows != self.scratch
        mask = position_mask(self.positions, self.arange.expand_as(self.index_rows), valid)
        return keys.to(k.dtype), values.to(v.dtype), mask
