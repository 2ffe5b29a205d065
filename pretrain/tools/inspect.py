"""Print what a model config builds: parameters, layers per recursion, routing, capacities and FLOPs.

    python -m pretrain.tools.inspect CONFIG [key=value ...] [--seq-len T]

CONFIG is a YAML file or a preset name from conf/model (e.g. 360m_mor_ec). Counts come from closed-form
formulas (model/flops.py) that the tests check against built models, so even the 1.7B preset prints at once.
The command lives here rather than in model/: importing the model package imports torch (the routing registry),
and a --help must answer at once.
"""
from __future__ import annotations

import argparse
import json
import sys


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m pretrain.tools.inspect", description=__doc__.split("\n\n")[0],
                                     epilog="Example: python -m pretrain.tools.inspect 360m_mor_ec num_recursions=3 "
                                            "router.alpha=0.1")
    parser.add_argument("config", help="YAML file or preset name from conf/model")
    parser.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. router.alpha=0.2")
    parser.add_argument("--seq-len", type=int, default=None, help="sequence length (default: max_seq_len)")
    args = parser.parse_args(argv)
    from conf import cli_errors, load_config
    from model.config import ModelConfig
    from model.inspect import describe
    with cli_errors():
        cfg = load_config(args.config, args.overrides, schema=ModelConfig)
    print(json.dumps(describe(cfg, args.seq_len or cfg.max_seq_len), indent=2))


if __name__ == "__main__":
    main(sys.argv[1:])
