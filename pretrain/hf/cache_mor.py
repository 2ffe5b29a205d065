"""The recursion-wise KV cache of an exported Mixture-of-Recursions model, shipped beside modeling_mor.py: a
transformers ``Cache`` whose buffers hold, at each recursion step, only the tokens that ran the step. Needs only
torch and transformers.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
from transformers.cache_utils import Cache

from .layers_mor import KeySource, position_mask


# ---- the cache ---------------------------------------------------------------------------------------------------
class MoRCache(Cache):
    """Recursion-wise KV cache of an MoR model (model/inference/cache.py of the training project, growing).

    One buffer per unrolled layer position that makes keys and values: per sequence of the batch, the keys of the
    tokens that ran that layer, packed in arrival order, with their positions and a count; one scratch slot past
    the end takes the writes of tokens that are not cached, so every write has a static shape. A recursion step's
    layers cache only the tokens that ran the step; with KV sharing the later steps' layers own no buffer (they
    read the first step's). ``get_seq_length()`` counts the input columns seen (padding included), as generate()
    expects; ``seen`` (B,) the real tokens of each sequence, which give the positions of the next ones.
    """

    def __init__(self):
        super().__init__(layers=[])
        self.buffers: dict[int, dict[str, torch.Tensor]] = {}
        self.seen: Optional[torch.Tensor] = None
        self.columns = 0

    # ---- what transformers asks -------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.buffers)

    def __repr__(self) -> str:
        return f"MoRCache(buffers={sorted(self.buffers)}, columns={self.columns})"

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.columns

    def get_max_length(self, layer_idx: Optional[int] = None) -> int:
        return -1

    @property
    def is_compileable(self) -> bool:
        return False

    @property
    def is_croppable(self) -> bool:
        return False

    @property
    def is_initialized(self) -> bool:
        return self.seen is not None

    @property
    def batch_size(self) -> int:
        return 0 if self.seen is None else int(self.seen.shape[0])

    def reset(self) -> None:
        self.buffers, self.seen, self.columns = {}, None, 0

    def _rows(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        for buf in self.buffers.values():
            for key in buf:
                buf[key] = fn(buf[key])
        if self.seen is not None:
            self.seen = fn(self.seen)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._rows(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._rows(lambda t: t[indices.to(t.device)])

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._rows(lambda t: t.repeat_interleave(repeats, dim=0))

    def crop(self, max_length: int) -> None:
        raise NotImplementedError("MoRCache cannot be cropped: a recursion step's cache holds only the tokens that "
                                  "ran the step")

    # ---- what the model asks ------------------------------------------------------------------------------------
    def positions(self, valid: torch.Tensor) -> torch.Tensor:
        """(B, T) positions of the next T input columns: each real token's count of real tokens before it (padding
        gets a position too, never used)."""
        if self.seen is None:
            self.seen = torch.zeros(valid.shape[0], dtype=torch.long, device=valid.device)
        return (self.seen[:, None] + valid.long().cumsum(dim=1) - 1).clamp(min=0)

    def advance(self, valid: torch.Tensor) -> None:
        self.seen = self.seen + valid.long().sum(dim=1)
        self.columns += valid.shape[1]

    def cached_tokens(self) -> dict[int, torch.Tensor]:
        """Unrolled layer position -> (B,) tokens of each sequence in its buffer."""
        return {pos: buf["count"].clone() for pos, buf in sorted(self.buffers.items())}

    def _buffer(self, pos: int, k: torch.Tensor, need: int) -> dict[str, torch.Tensor]:
        """The buffer of position ``pos`` with room for ``need`` tokens per sequence plus the scratch slot."""
        buf = self.buffers.get(pos)
        b, hkv, d = k.shape[0], k.shape[2], k.shape[3]
        if buf is None:
            buf = {"k": k.new_zeros(b, 0, hkv, d), "v": k.new_zeros(b, 0, hkv, d),
                   "pos": torch.zeros(b, 0, dtype=torch.long, device=k.device),
                   "count": torch.zeros(b, dtype=torch.long, device=k.device)}
            self.buffers[pos] = buf
        slots = buf["k"].shape[1]
        if need + 1 > slots:
            grow = max(need + 1, 2 * slots, 64) - slots
            buf["k"] = torch.cat([buf["k"], buf["k"].new_zeros(b, grow, hkv, d)], dim=1)
            buf["v"] = torch.cat([buf["v"], buf["v"].new_zeros(b, grow, hkv, d)], dim=1)
            buf["pos"] = torch.cat([buf["pos"], buf["pos"].new_zeros(b, grow)], dim=1)
        return buf

    def writer(self, pos: int, positions: torch.Tensor, write: torch.Tensor) -> KeySource:
        """Key source of the layer at unrolled position ``pos``: appends the keys of the tokens where ``write``
        (B, T), then lets the queries at ``positions`` attend to the buffer."""

        def source(k: torch.Tensor, v: torch.Tensor):
            count = self.buffers[pos]["count"] if pos in self.buffers else 0
            buf = self._buffer(pos, k, int((count + write.long().sum(dim=1)).max()))   # one host sync per layer
            scratch = buf["k"].shape[1] - 1
            dest = torch.where(write, buf["count"][:, None] + write.long().cumsum(dim=1) - 1, scratch)
            dest = dest.clamp(max=scratch)
            idx = dest[..., None, None].expand_as(k)
            buf["k"].scatter_(1, idx, k.detach().to(buf["k"].dtype))
            buf["v"].scatter_(1, idx, v.detach().to(buf["v"].dtype))
            buf["pos"].scatter_(1, dest, positions)
            buf["count"] += write.long().sum(dim=1)
            return self._read(buf, positions, k)

        return source

    def reader(self, pos: int, positions: torch.Tensor) -> KeySource:
        """Key source of a layer under KV sharing: the buffer of the first-step layer at ``pos``, unchanged."""
        return lambda k, v: self._read(self.buffers[pos], positions, k)

    @staticmethod
    def _read(buf: dict[str, torch.Tensor], positions: torch.Tensor, k: torch.Tensor):
        slot = torch.arange(buf["k"].shape[1], device=k.device)
        in_use = slot[None, :] < buf["count"][:, None]
        return buf["k"].to(k.dtype), buf["v"].to(k.dtype), position_mask(positions, buf["pos"], in_use)
