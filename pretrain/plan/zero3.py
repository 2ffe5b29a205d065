"""DeepSpeed ZeRO-3's parameter gathers over one micro-batch, replayed from the order the modules run in.

ZeRO-3 (DeepSpeed 0.19.8, our config: pretrain/parallel/zero.py) keeps each parameter as a 1/DP shard and gathers
it whole before a module that owns it runs. What it then keeps:
  - a parameter of fewer than ``stage3_param_persistence_threshold`` (1e5) elements stays gathered ("persistent");
    the persistent ones are all-gathered once per optimizer step, after it;
  - any other parameter is released after a module that used it, unless it is used again within the next
    ``stage3_max_reuse_distance`` (1e9) elements of parameters in the recorded module order; the tied embedding,
    which the output head borrows, is an external parameter and stays until the micro-batch ends.
The order is the forward pass's modules (embedding, each layer op's norms and linears, routers, final norm, head),
then the same in reverse for the backward pass (with activation checkpointing, each layer's forward again before
its backward). Every gather moves the whole, padded parameter: ceil(numel / DP) × DP elements.
"""
from __future__ import annotations

from dataclasses import dataclass

from model.config import ModelConfig
from pretrain.plan.shapes import Param, memo, padded, router_params, stage_ops, stage_params

PERSISTENCE_THRESHOLD = 100_000
MAX_REUSE_DISTANCE = 1_000_000_000


@dataclass(frozen=True)
class Zero3Gathers:
    per_micro_batch: float     # elements all-gathered per micro-batch (non-persistent parameters)
    gathers: int               # how many gathers that takes (one per parameter fetched)
    per_step: float            # elements all-gathered once per step (persistent parameters)
    peak_live: float           # most non-persistent elements held whole at once
    persistent: float          # elements of the persistent parameters (held whole all the time)


def module_order(cfg: ModelConfig, tp: int, checkpointing: bool) -> list[list[Param]]:
    """Forward then backward module uses of a one-stage model; each entry: the parameters the module owns."""
    params = {p.name: p for p in stage_params(cfg, tp, 1, 0)}
    routers = [params[f"router.{name}"] for name, _ in router_params(cfg)]
    forward: list[list[Param]] = [[params["embedding"]]]
    layers: list[tuple[int, int]] = []          # (start, end) in forward of each layer op's modules
    for op in stage_ops(cfg, 1, 0):
        if op.kind == "layer":
            names = ("attn_norm", "attn.qkv", "attn.proj", "mlp_norm", "mlp.gate_up", "mlp.down")
            layers.append((len(forward), len(forward) + len(names)))
            forward += [[params[f"layers.{op.layer}.{n}"]] for n in names]
        elif not op.closes:   # a routing op that scores tokens: its step's routers, or the one shared router
            forward += [[r] for r in routers
                        if _router_step(r.name) == op.step or (_router_step(r.name) is None and op.step < 0)]
    forward.append([params["final_norm"]])
    forward.append([params["output_layer"] if "output_layer" in params else params["embedding"]])
    backward: list[list[Param]] = []
    starts = {end - 1: (start, end) for start, end in layers}
    for i in range(len(forward) - 1, -1, -1):
        if checkpointing and i in starts:       # a checkpointed layer runs its forward again, then its backward
            start, end = starts[i]
            backward += forward[start:end]
        backward.append(forward[i])
    return forward + backward


def _router_step(name: str) -> "int | None":
    """The recursion step a router parameter serves (``router.routers.2.net.weight`` -> 2), None for one router
    that serves them all."""
    parts = name.split(".")
    return int(parts[2]) if len(parts) > 2 and parts[2].isdigit() else None


@memo
def replay(cfg: ModelConfig, tp: int, dp: int, checkpointing: bool = False) -> Zero3Gathers:
    order = module_order(cfg, tp, checkpointing)
    unique = {p.name: p for mod in order for p in mod}
    persistent = {n for n, p in unique.items() if p.numel < PERSISTENCE_THRESHOLD}
    external = {"embedding"} if cfg.tie_embeddings else set()
    size = {n: padded(p.numel, dp) for n, p in unique.items()}
    live: set[str] = set()
    gathered = most = 0.0
    gathers = 0
    for i, mod in enumerate(order):
        for p in mod:
            if p.name not in persistent and p.name not in live:
                gathered += size[p.name]
                gathers += 1
                live.add(p.name)
        most = max(most, sum(size[n] for n in live))
        release = {p.name for p in mod if p.name not in persistent and p.name not in external}
        traversed = 0
        for later in order[i + 1:]:
            if traversed >= MAX_REUSE_DISTANCE or not release:
                break
            for p in later:
                release.discard(p.name)
                traversed += p.numel
        live -= release
    return Zero3Gathers(gathered, gathers, sum(size[n] for n in persistent), most,
                        sum(unique[n].numel for n in persistent))
