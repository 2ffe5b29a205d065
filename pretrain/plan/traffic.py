"""Payload bytes per optimizer step, by (kind, group), on one GPU of each pipeline stage: the quantity that
pretrain/parallel/traffic.py measures (see its docstring), predicted from the model's shapes and the code paths
the layout takes. Model traffic only: the bookkeeping collectives (losses, the non-finite guard, gradient norms)
are a few bytes each and are left out here as they are in the measured totals.

Per micro-batch, b sequences of T tokens, e bytes per activation element (2 in bf16, 4 in fp32), on a layer op
that runs n tokens per sequence (T outside the recursions; k_r = max(1, ⌊c_r·T⌋) under expert-choice: the shared
block's traffic repeats for every recursion step and shrinks with its capacity):

  TP, no SP     all_reduce  4·b·n·d·e per layer op (forward: after the attention and MLP row-parallel linears;
                            backward: the column-parallel linears' input gradients); +2·b·n·d·e when the layer is
                            recomputed (activation checkpointing)
                all_reduce  b·T·d·e for the vocab-parallel embedding (forward), b·T·d·e for the head's input
                            gradient, 3·b·T·4 for the vocab-parallel loss (max, sum of exponentials, label logit)
  TP + SP       all_gather  6·b·n'·d·e, reduce_scatter 4·b·n'·d·e per layer op, n' = n rounded up to a multiple of
                            TP (forward: gather before each column-parallel linear, reduce-scatter after each
                            row-parallel one; backward: the same reversed, and the column-parallel linears gather
                            their input again for the weight gradient); recomputed: +2 all_gather
                            +1 reduce_scatter (the MLP's last reduce-scatter is not redone)
                all_gather  2·b·n'·d·e per run of layer ops between routing ops (scatter's backward, the gather)
                all_reduce  2·d·e_p per layer op (the norm weights' gradients), embedding and head as above
  PP            p2p_send / p2p_recv  R·b·d·4 each way per micro-batch and stage boundary (1F1B: activations
                            forward, their gradients back; R rows pack the whole routing state, fp32:
                            model/program.packed_rows); all_reduce over the pipeline group of every replicated
                            parameter's gradient, fp32, once per step (replicas of shared layers, tied
                            embedding, routers)
  DP  PP = 1    ZeRO-0      all_reduce of the gradients once per step
                ZeRO-1      all_reduce of the gradients once per step, all_gather of the parameters (each weight-
                            decay group flattened, padded to a multiple of 2·DP elements) after the step
                ZeRO-2      all_reduce of the gradients after every micro-batch's backward (DeepSpeed 0.19.8
                            reduces each bucket with an all-reduce and keeps its own partition), the ZeRO-1 gather
                ZeRO-3      reduce_scatter of the gradients after every micro-batch (each parameter padded to a
                            multiple of DP), the parameter gathers of pretrain/plan/zero3.py
      PP > 1    ZeRO-0/1    all_reduce of the gradients twice per step (the pipeline step averages them over DP,
                            then DeepSpeed's engine reduces them again), ZeRO-1's gather after the step
"""
from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass

from model.config import ModelConfig
from pretrain.plan.shapes import (Layout, layer_ops, padded, pipeline_rows, replicated_numel, segments,
                                  stage_params)
from pretrain.plan.zero3 import replay

FP32 = 4
BUCKET = 5e7            # elements: DeepSpeed's reduce / all-gather buckets (pretrain/parallel/zero.py)


@dataclass(frozen=True)
class Precision:
    activation: int     # bytes per activation element: 2 (bf16) or 4 (fp32)
    param: int          # bytes per parameter and gradient element

    @staticmethod
    def of(name: str) -> "Precision":
        return Precision(2, 2) if name == "bf16" else Precision(4, 4)


def _zero12_flat(params, dp: int) -> float:
    """Elements of ZeRO-1/2's flattened parameter groups (decay, no decay), each padded to 2·DP."""
    total = 0.0
    for decay in (True, False):
        n = sum(p.numel for p in params if p.decay == decay)
        total += padded(n, 2 * dp) if n else 0
    return total


