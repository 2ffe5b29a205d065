"""Tests for pretrain.data.loader.TokenLoader: coverage over ranks and workers, determinism, exact resume, validation
pass, and errors naming the broken file. Fixture samples encode (shard, sample) in their first two tokens."""
from __future__ import annotations

import itertools
import json
import random
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from data_prep.shards import Manifest, shard_name, write_shard
from pretrain.data.loader import ShardError, TokenLoader

SEQ = 8
EVEN = (10,) * 8                       # 8 shards over 4 readers
UNEVEN = (10, 9, 10, 3, 10, 10, 7)     # 7 shards over 4 readers, shards of unequal size


def row(shard: int, sample: int) -> np.ndarray:
    rest = [(shard * 31 + sample * 7 + k) % 1000 for k in range(SEQ - 1)]
    return np.array([shard, sample, *rest], dtype="<u2")


def make_data(folder: Path, train=EVEN, val=(5, 4, 6)) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    m = Manifest(seq_len=SEQ, dtype="uint16", vocab_size=1000, tokenizer={})
    for split, sizes in (("train", train), ("val", val)):
        for i, n in enumerate(sizes):
            rows = [row(i, j) for j in range(n)]
            m.splits[split].append(write_shard(folder / shard_name(split, i), split, i, rows))
    m.complete = True
    m.save(folder)
    return folder


def ids(tokens: torch.Tensor) -> list[tuple[int, int]]:
    return [(int(a), int(b)) for a, b in tokens[:, :2].tolist()]


def take(loader: TokenLoader, n: int | None = None) -> list[tuple[torch.Tensor, torch.Tensor]]:
    it = iter(loader)
    try:
        return list(itertools.islice(it, n))
    finally:
        it.close()                     # stops DataLoader workers now


def flat(batches) -> list[tuple[int, int]]:
    return [s for t, _ in batches for s in ids(t)]


def every(sizes) -> list[tuple[int, int]]:
    return [(i, j) for i, n in enumerate(sizes) for j in range(n)]


@pytest.fixture
def even(tmp_path: Path) -> Path:
    return make_data(tmp_path / "even", EVEN)


@pytest.fixture
def uneven(tmp_path: Path) -> Path:
    return make_data(tmp_path / "uneven", UNEVEN)


def test_batches_are_int64_windows_of_the_samples(even: Path):
    batches = take(TokenLoader(even, micro_batch_size=4, seed=3), 5)
    for tokens, labels in batches:
        assert tokens.dtype == labels.dtype == torch.int64
        assert tokens.shape == labels.shape == (4, SEQ)
        assert tokens.is_contiguous() and labels.is_contiguous()
        for t, l, (i, j) in zip(tokens, labels, ids(tokens)):
            full = torch.from_numpy(row(i, j).astype(np.int64))
            assert torch.equal(t, full[:-1]) and torch.equal(l, full[1:])


@pytest.mark.parametrize("sizes", [EVEN, UNEVEN], ids=["even", "uneven"])
def test_one_epoch_over_2_ranks_x_2_workers_reads_every_sample_once(tmp_path: Path, sizes):
    folder = make_data(tmp_path, sizes)
    seen, shards_of_rank = [], []
    for rank in range(2):
        loader = TokenLoader(folder, micro_batch_size=4, seed=5, dp_rank=rank, dp_size=2, num_workers=2, epochs=1)
        batches = take(loader)
        assert len(batches) == len(loader)
        sizes_seen = [len(t) for t, _ in batches]
        assert sum(b < 4 for b in sizes_seen) <= 2          # at most one short batch per worker
        got = flat(batches)
        seen += got
        shards_of_rank.append({i for i, _ in got})
    assert sorted(seen) == every(sizes)                     # each sample exactly once, none dropped
    assert not shards_of_rank[0] & shards_of_rank[1]        # a shard belongs to one rank
    assert shards_of_rank[0] and shards_of_rank[1]


def test_bounded_epochs_read_every_sample_once_per_epoch(uneven: Path):
    seen = []
    for rank in range(2):
        seen += flat(take(TokenLoader(uneven, micro_batch_size=3, dp_rank=rank, dp_size=2, epochs=3)))
    assert Counter(seen) == Counter(every(UNEVEN) * 3)


def test_uneven_shards_rotate_the_extra_shard_over_epochs(uneven: Path):
    """7 shards, 4 readers: per epoch each reader gets 1 or 2 shards; over 4 epochs exactly 7 each."""
    lay = TokenLoader(uneven, micro_batch_size=4, dp_size=2, num_workers=2)._plan
    per_reader = Counter()
    for epoch in range(4):
        owned = [list(lay.shards(epoch, c)) for c in range(4)]
        assert sorted(s for o in owned for s in o) == list(range(7))
        assert {len(o) for o in owned} == {1, 2}
        per_reader.update({c: len(o) for c, o in enumerate(owned)})
    assert set(per_reader.values()) == {7}


