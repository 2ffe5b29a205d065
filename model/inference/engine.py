"""Continuous depth-wise batching: a serving engine whose shared block runs tokens of every recursion depth at once.

A fixed number of slots each hold one sequence (a request); a queue refills a slot the moment its sequence ends
(model/inference/serving.py). Each iteration (``tick``) moves every token in flight by one stage:

    enter    the next token of a sequence: embedding, the unique first layer(s), the routing state it carries
             (token-choice picks its depth here), and whether it runs recursion step 1
    block    every token inside the recursions runs the shared block ONCE, whatever its step: one call per layer
             of the block for all of them (tokens at step 1 beside tokens at step 3), each attending to its own
             sequence's cached tokens of its own step (model/inference/kv_pool.py: one key/value tensor per block
             layer over the pools of all steps, read through each row's index map); then the routing decides,
             per token, whether it runs the next step
    exit     tokens that stopped run the unique last layer(s) and the head together; each sequence gets its next
             token, and a finished sequence frees its slot (and its pool positions) for the next request

So a token of depth d spends d iterations in the block, and the block always runs on (nearly) every slot: a slot
whose token leaves early starts its next token at once instead of idling while deeper tokens finish — the point
of the paper's "continuous depth-wise batching". A sharing whose steps use different layers (sequence,
middle_sequence) splits each block call by layer. Routing is the causal rule of the forward pass with
``causal_routing=True`` (model/routing: token_enter / token_runs / token_update): with greedy sampling every
request gets exactly the tokens, and the logits, of decoding it alone (tests/model/test_engine.py).

KV memory is recursion-wise and pooled: step r's caches hold ``c_r × slots × max_len`` positions (``capacities``,
default the router's), so a model whose deeper steps see fewer tokens fits more slots in the same memory. A
request is admitted while every pool keeps room for its expected share (its length × c_r) besides the expected
rest of the sequences in flight. When a pool is full all the same — the realised depths exceed the capacities —
the engine preempts, before the block runs: the youngest sequence (the last admitted) that holds or needs
positions of that pool goes back to the front of the queue with what it made so far, its positions freed, until
the tokens of the iteration fit. The oldest sequence is never preempted (a pool holds at least one whole
sequence), so every run finishes; a preempted sequence is fed again token by token when it is admitted again,
so its tokens and logits are still those of decoding it alone.

Vanilla and recursive models can run here too (every token takes every step), but their baseline is the plain
batched decode (static.py). Each call gathers its rows (a host read of how many there are): simple and right on
a CPU; a GPU version would keep fixed row counts for CUDA graphs.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from model.inference.kv_pool import KVPool
from model.inference.sampling import Sampling
from model.inference.serving import Completion, ServeStats, Request, SlotServer
from model.mor import MoRModel

__all__ = ["Completion", "DepthBatchServer", "ServeStats", "Request"]

IDLE, ENTER, BLOCK = 0, 1, 2


class DepthBatchServer(SlotServer):
    def __init__(self, model: MoRModel, slots: int, max_len: int, *, sampling: Optional[Sampling] = None,
                 eos_id: Optional[int] = None, keep_logits: bool = False, cache_dtype: Optional[torch.dtype] = None,
                 capacities: Optional[Sequence[float]] = None):
        super().__init__(model, slots, max_len, sampling=sampling, eos_id=eos_id, keep_logits=keep_logits)
        self.pool = KVPool(self.cfg, slots, max_len, capacities=capacities, dtype=cache_dtype or self.dtype,
                           device=self.device)
        layer_ops = [op for op in model.program if op.kind == "layer"]
        first_step = min(o.pos for o in layer_ops if o.step >= 0)
        self.prelude = [op for op in layer_ops if op.step < 0 and op.pos < first_step]
        self.coda = [op for op in layer_ops if op.step < 0 and op not in self.prelude]
        self.steps = self.model.plan.steps          # unique layer ids of each step, by position in the step
        # (Nr,) unique layer at position j of each step; one id for all steps under cycle sharing
        self.layer_of = [torch.tensor([ids[j] for ids in self.steps], device=self.device)
                         for j in range(len(self.steps[0]))]
        self.one_layer = [len(set(ids[j] for ids in self.steps)) == 1 for j in range(len(self.steps[0]))]
        s, d = slots, self.cfg.d_model
        self.phase = torch.zeros(s, dtype=torch.long, device=self.device)
        self.h = torch.zeros(s, d, dtype=self.dtype, device=self.device)
        self.step = torch.zeros(s, dtype=torch.long, device=self.device)
        self.gate = torch.zeros(s, dtype=torch.float32, device=self.device)
        self.depth = torch.zeros(s, dtype=torch.long, device=self.device)
        self.length = torch.zeros(s, dtype=torch.long, device=self.device)   # tokens each slot's sequence fed
        self.route: dict[str, torch.Tensor] = {}   # per-slot routing state (token-choice: h1, depth, gate)

    # ---- admission and preemption -----------------------------------------------------------------------------
    def _in_flight(self) -> list[tuple[int, int]]:
        return [(s, self.total_tokens(s)) for s in range(self.slots) if self.owner[s] is not None]

    def _admissible(self, request: Request) -> bool:
        return self.pool.admits(len(request.prompt) + request.max_new_tokens, self._in_flight())

    def _begin(self, slots: list[int]) -> None:
        idx = torch.tensor(slots, device=self.device)
        self.phase[idx] = ENTER
        self.length[idx] = 0

    def _release(self, slots: list[int]) -> None:
        if slots:
            self.phase[torch.tensor(slots, device=self.device)] = IDLE
            self.pool.release(slots)

    def _reserve(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Pool positions for the block rows that cache their keys this tick, preempting the youngest sequences
        while a pool lacks room. Returns (the rows still in flight, their pool owner index, their positions)."""
        slots, steps = rows.tolist(), self.step[rows].tolist()
        sharing = self.cfg.kv_sharing
        owner = [(0 if s == 0 else -1) if sharing else s for s in steps]   # -1: reads step 1's keys, writes none
        for r in range(len(self.pool.owners)):
            while sum(o == r for o in owner) > self.pool.free(r):
                writers = {slot for slot, o in zip(slots, owner) if o == r}
                holders = [s for s in range(self.slots) if self.owner[s] is not None
                           and (s in writers or self.pool.held[r][s] > 0)]
                victim = max(holders, key=lambda s: self.admitted[s])
                self._preempt(victim)
                keep = [i for i, slot in enumerate(slots) if slot != victim]
                slots, owner = [slots[i] for i in keep], [owner[i] for i in keep]
        kept = torch.tensor(slots, dtype=torch.long, device=self.device)
        dest = self.pool.take(owner, slots, self.length[kept])
        stack = torch.zeros_like(kept) if sharing else self.step[kept]
        return kept, stack, dest

    # ---- the loop -------------------------------------------------------------------------------------------
    def tick(self) -> None:
        exits: list[torch.Tensor] = []
        enter = torch.nonzero(self.phase == ENTER).squeeze(-1)
        if enter.numel():
            exits.append(self._enter(enter))
        block = torch.nonzero(self.phase == BLOCK).squeeze(-1)
        preempted = self.stats.preemptions
        if block.numel():
            block, stack, dest = self._reserve(block)
            if block.numel():
                exits.append(self._block(block, stack, dest))
        rows = torch.cat(exits) if exits else torch.empty(0, dtype=torch.long, device=self.device)
        if self.stats.preemptions != preempted and rows.numel():   # a preempted slot left this tick's exits
            live = torch.tensor([o is not None for o in self.owner], device=self.device)
            rows = rows[live[rows]]
        if rows.numel():
            self._exit(rows)

    # ---- stages ---------------------------------------------------------------------------------------------
    def _layers(self, ops, rows: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        positions = self.length[rows][:, None]
        rope = self.model.rope(positions)
        for op in ops:
            x = self.model.run_layer(op.layer, x, rope, None, self.pool.static_source(op.pos, rows, positions))
        return x

    def _decide(self, rows: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        """Rows about to run ``self.step[rows]`` (or to leave): returns the rows that leave."""
        step = self.step[rows]
        st = {k: v[rows] for k, v in self.route.items()}
        runs, gate = self.model.router.token_runs(step.clamp(max=self.nr - 1), h, st)
        runs = runs & (step < self.nr)   # after the last step every token leaves
        self.gate[rows] = gate.float()
        self.phase[rows] = torch.where(runs, BLOCK, IDLE)
        self.depth[rows] = step
        return rows[~runs]

    def _enter(self, rows: torch.Tensor) -> torch.Tensor:
        x = self.model.embed(self.token[rows][:, None])
        h = self._layers(self.prelude, rows, x)[:, 0]
        for key, value in self.model.router.token_enter(h).items():
            if key not in self.route:
                self.route[key] = torch.zeros((self.slots,) + value.shape[1:], dtype=value.dtype, device=self.device)
            self.route[key][rows] = value
        self.h[rows] = h.to(self.h.dtype)
        self.step[rows] = 0
        return self._decide(rows, h)

    def _block(self, rows: torch.Tensor, stack: torch.Tensor, dest: torch.Tensor) -> torch.Tensor:
        step = self.step[rows]
        positions = self.length[rows][:, None]
        rope = self.model.rope(positions)
        x = self.h[rows][:, None]
        index_rows = self.pool.index[stack, rows]   # each row's map of its own step (step 1's under sharing)
        for j in range(len(self.steps[0])):
            if self.one_layer[j]:     # cycle sharing: one call for every depth
                x = self.model.run_layer(self.steps[0][j], x, rope, None,
                                         self.pool.block_source(j, index_rows, dest, positions))
                continue
            ids = self.layer_of[j][step]   # sequence sharing: each row's layer, one call per layer
            out = torch.empty_like(x)
            for layer in torch.unique(ids).tolist():
                m = ids == layer
                kv = self.pool.block_source(j, index_rows[m], dest[m], positions[m])
                out[m] = self.model.run_layer(layer, x[m], (rope[0][m], rope[1][m]), None, kv)
            x = out
        st = {k: v[rows] for k, v in self.route.items()}
        h = self.model.router.token_update(step, self.h[rows], x[:, 0], st, self.gate[rows])
        self.h[rows] = h.to(self.h.dtype)
        self.stats.block_rows += int(rows.numel())
        self.step[rows] = step + 1
        return self._decide(rows, h)

    def _exit(self, rows: torch.Tensor) -> None:
        x = self._layers(self.coda, rows, self.h[rows][:, None])
        logits = self.model.head(x)[:, 0]
        self.length[rows] += 1
        self.phase[rows] = IDLE
        go_on = self._finish(rows.tolist(), logits, self.depth[rows].tolist())
        if go_on:
            self.phase[torch.tensor(go_on, device=self.device)] = ENTER
