"""What runs where under a layout: parameters per pipeline stage (tensor-parallel shards), the layer ops of each
stage with the tokens each runs on, and the micro-batch layout. Read from the model's own program
(model/program.py) and sharing plan, as the model builds itself, so the planner follows the model's code.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any, Callable, TypeVar

import torch

from model.config import ModelConfig
from model.program import build_program, packed_rows, stage_ranges
from model.routing import Op, build_routing, routing_class


F = TypeVar("F", bound=Callable[..., Any])
_KEYS: dict[int, tuple[ModelConfig, str]] = {}


def config_key(cfg: ModelConfig) -> str:
    """A hashable stand-in for a config (ModelConfig is a plain, unhashable dataclass; the planner never changes
    one it is given)."""
    known = _KEYS.get(id(cfg))
    if known is None or known[0] is not cfg:
        known = _KEYS[id(cfg)] = (cfg, repr(cfg))
    return known[1]


def memo(fn: F) -> F:
    """Remember ``fn(cfg, *args)`` by the config's key and the other arguments: the enumeration asks the same
    questions of the model for hundreds of layouts."""
    cache: dict[tuple, Any] = {}

    @functools.wraps(fn)
    def wrapper(cfg: ModelConfig, *args):
        key = (config_key(cfg), *args)
        if key not in cache:
            cache[key] = fn(cfg, *args)
        return cache[key]
    return wrapper  # type: ignore[return-value]


@dataclass(frozen=True)
class Layout:
    """One way to run the model: sizes of the three groups, the ZeRO stage, sequence parallelism, micro-batches."""
    tp: int
    pp: int
    dp: int
    zero: int
    sp: bool
    micro_batch: int           # sequences per micro-batch
    micro_batches: int         # micro-batches per optimizer step on each data-parallel rank
    checkpointing: bool = False

    @property
    def gpus(self) -> int:
        return self.tp * self.pp * self.dp

    @property
    def global_batch(self) -> int:
        return self.micro_batch * self.micro_batches * self.dp

    def describe(self) -> str:
        sp = "+SP" if self.sp else ""
        ckpt = " ckpt" if self.checkpointing else ""
        return f"TP{self.tp}{sp} PP{self.pp} DP{self.dp} Z{self.zero} mb{self.micro_batch}x{self.micro_batches}{ckpt}"

    def overrides(self) -> list[str]:
        """The ``parallel.*`` (and ``train.*``) overrides that ``python -m pretrain.train`` takes for it."""
        out = [f"parallel.tensor_parallel={self.tp}", f"parallel.pipeline_parallel={self.pp}",
               f"parallel.zero_stage={self.zero}", f"parallel.micro_batch_size={self.micro_batch}",
               f"parallel.global_batch_size={self.global_batch}"]
        if self.sp:
            out.append("parallel.sequence_parallel=true")
        if self.checkpointing:
            out.append("train.activation_checkpointing=true")
        return out


@dataclass(frozen=True)
class Param:
    name: str
    numel: int          # on one tensor-parallel rank
    decay: bool         # a matrix (weight decay group); 1-D parameters are in the other group


@dataclass(frozen=True)
class LayerOp:
    op: Op
    tokens: float       # tokens per sequence this layer application runs on


@memo
def tokens_of_step(cfg: ModelConfig, seq_len: int, sp: bool) -> list[float]:
    """Tokens per sequence that the layers of each recursion step run on: the routing's own count (expert-choice:
    k_r = max(1, ⌊c_r·T⌋); token-choice: the expected count under balanced depths), or, where the stream runs
    whole rows under a mask (sequence parallelism, ``tc_compact`` off), the stream's length."""
    routing = routing_class(cfg)
    n = len(_steps(cfg))
    if sp or not cfg.tc_compact:
        kept = cfg.capacity_tokens(seq_len)
        return [float(routing.stream_len(cfg, r, seq_len, kept, False)) for r in range(n)]
    return [float(k) for k in routing.step_tokens(cfg, seq_len, n)]


def _steps(cfg: ModelConfig) -> list[int]:
    return sorted({op.step for op in build_program(cfg) if op.step >= 0}) or [0]


