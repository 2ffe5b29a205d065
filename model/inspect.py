"""What a model config builds: parameters, layers per recursion, routing, capacities and FLOPs
(``python -m pretrain.tools.inspect`` prints it). Counts come from closed-form formulas (model/flops.py) that the
tests check against built models, so even the 1.7B preset is described at once.
"""
from __future__ import annotations

import dataclasses

from model.config import ModelConfig
from model.flops import param_counts, training_flops
from model.routing import routing_class
from model.sharing import build_plan


def describe(cfg: ModelConfig, seq_len: int) -> dict:
    plan = build_plan(cfg)
    flops = training_flops(cfg, seq_len)
    vanilla = dataclasses.replace(cfg, sharing="none", num_recursions=1, routing="none", kv_sharing=False)
    vflops = training_flops(vanilla, seq_len)
    routing = routing_class(cfg)
    router = routing.settings(cfg) if routing.has_router else None  # alpha, func, z-loss: defaults filled in
    return {
        "name": cfg.name,
        "unique_params": param_counts(cfg)["unique"],
        "unrolled_params": param_counts(cfg)["unrolled"],
        "n_layers": cfg.n_layers,
        "unique_layers": cfg.unique_layers,
        "layers_per_recursion": cfg.layers_per_recursion,
        "num_recursions": cfg.num_recursions,
        "sharing": cfg.sharing,
        # unique layer index per unrolled position; "|" separates prelude, recursion steps and coda
        "layer_plan": " | ".join(" ".join(map(str, part)) for part in (plan.prelude, *plan.steps, plan.coda)
                                 if part),
        "routing": cfg.routing,
        "router": router,
        "capacities": cfg.capacities if router else None,
        "tokens_per_step": flops.tokens_per_step if router else None,
        "kv_sharing": cfg.kv_sharing,
        "seq_len": seq_len,
        "train_flops_per_token": flops.training_per_token,
        "vanilla_equal_depth": {"n_layers": cfg.n_layers, "params": param_counts(vanilla)["unique"],
                                "train_flops_per_token": vflops.training_per_token},
        "flops_ratio_vs_vanilla": flops.training_per_token / vflops.training_per_token,
    }
