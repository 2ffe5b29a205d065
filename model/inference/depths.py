"""Recursion depths for serving measurements: steering a random expert-choice router towards a depth distribution,
and the layer passes per token that a depth distribution costs (the compute bound of a speed-up)."""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn

from model.config import ModelConfig
from model.routing import routing_class
from model.routing.expert_choice import ExpertChoiceRouting
from model.sharing import build_plan


def layer_passes(cfg: ModelConfig, depth_shares: Sequence[float]) -> float:
    """Unrolled layers one token runs on average: the unique layers before and after the recursions, which every
    token runs, plus its depth times the layers of one recursion step. ``depth_shares[d]``: the share of tokens
    that ran d recursion steps (d = 0..Nr). A vanilla model (one step of every layer) gives n_layers."""
    plan = build_plan(cfg)
    mean_depth = sum(d * f for d, f in enumerate(depth_shares)) / max(sum(depth_shares), 1e-12)
    return len(plan.prelude) + len(plan.coda) + mean_depth * cfg.layers_per_recursion


def steerable(cfg: ModelConfig) -> bool:
    """Whether the model routes by expert choice, the routing whose step routers --depths can bias."""
    return issubclass(routing_class(cfg), ExpertChoiceRouting)


def check_depths(cfg: ModelConfig, fractions: Sequence[float], where: str) -> None:
    """ValueError (one line, naming ``where``) unless ``fractions`` can steer this model: linear expert-choice
    routers without an auxiliary router, one share per recursion step, each >= 0, summing to 1."""
    nr = cfg.num_recursions
    if not steerable(cfg) or cfg.router.aux_router or cfg.router.arch != "linear":
        raise ValueError(f"{where}: steers linear expert-choice routers without an auxiliary router only")
    if len(fractions) != nr:
        raise ValueError(f"{where}: {len(fractions)} shares for a model of {nr} recursion steps; give {nr} "
                         f"(tokens taking 1..{nr} steps)")
    if min(fractions) < 0 or abs(sum(fractions) - 1) > 1e-6:
        raise ValueError(f"{where}: shares must be >= 0 and sum to 1, got {','.join(f'{f:g}' for f in fractions)}")


def calibrate_depths(model, fractions: Sequence[float], *, tokens: int = 4096, seed: int = 0) -> list[float]:
    """Give each expert-choice step's router a bias so that, on random tokens under causal routing, the share of
    tokens running 1..Nr steps comes near ``fractions``. Returns the biases. Step by step: among the tokens that
    reach step r, the wanted share goes on, so the bias puts the router's logit quantile there. (A random router
    does not route like a trained one; the paper's trained models send most tokens shallow.)"""
    cfg = model.cfg
    check_depths(cfg, fractions, "depths")
    device = next(model.parameters()).device
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, cfg.vocab_size, (max(1, tokens // cfg.max_seq_len), cfg.max_seq_len), generator=g)
    x = x.to(device)
    for head in model.router.routers:   # router heads apply a bias when they have one
        old = head.net
        head.net = nn.Linear(old.in_features, 1, bias=True, device=device, dtype=old.weight.dtype)
        with torch.no_grad():
            head.net.weight.copy_(old.weight)
            head.net.bias.zero_()
    biases = []
    for r in range(cfg.num_recursions):
        seen = []
        hook = model.router.routers[r].register_forward_hook(lambda m, i, o: seen.append(o.squeeze(-1).float()))
        model.trace = []
        with torch.no_grad():
            model(x, causal_routing=True)
        hook.remove()
        trace, model.trace = model.trace, None
        reached = trace[r - 1]["active"] if r > 0 else torch.ones_like(x, dtype=torch.bool)
        logits = seen[0][reached]
        # a token runs step index r iff its depth > r; of the tokens that reach it (depth >= r), that share
        share = sum(fractions[r:]) / max(sum(fractions[r - 1:]) if r > 0 else 1.0, 1e-9)
        if r == 0 and cfg.capacities[0] >= 1.0:
            bias = 0.0
        elif share <= 0:
            bias = -1e4
        elif share >= 1:
            bias = 1e4
        else:
            bias = -float(torch.quantile(logits, 1.0 - share))
        with torch.no_grad():
            model.router.routers[r].net.bias.fill_(bias)
        biases.append(bias)
    return biases