def test_unbounded_order_depends_only_on_seed_and_epoch(even: Path):
    n = len(every(EVEN))                                     # 80 samples; batches of 3 straddle epochs
    def stream(seed):
        loader = TokenLoader(even, micro_batch_size=3, seed=seed)
        got = flat(take(loader, (2 * n) // 3 + 1))
        return got, loader
    random.seed(1); np.random.seed(1); torch.manual_seed(1)
    a, loader = stream(7)
    random.seed(2); np.random.seed(2); torch.manual_seed(2)
    b, _ = stream(7)
    assert a == b                                            # same seed: same order, whatever the global RNGs
    e0, e1 = a[:n], a[n:2 * n]
    assert sorted(e0) == sorted(e1) == every(EVEN)           # each epoch is a full pass
    shard_runs = [[k for k, _ in itertools.groupby(i for i, _ in e)] for e in (e0, e1)]
    assert all(sorted(r) == list(range(len(EVEN))) for r in shard_runs)   # one reader reads shard after shard
    assert shard_runs[0] != shard_runs[1]                    # another shard order in epoch 1 ...
    within = [[[j for i, j in e if i == s] for s in range(len(EVEN))] for e in (e0, e1)]
    assert all(w0 != w1 for w0, w1 in zip(*within))          # ... and another sample order in every shard
    assert loader.epoch == 2
    c, _ = stream(8)
    assert c[:n] != e0 and sorted(c[:n]) == every(EVEN)


def test_epoch_advances(even: Path):
    loader = TokenLoader(even, micro_batch_size=4)
    assert loader.epoch == 0
    take(loader, 19)
    assert loader.epoch == 0
    take(loader, 1)                                          # 20 batches of 4 = one epoch of 80
    assert loader.epoch == 1 and loader.state_dict()["epoch"] == 1


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_yields_the_batches_an_uninterrupted_loader_would(uneven: Path, workers: int):
    def make():
        return TokenLoader(uneven, micro_batch_size=4, seed=11, dp_rank=1, dp_size=2, num_workers=workers)
    ref = take(make(), 30)                                   # rank 1 reads ~30 samples/epoch: ~4 epochs
    epochs_seen = set()
    for k in (0, 3, 7, 12, 17):
        first = make()
        assert flat(take(first, k)) == flat(ref[:k])
        state = json.loads(json.dumps(first.state_dict()))   # survives a checkpoint as plain JSON
        epochs_seen.add(state["epoch"])
        again = make()
        again.load_state_dict(state)
        got = take(again, 10)
        for (t, l), (rt, rl) in zip(got, ref[k:k + 10], strict=True):
            assert torch.equal(t, rt) and torch.equal(l, rl)
    assert len(epochs_seen) >= 3                             # resumed in several epochs, across boundaries


def test_bounded_pass_resumes_exactly_and_restarts_when_done(uneven: Path):
    """Workers run out at different times here (7 shards over 2 workers): resume must follow DataLoader's skipping."""
    def make():
        return TokenLoader(uneven, micro_batch_size=4, seed=2, num_workers=2, epochs=1)
    ref = [ids(t) for t, _ in take(make())]
    assert len(ref) == len(make())
    for k in (1, 4, len(ref) - 3, len(ref) - 1, len(ref)):
        first = make()
        take(first, k)
        again = make()
        again.load_state_dict(first.state_dict())
        got = [ids(t) for t, _ in take(again)]
        assert got == (ref[k:] if k < len(ref) else ref)    # a finished pass starts over


def test_state_of_another_layout_is_refused(even: Path):
    state = TokenLoader(even, micro_batch_size=4, dp_size=2).state_dict()
    with pytest.raises(ValueError, match="dp_size"):
        TokenLoader(even, micro_batch_size=4).load_state_dict(state)


def test_validation_loader_is_one_ordered_pass(even: Path):
    val = TokenLoader(even, "val", micro_batch_size=4, shuffle=False, epochs=1)
    batches = take(val)
    assert flat(batches) == every((5, 4, 6))                 # manifest order, nothing dropped
    assert [len(t) for t, _ in batches] == [4, 4, 4, 3]      # the short last batch is kept
    assert len(val) == 4
    assert flat(take(val)) == every((5, 4, 6))               # the next loop is the same pass again
    ranks = [flat(take(TokenLoader(even, "val", micro_batch_size=4, shuffle=False, epochs=1, dp_rank=r,
                                   dp_size=2))) for r in range(2)]
    assert sorted(ranks[0] + ranks[1]) == every((5, 4, 6))
    assert all(r == sorted(r) for r in ranks)


def _truncate(path: Path, keep: int) -> None:
    path.write_bytes(path.read_bytes()[:keep])


@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("keep", [1024 * 3 + 600, 1024 * 3, 100],
                         ids=["inside-a-member", "at-a-member-boundary", "inside-the-first-header"])
def test_truncated_shard_is_named(even: Path, workers: int, keep: int):
    bad = even / shard_name("train", 5)                      # members are 512 header + 512 data bytes
    _truncate(bad, keep)
    with pytest.raises(ShardError, match=f"^{bad}: .*(truncated|samples)"):
        take(TokenLoader(even, micro_batch_size=4, num_workers=workers, epochs=1))


@pytest.mark.parametrize("workers", [0, 2])
def test_missing_shard_is_named(even: Path, workers: int):
    gone = even / shard_name("train", 2)
    gone.unlink()
    with pytest.raises(ShardError, match=f"^{gone}: shard listed in the manifest is missing"):
        take(TokenLoader(even, micro_batch_size=4, num_workers=workers, epochs=1))


def test_sha256_check_is_optional(even: Path):
    bad = even / shard_name("train", 4)
    data = bytearray(bad.read_bytes())
    data[512 + 4] ^= 0xFF                                    # a token of the first sample: still a valid tar
    bad.write_bytes(bytes(data))
    assert len(flat(take(TokenLoader(even, micro_batch_size=4, epochs=1)))) == 80
    with pytest.raises(ShardError, match=f"^{bad}: sha256 differs"):
        take(TokenLoader(even, micro_batch_size=4, epochs=1, verify_sha256=True))


def test_missing_manifest(tmp_path: Path):
    with pytest.raises(FileNotFoundError, match="manifest.json: no manifest here"):
        TokenLoader(tmp_path, micro_batch_size=4)
