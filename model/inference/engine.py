"""Continuous depth-wise batching: a serving engine whose shared block runs tokens of every recursion depth at once.

A fixed number of slots each hold one sequence (a request); a queue refills a slot the moment its sequence ends.
Each iteration (``tick``) moves every token in flight by one stage:

    enter    the next token of a sequence: embedding, the unique first layer(s), the routing state it carries
             (token-choice picks its depth here), and whether it runs recursion step 1
    block    every token inside the recursions runs the shared block ONCE, whatever its step: one call per layer
             of the block for all of them (tokens at step 1 beside tokens at step 3), each attending to its own
             sequence's cache of its own step (model/inference/cache.py: the block's buffers are stacked over the
             steps, so each row reads and writes its step's slice); then the routing decides, per token, whether
             it runs the next step
    exit     tokens that stopped run the unique last layer(s) and the head together; each sequence gets its next
             token, and a finished sequence frees its slot for the next request

So a token of depth d spends d iterations in the block, and the block always runs on (nearly) every slot: a slot
whose token leaves early starts its next token at once instead of idling while deeper tokens finish — the point
of the paper's "continuous depth-wise batching". Vanilla and plain recursive models run through the same engine
as ordinary continuous batching (every token takes every step). A sharing whose steps use different layers
(sequence, middle_sequence) splits each block call by layer. Routing is the causal rule of the forward pass with
``causal_routing=True`` (model/routing: token_enter / token_runs / token_update): with greedy sampling every
request gets exactly the tokens, and the logits, of decoding it alone (tests/model/test_engine.py).

The paper's protocol (pretrain/serve_bench.py) times this loop. Here each call gathers its rows (a host read of
how many there are): simple and right on a CPU; a GPU version would keep fixed row counts for CUDA graphs.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch

from model.inference.cache import KVCache, RowSource
from model.inference.sampling import Sampling, make_generator, next_tokens
from model.mor import MoRModel

IDLE, ENTER, BLOCK = 0, 1, 2


@dataclass
class Request:
    prompt: list[int]          # at least one token (the paper's protocol: a start token alone)
    max_new_tokens: int


@dataclass
class Completion:
    tokens: list[int] = field(default_factory=list)       # new tokens (EOS included when it stopped there)
    logits: list[torch.Tensor] = field(default_factory=list)  # the logits each new token was chosen from (kept)
    depths: list[int] = field(default_factory=list)       # recursion steps each new token's input ran


@dataclass
class EngineStats:
    ticks: int = 0
    block_rows: int = 0         # rows the block ran on, summed over ticks (the block's batch use)
    tokens: int = 0             # new tokens made
    depth_counts: list[int] = field(default_factory=list)   # tokens by recursion steps run (index: steps)


class DepthBatchEngine:
    def __init__(self, model: MoRModel, slots: int, max_len: int, *, sampling: Optional[Sampling] = None,
                 eos_id: Optional[int] = None, keep_logits: bool = False, cache_dtype: Optional[torch.dtype] = None):
        if model.pp_size > 1:
            raise NotImplementedError("the serving engine runs one process's model (pipeline size 1)")
        self.model, self.cfg, self.slots, self.max_len = model, model.cfg, slots, max_len
        self.sampling = (sampling or Sampling(temperature=0.0)).validate()
        self.eos_id, self.keep_logits = eos_id, keep_logits
        p = next(model.parameters())
        self.device = p.device
        self.generator = make_generator(self.sampling, self.device)
        self.cache = KVCache(self.cfg, slots, max_len, dtype=cache_dtype or p.dtype, device=self.device)
        layer_ops = [op for op in model.program if op.kind == "layer"]
        self.prelude = [op for op in layer_ops if op.step < 0 and op.pos < min(o.pos for o in layer_ops
                                                                               if o.step >= 0)]
        self.coda = [op for op in layer_ops if op.step < 0 and op not in self.prelude]
        self.steps = self.model.plan.steps          # unique layer ids of each step, by position in the step
        self.nr = len(self.steps)
        # (Nr,) unique layer at position j of each step; one id for all steps under cycle sharing
        self.layer_of = [torch.tensor([ids[j] for ids in self.steps], device=p.device)
                         for j in range(len(self.steps[0]))]
        self.one_layer = [len(set(ids[j] for ids in self.steps)) == 1 for j in range(len(self.steps[0]))]
        s, d = slots, self.cfg.d_model
        self.phase = torch.zeros(s, dtype=torch.long, device=self.device)
        self.token = torch.zeros(s, dtype=torch.long, device=self.device)   # the token each slot feeds next
        self.h = torch.zeros(s, d, dtype=p.dtype, device=self.device)
        self.step = torch.zeros(s, dtype=torch.long, device=self.device)
        self.gate = torch.zeros(s, dtype=torch.float32, device=self.device)
        self.route: dict[str, torch.Tensor] = {}   # per-slot routing state (token-choice: h1, depth, gate)
        self.stats = EngineStats(depth_counts=[0] * (self.nr + 1))

    # ---- the loop -------------------------------------------------------------------------------------------
    @torch.no_grad()
    def run(self, requests: Sequence[Request]) -> list[Completion]:
        for r in requests:
            if not r.prompt or r.max_new_tokens < 1:
                raise ValueError("every request needs a prompt token and max_new_tokens >= 1")
            if len(r.prompt) + r.max_new_tokens > self.max_len:
                raise ValueError(f"a request of {len(r.prompt)} + {r.max_new_tokens} tokens passes the engine's "
                                 f"max_len={self.max_len}")
        was_training = self.model.training
        self.model.eval()
        self.out = [Completion() for _ in requests]
        self.requests, self.queue = list(requests), deque(range(len(requests)))
        self.owner: list[Optional[int]] = [None] * self.slots   # request index in each slot
        self.fed = [0] * self.slots                             # tokens of its sequence each slot has fed
        self.depth = torch.zeros(self.slots, dtype=torch.long, device=self.device)
        try:
            self._refill()
            while any(o is not None for o in self.owner):
                self.tick()
        finally:
            self.model.train(was_training)
        return self.out

    def tick(self) -> None:
        self.stats.ticks += 1
        exits: list[torch.Tensor] = []
        enter = torch.nonzero(self.phase == ENTER).squeeze(-1)
        if enter.numel():
            exits.append(self._enter(enter))
        block = torch.nonzero(self.phase == BLOCK).squeeze(-1)
        if block.numel():
            exits.append(self._block(block))
        rows = torch.cat(exits) if exits else torch.empty(0, dtype=torch.long, device=self.device)
        if rows.numel():
            self._exit(rows)
        self._refill()

    # ---- stages ---------------------------------------------------------------------------------------------
    def _positions(self, rows: torch.Tensor) -> torch.Tensor:
        return self.cache.lengths[rows][:, None]

    def _layers(self, ops, rows: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        positions = self._positions(rows)
        rope = self.model.rotary(positions)
        for op in ops:
            kv = RowSource(self.cache.buffers[op.pos], (rows,), positions, torch.ones_like(rows, dtype=torch.bool))
            x = self.model.layers[str(op.layer)](x, rope, None, kv)
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
        x = self.model.embedding(self.token[rows][:, None])
        h = self._layers(self.prelude, rows, x)[:, 0]
        for key, value in self.model.router.token_enter(h).items():
            if key not in self.route:
                self.route[key] = torch.zeros((self.slots,) + value.shape[1:], dtype=value.dtype, device=self.device)
            self.route[key][rows] = value
        self.h[rows] = h.to(self.h.dtype)
        self.step[rows] = 0
        return self._decide(rows, h)

    def _block(self, rows: torch.Tensor) -> torch.Tensor:
        step = self.step[rows]
        positions = self._positions(rows)
        rope = self.model.rotary(positions)
        x = self.h[rows][:, None]
        # under KV sharing every step reads the first step's buffers, and only the first step writes them
        stack = torch.zeros_like(step) if self.cfg.kv_sharing else step
        write = step == 0 if self.cfg.kv_sharing else torch.ones_like(step, dtype=torch.bool)
        for j in range(len(self.steps[0])):
            kv_buf = self.cache.block[j]
            if self.one_layer[j]:     # cycle sharing: one call for every depth
                x = self.model.layers[str(self.steps[0][j])](x, rope, None,
                                                             RowSource(kv_buf, (stack, rows), positions, write))
                continue
            ids = self.layer_of[j][step]   # sequence sharing: each row's layer, one call per layer
            out = torch.empty_like(x)
            for layer in torch.unique(ids).tolist():
                m = ids == layer
                rope_m = (rope[0][m], rope[1][m])
                out[m] = self.model.layers[str(layer)](
                    x[m], rope_m, None, RowSource(kv_buf, (stack[m], rows[m]), positions[m], write[m]))
            x = out
        st = {k: v[rows] for k, v in self.route.items()}
        h = self.model.router.token_update(step, self.h[rows], x[:, 0], st, self.gate[rows])
        self.h[rows] = h.to(self.h.dtype)
        self.stats.block_rows += int(rows.numel())
        self.step[rows] = step + 1
        return self._decide(rows, h)

    def _exit(self, rows: torch.Tensor) -> None:
        x = self._layers(self.coda, rows, self.h[rows][:, None])
        model = self.model
        weight = model.embedding.weight if self.cfg.tie_embeddings else None
        logits = model.output_layer(model.final_norm(x), weight=weight)[0][:, 0]
        self.cache.lengths[rows] += 1
        self.phase[rows] = IDLE
        chosen = next_tokens(logits, self.sampling, self.generator)
        depths = self.depth[rows].tolist()
        for i, (slot, tok, depth) in enumerate(zip(rows.tolist(), chosen.tolist(), depths)):
            req = self.owner[slot]
            request, done = self.requests[req], self.out[req]
            self.fed[slot] += 1
            self.stats.depth_counts[depth] += 1
            if self.fed[slot] < len(request.prompt):        # still reading the prompt: its next token
                self.token[slot] = request.prompt[self.fed[slot]]
                self.phase[slot] = ENTER
                continue
            done.tokens.append(tok)
            done.depths.append(depth)
            if self.keep_logits:
                done.logits.append(logits[i].float().cpu())
            self.stats.tokens += 1
            if len(done.tokens) >= request.max_new_tokens or (self.eos_id is not None and tok == self.eos_id):
                self.owner[slot] = None                     # finished: the slot takes the next request
            else:
                self.token[slot] = tok
                self.phase[slot] = ENTER

    def _refill(self) -> None:
        free = [s for s in range(self.slots) if self.owner[s] is None][:len(self.queue)]
        if not free:
            return
        mask = torch.zeros(self.slots, dtype=torch.bool, device=self.device)
        mask[free] = True
        self.cache.reset(mask)
        for slot in free:
            req = self.queue.popleft()
            self.owner[slot], self.fed[slot] = req, 0
            self.token[slot] = self.requests[req].prompt[0]
            self.phase[slot] = ENTER
