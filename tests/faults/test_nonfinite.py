"""A run that goes bad: a stretch of non-finite steps stops it after ``max_consecutive_skips``, and pruning
(``checkpoint.keep``) never removes the newest checkpoint saved before the stretch."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from pretrain.checkpoint import faults
from pretrain.training.trainer import NONFINITE_EXIT_CODE
from tests.faults.runs import args, losses, run_main
from tests.pretrain.fixtures import make_shards


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return make_shards(tmp_path_factory.mktemp("nonfinite_data") / "data")


def nan_from(step: int, monkeypatch) -> None:
    """Every step from ``step`` (0-based, as the trainer counts before it trains one) has a NaN loss."""
    monkeypatch.setattr(faults, "before_step", lambda s, rank: s >= step)


def test_a_stretch_of_nonfinite_steps_stops_the_run_and_keeps_the_last_good_checkpoint(data, tmp_path,
                                                                                        monkeypatch):
    # Steps 5, 6, 7 are non-finite; checkpoints every 2 steps, only the newest 1 kept: step 6's save would prune
    # step 4, the newest from before the stretch, if pruning did not protect it.
    nan_from(4, monkeypatch)
    code, out, err = run_main(args(data, tmp_path, "bad", "checkpoint.keep=1", "max_consecutive_skips=3",
                                   "train.steps=20"))
    assert code == NONFINITE_EXIT_CODE, out + err
    ckpts = tmp_path / "bad" / "checkpoints"
    assert sorted(p.name for p in ckpts.glob("step-*")) == ["step-000004", "step-000006"]
    stop = [ln for ln in out.splitlines() if "non-finite steps in a row" in ln]
    assert len(stop) == 1 and "max_consecutive_skips=3" in stop[0] and "step-000004" in stop[0], out
    events = [json.loads(ln) for ln in (tmp_path / "bad" / "metrics.jsonl").read_text().splitlines()]
    assert events[-1]["event"] == "nonfinite_stop" and events[-1]["step"] == 7
    assert sorted(losses(tmp_path / "bad")) == list(range(1, 7))


def test_the_protection_survives_a_restart(data, tmp_path, monkeypatch):
    """The protected step is part of the checkpoint: a resumed run that saves again still keeps it."""
    nan_from(4, monkeypatch)
    code, _, _ = run_main(args(data, tmp_path, "bad", "checkpoint.keep=1", "max_consecutive_skips=3",
                               "train.steps=20"))
    assert code == NONFINITE_EXIT_CODE
    monkeypatch.setattr(faults, "before_step", lambda s, rank: False)        # the cause is fixed
    code, out, err = run_main(args(data, tmp_path, "bad", "checkpoint.keep=1", "max_consecutive_skips=3",
                                   "train.steps=10"))
    assert code == 0, out + err
    names = sorted(p.name for p in (tmp_path / "bad" / "checkpoints").glob("step-*"))
    assert names == ["step-000004", "step-000010"]


def test_isolated_nonfinite_steps_do_not_stop_the_run(data, tmp_path, monkeypatch):
    monkeypatch.setattr(faults, "before_step", lambda s, rank: s in (2, 4, 6))
    code, out, err = run_main(args(data, tmp_path, "spotty", "max_consecutive_skips=2"))
    assert code == 0, out + err
    last = [json.loads(ln) for ln in (tmp_path / "spotty" / "metrics.jsonl").read_text().splitlines()][-1]
    assert last["skipped_steps"] == 3 and last["step"] == 8
