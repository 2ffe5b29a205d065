"""Step time of a layout: compute from the model's own FLOPs (model/flops.py) at an assumed rate, plus the
collectives of pretrain/plan/traffic.py on an α–β model of the links, plus the pipeline's bubble.

Collectives (ring algorithms, a group of n GPUs, S payload bytes, B the link's bandwidth per GPU and direction,
α its latency per message):

    all_reduce                  2(n−1)·α + 2(n−1)/n · S/B
    all_gather, reduce_scatter  (n−1)·α + (n−1)/n · S/B
    p2p                         α + S/B

A group's link is NVLink (``intra``) when all its GPUs share a node and InfiniBand (``inter``) otherwise. Ranks are
placed as megatron-core orders them: TP fastest, then DP, then PP, ``gpus_per_node`` to a node. Nothing overlaps:
the project's DeepSpeed config runs with ``overlap_comm`` off and megatron's TP collectives wait for their result.

Compute: one micro-batch on a stage costs its share of the model's training FLOPs (3 × forward; 4 × for the
layers under activation checkpointing), divided by TP, at ``rate`` FLOP/s per GPU (MFU × peak, or a measured
rate). 1F1B runs (m + PP − 1) micro-batch slots of the slowest stage: the bubble is (PP − 1)/(m + PP − 1).
Not modelled: kernel efficiency changing with the layout (the rate is one number), the optimizer step's own time.
"""
from __future__ import annotations

from dataclasses import dataclass

from model.config import ModelConfig
from model.flops import layer_linear_params, training_flops
from pretrain.plan.shapes import Layout, layer_ops


@dataclass(frozen=True)
class Gpu:
    name: str
    peak_flops: float      # dense bf16 FLOP/s
    memory: float          # bytes


GPUS = {"h100": Gpu("H100", 989e12, 80e9), "h200": Gpu("H200", 989e12, 141e9)}


@dataclass(frozen=True)
class Links:
    intra_bw: float = 450e9      # bytes/s per GPU and direction, NVLink (H100 SXM, effective bus bandwidth)
    inter_bw: float = 50e9       # 400 Gb/s InfiniBand per GPU
    intra_alpha: float = 3e-6    # seconds per message
    inter_alpha: float = 10e-6


@dataclass(frozen=True)
class StepTime:
    compute: float          # seconds of computation on the slowest stage, bubble included
    tp: float               # seconds in collectives, by group (slowest stage)
    pp: float
    dp: float
    bubble: float           # fraction of the pipeline's slots that idle
    total: float


def spans_nodes(layout: Layout, group: str, gpus_per_node: int) -> bool:
    """Whether some group of this kind holds GPUs of two nodes (megatron's order: TP, DP, PP)."""
    extent = {"tp": layout.tp, "dp": layout.tp * layout.dp, "pp": layout.gpus}[group]
    return extent > gpus_per_node


def collective_time(kind: str, n: int, nbytes: float, calls: float, inter: bool, links: Links) -> float:
    bw = links.inter_bw if inter else links.intra_bw
    alpha = links.inter_alpha if inter else links.intra_alpha
    if kind.startswith("p2p"):
        return calls * alpha + nbytes / bw
    steps, share = ((2 * (n - 1), 2 * (n - 1) / n) if kind == "all_reduce" else ((n - 1), (n - 1) / n))
    return calls * steps * alpha + share * nbytes / bw


def stage_flops(cfg: ModelConfig, layout: Layout, seq_len: int) -> list[float]:
    """Training FLOPs of one micro-batch on each stage, on one GPU: model/flops.py's total, split over the stages
    by their layer work (the head on the last stage), divided by TP."""
    report = training_flops(cfg, seq_len)
    lin = 2.0 * layer_linear_params(cfg)
    h_hd = cfg.n_heads * cfg.head_dim
    shares = [sum(lin * o.tokens + 2.0 * h_hd * o.tokens * (o.tokens + 1)
                  for o in layer_ops(cfg, layout.pp, s, seq_len, False)) for s in range(layout.pp)]
    body, total = report.forward_per_sequence - report.head, sum(shares) or 1.0
    passes = 4.0 if layout.checkpointing else 3.0      # forward, backward (2×), and the recomputed forward
    return [(passes * body * share / total + (3.0 * report.head if s == layout.pp - 1 else 0.0))
            * layout.micro_batch / layout.tp for s, share in enumerate(shares)]


def step_time(cfg: ModelConfig, layout: Layout, seq_len: int, traffic: list[dict], calls: list[dict],
              rate: float, gpus_per_node: int, links: Links) -> StepTime:
    """``traffic`` / ``calls``: per stage, {(kind, group): bytes} and {(kind, group): number of calls}."""
    m, pp = layout.micro_batches, layout.pp
    sizes = {"tp": layout.tp, "pp": pp, "dp": layout.dp}
    per_stage = []
    for flows, counts in zip(traffic, calls):
        t = {"tp": 0.0, "p2p": 0.0, "pp": 0.0, "dp": 0.0}   # p2p: per micro-batch; pp: the replicas, per step
        for (kind, group), nbytes in flows.items():
            p2p = kind.startswith("p2p")
            seconds = collective_time(kind, 2 if p2p else sizes[group], nbytes, counts.get((kind, group), 1),
                                      spans_nodes(layout, group, gpus_per_node), links)
            t["p2p" if p2p else group] += seconds
        per_stage.append(t)
    flops = stage_flops(cfg, layout, seq_len)
    slots = m + pp - 1                 # 1F1B: the slowest stage's micro-batch slots, bubble included
    slot = max(f / rate + (t["tp"] + t["p2p"]) / m for f, t in zip(flops, per_stage))
    after = max(t["dp"] + t["pp"] for t in per_stage)
    return StepTime(compute=slots * max(f / rate for f in flops),
                    tp=slots * max(t["tp"] for t in per_stage) / m,
                    pp=slots * max(t["p2p"] for t in per_stage) / m + max(t["pp"] for t in per_stage),
                    dp=max(t["dp"] for t in per_stage), bubble=(pp - 1) / slots, total=slots * slot + after)
