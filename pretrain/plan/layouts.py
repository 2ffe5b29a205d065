"""Every layout that can run a model on a cluster, and each one's prediction.

Valid means what pretrain/parallel/layout.check_layout accepts (TP divides the heads, kv heads, FFN and
vocabulary; PP > 1 only with ZeRO ≤ 1; sequence parallelism only with TP > 1; the global batch a multiple of
micro-batch × DP; the layers split into PP stages, so PP ≤ the unrolled layers) plus what a cluster needs: a TP
group stays inside one node (TP divides the GPUs per node).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator, Optional, Sequence

from conf.errors import ConfigError
from model.config import ModelConfig
from pretrain.parallel.layout import ParallelConfig, check_layout
from pretrain.plan.memory import StageMemory, step_memory
from pretrain.plan.shapes import Layout
from pretrain.plan.timing import Links, StepTime, step_time
from pretrain.plan.traffic import Precision, stage_calls, stage_traffic


@dataclass(frozen=True)
class Cluster:
    gpus: int
    gpus_per_node: int
    memory: float               # bytes per GPU
    rate: float                 # FLOP/s per GPU the model's compute runs at
    links: Links = field(default_factory=Links)

    @property
    def nodes(self) -> int:
        return self.gpus // self.gpus_per_node


@dataclass(frozen=True)
class Prediction:
    layout: Layout
    memory: list[StageMemory]                         # per pipeline stage, one GPU
    traffic: list[dict[tuple[str, str], float]]       # per stage: payload bytes per step by (kind, group)
    time: StepTime
    tokens_per_step: int

    @property
    def peak_memory(self) -> float:
        return max(m.peak for m in self.memory)

    def group_bytes(self, group: str) -> float:
        """Payload bytes per step on the busiest GPU's ``group`` collectives."""
        return max(sum(v for (_, g), v in t.items() if g == group) for t in self.traffic)

    @property
    def tokens_per_second(self) -> float:
        return self.tokens_per_step / self.time.total


def divisors(n: int) -> list[int]:
    return [i for i in range(1, n + 1) if n % i == 0]


def _valid(cfg: ModelConfig, layout: Layout, cluster: Cluster) -> Optional[str]:
    """None for a layout that can run here, else why not."""
    if cluster.gpus_per_node % layout.tp:
        return f"TP={layout.tp} does not divide {cluster.gpus_per_node} GPUs per node (a TP group would span nodes)"
    pcfg = ParallelConfig(tensor_parallel=layout.tp, pipeline_parallel=layout.pp, sequence_parallel=layout.sp,
                          zero_stage=layout.zero, micro_batch_size=layout.micro_batch,
                          global_batch_size=layout.global_batch)
    try:
        check_layout(pcfg, cluster.gpus, cfg)
    except ConfigError as e:
        return str(e)
    return None


def candidates(cfg: ModelConfig, cluster: Cluster, global_batch: int, checkpointing: Sequence[bool],
               max_micro_batch: int) -> Iterator[Layout]:
    """Every layout of ``cluster.gpus`` GPUs for ``global_batch`` sequences per step, valid ones only."""
    for tp in divisors(cluster.gpus):
        for pp in divisors(cluster.gpus // tp):
            dp = cluster.gpus // (tp * pp)
            if global_batch % dp:
                continue
            for zero in range(4):
                for sp in ((False, True) if tp > 1 else (False,)):
                    for mb in divisors(global_batch // dp):
                        if mb > max_micro_batch:
                            break
                        for ckpt in checkpointing:
                            layout = Layout(tp, pp, dp, zero, sp, mb, global_batch // (dp * mb), ckpt)
                            if _valid(cfg, layout, cluster) is None:
                                yield layout


def predict(cfg: ModelConfig, layout: Layout, cluster: Cluster, seq_len: int, precision: Precision) -> Prediction:
    traffic = [stage_traffic(cfg, layout, s, seq_len, precision) for s in range(layout.pp)]
    calls = [stage_calls(cfg, layout, s, seq_len, precision) for s in range(layout.pp)]
    memory = step_memory(cfg, layout, seq_len, precision)
    time = step_time(cfg, layout, seq_len, traffic, calls, cluster.rate, cluster.gpus_per_node, cluster.links)
    return Prediction(layout, memory, traffic, time, layout.global_batch * seq_len)


def plan(cfg: ModelConfig, cluster: Cluster, *, global_batch: int, seq_len: int, precision: Precision,
         checkpointing: Sequence[bool] = (False,), max_micro_batch: int = 64) -> list[Prediction]:
    """Every valid layout's prediction, fastest first; of equally fast ones, the larger micro-batch first (the
    compute rate is one number here, while a GPU runs larger matmuls closer to its peak)."""
    out = [predict(cfg, layout, cluster, seq_len, precision)
           for layout in candidates(cfg, cluster, global_batch, checkpointing, max_micro_batch)]
    return sorted(out, key=lambda p: (round(p.time.total, 9), -p.layout.micro_batch, p.peak_memory))
