"""Initial weights that do not depend on the parallel layout.

megatron-core initialises each tensor-parallel shard from its own RNG stream, and a pipeline stage builds only its
own layers, so the same seed gives different initial weights under different layouts and runs on two layouts
cannot be compared from step one. ``init_weights`` redraws every parameter from a generator seeded by (seed,
parameter name) alone: the full (TP = 1) tensor is drawn and this rank keeps its slice of it (model/tp_shard.py),
so every layout starts from the weights one process would have. Replicas of a shared layer on several pipeline
stages get the same name, hence the same values.

The distributions are the model's own (model/layers.py, model/routing/base.py): N(0, init_std) for the
embedding, the head and the projections into a layer; N(0, init_std / sqrt(2 · n_layers)) for the projections
that write into the residual stream; N(0, ROUTER_INIT_STD) for router heads; ones for norms.
"""
from __future__ import annotations

import math
import zlib

import torch
from torch import nn

from model.config import ModelConfig
from model.routing.base import ROUTER_INIT_STD
from model.tp_shard import full_shape, shard_state_dict

_RESIDUAL_OUT = ("attn.proj.weight", "mlp.down.weight")
_PLAIN = ("embedding.weight", "output_layer.weight", "attn.qkv.weight", "mlp.gate_up.weight")


def initial_value(name: str, cfg: ModelConfig) -> tuple[str, float]:
    """("normal", std) or ("ones", 0) for the parameter ``name``; ValueError for a parameter with no rule, so a new
    kind of parameter cannot start from an unintended distribution."""
    if name.endswith("norm.weight"):
        return "ones", 0.0
    if name.endswith(_RESIDUAL_OUT):
        return "normal", cfg.init_std / math.sqrt(2 * cfg.n_layers)
    if name.endswith(_PLAIN):
        return "normal", cfg.init_std
    if name.startswith("router.") and name.endswith(".weight"):
        return "normal", ROUTER_INIT_STD
    raise ValueError(f"no layout-free initialisation rule for parameter {name!r} (model/init.py)")


def _generator(seed: int, name: str) -> torch.Generator:
    return torch.Generator(device="cpu").manual_seed((seed * 1_000_003 + zlib.crc32(name.encode())) % 2**63)


@torch.no_grad()
def init_weights(model: nn.Module, cfg: ModelConfig, seed: int, tp_rank: int = 0, tp_size: int = 1) -> None:
    """Redraw every parameter of ``model`` (a whole model or one pipeline stage, one TP rank's shard) as described
    above. Drawn on the CPU in fp32, one full tensor at a time, then copied into the parameter's device/dtype."""
    for name, p in model.named_parameters():
        kind, std = initial_value(name, cfg)
        shape = full_shape(name, tuple(p.shape), tp_size)
        if kind == "ones":
            full = torch.ones(shape)
        else:
            full = torch.empty(shape).normal_(0.0, std, generator=_generator(seed, name))
        p.copy_(shard_state_dict({name: full}, tp_rank, tp_size)[name])
