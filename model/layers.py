"""Llama-style decoder layer on megatron-core tensor-parallel linears.

Activations are batch-first (B, S, D). The QKV projection is one column-parallel matmul laid out by kv-head
group — [q heads of group 0, k_0, v_0, q heads of group 1, k_1, v_1, ...] — so that splitting its output
contiguously over tensor-parallel ranks hands each rank whole groups. Likewise the SwiGLU input projection is
[gate; up] per rank. RoPE is applied at each token's *original* position, which is what lets a recursion step
run on a compacted subsequence of the tokens.
"""
from __future__ import annotations

import math
from typing import Callable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from megatron.core import ModelParallelConfig, parallel_state
from megatron.core.tensor_parallel import (ColumnParallelLinear, RowParallelLinear,
                                           copy_to_tensor_model_parallel_region)

from model.attention import causal_attention, masked_attention, resolve_backend
from model.config import ModelConfig


def normal_init(std: float) -> Callable[[torch.Tensor], None]:
    def init(weight: torch.Tensor) -> None:
        nn.init.normal_(weight, mean=0.0, std=std)
    return init


def tp_world_size() -> int:
    if parallel_state.model_parallel_is_initialized():
        return parallel_state.get_tensor_model_parallel_world_size()
    return 1


def tp_group():
    """The tensor-parallel group, passed explicitly (megatron-core deprecates the implicit default)."""
    return parallel_state.get_tensor_model_parallel_group() if parallel_state.model_parallel_is_initialized() else None


def make_parallel_config(cfg: ModelConfig, *, params_dtype: torch.dtype = torch.float32,
                         use_cpu_initialization: bool = True, sequence_parallel: bool = False) -> ModelParallelConfig:
    """megatron-core settings for the model's layers. Fusions are off: they need CUDA kernels we do not use.

    Weights are created on the CPU by default (then moved with ``.to``); ``use_cpu_initialization=False`` creates
    them on the current GPU, which is much faster for large models.
    """
    return ModelParallelConfig(
        tensor_model_parallel_size=tp_world_size(),
        params_dtype=params_dtype,
        use_cpu_initialization=use_cpu_initialization,
        perform_initialization=True,
        gradient_accumulation_fusion=False,
        sequence_parallel=sequence_parallel,
    )


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, sequence_parallel: bool = False):
        super().__init__()
        self.eps = eps
        self.sequence_parallel = sequence_parallel
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight
        if self.sequence_parallel:
            # Each rank normalises only its slice of the sequence: sum the weight's gradient over the TP group.
            weight = copy_to_tensor_model_parallel_region(weight, group=tp_group())
        # Normalise in fp32 whatever the autocast dtype; the variance of a bf16 sum is too coarse.
        return F.rms_norm(x.float(), (x.shape[-1],), weight.float(), self.eps).to(x.dtype)


class Rotary(nn.Module):
    """Rotary position embedding evaluated at arbitrary (per-token) positions."""

    def __init__(self, head_dim: int, theta: float):
        super().__init__()
        self.head_dim, self.theta = head_dim, theta

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """positions (B, S) integer -> cos, sin of shape (B, S, 1, head_dim/2), fp32."""
        # Frequencies are computed here, not kept in a buffer, so casting the model to bf16 cannot round them.
        exponent = torch.arange(0, self.head_dim, 2, dtype=torch.float32, device=positions.device) / self.head_dim
        angles = positions.to(torch.float32)[..., None] * self.theta ** -exponent
        return angles.cos()[:, :, None, :], angles.sin()[:, :, None, :]


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half].float(), x[..., half:].float()
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).to(x.dtype)


def seq_parallel_linear(linear: nn.Module, x: torch.Tensor, sequence_parallel: bool) -> torch.Tensor:
    """Apply a megatron linear to batch-first ``x``. With sequence parallelism megatron gathers / scatters along
    dim 0, which must then be the sequence: transpose around the call."""
    if not sequence_parallel:
        return linear(x)[0]
    return linear(x.transpose(0, 1).contiguous())[0].transpose(0, 1)


# Where a layer's attention takes its keys and values from, when not only from its own input: called with the
# layer's own (k, v) after RoPE (B, S, Hkv_local, D), returns (keys, values, mask (B, S, Sk)) to attend over, or
# None for plain causal attention over (k, v). Recursive KV sharing (model/kv_sharing.py) and the inference KV
# caches (model/inference/cache.py) implement it.
KeySource = Callable[[torch.Tensor, torch.Tensor], Optional[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]]


