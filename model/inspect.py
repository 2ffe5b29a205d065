"""Print what a model config builds: parameters, layers per recursion, routing, capacities and FLOPs.

    python -m model.inspect CONFIG [key=value ...] [--seq-len T]

CONFIG is a YAML file or a preset name from conf/model (e.g. 360m_mor_ec). Counts come from closed-form
formulas (model/flops.py) that the tests check against built models, so even the 1.7B preset prints at once.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys

from conf import cli_errors, load_config
from model.config import ModelConfig
from model.flops import param_counts, training_flops
from model.routing import routing_class
from model.sharing import build_plan


def describe(cfg, seq_len: int) -> dict:
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


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m model.inspect", description=__doc__.split("\n\n")[0],
                                     epilog="Example: python -m model.inspect 360m_mor_ec num_recursions=3 "
                                            "router.alpha=0.1")
    parser.add_argument("config", help="YAML file or preset name from conf/model")
    parser.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. router.alpha=0.2")
    parser.add_argument("--seq-len", type=int, default=None, help="sequence length (default: max_seq_len)")
    args = parser.parse_args(argv)
    with cli_errors():
        cfg = load_config(args.config, args.overrides, schema=ModelConfig)
    print(json.dumps(describe(cfg, args.seq_len or cfg.max_seq_len), indent=2))


if __name__ == "__main__":
    main(sys.argv[1:])
