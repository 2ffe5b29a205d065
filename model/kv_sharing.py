"""Recursive KV sharing in the forward pass: later recursion steps attend to the first step's keys and values.

With ``kv_sharing`` the j-th layer of recursion step 1 keeps the keys and values it makes, together with their
tokens' positions and which of them are real (``SaveFirstStep``); the j-th layer of every later step computes
only its queries' use of them (``ReadFirstStep``): a query at position p sees every first-step key at a position
≤ p. The keys live in the forward state under ``kv{pos}_k``/``_v``/``_pos``/``_valid`` (``pos``: the unrolled
position of the layer that made them), so they cross pipeline stages like the rest of the state
(model/program.py: state_spec) and carry gradients back to the layer that made them.
"""
from __future__ import annotations

from typing import Optional

import torch

from model.attention import position_mask
from model.state import ForwardState


class SaveFirstStep:
    """Key source of a first-step layer whose keys later steps read: keep them, attend as usual."""

    def __init__(self, state: ForwardState, pos: int, positions: torch.Tensor, valid: Optional[torch.Tensor], n: int):
        self.state, self.pos, self.positions, self.valid, self.n = state, pos, positions, valid, n

    def __call__(self, k: torch.Tensor, v: torch.Tensor) -> None:
        n = self.n  # under sequence parallelism the stream is padded to a multiple of TP: keep the real rows
        valid = self.valid if self.valid is not None else torch.ones_like(self.positions, dtype=torch.bool)
        self.state.update({f"kv{self.pos}_k": k[:, :n], f"kv{self.pos}_v": v[:, :n],
                           f"kv{self.pos}_pos": self.positions[:, :n], f"kv{self.pos}_valid": valid[:, :n]})
        return None


class ReadFirstStep:
    """Key source of a later-step layer: the first step's keys and values, visible up to each query's position."""

    def __init__(self, state: ForwardState, source: int, q_positions: torch.Tensor):
        self.state, self.source, self.q_positions = state, source, q_positions

    def __call__(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        s, src = self.state, self.source
        mask = position_mask(self.q_positions, s[f"kv{src}_pos"], s[f"kv{src}_valid"].bool())
        return s[f"kv{src}_k"].to(k.dtype), s[f"kv{src}_v"].to(v.dtype), mask
