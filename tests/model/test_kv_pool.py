"""Recursion-wise KV pools (model/inference/kv_pool.py): deeper steps get fewer positions, so in the same memory an
MoR model holds more sequences than vanilla (a quarter more for Nr = 3 with the default capacities and one unique
layer on each side, twice as many with KV sharing); the size formula is what gets allocated; positions are taken
and given back exactly; admission keeps room for the expected share."""
from __future__ import annotations

import math

import pytest
import torch

from conf import load_config
from model.config import ModelConfig, RouterConfig
from model.inference import KVCache, KVPool, pool_bytes
from tests.model.helpers import tiny

CONFIGS = {
    "vanilla": lambda: tiny(sharing="none"),
    "ec": lambda: tiny(routing="expert_choice", router=RouterConfig(capacities=[0.9, 0.6, 0.3])),
    "ec-kv": lambda: tiny(routing="expert_choice", kv_sharing=True),
    "tc-sequence": lambda: tiny(routing="token_choice", sharing="sequence"),
    "recursive": lambda: tiny(routing="none", sharing="middle_cycle"),
}


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("slots", [1, 3, 50])
def test_the_size_formula_is_what_is_allocated(name, slots):
    cfg = CONFIGS[name]()
    pool = KVPool(cfg, slots, 24)
    assert pool_bytes(cfg, slots, 24) == pool.allocated_bytes() + pool.index_bytes()
    bf16 = KVPool(cfg, slots, 24, dtype=torch.bfloat16, device="meta")
    assert pool_bytes(cfg, slots, 24, dtype=torch.bfloat16) == bf16.allocated_bytes() + bf16.index_bytes()


def test_deeper_steps_get_fewer_positions_and_mor_fits_more_sequences():
    presets = {n: load_config(n, [], schema=ModelConfig) for n in ("tiny_vanilla", "tiny_mor_ec",
                                                                  "tiny_mor_ec_kvshare", "tiny_recursive")}
    slots, length = 64, 100
    ec = KVPool(presets["tiny_mor_ec"], slots, length, device="meta")
    assert ec.sizes == [slots * length, math.ceil(2 / 3 * slots * length), math.ceil(1 / 3 * slots * length)]
    assert KVPool(presets["tiny_mor_ec_kvshare"], slots, length, device="meta").sizes == [slots * length]
    assert KVPool(presets["tiny_recursive"], slots, length, device="meta").sizes == [slots * length] * 3
    # keys and values per sequence against the static cache of the same unrolled depth (8 layers): the first
    # and last layers cache every token, the block's 2 layers c_1 + c_2 + c_3 = 2 tokens' worth: 6/8; sharing 4/8
    static = KVCache(presets["tiny_vanilla"], slots, length, device="meta").allocated_bytes()
    for name, share in (("tiny_mor_ec", 6 / 8), ("tiny_mor_ec_kvshare", 4 / 8), ("tiny_recursive", 1.0)):
        got = KVPool(presets[name], slots, length, device="meta").allocated_bytes()
        assert got / static == pytest.approx(share, rel=0.02)

    def fits(cfg, per_slot) -> int:
        budget = 32 * 2**20
        return max(s for s in range(1, 400) if per_slot(cfg, s) <= budget)

    static_fit = fits(presets["tiny_vanilla"], lambda c, s: s * (KVCache(c, 1, length, device="meta").allocated_bytes()
                                                                + KVCache(c, 1, length, device="meta").index_bytes()))
    ec_fit = fits(presets["tiny_mor_ec"], lambda c, s: pool_bytes(c, s, length))
    shared_fit = fits(presets["tiny_mor_ec_kvshare"], lambda c, s: pool_bytes(c, s, length))
    assert static_fit < ec_fit < shared_fit
    assert ec_fit / static_fit == pytest.approx(8 / 6, rel=0.05)
    assert shared_fit / static_fit == pytest.approx(2, rel=0.05)


def test_positions_are_taken_and_given_back():
    cfg = tiny(routing="expert_choice")
    pool = KVPool(cfg, slots=2, max_len=4, capacities=[1.0, 0.5, 0.25])
    assert pool.sizes == [8, 4, 4] and pool.scratch == 16   # step 3: ceil(0.25 * 8) = 2, raised to max_len
    # slot 0 at step 1, slot 1 at step 2, and a row that caches nothing
    dest = pool.take([0, 1, -1], [0, 1, 1], torch.tensor([0, 2, 3]))
    assert 0 <= int(dest[0]) < 8 and 8 <= int(dest[1]) < 12 and int(dest[2]) == pool.scratch
    assert int(pool.index[0, 0, 0]) == int(dest[0]) and int(pool.index[1, 1, 2]) == int(dest[1])
    assert int(pool.index[1, 1, 3]) == pool.scratch
    assert [pool.free(r) for r in range(3)] == [7, 3, 4] and pool.used_positions() == [1, 1, 0]
    taken = [int(pool.take([1], [0], torch.tensor([p]))[0]) for p in range(3)]   # the rest of step 2's pool
    assert sorted(taken + [int(dest[1])]) == list(range(8, 12)) and pool.free(1) == 0
    with pytest.raises(RuntimeError, match="step 2"):
        pool.take([1], [1], torch.tensor([0]))
    pool.release([0])
    assert [pool.free(r) for r in range(3)] == [8, 3, 4] and pool.held[1] == [0, 1]
    assert bool((pool.index[:, 0] == pool.scratch).all()) and int(pool.index[1, 1, 2]) == int(dest[1])
    pool.release([1])
    assert pool.used_positions() == [0, 0, 0]
    assert sorted(pool.free_stack[1].tolist()) == list(range(8, 12))   # the same positions, none lost or doubled


def test_admission_keeps_room_for_the_expected_share():
    """A new sequence is admitted while every pool keeps its expected share (tokens x c_r) besides what the
    sequences in flight are still expected to take; a sequence deeper than expected takes that room."""
    cfg = tiny(routing="expert_choice")
    pool = KVPool(cfg, slots=4, max_len=10, capacities=[1.0, 0.5, 0.25])
    assert pool.sizes == [40, 20, 10]                          # shares of a 10-token sequence: 10, 5, 3
    assert pool.admits(10, [(0, 10), (1, 10)])                 # step 3: 10 - 2 x 3 >= 3
    assert not pool.admits(10, [(0, 10), (1, 10), (2, 10)])    # step 3: 10 - 3 x 3 < 3
    for p in range(3):                                         # slot 0 takes its expected share: nothing changes
        pool.take([2], [0], torch.tensor([p]))
    assert pool.admits(10, [(0, 10), (1, 10)])
    for p in range(3, 5):                                      # ... then goes deeper than expected
        pool.take([2], [0], torch.tensor([p]))
    assert not pool.admits(10, [(0, 10), (1, 10)])             # 10 - 5 held - 3 promised < 3
    pool.release([0])
    assert pool.admits(10, [(1, 10)])
