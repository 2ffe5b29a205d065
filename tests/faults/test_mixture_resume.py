"""A data mixture through real training processes: a run killed (SIGKILL) before a phase boundary resumes across
it with the uninterrupted run's losses bit for bit; resumed from a checkpoint inside the new phase on one process
instead of two (data-parallel size 2 -> 1, the global batch kept), it reads the same micro-batches of the same
sources and logs the same losses bit for bit; every source's tokens add up to the tokens trained; the small source starts over and says so; a changed
phase that has begun is one line unless allowed; sources that do not fit together are one line."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from data_prep.shards import Manifest
from pretrain.checkpoint.state import TrainerState
from tests.distributed.harness import spawn_ranks
from tests.faults.runs import losses, run_main
from tests.pretrain.fixtures import make_shards

STEPS, PHASE_AT = 8, 5
SOURCES = {"web": (256, 0.6), "books": (64, 0.3), "tiny": (8, 0.1)}     # training samples, weight
# From step 5 on: no more web; books and tiny half and half.
PHASE = ["data.phases=[{start: 5, weights: {books: 0.5, tiny: 0.5}}]"]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("mix_data")
    return {name: make_shards(root / name, train=n, val=8, per_shard=8, seed=i)
            for i, (name, (n, _)) in enumerate(SOURCES.items())}


def args(data: dict[str, Path], out: Path, name: str, *extra: str) -> list[str]:
    sources = [f"data.sources.{n}.{k}={v}" for n, (_, w) in SOURCES.items()
               for k, v in (("path", data[n]), ("weight", w))]
    return ["data.path=null", *sources, *PHASE, f"out_dir={out}", f"name={name}", f"train.steps={STEPS}",
            "train.log_every=1", "train.eval_every=4", "train.eval_batches=2", "checkpoint.every=2",
            "checkpoint.keep=4", "logging.wandb=disabled", "model.max_seq_len=64", "data.num_workers=0",
            "parallel.micro_batch_size=4", "parallel.global_batch_size=8", "data.readers=2", *extra]


def train(world: int, argv: list[str], tmp: Path, **kw) -> list[int]:
    return spawn_ranks(world, ["-m", "pretrain.train", "conf/run/tiny_cpu.yaml", *argv], tmp, **kw)


def records(run: Path) -> dict[int, dict]:
    return {r["step"]: r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "loss" in r}


@pytest.fixture(scope="module")
def straight(data, tmp_path_factory) -> Path:
    """The uninterrupted run on two ranks (DP=2, one micro-batch each per step)."""
    tmp = tmp_path_factory.mktemp("straight")
    train(2, args(data, tmp, "straight"), tmp, prefix="straight")
    return tmp / "straight"


def test_the_tokens_of_every_source_add_up_and_the_small_source_starts_over(straight):
    recs = records(straight)
    assert sorted(recs) == list(range(1, STEPS + 1))
    for step, r in recs.items():
        assert sum(r[f"tokens/{n}"] for n in SOURCES) == r["tokens"], r       # exactly, at every step
        assert sum(r[f"phase_tokens/{p}/{n}"] for p in (0, 1) for n in SOURCES
                   if f"phase_tokens/{p}/{n}" in r) == r["tokens"]
        assert r["phase"] == (0 if step <= PHASE_AT else 1)
    last = recs[STEPS]
    assert last["phase_tokens/1/web"] == 0 and last["tokens/web"] == last["phase_tokens/0/web"] > 0
    assert last["epochs/tiny"] > 1 and last["epochs/web"] < 1
    log = (straight.parent / "straight0.log").read_text()
    assert "data: source tiny starts epoch 2" in log, log
    assert "data mix: tokens per source" in log and "total" in log
    val = [json.loads(ln) for ln in (straight / "metrics.jsonl").read_text().splitlines() if "val_loss" in ln]
    assert val and all(f"val_loss/{n}" in v and f"val_loss_causal/{n}" in v for v in val for n in SOURCES)
    # the checkpoint holds the same counts, the epochs and the realised mix
    saved = TrainerState.from_dict(torch.load(straight / "checkpoints" / f"step-{STEPS:06d}" / "trainer.pt",
                                              weights_only=False)).callbacks
    assert saved["mix_tokens"] == {n: last[f"tokens/{n}"] for n in SOURCES}
    assert saved["mix_epochs"] == {n: last[f"epochs/{n}"] for n in SOURCES}
    assert saved["mix_mix"] == {n: last[f"mix/{n}"] for n in SOURCES}


def test_a_run_killed_before_a_phase_boundary_resumes_across_it_bit_for_bit(data, straight, tmp_path):
    codes = train(2, args(data, tmp_path, "run"), tmp_path, check=False, prefix="killed",
                  env={"MOR_FAULT_KILL_AT_STEP": str(PHASE_AT)})
    assert all(c != 0 for c in codes), codes
    train(2, args(data, tmp_path, "run"), tmp_path, prefix="resumed")
    text = (tmp_path / "resumed0.log").read_text()
    assert "at step 4" in text, text                                   # the checkpoint before the boundary
    assert losses(tmp_path / "run") == losses(straight)                # bit for bit, every step once
    got, want = records(tmp_path / "run"), records(straight)
    assert all(got[s][f"tokens/{n}"] == want[s][f"tokens/{n}"] for s in want for n in SOURCES)


def test_two_ranks_killed_in_the_new_phase_are_continued_by_one_process_bit_for_bit(data, straight, tmp_path):
    """Killed at step 7 on two ranks (DP=2, inside phase 1), resumed from step 6 on one process (DP=1 accumulating
    the two micro-batches DP=2 split): each step reads the same sources' samples (its tokens per source equal)
    and logs the same loss, bit for bit (two micro-batches' gradients halved and added are the same numbers
    whether a rank or an all-reduce adds them)."""
    codes = train(2, args(data, tmp_path, "run"), tmp_path, check=False, prefix="killed",
                  env={"MOR_FAULT_KILL_AT_STEP": "7"})
    assert all(c != 0 for c in codes), codes
    train(1, args(data, tmp_path, "run"), tmp_path, prefix="one")
    text = (tmp_path / "one0.log").read_text()
    assert "at step 6" in text and "DP=1" in text, text
    assert losses(tmp_path / "run") == losses(straight)
    got, want = records(tmp_path / "run"), records(straight)
    assert all(got[s][f"tokens/{n}"] == want[s][f"tokens/{n}"] for s in want for n in SOURCES)


def test_changing_a_phase_that_has_begun_is_one_line_unless_allowed(data, straight, tmp_path):
    shutil.copytree(straight, tmp_path / "run")
    (tmp_path / "run" / "metrics.jsonl").write_text("")
    changed = ["data.phases=[{start: 5, weights: {books: 0.9, tiny: 0.1}}]", "train.steps=10"]
    code, out, err = run_main(args(data, tmp_path, "run", *changed))
    errors = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert code == 2 and len(errors) == 1 and "Traceback" not in out + err, out + err
    assert "data.phases: changed where training has begun (resumed at step 8): phase 1: was from step 5" in errors[0]
    assert "data.allow_mix_change=true" in errors[0]
    code, out, err = run_main(args(data, tmp_path, "run", *changed, "data.allow_mix_change=true"))
    assert code == 0, out + err
    assert "the new weights apply from step 8 on" in out, out
    recs = records(tmp_path / "run")
    assert sorted(recs) == [9, 10] and recs[10]["tokens/books"] > recs[10]["tokens/tiny"]


def test_a_source_of_another_tokenizer_or_sequence_length_is_one_line(data, tmp_path):
    other = make_shards(tmp_path / "other", seq_len=16, train=16, val=4)
    code, out, err = run_main(args(data, tmp_path, "bad", f"data.sources.other.path={other}"))
    assert code == 2 and "Traceback" not in err, err
    assert err.strip().splitlines()[-1] == (f"error: data.sources.other: {other} has seq_len 16 but {data['web']} "
                                            "has 32; tokenize every source with the same --seq-len")
    m = Manifest.load(other)
    m.seq_len, m.tokenizer = 32, {**m.tokenizer, "sha256": "f" * 64}
    m.save(other)
    code, out, err = run_main(args(data, tmp_path, "bad", f"data.sources.other.path={other}"))
    assert code == 2 and f"error: data.sources.other: {other} was tokenized with another tokenizer than" in err
