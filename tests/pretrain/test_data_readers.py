"""A fixed number of readers makes the data order independent of the layout (pretrain/data/loader.py, Readers):
global micro-batch g = k·dp + r (the k-th batch of rank r) is the same samples under any number of data-parallel
ranks and loader workers, and a position saved under one number continues under another, every sample still read
once per epoch."""
from __future__ import annotations

from itertools import islice

import pytest

from pretrain.data.loader import TokenLoader
from tests.pretrain.test_data import UNEVEN, ids, make_data

READERS, MB = 4, 2


def global_batches(folder, dp: int, workers: int, n: int, state: dict | None = None) -> list[list[tuple[int, int]]]:
    """The first ``n`` global micro-batches (as (shard, sample) ids) of ``dp`` ranks with ``workers`` each, ranks'
    batches laid out as g = k·dp + r; each rank's loader first given ``state`` when one is passed."""
    ranks = []
    for r in range(dp):
        loader = TokenLoader(folder, micro_batch_size=MB, dp_rank=r, dp_size=dp, num_workers=workers,
                             readers=READERS, seed=3)
        if state is not None:
            loader.load_state_dict(state)
        ranks.append([ids(t) for t, _ in islice(loader, n // dp)])
    return [ranks[g % dp][g // dp] for g in range(n)]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return make_data(tmp_path_factory.mktemp("readers") / "tok", train=UNEVEN)


def test_the_global_order_does_not_depend_on_ranks_or_workers(folder):
    one = global_batches(folder, 1, 0, 24)
    for dp, workers in ((2, 0), (4, 0), (1, 2), (2, 2)):
        assert global_batches(folder, dp, workers, 24) == one, (dp, workers)
    # the readers really interleave: the first 4 global micro-batches come from 4 different shards' parts
    assert len({batch[0][0] for batch in one[:4]}) == 4


def test_a_position_continues_under_another_layout(folder):
    straight = global_batches(folder, 1, 0, 40)
    saver = TokenLoader(folder, micro_batch_size=MB, num_workers=2, readers=READERS, seed=3)
    list(islice(saver, 12))                       # 12 global micro-batches read by one rank with 2 workers
    state = saver.state_dict()
    for dp, workers in ((2, 0), (4, 1), (2, 2)):
        assert global_batches(folder, dp, workers, 28, state) == straight[12:], (dp, workers)
    # and back: 4 ranks' states at 16 global micro-batches, continued by one process
    states = []
    for r in range(4):
        loader = TokenLoader(folder, micro_batch_size=MB, dp_rank=r, dp_size=4, readers=READERS, seed=3)
        list(islice(loader, 4))
        states.append(loader.state_dict())
    assert global_batches(folder, 1, 0, 24, states[3]) == straight[16:]


def test_what_cannot_move_is_refused(folder):
    state = TokenLoader(folder, micro_batch_size=MB, dp_size=2, readers=READERS).state_dict()
    with pytest.raises(ValueError, match="readers: 4, 8"):
        TokenLoader(folder, micro_batch_size=MB, readers=8).load_state_dict(state)
    with pytest.raises(ValueError, match="cannot be continued by 3"):
        TokenLoader(folder, micro_batch_size=MB, dp_size=3, readers=3).load_state_dict(
            {**state, "readers": 3, "batches": 1})
    bounded = TokenLoader(folder, "val", micro_batch_size=MB, epochs=1, shuffle=False)
    with pytest.raises(ValueError, match="another layout"):
        bounded.load_state_dict({**bounded.state_dict(), "dp_size": 2, "dp_rank": 1})
    with pytest.raises(ValueError, match="cannot be shared evenly"):
        TokenLoader(folder, micro_batch_size=MB, dp_size=2, num_workers=2, readers=6)
