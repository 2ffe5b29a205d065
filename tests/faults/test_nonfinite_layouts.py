"""The non-finite skip under the parallel layouts that keep weights apart: DP=2 with ZeRO-2 and ZeRO-3 (optimizer
state, and with ZeRO-3 the weights too, partitioned over the ranks) and PP=2 (the backward inside megatron's
schedule). Real 2-process gloo runs of the Trainer; the NaN is the fault of pretrain/checkpoint/faults.py — one
element of the input embedding's output in a step's last micro-batch — so it travels the real forward pass (and,
through the pipeline, the backward pass into every stage's gradients).

One run per layout checks the three promises: the weights every rank holds (its parameters and DeepSpeed's fp32
master partitions) are bit-for-bit unchanged by a skipped step, while a normal step changes them; the skipped step
counts (the step number moves on, metrics.jsonl logs it as skipped); and ``max_consecutive_skips`` stops the run
with NONFINITE_EXIT_CODE on every rank.

The file is also the worker those runs start (``python -m tests.faults.test_nonfinite_layouts OUT RUN key=value
...``): the Trainer as pretrain.train runs it, with every step's weights compared before and after.
"""
from __future__ import annotations

import json
import math
import sys
import warnings
from pathlib import Path

import pytest

from tests.distributed.harness import spawn_ranks
from tests.faults.runs import RUN

NAN_FROM, BOUND = 2, 2        # the trainer's 0-based steps 2 and 3 (logged as steps 3 and 4) are NaN; 2 in a row stop
LAYOUTS = {
    # rank 1 alone makes the NaN: rank 0 sees a finite loss and must skip all the same
    "dp2-zero2": (["parallel.zero_stage=2"], {"MOR_FAULT_NAN_RANK": "1"}),
    "dp2-zero3": (["parallel.zero_stage=3"], {"MOR_FAULT_NAN_RANK": "1"}),
    # the first stage makes it; the last stage's loss and both stages' gradients carry it. ZeRO-0: the engine's
    # own guard is all there is (ZeRO-1's optimizer would also refuse NaN gradients: DeepSpeed's overflow check)
    "pp2": (["parallel.pipeline_parallel=2", "parallel.zero_stage=0"], {}),
}


def _local_weights(engine) -> list:
    """Copies of everything this rank holds of the weights: its parameters (its ZeRO-3 partition of each) and
    the optimizer's fp32 master partitions (ZeRO 1-2: single_partition_of_fp32_groups; ZeRO-3:
    fp32_partitioned_groups_flat)."""
    out = [getattr(p, "ds_tensor", p).detach().clone() for p in engine.model.parameters()]
    opt = engine._ds.optimizer
    for name in ("single_partition_of_fp32_groups", "fp32_partitioned_groups_flat"):
        out += [t.detach().clone() for t in getattr(opt, name, None) or []]
    return out


def worker(out: str, run: str, overrides: list[str]) -> int:
    import torch
    import torch.distributed as dist

    from conf import load_config
    from pretrain.config import RunConfig
    from pretrain.training.trainer import Trainer

    warnings.filterwarnings("ignore")
    cfg = load_config(run, overrides, schema=RunConfig)
    trainer = Trainer(cfg, log=lambda *_: None)
    engine, steps = trainer.engine, []
    plain_step = engine.train_step

    def train_step(micro, *, inject_nan=False):
        before = _local_weights(engine)
        result = plain_step(micro, inject_nan=inject_nan)
        after = _local_weights(engine)
        assert len(before) == len(after) and all(t.numel() for t in before)
        steps.append({"step": trainer.step, "inject": inject_nan, "finite": result.finite,
                      "grad_norm": result.grad_norm, "loss": float(result.loss),
                      "changed": any(not torch.equal(a, b) for a, b in zip(before, after))})
        return result

    engine.train_step = train_step
    try:
        code = trainer.fit()
        steps.append({"final_step": trainer.step, "skipped": trainer.skipped})
    finally:
        trainer.close()
    Path(out, f"steps-{dist.get_rank()}.json").write_text(json.dumps({"code": code, "steps": steps}))
    return code


@pytest.mark.parametrize("layout", LAYOUTS)
def test_a_real_nan_is_skipped_on_every_rank_and_a_stretch_of_them_stops_the_run(tmp_path, layout):
    from pretrain.training.trainer import NONFINITE_EXIT_CODE
    from tests.pretrain.fixtures import make_shards
    data = make_shards(tmp_path / "data")
    extra, env = LAYOUTS[layout]
    args = [f"data.path={data}", f"out_dir={tmp_path}", "name=bad", "train.steps=8", "train.log_every=1",
            "train.eval_every=0", "checkpoint.every=0", "logging.wandb=disabled", "model.max_seq_len=64",
            "data.num_workers=0", "parallel.micro_batch_size=2", "parallel.global_batch_size=8",
            f"max_consecutive_skips={BOUND}", *extra]
    env = {**env, "MOR_FAULT_NAN_AT_STEP": str(NAN_FROM), "MOR_FAULT_NAN_STEPS": "3"}
    codes = spawn_ranks(2, ["-m", "tests.faults.test_nonfinite_layouts", str(tmp_path), RUN, *args], tmp_path,
                        env=env, timeout=600, check=False)
    logs = "\n".join((tmp_path / f"rank{r}.log").read_text()[-3000:] for r in range(2))
    assert codes == [NONFINITE_EXIT_CODE] * 2, logs
    for rank in range(2):
        got = json.loads((tmp_path / f"steps-{rank}.json").read_text())
        assert got["code"] == NONFINITE_EXIT_CODE
        *steps, final = got["steps"]
        assert [s["step"] for s in steps] == [0, 1, 2, 3]            # the bound stopped the run after 2 skips
        poisons = env.get("MOR_FAULT_NAN_RANK") in (None, str(rank))   # the fault's rank (PP: a stage without
        assert [s["inject"] for s in steps] == [False, False, poisons, poisons]   # the embedding makes none)
        for s in steps[:NAN_FROM]:                                   # normal steps move the weights ...
            assert s["finite"] and s["changed"], (rank, s)
        for s in steps[NAN_FROM:]:                                   # ... a skipped one leaves every bit of them
            assert not s["finite"] and not s["changed"], (rank, s)
            # the pipeline's backward ran on the NaN: it reached the gradients (their norm)
            assert math.isnan(s["grad_norm"]) == (layout == "pp2"), (rank, s)
        assert final == {"final_step": NAN_FROM + 1, "skipped": BOUND}   # the first skip counted as a step
    records = [json.loads(line) for line in (tmp_path / "bad" / "metrics.jsonl").read_text().splitlines()]
    trained = {r["step"]: r for r in records if "loss" in r and "event" not in r}
    assert sorted(trained) == [1, 2, 3]
    # logged as skipped: no learning rate, the count, and the NaN loss (JSON has no NaN: null)
    assert trained[3]["lr"] == 0.0 and trained[3]["skipped_steps"] == 1 and trained[3]["loss"] is None
    stop = [r for r in records if r.get("event") == "nonfinite_stop"]
    assert len(stop) == 1 and stop[0]["step"] == 4, stop


if __name__ == "__main__":
    sys.exit(worker(sys.argv[1], sys.argv[2], sys.argv[3:]))
