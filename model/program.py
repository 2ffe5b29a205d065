"""The model's forward pass as a flat program of ops, and the state that flows between them.

Writing the unrolled model as a list of ops — layer applications plus the routing ops around each recursion
step — lets one interpreter run the whole model in one process and any contiguous slice of it on a pipeline
stage. A slice's inputs and outputs are the *state* alive at its edges (the residual stream, and mid-recursion
the compacted tokens, their original positions and gates, the router losses so far), which ``pack`` turns into
the single tensor megatron's pipeline schedule sends between stages and ``unpack`` turns back. The routing
ops, and the state they keep, come from the model's routing variant (model/routing):

    expert-choice   prelude layers | ec_route r, block layers, ec_merge r  (r = 1..Nr) | coda layers
    token-choice    prelude layers | tc_route | tc_begin r, block layers, tc_end r      | coda layers
    none            every layer in unrolled order
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch

from conf.errors import ConfigError
from model.config import ModelConfig
from model.flops import step_tokens
from model.routing import Op, StateSpec, routing_class
from model.sharing import build_plan

__all__ = ["Op", "build_program", "pack", "packed_rows", "stage_ranges", "state_spec", "unpack"]


def build_program(cfg: ModelConfig) -> list[Op]:
    """Layer ops in unrolled order, with the routing variant's ops around the recursion steps. With recursive KV
    sharing, the j-th layer of every recursion step after the first attends to the keys and values that the j-th
    layer of the first step made (``kv_from``)."""
    plan, routing = build_plan(cfg), routing_class(cfg)
    first = len(plan.prelude)  # unrolled position of the first step's first layer
    ops = [Op("layer", -1, i, pos=p) for p, i in enumerate(plan.prelude)] + routing.entry_ops(cfg)
    for r, ids in enumerate(plan.steps):
        opening, closing = routing.step_ops(cfg, r)
        at = first + r * len(ids)
        ops += opening + [Op("layer", r, i, pos=at + j, kv_from=first + j if cfg.kv_sharing and r > 0 else -1)
                          for j, i in enumerate(ids)] + closing
    coda_at = first + sum(len(ids) for ids in plan.steps)
    return ops + [Op("layer", -1, i, pos=coda_at + p) for p, i in enumerate(plan.coda)]


# ---- pipeline stages --------------------------------------------------------------------------------------------
def stage_ranges(cfg: ModelConfig, pp: int, seq_len: Optional[int] = None) -> list[tuple[int, int]]:
    """Split the program into ``pp`` contiguous op ranges of about equal work (tokens × layers).

    A stage boundary always falls between two layer ops: routing ops travel with the block layers they open
    (route, begin) or close (merge, end). Raises ConfigError when there are fewer layer ops than stages.
    """
    ops = build_program(cfg)
    layer_pos = [i for i, op in enumerate(ops) if op.kind == "layer"]
    if pp > len(layer_pos):
        raise ConfigError(f"parallel.pipeline_parallel: {pp} stages but the model unrolls to only {len(layer_pos)} "
                          "layers; use at most that many stages")
    t = seq_len or cfg.max_seq_len
    per_step = step_tokens(cfg, t)
    cost = [per_step[ops[i].step] if ops[i].step >= 0 else float(t) for i in layer_pos]
    total, cuts, acc = sum(cost), [], 0.0
    for j, c in enumerate(cost[:-1]):
        acc += c
        # cut after layer j once this stage holds its share, keeping enough layers for the stages still to come
        if len(cuts) < pp - 1 and (acc >= total * (len(cuts) + 1) / pp or len(cost) - 1 - j == pp - 1 - len(cuts)):
            cuts.append(j)
    starts = [0]
    for j in cuts:
        end = layer_pos[j] + 1
        while end < len(ops) and ops[end].closes:
            end += 1
        starts.append(end)
    return [(a, b) for a, b in zip(starts, starts[1:] + [len(ops)])]


# ---- state between ops --------------------------------------------------------------------------------------
def state_spec(cfg: ModelConfig, upto: int, batch: int, seq_len: int, kept: Optional[Sequence[int]] = None, *,
               causal: bool = False, tp: int = 1) -> StateSpec:
    """The state alive after the first ``upto`` ops of the program (before op ``upto``): key -> (shape,
    is_integer). ``kept``: tokens each recursion step keeps in this forward pass (``MoRModel.router.kept_tokens``;
    expert-choice's capacity warm-up changes them); default the largest of the run, which sizes the buffers.
    ``causal``: the forward pass routes causally (``MoRModel.forward(causal_routing=True)``). ``tp``: the tensor-
    parallel size (shared keys and values hold this rank's kv heads)."""
    routing = routing_class(cfg)
    kept = routing.max_kept_tokens(cfg, seq_len) if kept is None else kept
    spec: StateSpec = {"h": ((batch, seq_len, cfg.d_model), False), "aux": ((), False)}
    program = build_program(cfg)
    for op in program[:upto]:
        if op.kind != "layer":
            routing.state_after(cfg, op, spec, batch, seq_len, kept, causal)
    # Recursive KV sharing: the first step's keys and values, alive while a later layer still reads them.
    for src in sorted({op.kv_from for op in program[upto:] if op.kv_from >= 0}):
        if any(op.pos == src for op in program[:upto]):
            n = routing.stream_len(cfg, 0, seq_len, kept, causal)
            kv = (batch, n, cfg.n_kv_heads // tp, cfg.head_dim)
            spec.update({f"kv{src}_k": (kv, False), f"kv{src}_v": (kv, False), f"kv{src}_pos": ((batch, n), True),
                         f"kv{src}_valid": ((batch, n), True)})
    return spec


_INT_BASE = 256  # integers travel as two floats < 256, exact even in bf16


def _numel(shape: tuple[int, ...], is_int: bool) -> int:
    return math.prod(shape) * (2 if is_int else 1)


def packed_rows(cfg: ModelConfig, pp: int, batch: int, seq_len: int, tp: int = 1) -> int:
    """Rows R of the (R, B, d_model) tensor that carries the state across every stage boundary of this layout, in
    every forward pass of the run (state_spec's default ``kept`` is the largest), training or causal routing."""
    most = 0
    for _, end in stage_ranges(cfg, pp, seq_len)[:-1]:
        for causal in (False, True):
            spec = state_spec(cfg, end, batch, seq_len, causal=causal, tp=tp)
            most = max(most, sum(_numel(s, i) for s, i in spec.values()))
    return max(1, math.ceil(most / (batch * cfg.d_model)))


def pack(state: dict[str, torch.Tensor], spec: dict, rows: int, dtype: torch.dtype) -> torch.Tensor:
    parts = []
    for key in sorted(spec):
        v = state[key]
        if spec[key][1]:
            parts += [(v // _INT_BASE).to(dtype).reshape(-1), (v % _INT_BASE).to(dtype).reshape(-1)]
        else:
            parts.append(v.to(dtype).reshape(-1))
    flat = torch.cat(parts)
    batch, d = spec["h"][0][0], spec["h"][0][2]
    flat = torch.nn.functional.pad(flat, (0, rows * batch * d - flat.numel()))
    return flat.view(rows, batch, d)


def unpack(packed: torch.Tensor, spec: dict, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    flat, state, at = packed.reshape(-1), {}, 0
    for key in sorted(spec):
        shape, is_int = spec[key]
        n = math.prod(shape)
        if is_int:
            hi, lo = flat[at:at + n], flat[at + n:at + 2 * n]
            state[key] = (hi.detach().round().long() * _INT_BASE + lo.detach().round().long()).view(shape)
            at += 2 * n
        else:
            state[key] = flat[at:at + n].view(shape).to(dtype)
            at += n
    return state
