"""Loss-free balancing in a real 2-rank data-parallel run: the bias moves once per optimizer step from the depth
loads of all the step's micro-batches, stays identical on every rank, balances the depths, and resumes exactly."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.distributed.harness import spawn_ranks
from tests.pretrain.fixtures import make_shards

STEPS = 50


def _args(tmp: Path, *extra: str) -> list[str]:
    return ["conf/run/tiny_cpu.yaml", "model=tiny_mor_tc", "model.vocab_size=128", "model.max_seq_len=64",
            "model.router.balance=loss_free", "model.router.bias_update_rate=0.01", f"data.path={tmp / 'data'}",
            f"out_dir={tmp / 'runs'}", "train.log_every=1", "train.eval_every=0", "logging.wandb=disabled",
            "parallel.micro_batch_size=4", "parallel.global_batch_size=16", "parallel.zero_stage=2",
            "data.num_workers=0", *extra]


def _run(tmp: Path, *extra: str, env: dict | None = None, check: bool = True) -> list[int]:
    return spawn_ranks(2, ["-m", "tests.pretrain.lossfree_run", str(tmp), *_args(tmp, *extra)], tmp, env=env,
                       check=check, timeout=900)


def _bias(tmp: Path, rank: int) -> dict[int, list[int]]:
    """step -> bias_steps, the last record of each step winning (a resumed run records repeated steps again)."""
    out = {}
    for line in (tmp / f"bias-rank-{rank}.jsonl").read_text().splitlines():
        rec = json.loads(line)
        out[rec["step"]] = rec["bias_steps"]
    return out


def _loads(run_dir: Path) -> dict[int, list[float]]:
    out = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if "load/d1" in rec:
            out[rec["step"]] = [rec[f"load/d{d}"] for d in (1, 2, 3)]
    return out


@pytest.fixture(scope="module")
def balanced(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("lossfree")
    make_shards(tmp / "data", vocab=128, seq_len=32, train=256, val=16, per_shard=32)
    _run(tmp, f"train.steps={STEPS}", "checkpoint.every=0", "name=whole")
    return tmp


@pytest.mark.slow
def test_bias_moves_every_step_identically_on_both_ranks(balanced):
    ranks = [_bias(balanced, r) for r in range(2)]
    assert ranks[0] == ranks[1]
    steps = sorted(ranks[0])
    assert steps == list(range(1, STEPS + 1))
    start = [30, 0, 0]   # PUSH in lossfree_run.py, before the first step
    for before, s in zip([start] + [ranks[0][s] for s in steps[:-1]], steps):
        moved = [a - b for a, b in zip(ranks[0][s], before)]
        assert moved != [0, 0, 0] and all(m in (-1, 0, 1) for m in moved), (s, moved)


def test_depth_loads_narrow_within_50_steps(balanced):
    loads = _loads(balanced / "runs" / "whole")
    gap = {s: max(v) - min(v) for s, v in loads.items()}
    assert gap[1] > 0.9, loads[1]          # the push sends (almost) every token to one depth
    # the bias moves by ±u each step, so the loads oscillate around balance: judge the last ten steps' mean
    late = [gap[s] for s in range(STEPS - 9, STEPS + 1)]
    assert sum(late) / len(late) < 0.5 * gap[1], late


@pytest.mark.slow
def test_bias_survives_kill_and_resume_exactly(balanced, tmp_path):
    """The same run, SIGKILLed at step 8 and resumed from its step-6 checkpoint, records the very same biases."""
    (tmp_path / "data").symlink_to(balanced / "data")
    codes = _run(tmp_path, f"train.steps={STEPS}", "checkpoint.every=3", "name=killed",
                 env={"MOR_FAULT_KILL_AT_STEP": "8"}, check=False)
    assert all(c != 0 for c in codes), codes
    _run(tmp_path, f"train.steps={STEPS}", "checkpoint.every=3", "name=killed")
    whole = _bias(balanced, 0)
    for rank in range(2):
        assert _bias(tmp_path, rank) == whole