class RowParallel(RowParallelLinear):
    """megatron-core's row-parallel linear, handing its own TP group to the matmul. megatron passes None there,
    and the deprecation warning that None triggers on rank 0 is a graph break for torch.compile in every layer."""

    def _forward_impl(self, input, weight, *args, **kwargs):
        if kwargs.get("tp_group") is None:
            kwargs["tp_group"] = self.tp_group
        return super()._forward_impl(input, weight, *args, **kwargs)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, mp: ModelParallelConfig, out_std: float):
        super().__init__()
        tp = mp.tensor_model_parallel_size
        self.head_dim = cfg.head_dim
        self.kv_local = cfg.n_kv_heads // tp
        self.q_per_kv = cfg.n_heads // cfg.n_kv_heads
        self.backend = cfg.attention_backend
        self.sp = mp.sequence_parallel
        qkv_out = (cfg.n_heads + 2 * cfg.n_kv_heads) * cfg.head_dim
        self.qkv = ColumnParallelLinear(cfg.d_model, qkv_out, config=mp, init_method=normal_init(cfg.init_std),
                                        bias=False, gather_output=False, tp_group=tp_group())
        self.proj = RowParallel(cfg.n_heads * cfg.head_dim, cfg.d_model, config=mp,
                                      init_method=normal_init(out_std), bias=False, input_is_parallel=True,
                                      skip_bias_add=False, tp_group=tp_group())

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor],
                key_active: Optional[torch.Tensor] = None, kv: Optional[KeySource] = None) -> torch.Tensor:
        qkv = seq_parallel_linear(self.qkv, x, self.sp)  # with SP: (B, S/TP, D) in, (B, S, ...) out
        b, s, _ = qkv.shape
        qkv = qkv.view(b, s, self.kv_local, self.q_per_kv + 2, self.head_dim)
        q = qkv[:, :, :, : self.q_per_kv].reshape(b, s, self.kv_local * self.q_per_kv, self.head_dim)
        k, v = qkv[:, :, :, self.q_per_kv], qkv[:, :, :, self.q_per_kv + 1]
        cos, sin = rope
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        keys = kv(k, v) if kv is not None else None
        if keys is None:
            out = causal_attention(q, k, v, backend=self.backend, key_active=key_active)
        else:
            out = masked_attention(q, *keys)
        return seq_parallel_linear(self.proj, out.reshape(b, s, -1), self.sp)


class SwiGLU(nn.Module):
    def __init__(self, cfg: ModelConfig, mp: ModelParallelConfig, out_std: float):
        super().__init__()
        self.gate_up = ColumnParallelLinear(cfg.d_model, 2 * cfg.ffn_hidden, config=mp,
                                            init_method=normal_init(cfg.init_std), bias=False, gather_output=False,
                                            tp_group=tp_group())
        self.sp = mp.sequence_parallel
        self.down = RowParallel(cfg.ffn_hidden, cfg.d_model, config=mp, init_method=normal_init(out_std),
                                      bias=False, input_is_parallel=True, skip_bias_add=False, tp_group=tp_group())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = seq_parallel_linear(self.gate_up, x, self.sp).chunk(2, dim=-1)
        return seq_parallel_linear(self.down, F.silu(gate) * up, self.sp)


class TransformerLayer(nn.Module):
    """Pre-norm decoder layer. Its output includes both residual connections."""

    def __init__(self, cfg: ModelConfig, mp: ModelParallelConfig):
        super().__init__()
        # Megatron-style scaled init for the projections that write into the residual stream.
        out_std = cfg.init_std / math.sqrt(2 * cfg.n_layers)
        self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps, mp.sequence_parallel)
        self.attn = Attention(cfg, mp, out_std)
        self.mlp_norm = RMSNorm(cfg.d_model, cfg.norm_eps, mp.sequence_parallel)
        self.mlp = SwiGLU(cfg, mp, out_std)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor],
                key_active: Optional[torch.Tensor] = None, kv: Optional[KeySource] = None) -> torch.Tensor:
        h = x + self.attn(self.attn_norm(x), rope, key_active, kv)
        return h + self.mlp(self.mlp_norm(h))


def use_attention_backend(model: nn.Module, device: torch.device) -> str:
    """Resolve the model's ``attention_backend`` (auto, sdpa, flash) for ``device`` once and set every attention
    layer to the result, so that ``auto`` is decided at start-up and not per call. Returns the kernel's name."""
    layers = [m for m in model.modules() if isinstance(m, Attention)]
    if not layers:
        return "none"
    backend = resolve_backend(layers[0].backend, device)
    for m in layers:
        m.backend = backend
    return backend