def _flows(cfg: ModelConfig, layout: Layout, stage: int, seq_len: int,
           precision: Precision) -> dict[tuple[str, str], list[float]]:
    """{(kind, group): [payload bytes, calls]} per optimizer step on one GPU of ``stage``. The calls are an
    estimate for the time model's latency term (DeepSpeed's buckets of 5e7 elements); tests check the bytes."""
    out: dict[tuple[str, str], list[float]] = defaultdict(lambda: [0.0, 0.0])

    def add(kind: str, group: str, nbytes: float, calls: float) -> None:
        if nbytes:
            out[(kind, group)][0] += nbytes
            out[(kind, group)][1] += calls

    tp, pp, dp, m, b = layout.tp, layout.pp, layout.dp, layout.micro_batches, layout.micro_batch
    d, e, ep = cfg.d_model, precision.activation, precision.param
    first, last = stage == 0, stage == pp - 1
    bucket = BUCKET * ep
    if tp > 1:
        ops = layer_ops(cfg, pp, stage, seq_len, layout.sp)
        redo = 1 if layout.checkpointing else 0
        if layout.sp:
            rows = sum(padded(o.tokens, tp) for o in ops)
            seg = segments(cfg, pp, stage, seq_len, True)
            rows_seg = sum(padded(n, tp) for n in seg)
            add("all_gather", "tp", m * b * d * e * ((6 + 2 * redo) * rows + 2 * rows_seg),
                m * ((6 + 2 * redo) * len(ops) + 2 * len(seg)))
            add("reduce_scatter", "tp", m * b * d * e * (4 + redo) * rows, m * (4 + redo) * len(ops))
            add("all_reduce", "tp", m * 2 * d * ep * len(ops), m * 2 * len(ops))
        else:
            add("all_reduce", "tp", m * b * d * e * (4 + redo) * sum(o.tokens for o in ops),
                m * (4 + redo) * len(ops))
        if first:
            add("all_reduce", "tp", m * b * seq_len * d * e, m)
        if last:
            chunks = math.ceil(b * seq_len / (cfg.loss_chunk or b * seq_len))
            add("all_reduce", "tp", m * b * seq_len * (d * e + 3 * FP32), m * (1 + 2 * chunks))
    if pp > 1:
        p2p = m * pipeline_rows(cfg, pp, b, seq_len, tp) * b * d * FP32
        for kind, present in (("p2p_send", not last), ("p2p_recv", not first)):   # forward activations
            add(kind, "pp", p2p if present else 0, m)
        for kind, present in (("p2p_send", not first), ("p2p_recv", not last)):   # their gradients
            add(kind, "pp", p2p if present else 0, m)
        add("all_reduce", "pp", replicated_numel(cfg, tp, pp) * FP32, 1)
    if dp > 1:
        params = stage_params(cfg, tp, pp, stage)
        grads = sum(p.numel for p in params) * ep
        zero = layout.zero
        if pp > 1:   # every parameter's gradient on its own, then DeepSpeed's buckets
            add("all_reduce", "dp", 2 * grads, len(params) + math.ceil(grads / bucket))
        elif zero in (0, 1):
            add("all_reduce", "dp", grads, math.ceil(grads / bucket))
        elif zero == 2:
            add("all_reduce", "dp", m * grads, m * math.ceil(grads / bucket))
        else:
            scattered = sum(padded(p.numel, dp) for p in params) * ep
            add("reduce_scatter", "dp", m * scattered, m * math.ceil(scattered / bucket))
            z3 = replay(cfg, tp, dp, layout.checkpointing)
            add("all_gather", "dp", (m * z3.per_micro_batch + z3.per_step) * ep, m * z3.gathers + 1)
        if zero in (1, 2):
            flat = _zero12_flat(params, dp) * ep
            add("all_gather", "dp", flat, math.ceil(flat / bucket))
    return out


def stage_traffic(cfg: ModelConfig, layout: Layout, stage: int, seq_len: int,
                  precision: Precision) -> dict[tuple[str, str], float]:
    """Payload bytes per optimizer step on one GPU of pipeline stage ``stage``, by (kind, group)."""
    return {k: v[0] for k, v in _flows(cfg, layout, stage, seq_len, precision).items()}


def stage_calls(cfg: ModelConfig, layout: Layout, stage: int, seq_len: int,
                precision: Precision) -> dict[tuple[str, str], float]:
    """How many calls ``stage_traffic``'s bytes take (an estimate: see ``_flows``)."""
    return {k: v[1] for k, v in _flows(cfg, layout, stage, seq_len, precision).items()}


def step_traffic(cfg: ModelConfig, layout: Layout, seq_len: int,
                 precision: Precision) -> list[dict[tuple[str, str], float]]:
    """``stage_traffic`` for every pipeline stage, in order."""
    return [stage_traffic(cfg, layout, s, seq_len, precision) for s in range(layout.pp)]
