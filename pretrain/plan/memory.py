"""Bytes per GPU of one pipeline stage: model state by ZeRO stage, activations, and the peak of a step.

Model state, per parameter on this GPU (Ψ: the stage's parameters on one TP rank; /DP where ZeRO shards it):

                 weights          gradients (during the step)        master + Adam moments (fp32)
    ZeRO-0       e                e, all of them                      bf16: 4 + 8; fp32: 8 (the weights are the master)
    ZeRO-1       e (flat)         e, all of them; fp32 partition      (4 + 8) / DP
    ZeRO-2       e (flat)         one 5e7-element bucket of e, and    (4 + 8) / DP
                                  the partition: 4 / DP
    ZeRO-3       e / DP, and      one bucket, the partition 4 / DP    (4 + 8) / DP
                 whole for the parameters under 1e5 elements and while gathered (pretrain/plan/zero3.py)

e = 2 in bf16, 4 in fp32. In fp32 ZeRO-1/2/3 still keep their own fp32 copy of the partition (DeepSpeed clones it).

Activations kept for the backward pass, per micro-batch of b sequences (N = b·n tokens on a layer op that runs n
tokens per sequence, t = TP, e bytes per element; under sequence parallelism the d-wide tensors are split by t):

    layer op     N·e·(4d + (H + 2Hkv)·hd/t + 4·H·hd/t + Hkv·hd/t + [2·H·hd/t with grouped-query attention]
                      + H/t + 4F/t)         norm outputs and the residuals, q/k/v and their RoPE, SDPA's output and
                                            log-sum-exp, the SwiGLU input, activation and product
    checkpointed N·e·d per layer op (its input); one layer's activations again while it is recomputed
    routing      the op opening recursion step r: the step's gathered tokens b·n_r·d and, from the second step, the
                 router's candidates b·n_{r-1}·d (expert-choice's; token-choice is approximated the same way)
    embedding    b·T·d·e (first stage); head: its input b·T·d·e, the chunked loss's saved gradients b·T·d·e and
                 V/t·d·4, and while it runs one chunk's logits (chunk·V/t·4) and V/t·d·4 more
    pipeline     the received and the sent state, R·b·d·4 each (model/program.packed_rows)

1F1B keeps up to min(PP − stage, micro-batches) micro-batches in flight on a stage. The backward pass is swept
layer by layer: activations are freed as gradients appear (ZeRO-0/1 allocate every gradient in the first micro-
batch; a step of one micro-batch holds them only from where the sweep has reached), with a working set of
3·N·F/t·e (the SwiGLU gradients). The peak is the highest of: that sweep, the gradient reduction (ZeRO-0/1 flatten
their gradients into one more copy, up to their bucket), and the optimizer step.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

from model.config import ModelConfig
from pretrain.plan.shapes import (Layout, Param, layer_ops, padded, pipeline_rows, stage_ops, stage_params,
                                  tokens_of_step)
from pretrain.plan.traffic import Precision
from pretrain.plan.zero3 import replay

FP32 = 4
REDUCE_BUCKET = 5e7          # pretrain/parallel/zero.py: reduce_bucket_size
ZERO0_BUCKET = 5e8           # DeepSpeed's engine: MEMORY_OPT_ALLREDUCE_SIZE
LOSS_CHUNK_DEFAULT = 2048


@dataclass(frozen=True)
class StageMemory:
    weights: float
    gradients: float
    optimizer: float            # fp32 master copies and Adam moments
    activations: float          # all micro-batches in flight
    peak: float                 # the most allocated at once during a step

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


def layer_activation(cfg: ModelConfig, tokens: float, tp: int, sp: bool, e: int) -> float:
    """Bytes a layer op keeps for its backward pass over ``tokens`` tokens (all sequences of the micro-batch)."""
    d, hd, h, hkv, f = cfg.d_model, cfg.head_dim, cfg.n_heads, cfg.n_kv_heads, cfg.ffn_hidden
    wide = 4 * d / (tp if sp else 1)
    heads = ((h + 2 * hkv) * hd + 4 * h * hd + hkv * hd + (2 * h * hd if h != hkv else 0) + h) / tp
    return tokens * e * (wide + heads + 4 * f / tp) + 2 * tokens * FP32


def _working(cfg: ModelConfig, tokens: float, tp: int, e: int) -> float:
    return 3 * tokens * cfg.ffn_hidden / tp * e


def _state(cfg: ModelConfig, layout: Layout, params: list[Param], precision: Precision) -> tuple[float, float, float]:
    """(weights, optimizer state, gradient partition that lives across steps) in bytes."""
    psi = sum(p.numel for p in params)
    e, dp = precision.param, layout.dp
    if layout.zero == 0:
        return psi * e, (8 + (4 if e != FP32 else 0)) * psi, 0.0
    flat = sum(padded(sum(p.numel for p in params if p.decay == decay), 2 * dp) for decay in (True, False))
    shard = flat / dp
    if layout.zero in (1, 2):
        return flat * e, 12 * shard, 0.0
    z3 = replay(cfg, layout.tp, dp, layout.checkpointing)
    part = sum(padded(p.numel, dp) for p in params) / dp
    return part * e + z3.persistent * e, 12 * part, FP32 * part


def activations(cfg: ModelConfig, layout: Layout, stage: int, seq_len: int, e: int) -> tuple[float, list[float]]:
    """(bytes kept per micro-batch outside the layers, each layer op's bytes in order)."""
    b, d, tp, sp = layout.micro_batch, cfg.d_model, layout.tp, layout.sp
    ops = layer_ops(cfg, layout.pp, stage, seq_len, sp)
    if layout.checkpointing:
        per_layer = [b * o.tokens * d * e / (tp if sp else 1) for o in ops]
    else:
        per_layer = [layer_activation(cfg, b * o.tokens, tp, sp, e) for o in ops]
    other = 0.0
    kept = tokens_of_step(cfg, seq_len, sp)
    for op in stage_ops(cfg, layout.pp, stage):
        if op.kind != "layer" and not op.closes and op.step >= 0:   # a routing op that opens recursion step r
            other += b * d * e * (kept[op.step] + (kept[op.step - 1] if op.step > 0 else 0))
    first, last = stage == 0, stage == layout.pp - 1
    if first:
        other += b * seq_len * d * e
    if last:
        other += 2 * b * seq_len * d * e + cfg.vocab_size / tp * d * FP32
    if layout.pp > 1:
        rows = pipeline_rows(cfg, layout.pp, b, seq_len, tp)
        other += rows * b * d * FP32 * ((0 if first else 1) + (0 if last else 1))
    return other, per_layer


def stage_memory(cfg: ModelConfig, layout: Layout, stage: int, seq_len: int, precision: Precision) -> StageMemory:
    params = stage_params(cfg, layout.tp, layout.pp, stage)
    psi = sum(p.numel for p in params)
    e, dp, m, tp = precision.param, layout.dp, layout.micro_batches, layout.tp
    weights, optimizer, grad_part = _state(cfg, layout, params, precision)
    static = weights + optimizer + grad_part
    other, per_layer = activations(cfg, layout, stage, seq_len, precision.activation)
    act_mb = other + sum(per_layer)
    in_flight = 1 if layout.pp == 1 else min(layout.pp - stage, m)
    full_grads = psi * e
    bucket = min(psi, ZERO0_BUCKET if layout.zero == 0 else REDUCE_BUCKET) * e
    partition = FP32 * psi / dp if layout.zero > 0 else 0.0
    static_live = replay(cfg, tp, dp, layout.checkpointing).peak_live * e if layout.zero == 3 else 0.0
    if layout.zero in (0, 1):      # every gradient whole, from the first backward to the step
        held, cap, later_grows = full_grads, full_grads, False
        reduce_peak = full_grads + bucket + partition
    else:                          # gradients up to a bucket, then reduced into this rank's partition
        held, cap, later_grows = (partition if layout.zero == 2 else 0.0), bucket, True
        reduce_peak = partition + 2 * bucket
    ops = layer_ops(cfg, layout.pp, stage, seq_len, layout.sp)
    b, last = layout.micro_batch, stage == layout.pp - 1
    layer_param = psi / max(1, len(ops)) * e
    chunk = min(cfg.loss_chunk or b * seq_len, b * seq_len)
    head = (chunk * cfg.vocab_size / tp * FP32 + 2 * cfg.vocab_size / tp * cfg.d_model * FP32) if last else 0.0

    def sweep(base: float, grows: bool) -> float:
        """The highest point of one micro-batch's backward pass, from the head back to the first layer op."""
        most, remaining, grads = base + act_mb + head, act_mb, 0.0
        for o, a in zip(reversed(ops), reversed(per_layer)):
            redo = (layer_activation(cfg, b * o.tokens, tp, layout.sp, precision.activation)
                    if layout.checkpointing else 0.0)
            grads = min(cap, grads + layer_param) if grows else 0.0
            most = max(most, base + remaining + redo + grads + _working(cfg, b * o.tokens, tp, precision.activation))
            remaining -= a
        return most

    state = static + static_live
    # the first backward: every micro-batch of the warm-up in flight, no gradient yet; the later ones: the
    # gradients (or the partition) held, one micro-batch fewer in flight at most
    peak = sweep(state + (in_flight - 1) * act_mb, True)
    if m > 1:
        peak = max(peak, sweep(state + held + (min(in_flight, m - 1) - 1) * act_mb, later_grows))
    peak = max(peak, state + reduce_peak)
    gradients = full_grads if layout.zero in (0, 1) else partition if layout.zero == 2 else 0.0
    return StageMemory(weights + static_live, gradients + grad_part, optimizer, in_flight * act_mb, peak)


def step_memory(cfg: ModelConfig, layout: Layout, seq_len: int, precision: Precision) -> list[StageMemory]:
    return [stage_memory(cfg, layout, s, seq_len, precision) for s in range(layout.pp)]
