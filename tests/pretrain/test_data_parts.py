"""TokenLoader on a split with fewer shards than readers: shards are read as parts, every sample still exactly once
per epoch over all readers, deterministic, resumable exactly; with enough shards nothing changes (pinned)."""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
import torch

from pretrain.data.loader import TokenLoader
from tests.pretrain.test_data import UNEVEN, every, flat, ids, make_data, take

ONE = (13,)                                  # one training shard of 13 samples
LAYOUTS = [(dp, w) for dp in (2, 4) for w in (0, 2)]


@pytest.fixture
def one(tmp_path: Path) -> Path:
    return make_data(tmp_path / "one", ONE, val=(5,))


@pytest.mark.parametrize("dp,workers", LAYOUTS)
def test_bounded_epochs_read_every_sample_once_per_epoch(one: Path, dp: int, workers: int):
    seen, ranks_with_data = [], 0
    for rank in range(dp):
        loader = TokenLoader(one, micro_batch_size=2, seed=3, dp_rank=rank, dp_size=dp, num_workers=workers,
                             epochs=2)
        batches = take(loader)
        assert len(batches) == len(loader)
        seen += flat(batches)
        ranks_with_data += bool(batches)
    assert Counter(seen) == Counter(every(ONE) * 2)
    assert ranks_with_data == dp                             # 13 samples: a part for every reader


@pytest.mark.parametrize("dp,workers", LAYOUTS)
def test_unbounded_epoch_reads_every_sample_once(one: Path, dp: int, workers: int):
    """Batches of one sample: a rank's batches come from its workers in turn, so the first ``total`` batches of
    each worker are its reader's share of epoch 0; together they are the split, each sample once."""
    w = max(1, workers)
    epoch0 = []
    for rank in range(dp):
        loader = TokenLoader(one, micro_batch_size=1, seed=3, dp_rank=rank, dp_size=dp, num_workers=workers)
        totals = [loader._plan.total(0, loader._plan.reader_ids(k)[0]) for k in range(w)]
        assert min(totals) >= 1
        got = flat(take(loader, w * max(totals)))
        for k in range(w):
            epoch0 += got[k::w][:totals[k]]
    assert sorted(epoch0) == every(ONE)


@pytest.mark.slow
@pytest.mark.parametrize("sizes,dp,workers", [(ONE, dp, w) for dp, w in LAYOUTS] + [((5, 4, 6), 2, 2)],
                         ids=[f"one-dp{dp}-w{w}" for dp, w in LAYOUTS] + ["three-dp2-w2"])
def test_resume_is_exact(tmp_path: Path, sizes, dp: int, workers: int):
    """On one shard every reader has one part per epoch; on three shards over 4 readers (6 parts) some have two,
    so a resume inside an epoch skips whole parts."""
    folder = make_data(tmp_path, sizes, val=(1,))
    rank = dp - 1

    def make(epochs=None):
        return TokenLoader(folder, micro_batch_size=2, seed=7, dp_rank=rank, dp_size=dp, num_workers=workers,
                           epochs=epochs)
    ref = take(make(), 12)                                   # several epochs of this rank's few samples
    for k in (1, 4, 9):
        first = make()
        take(first, k)
        again = make()
        again.load_state_dict(json.loads(json.dumps(first.state_dict())))
        for (t, l), (rt, rl) in zip(take(again, 12 - k), ref[k:], strict=True):
            assert torch.equal(t, rt) and torch.equal(l, rl)
    bounded = [ids(t) for t, _ in take(make(epochs=1))]
    for k in range(1, len(bounded)):
        first = make(epochs=1)
        take(first, k)
        again = make(epochs=1)
        again.load_state_dict(first.state_dict())
        assert [ids(t) for t, _ in take(again)] == bounded[k:]


def test_parts_are_contiguous_and_cover_each_shard(tmp_path: Path):
    folder = make_data(tmp_path, (5, 1, 4), val=(1,))
    lay = TokenLoader(folder, micro_batch_size=1, dp_size=4, num_workers=2, epochs=1)._plan
    # 3 shards, 8 readers: m = ceil(8 / 3) = 3 gives 7 parts (the 1-sample shard is one part), m = 4 gives 9
    assert lay.parts == [(0, 0, 1), (0, 1, 2), (0, 2, 3), (0, 3, 5), (1, 0, 1), (2, 0, 1), (2, 1, 2), (2, 2, 3),
                         (2, 3, 4)]


def test_too_few_samples_for_an_unbounded_loader(tmp_path: Path):
    folder = make_data(tmp_path, (2, 1), val=(1,))
    with pytest.raises(ValueError, match=r"^\S+: split 'train' has 3 samples, fewer than the 4 readers \(dp_size 2 "
                                         r"x workers 2\), so some would never get a batch; use fewer workers"):
        TokenLoader(folder, micro_batch_size=1, dp_size=2, num_workers=2)
    seen = []                                                # bounded: some readers just get nothing
    for rank in range(2):
        seen += flat(take(TokenLoader(folder, micro_batch_size=1, dp_rank=rank, dp_size=2, num_workers=2, epochs=1)))
    assert sorted(seen) == every((2, 1))


# Made by the loader before parts existed (7 shards, 4 readers), batches of 3: reading whole shards must not change.
BEFORE_PARTS = {
    (0, 0): [(5, 6), (5, 0), (5, 3), (5, 4), (5, 7), (5, 1), (5, 5), (5, 2), (5, 8), (5, 9), (4, 3), (4, 7), (4, 4),
             (4, 8), (4, 9), (4, 1), (4, 6), (4, 2), (4, 0), (4, 5), (6, 4), (6, 6), (6, 3), (6, 1)],
    (1, 2): [(3, 0), (3, 1), (3, 2), (2, 0), (2, 9), (2, 2), (1, 2), (1, 1), (1, 8), (2, 6), (2, 4), (2, 7), (1, 7),
             (1, 3), (1, 6), (2, 3), (2, 1), (2, 5), (1, 4), (1, 5), (1, 0), (2, 8), (6, 3), (6, 1)],
}


@pytest.mark.parametrize("rank,workers", sorted(BEFORE_PARTS))
def test_enough_shards_read_as_before(tmp_path: Path, rank: int, workers: int):
    folder = make_data(tmp_path, UNEVEN)
    loader = TokenLoader(folder, micro_batch_size=3, seed=11, dp_rank=rank, dp_size=2, num_workers=workers)
    assert flat(take(loader, 8)) == BEFORE_PARTS[rank, workers]
    assert loader.state_dict()["shards"] == "2671fd2b031d729f"
    assert [p[0] for p in loader._plan.parts] == list(range(len(UNEVEN)))
