"""Causal attention kernels: PyTorch SDPA everywhere, flash-attn on GPU when it is installed.

All entry points take batch-first tensors q (B, S, H, D) and k, v (B, S, Hkv, D) and are always causal. An
optional ``key_active`` mask (B, S) removes inactive tokens from the keys; token-choice routing uses it for the
recursion steps where only part of the sequence is still running.

Keys that are not the queries' own (recursive KV sharing, KV caches) go through ``masked_attention`` with a mask
built from positions (``position_mask``): a query sees a key iff the key is valid and not after it.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from conf.errors import ConfigError

try:  # flash-attn is optional and GPU-only
    from flash_attn import flash_attn_func as _flash_attn_func
except Exception:  # noqa: BLE001 - any import failure means "not available"
    _flash_attn_func = None


def flash_available() -> bool:
    return _flash_attn_func is not None and torch.cuda.is_available()


def resolve_backend(requested: str, device: torch.device) -> str:
    """Pick the kernel for ``requested`` in {auto, sdpa, flash} on ``device``: auto is flash-attn on CUDA when it
    is importable, SDPA otherwise; flash without flash-attn or CUDA is an error."""
    if requested == "flash":
        if not flash_available():
            raise ConfigError("model.attention_backend: flash needs flash-attn and a CUDA device; use sdpa or auto")
        return "flash"
    if requested == "auto" and device.type == "cuda" and flash_available():
        return "flash"
    return "sdpa"


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, backend: str = "sdpa",
                     key_active: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Causal attention over (B, S, H, D) inputs, returning (B, S, H, D). ``auto`` is resolved here per call for
    models used directly; the trainer resolves it once for the whole model (model/layers.py)."""
    if backend == "auto":
        backend = resolve_backend("auto", q.device)
    if backend == "flash" and key_active is None and q.dtype in (torch.float16, torch.bfloat16):
        return _flash_attn_func(q, k, v, causal=True)  # native GQA and BSHD layout
    h, hkv = q.shape[2], k.shape[2]
    if h != hkv:
        # Expanding the shared kv heads keeps every SDPA backend (cuDNN included) available.
        k = k.repeat_interleave(h // hkv, dim=2)
        v = v.repeat_interleave(h // hkv, dim=2)
    qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    if key_active is None:
        out = F.scaled_dot_product_attention(qt, kt, vt, is_causal=True)
    else:
        s = q.shape[1]
        causal = torch.ones(s, s, dtype=torch.bool, device=q.device).tril()
        # A query always sees itself, so no row is fully masked (a fully masked row gives NaN in softmax, and
        # its NaN would leak into the key/value gradients even though the row's output is discarded).
        diag = torch.eye(s, dtype=torch.bool, device=q.device)
        mask = causal & (key_active[:, None, None, :] | diag)
        out = F.scaled_dot_product_attention(qt, kt, vt, attn_mask=mask)
    return out.transpose(1, 2)


def position_mask(q_pos: torch.Tensor, k_pos: torch.Tensor, k_valid: Optional[torch.Tensor] = None) -> torch.Tensor:
    """(B, Sq, Sk) bool: key j is visible to query i iff k_pos[j] <= q_pos[i] and k_valid[j]. A query that would see
    no key at all (padding, or a token that does not run this step: its output is never read) sees key 0 instead,
    so that softmax has no empty row (NaN in the forward pass would reach the gradients)."""
    mask = k_pos[:, None, :] <= q_pos[:, :, None]
    if k_valid is not None:
        mask = mask & k_valid[:, None, :]
    empty = ~mask.any(dim=-1, keepdim=True)
    first = torch.zeros_like(mask)
    first[..., 0] = True
    return mask | (empty & first)


def masked_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Attention of q (B, Sq, H, D) over k, v (B, Sk, Hkv, D) where ``mask`` (B, Sq, Sk) is True; (B, Sq, H, D)."""
    h, hkv = q.shape[2], k.shape[2]
    if h != hkv:
        k = k.repeat_interleave(h // hkv, dim=2)
        v = v.repeat_interleave(h // hkv, dim=2)
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2).to(q.dtype),
                                         v.transpose(1, 2).to(q.dtype), attn_mask=mask[:, None])
    return out.transpose(1, 2)
