"""Train a model: ``python -m pretrain.train CONFIG [key=value ...]``.

CONFIG is a run file (conf/run/*.yaml, or a path). Overrides use dotted keys, e.g.
``train.steps=200 model.num_recursions=4 parallel.tensor_parallel=2 checkpoint.resume=none``.
Run it as one process, under ``torchrun --nproc-per-node N``, or through the slurm/ launchers: the layout comes
from the environment. Exit codes: 0 done, 75 preempted (saved; requeue me), 3 stopped on a non-finite loss,
2 a configuration mistake.
"""
from __future__ import annotations

import argparse
import os
import sys
import warnings

warnings.filterwarnings("ignore", message="Transformer Engine and Apex are not installed")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pretrain.train", description=__doc__.split("\n\n")[0],
                                     epilog=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("config", help="run file (conf/run/NAME.yaml) or a path to one")
    parser.add_argument("overrides", nargs="*", help="dotted key=value overrides")
    args = parser.parse_args(argv)
    from pretrain.preempt import catch_early
    catch_early()                       # a scheduler's signal during start-up must not kill us: we save instead
    os.environ.setdefault("WANDB_MODE", "offline")
    from conf import cli_errors, load_config
    from conf.loader import CONF_DIR
    from pretrain.config import RunConfig
    from pretrain.trainer import run

    path = args.config
    if "/" not in path and not path.endswith((".yaml", ".yml")):
        path = str(CONF_DIR / "run" / f"{path}.yaml")
    with cli_errors():
        cfg = load_config(path, args.overrides, schema=RunConfig)
        return run(cfg)


if __name__ == "__main__":
    sys.exit(main())
