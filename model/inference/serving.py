"""Serving a queue of requests through a fixed number of slots: what both servers share.

Each of ``slots`` slots holds one sequence at a time; a slot whose sequence ends takes the next request of the
queue at once (continuous batching). A sequence first feeds its known tokens, one per pass through the model —
its prompt, and after a preemption the tokens it had already made — then each token it samples. Two servers
fill in how a pass runs:

    StaticBatchServer (static.py)  every slot advances one token per iteration through the whole model with a
                                   static KV cache: the plain batched decode, the baseline for vanilla and
                                   recursive models
    DepthBatchServer (engine.py)   continuous depth-wise batching over recursion-wise KV pools (MoR models)

Bookkeeping stays on the host (which slot holds which request, how far it got); per-token state lives in tensors
on the model's device.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch

from model.inference.sampling import Sampling, make_generator, next_tokens
from model.mor import MoRModel


@dataclass
class Request:
    prompt: list[int]          # at least one token (the paper's protocol: a start token alone)
    max_new_tokens: int


@dataclass
class Completion:
    tokens: list[int] = field(default_factory=list)       # new tokens (EOS included when it stopped there)
    logits: list[torch.Tensor] = field(default_factory=list)  # the logits each new token was chosen from (kept)
    depths: list[int] = field(default_factory=list)       # recursion steps each new token's input ran (engine)


@dataclass
class ServeStats:
    ticks: int = 0
    block_rows: int = 0         # rows the recursion block ran on, summed over ticks (the engine's batch use)
    tokens: int = 0             # new tokens made
    fed: int = 0                # tokens run through the model (prompts, re-fed tokens, new tokens but the last)
    depth_counts: Optional[list[int]] = None   # fed tokens by recursion steps run (index: steps); None: unknown
    preemptions: int = 0        # sequences set back into the queue because a KV pool was full


class SlotServer:
    def __init__(self, model: MoRModel, slots: int, max_len: int, *, sampling: Optional[Sampling] = None,
                 eos_id: Optional[int] = None, keep_logits: bool = False):
        if model.pp_size > 1:
            raise NotImplementedError("serving runs one process's model (pipeline size 1)")
        if slots < 1 or max_len < 2:
            raise ValueError(f"slots must be >= 1 and max_len >= 2, got {slots} and {max_len}")
        self.model, self.cfg, self.slots, self.max_len = model, model.cfg, slots, max_len
        self.sampling = (sampling or Sampling(temperature=0.0)).validate()
        self.eos_id, self.keep_logits = eos_id, keep_logits
        p = next(model.parameters())
        self.device, self.dtype = p.device, p.dtype
        self.generator = make_generator(self.sampling, self.device)
        self.nr = model.cfg.num_recursions
        self.token = torch.zeros(slots, dtype=torch.long, device=self.device)   # the token each slot feeds next
        self.owner: list[Optional[int]] = [None] * slots                       # request index in each slot
        self.stats = self.new_stats()

    def new_stats(self) -> ServeStats:
        return ServeStats(depth_counts=[0] * (self.nr + 1))

    # ---- the loop -------------------------------------------------------------------------------------------
    @torch.no_grad()
    def run(self, requests: Sequence[Request]) -> list[Completion]:
        for r in requests:
            if not r.prompt or r.max_new_tokens < 1:
                raise ValueError("every request needs a prompt token and max_new_tokens >= 1")
            if len(r.prompt) + r.max_new_tokens > self.max_len:
                raise ValueError(f"a request of {len(r.prompt)} + {r.max_new_tokens} tokens passes the server's "
                                 f"max_len={self.max_len}")
        was_training = self.model.training
        self.model.eval()
        self.out = [Completion() for _ in requests]
        self.requests, self.queue = list(requests), deque(range(len(requests)))
        self.owner = [None] * self.slots
        self.fed = [0] * self.slots           # tokens of its sequence each slot has fed
        self.admitted = [0] * self.slots      # when each slot's sequence was admitted (a counter): the youngest
        self._admissions = 0
        try:
            self._refill()
            while any(o is not None for o in self.owner):
                self.stats.ticks += 1
                self.tick()
                self._refill()
        finally:
            self.model.train(was_training)
        return self.out

    def tick(self) -> None:
        raise NotImplementedError

    # ---- what the servers add ---------------------------------------------------------------------------------
    def _admissible(self, request: Request) -> bool:
        """Whether a request may take a free slot while other sequences are in flight."""
        return True

    def _begin(self, slots: list[int]) -> None:
        """Slots that just took a new sequence (their caches start empty)."""

    def _release(self, slots: list[int]) -> None:
        """Slots whose sequences ended or were preempted."""

    # ---- shared steps -----------------------------------------------------------------------------------------
    def total_tokens(self, slot: int) -> int:
        request = self.requests[self.owner[slot]]
        return len(request.prompt) + request.max_new_tokens

    def _known(self, slot: int) -> Optional[int]:
        """The token the slot feeds next if it is known already (prompt, or made before a preemption)."""
        req = self.owner[slot]
        i, prompt = self.fed[slot], self.requests[req].prompt
        if i < len(prompt):
            return prompt[i]
        made = self.out[req].tokens
        return made[i - len(prompt)] if i - len(prompt) < len(made) else None

    def _refill(self) -> None:
        """Free slots take requests from the front of the queue, in order, while the server admits them (a
        request is always admitted when nothing else is in flight)."""
        new: list[int] = []
        for slot in range(self.slots):
            if not self.queue:
                break
            if self.owner[slot] is not None:
                continue
            busy = any(o is not None for o in self.owner)
            if busy and not self._admissible(self.requests[self.queue[0]]):
                break
            self.owner[slot], self.fed[slot] = self.queue.popleft(), 0
            self._admissions += 1
            self.admitted[slot] = self._admissions
            new.append(slot)
        if new:
            self._begin(new)
            self._set_tokens(new, [self._known(s) for s in new])

    def _set_tokens(self, slots: list[int], tokens: list[int]) -> None:
        self.token[torch.tensor(slots, device=self.device)] = torch.tensor(tokens, device=self.device)

    def _preempt(self, slot: int) -> None:
        """Set the slot's sequence back at the front of the queue; what it made stays in its completion and is
        fed again when it is admitted again."""
        self.queue.appendleft(self.owner[slot])
        self.owner[slot] = None
        self.stats.preemptions += 1
        self._release([slot])

    def _finish(self, rows: list[int], logits: torch.Tensor, depths: Optional[list[int]]) -> list[int]:
        """The fed tokens of slots ``rows`` ran the whole model, giving ``logits`` (n, V) (``depths``: recursion
        steps each ran). Each slot takes its next token — a known one, or one sampled here — or ends. Returns the
        slots that go on."""
        chosen = next_tokens(logits, self.sampling, self.generator).tolist()
        go_on, nxt, ended = [], [], []
        for i, slot in enumerate(rows):
            req = self.owner[slot]
            request, done = self.requests[req], self.out[req]
            self.fed[slot] += 1
            self.stats.fed += 1
            if depths is not None:
                self.stats.depth_counts[depths[i]] += 1
            known = self._known(slot)
            if known is None:   # a new token
                tok = chosen[i]
                done.tokens.append(tok)
                if depths is not None:
                    done.depths.append(depths[i])
                if self.keep_logits:
                    done.logits.append(logits[i].float().cpu())
                self.stats.tokens += 1
                if len(done.tokens) >= request.max_new_tokens or (self.eos_id is not None and tok == self.eos_id):
                    self.owner[slot] = None       # finished: the slot takes the next request
                    ended.append(slot)
                    continue
                known = tok
            go_on.append(slot)
            nxt.append(known)
        if go_on:
            self._set_tokens(go_on, nxt)
        self._release(ended)
        return go_on
