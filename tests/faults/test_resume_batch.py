"""Resuming under another number of data-parallel ranks: the effective global batch, and ranks that agree.

With parallel.global_batch_size unset the batch follows DP (micro_batch_size × DP), so a run resumed on more or
fewer ranks would silently take other steps: that is refused before anything is loaded, in one line naming both
batches and what to set. Set to the old batch, the run continues exactly (the same samples per step: the
checkpoint's readers are adopted); set to a new one, the change is accepted and said. Real ``pretrain.train``
runs: DP=2 as separate processes, one process in-process (pretrain/checkpoint/resume.py)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.distributed.harness import spawn_ranks
from tests.faults.runs import args, losses, run_main
from tests.faults.test_checkpoints import corrupt_in_place
from tests.pretrain.fixtures import make_shards

NEWEST = "step-000006"
ZERO2 = ["parallel.zero_stage=2"]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return make_shards(tmp_path_factory.mktemp("batch_data") / "data")


def train(world: int, argv: list[str], tmp: Path, **kw) -> list[int]:
    return spawn_ranks(world, ["-m", "pretrain.train", "conf/run/tiny_cpu.yaml", *argv], tmp, **kw)


@pytest.fixture(scope="module")
def dp2(data, tmp_path_factory) -> Path:
    """A DP=2 ZeRO-2 run, start to end, global_batch_size unset: 2 × micro-batch 4 = 8 sequences per step, read by
    2 readers; checkpoints at steps 4, 6 and 8."""
    tmp = tmp_path_factory.mktemp("dp2")
    train(2, args(data, tmp, "straight", *ZERO2), tmp, prefix="straight")
    return tmp / "straight"


def _errors(text: str) -> list[str]:
    return [ln for ln in text.splitlines() if ln.startswith("error:")]


def test_two_ranks_agree_on_the_fallback_when_only_one_rank_file_is_bad(data, dp2, tmp_path):
    """DP=2 with ZeRO-2: rank 1's optimizer partition of the newest checkpoint is corrupt; both ranks fall back."""
    run_args = args(data, tmp_path, "run", *ZERO2)
    codes = train(2, run_args, tmp_path, env={"MOR_FAULT_SIGNAL_AT_STEP": "5"}, check=False, prefix="first")
    assert codes == [75, 75]
    newest = tmp_path / "run" / "checkpoints" / NEWEST
    partitions = sorted(newest.glob("engine/*optim_states.pt"))
    assert len(partitions) == 2
    corrupt_in_place(partitions[1])
    train(2, run_args, tmp_path, prefix="again")
    logs = [(tmp_path / f"again{r}.log").read_text() for r in range(2)]
    assert "step-000004 at step 4" in logs[0], logs[0]
    assert sum("set aside" in ln for log in logs for ln in log.splitlines()) == 1      # said once, by rank 0
    # Rank 1 read its own partition from step 4 too: otherwise the losses would part from the straight run's.
    assert losses(tmp_path / "run") == losses(dp2)


def test_two_ranks_resumed_by_one_process_keep_their_batch_only_when_asked(data, dp2, tmp_path):
    """DP=2 → 1 process: unset, the batch would halve (refused, one line, nothing written); set to the old 8 the
    run continues as the DP=2 run did (re-sharded: within fp32 summation order, as tests/pretrain/test_reshard.py);
    set to 4 the change is accepted, said, and each step then counts half the tokens."""
    at = dp2 / "checkpoints" / NEWEST

    def one(name: str, *extra: str) -> tuple[int, str, str]:
        return run_main(args(data, tmp_path, name, f"checkpoint.resume={at}", "parallel.zero_stage=0", *extra))

    code, out, err = one("unset")
    errors = _errors(err)
    assert code == 2 and len(errors) == 1 and "Traceback" not in out + err, out + err
    assert "trained with 8 sequences per optimizer step" in errors[0] and "would take 4" in errors[0]
    assert "parallel.global_batch_size=8 to continue exactly" in errors[0], errors[0]
    assert not (tmp_path / "unset" / "checkpoints").exists()
    code, out, err = one("exact", "parallel.global_batch_size=8")
    assert code == 0, out + err
    got, want = losses(tmp_path / "exact"), losses(dp2)
    assert sorted(got) == [7, 8]
    for step in got:
        assert got[step] == pytest.approx(want[step], rel=1e-5, abs=0), (step, got, want)
    code, out, err = one("smaller", "parallel.global_batch_size=4", "train.steps=7")
    assert code == 0 and "trained with 8 sequences per optimizer step; continuing with 4" in out, out + err

    def step_tokens(run: Path) -> dict[int, int]:
        recs = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]
        return {r["step"]: r["step_tokens"] for r in recs if "step_tokens" in r}
    assert step_tokens(tmp_path / "smaller")[7] * 2 == step_tokens(dp2)[7]


def test_one_process_resumed_by_two_ranks_is_refused_not_doubled(data, tmp_path):
    """The other way, with global_batch_size unset: 4 sequences per step would become 8. 4 is not a multiple of
    micro-batch 4 × DP 2, so the one line offers only what is possible: to accept 8 explicitly."""
    code, out, err = run_main(args(data, tmp_path, "one", "train.steps=2", "data.readers=2"))
    assert code == 0, out + err
    at = tmp_path / "one" / "checkpoints" / "step-000002"
    codes = train(2, args(data, tmp_path, "two", f"checkpoint.resume={at}"), tmp_path, check=False, prefix="two")
    log = (tmp_path / "two0.log").read_text()
    assert codes == [2, 2], log[-3000:]
    errors = _errors(log)
    assert len(errors) == 1 and "Traceback" not in log, log[-3000:]
    assert "trained with 4 sequences per optimizer step" in errors[0] and "would take 8" in errors[0]
    assert "parallel.global_batch_size=8 to accept the change" in errors[0] and "=4 to continue" not in errors[0]
    assert not (tmp_path / "two" / "checkpoints").exists()
