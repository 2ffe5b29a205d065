"""A training run for tests/pretrain/test_loss_free.py: ``python -m tests.pretrain.lossfree_run OUT RUN key=value...``.

Trains like ``python -m pretrain.train`` does, with two additions made through the trainer's own seams: a fresh
run starts with the loss-free bias pushed towards depth 1 (so that almost every token takes one recursion), and a
callback writes this rank's bias after every step to OUT/bias-rank-R.jsonl.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import conf  # noqa: F401  (conf first: the bottom layer)
from conf import load_config
from pretrain.config import RunConfig
from pretrain.training.callbacks import Callback
from pretrain.training.trainer import Trainer

PUSH = 30   # bias steps added to depth 1 at the start: 30 × bias_update_rate


class RecordBias(Callback):
    def __init__(self, path: Path):
        self.path = path

    def step_end(self, trainer, rec) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps({"step": trainer.step, "bias_steps": trainer.model.router.bias_steps.tolist(),
                                "loss": rec["loss"]}) + "\n")


def main(argv: list[str]) -> int:
    out, run, overrides = Path(argv[0]), argv[1], argv[2:]
    cfg = load_config(run, overrides, schema=RunConfig)
    trainer = Trainer(cfg)
    try:
        if trainer.step == 0:
            trainer.model.router.bias_steps[0] += PUSH
        trainer.callbacks.insert(1, RecordBias(out / f"bias-rank-{trainer.layout.rank}.jsonl"))
        return trainer.fit()
    finally:
        trainer.close()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
