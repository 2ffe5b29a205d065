"""Layers and routers of an exported Mixture-of-Recursions model (plain PyTorch), shipped beside modeling_mor.py.

The decoder layer (pre-norm grouped-query attention with RoPE, SwiGLU), the attention over a key source (the KV
cache's buffers: cache_mor.py) and the expert- and token-choice routers, with the training project's parameter
names. Needs only torch and transformers.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from .configuration_mor import MoRConfig


# ---- layers ----------------------------------------------------------------------------------------------------------
class MoRRMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # in fp32 whatever the model's dtype, as in training
        return F.rms_norm(x.float(), (x.shape[-1],), self.weight.float(), self.eps).to(x.dtype)


def rotary(positions: torch.Tensor, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """positions (B, S) -> cos, sin (B, S, 1, head_dim / 2), fp32, at each token's own position."""
    exponent = torch.arange(0, head_dim, 2, dtype=torch.float32, device=positions.device) / head_dim
    angles = positions.to(torch.float32)[..., None] * theta ** -exponent
    return angles.cos()[:, :, None, :], angles.sin()[:, :, None, :]


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half].float(), x[..., half:].float()
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).to(x.dtype)


def position_mask(q_pos: torch.Tensor, k_pos: torch.Tensor, k_valid: torch.Tensor) -> torch.Tensor:
    """(B, Sq, Sk): key j is visible to query i iff it is valid and not after it. A query that would see no key
    (padding, or a token that does not run this step: its output is never used) sees key 0, so that softmax has
    no empty row."""
    mask = (k_pos[:, None, :] <= q_pos[:, :, None]) & k_valid[:, None, :]
    empty = ~mask.any(dim=-1, keepdim=True)
    first = torch.zeros_like(mask)
    first[..., 0] = True
    return mask | (empty & first)


def masked_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """q (B, Sq, H, D) over k, v (B, Sk, Hkv, D) where ``mask`` (B, Sq, Sk); (B, Sq, H, D)."""
    h, hkv = q.shape[2], k.shape[2]
    if h != hkv:
        k = k.repeat_interleave(h // hkv, dim=2)
        v = v.repeat_interleave(h // hkv, dim=2)
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2).to(q.dtype),
                                         v.transpose(1, 2).to(q.dtype), attn_mask=mask[:, None])
    return out.transpose(1, 2)


# Where a layer's attention takes its keys from: called with its own (k, v) after RoPE, returns the keys, values
# and (B, S, Sk) mask to attend over (MoRCache.writer / MoRCache.reader).
KeySource = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor, torch.Tensor]]


class MoRAttention(nn.Module):
    """Grouped-query attention. ``qkv`` rows are grouped by kv head: [q heads of group 0, k_0, v_0, q heads of
    group 1, k_1, v_1, ...] (the training layout)."""

    def __init__(self, cfg: MoRConfig):
        super().__init__()
        self.head_dim, self.n_kv = cfg.head_dim, cfg.n_kv_heads
        self.q_per_kv = cfg.n_heads // cfg.n_kv_heads
        self.qkv = nn.Linear(cfg.d_model, (cfg.n_heads + 2 * cfg.n_kv_heads) * cfg.head_dim, bias=False)
        self.proj = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.d_model, bias=False)
        self.proj.mor_init_std = cfg.init_std / (2 * cfg.n_layers) ** 0.5

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], keys: KeySource) -> torch.Tensor:
        qkv = self.qkv(x)
        b, s, _ = qkv.shape
        qkv = qkv.view(b, s, self.n_kv, self.q_per_kv + 2, self.head_dim)
        q = qkv[:, :, :, :self.q_per_kv].reshape(b, s, self.n_kv * self.q_per_kv, self.head_dim)
        k, v = qkv[:, :, :, self.q_per_kv], qkv[:, :, :, self.q_per_kv + 1]
        cos, sin = rope
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        out = masked_attention(q, *keys(k, v))
        return self.proj(out.reshape(b, s, -1))


class MoRMLP(nn.Module):
    """SwiGLU; ``gate_up`` holds [gate; up]."""

    def __init__(self, cfg: MoRConfig):
        super().__init__()
        self.gate_up = nn.Linear(cfg.d_model, 2 * cfg.ffn_hidden, bias=False)
        self.down = nn.Linear(cfg.ffn_hidden, cfg.d_model, bias=False)
        self.down.mor_init_std = cfg.init_std / (2 * cfg.n_layers) ** 0.5

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return self.down(F.silu(gate) * up)


class MoRLayer(nn.Module):
    """Pre-norm decoder layer; its output includes both residual connections."""

    def __init__(self, cfg: MoRConfig):
        super().__init__()
        self.attn_norm = MoRRMSNorm(cfg.d_model, cfg.norm_eps)
        self.attn = MoRAttention(cfg)
        self.mlp_norm = MoRRMSNorm(cfg.d_model, cfg.norm_eps)
        self.mlp = MoRMLP(cfg)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], keys: KeySource) -> torch.Tensor:
        h = x + self.attn(self.attn_norm(x), rope, keys)
        return h + self.mlp(self.mlp_norm(h))


# ---- routers -----------------------------------------------------------------------------------------------------
class MoRRouterHead(nn.Module):
    """Linear(d, out) or Linear-GELU-Linear; always evaluated in fp32 (as in training)."""

    def __init__(self, d_model: int, out: int, arch: str):
        super().__init__()
        if arch == "linear":
            self.net = nn.Linear(d_model, out, bias=False)
        else:
            self.net = nn.Sequential(nn.Linear(d_model, d_model, bias=False), nn.GELU(),
                                     nn.Linear(d_model, out, bias=False))
        for m in self.net.modules():
            if isinstance(m, nn.Linear):
                m.mor_init_std = 0.02

    def forward(self, h: torch.Tensor, temperature: float) -> torch.Tensor:
        with torch.autocast(device_type=h.device.type, enabled=False):
            x = h.float() / temperature
            for m in self.net.modules() if isinstance(self.net, nn.Sequential) else [self.net]:
                if isinstance(m, nn.Linear):
                    x = F.linear(x, m.weight.float(), None if m.bias is None else m.bias.float())
                elif isinstance(m, nn.GELU):
                    x = F.gelu(x)
            return x


class MoRExpertChoiceRouter(nn.Module):
    """One router per recursion step (and one auxiliary router per step with ``router.aux_router``)."""

    def __init__(self, cfg: MoRConfig):
        super().__init__()
        rc, nr = cfg.router, cfg.num_recursions
        self.routers = nn.ModuleList(MoRRouterHead(cfg.d_model, 1, rc["arch"]) for _ in range(nr))
        self.aux_routers = (nn.ModuleList(MoRRouterHead(cfg.d_model, 1, rc["arch"]) for _ in range(nr))
                            if rc["aux_router"] else None)


class MoRTokenChoiceRouter(nn.Module):
    """One router ``Linear(d, Nr)`` choosing each token's depth; ``bias_steps``: the loss-free balancing bias in
    steps of ``router.bias_update_rate``."""

    def __init__(self, cfg: MoRConfig):
        super().__init__()
        self.router = MoRRouterHead(cfg.d_model, cfg.num_recursions, cfg.router["arch"])
        self.register_buffer("bias_steps", torch.zeros(cfg.num_recursions, dtype=torch.long))