@memo
def _stages(cfg: ModelConfig, pp: int) -> list[list[Op]]:
    program = build_program(cfg)
    return [program[a:b] for a, b in stage_ranges(cfg, pp)]


def stage_ops(cfg: ModelConfig, pp: int, stage: int) -> list[Op]:
    """The program ops of ``stage``, cut as MoRModel cuts them (stage_ranges at the config's max_seq_len)."""
    return _stages(cfg, pp)[stage]


@memo
def layer_ops(cfg: ModelConfig, pp: int, stage: int, seq_len: int, sp: bool) -> list[LayerOp]:
    steps = tokens_of_step(cfg, seq_len, sp)
    return [LayerOp(op, float(seq_len) if op.step < 0 else steps[op.step])
            for op in stage_ops(cfg, pp, stage) if op.kind == "layer"]


@memo
def segments(cfg: ModelConfig, pp: int, stage: int, seq_len: int, sp: bool) -> list[float]:
    """Under sequence parallelism, the token counts of the runs of layer ops between routing ops (or a stage's
    edges): each run scatters its stream over the TP group once and gathers it once."""
    steps = tokens_of_step(cfg, seq_len, sp)
    out: list[float] = []
    previous_layer = False
    for op in stage_ops(cfg, pp, stage):
        if op.kind == "layer":
            if not previous_layer:
                out.append(float(seq_len) if op.step < 0 else steps[op.step])
            previous_layer = True
        else:
            previous_layer = False
    return out


@memo
def router_params(cfg: ModelConfig) -> list[tuple[str, int]]:
    """(name, size) of every parameter of the model's routing module (built on the meta device: no memory)."""
    with torch.device("meta"):
        routing = build_routing(cfg)
    return [(name, p.numel()) for name, p in routing.named_parameters()]


def layer_params(cfg: ModelConfig, tp: int, layer: int) -> list[Param]:
    d, hd, f = cfg.d_model, cfg.head_dim, cfg.ffn_hidden
    p = f"layers.{layer}."
    return [Param(p + "attn_norm", d, False),
            Param(p + "attn.qkv", (cfg.n_heads + 2 * cfg.n_kv_heads) * hd * d // tp, True),
            Param(p + "attn.proj", d * cfg.n_heads * hd // tp, True),
            Param(p + "mlp_norm", d, False),
            Param(p + "mlp.gate_up", 2 * f * d // tp, True),
            Param(p + "mlp.down", f * d // tp, True)]


@memo
def stage_params(cfg: ModelConfig, tp: int, pp: int, stage: int) -> list[Param]:
    """This stage's parameters on one TP rank, in the order the model registers them."""
    first, last = stage == 0, stage == pp - 1
    embed = cfg.vocab_size * cfg.d_model // tp
    out = [Param("embedding", embed, True)] if first or (last and cfg.tie_embeddings) else []
    for i in sorted({op.layer for op in stage_ops(cfg, pp, stage) if op.kind == "layer"}):
        out += layer_params(cfg, tp, i)
    if last:
        out.append(Param("final_norm", cfg.d_model, False))
        if not cfg.tie_embeddings:
            out.append(Param("output_layer", embed, True))
    out += [Param(f"router.{name}", n, True) for name, n in router_params(cfg)]
    return out


@memo
def replicated_numel(cfg: ModelConfig, tp: int, pp: int) -> int:
    """Elements of the parameters held by two or more stages: the pipeline's replica gradient sum all-reduces
    all of them on every stage (zeros where a stage holds none)."""
    if pp == 1:
        return 0
    held: dict[str, tuple[int, int]] = {}
    for s in range(pp):
        for p in stage_params(cfg, tp, pp, s):
            n, count = held.get(p.name, (p.numel, 0))
            held[p.name] = (n, count + 1)
    return sum(n for n, count in held.values() if count > 1)


@memo
def pipeline_rows(cfg: ModelConfig, pp: int, micro_batch: int, seq_len: int, tp: int) -> int:
    """Rows of the (rows, micro-batch, d_model) tensor each pipeline p2p carries (model/program.packed_rows)."""
    return packed_rows(cfg, pp, micro_batch, seq_len, tp)


def padded(n: float, multiple: int) -> float:
    return math.ceil(n / multiple) * multiple
