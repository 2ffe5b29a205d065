"""Convert state dicts between one tensor-parallel rank's view and the full (TP = 1) model.

Layouts (see model/layers.py): QKV rows are grouped by kv head, so a contiguous split of the rows hands each rank
whole groups; the SwiGLU input projection holds [gate; up] *per rank*; row-parallel weights split their input
columns; the vocabulary splits into contiguous ranges. Norms and routers are replicated.
"""
from __future__ import annotations

import torch

# name suffix -> (dim, kind): "split" is a contiguous split along dim; "gate_up" splits gate and up separately.
_RULES = {
    "attn.qkv.weight": (0, "split"),
    "attn.proj.weight": (1, "split"),
    "mlp.gate_up.weight": (0, "gate_up"),
    "mlp.down.weight": (1, "split"),
    "embedding.weight": (0, "split"),
    "output_layer.weight": (0, "split"),
}


def _rule(name: str):
    for suffix, rule in _RULES.items():
        if name.endswith(suffix):
            return rule
    return None


def shard_state_dict(full: dict[str, torch.Tensor], rank: int, size: int) -> dict[str, torch.Tensor]:
    """The slice of a full state dict that tensor-parallel rank ``rank`` of ``size`` holds."""
    out = {}
    for name, t in full.items():
        rule = _rule(name)
        if not torch.is_tensor(t):  # e.g. megatron's per-layer "_extra_state" (None)
            out[name] = t
            continue
        if rule is None or size == 1:
            out[name] = t.clone()
            continue
        dim, kind = rule
        if kind == "gate_up":
            gate, up = t.chunk(2, dim=0)
            out[name] = torch.cat([gate.chunk(size, 0)[rank], up.chunk(size, 0)[rank]], 0).clone()
        else:
            out[name] = t.chunk(size, dim)[rank].clone()
    return out


def unshard_tensor(name: str, shards: list[torch.Tensor]) -> torch.Tensor:
    """Reassemble one full tensor from every rank's shard (in rank order)."""
    rule = _rule(name)
    if rule is None or len(shards) == 1:
        return shards[0]
    dim, kind = rule
    if kind == "gate_up":
        halves = [s.chunk(2, 0) for s in shards]
        return torch.cat([h[0] for h in halves] + [h[1] for h in halves], 0)
    return torch.cat(shards, dim)


def full_shape(name: str, local: tuple[int, ...], size: int) -> tuple[int, ...]:
    """The full (TP = 1) shape of a tensor whose rank-local shape is ``local`` under TP = ``size``."""
    rule = _rule(name)
    if rule is None or size == 1:
        return tuple(local)
    dim = rule[0]
    return tuple(n * size if d == dim else n for d, n in enumerate(local))
