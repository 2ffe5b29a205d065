"""Parameter-sharing strategies: which unique layer runs at each unrolled position.

The unrolled stack is split into a *prelude* (run by every token), ``num_recursions`` recursion *steps* of
``layers_per_recursion`` positions each (the part that routing gates), and a *coda* (run by every token).
For Nr = 3 and 3 unique block layers (indices relative to the block):

    cycle            steps [0,1,2] [0,1,2] [0,1,2]           the whole stack is the recursion block
    sequence         steps [0,0,0] [1,1,1] [2,2,2]           each layer repeated in place
    middle_cycle     prelude [first], steps as cycle, coda [last]     (the paper's best)
    middle_sequence  prelude [first], steps as sequence, coda [last]

A vanilla model (sharing = none) is one step holding every layer once.
"""
from __future__ import annotations

from dataclasses import dataclass

from model.config import ModelConfig


@dataclass(frozen=True)
class SharingPlan:
    prelude: tuple[int, ...]
    steps: tuple[tuple[int, ...], ...]
    coda: tuple[int, ...]

    @property
    def unrolled(self) -> tuple[int, ...]:
        return self.prelude + sum(self.steps, ()) + self.coda


def build_plan(cfg: ModelConfig) -> SharingPlan:
    if cfg.sharing == "none":
        return SharingPlan((), (tuple(range(cfg.n_layers)),), ())
    nr, per_step = cfg.num_recursions, cfg.layers_per_recursion
    offset = 1 if cfg.middle else 0  # unique index of the first block layer
    block = per_step  # unique layers in the shared block
    body = nr * per_step
    if cfg.sharing in ("cycle", "middle_cycle"):
        order = [offset + i % block for i in range(body)]
    else:  # sequence order: each block layer repeated nr times in place
        order = [offset + i // nr for i in range(body)]
    steps = tuple(tuple(order[r * per_step:(r + 1) * per_step]) for r in range(nr))
    if cfg.middle:
        return SharingPlan((0,), steps, (block + 1,))
    return SharingPlan((), steps, ())
