"""The mixture's source schedule (pretrain/data/mixture.py): realised proportions within the stated bound over
every window and in every reader slot, counts equal to counting, phases at their steps, and what a resume may
change."""
from __future__ import annotations

from fractions import Fraction

import numpy as np
import pytest

from pretrain.data.mixture import MixSchedule, Phase, plan, started_changes


def phase(start: int, **weights: float) -> Phase:
    return Phase(start, tuple((n, Fraction(str(w))) for n, w in weights.items()))


def window_counts(src: np.ndarray, k: int, n: int) -> np.ndarray:
    """(k, windows): how many of each window of n consecutive entries are each source."""
    csum = np.concatenate([np.zeros((k, 1), np.int64), np.cumsum(np.eye(k, dtype=np.int64)[src].T, axis=1)], axis=1)
    return csum[:, n:] - csum[:, :-n]


@pytest.mark.parametrize("weights", [
    {"web": 0.7, "code": 0.2, "math": 0.1},
    {"a": 0.5, "b": 0.5},
    {"a": 1, "b": 1, "c": 1},                     # thirds: no finite decimal
    {"a": 0.9, "b": 0.05, "c": 0.03, "d": 0.02},
    {"a": 0.123, "b": 0.456, "c": 0.2, "d": 0.1, "e": 0.121},
])
@pytest.mark.parametrize("seed", [0, 7])
def test_every_window_holds_each_weight_within_the_stated_bound(weights, seed):
    """Over ANY N consecutive global micro-batches, each source gets weight·N ± less than 3 for N <= 1000 and
    ± at most 4 beyond (pretrain/data/mixture.py states the bound)."""
    names = list(weights)
    s = MixSchedule(names, plan([phase(0, **weights)], 4), seed)
    src = s.source_of(np.arange(30_000))
    w = np.array([weights[n] for n in names], dtype=np.float64)
    w /= w.sum()
    for n in (1, 2, 3, 5, 10, 17, 100, 1000, 9999, 29_000):
        dev = np.abs(window_counts(src, len(names), n) - w[:, None] * n).max()
        assert dev < 3 if n <= 1000 else dev <= 4, (n, dev)


@pytest.mark.parametrize("readers", [2, 8, 96, 128])
def test_every_reader_slot_sees_each_source_at_its_weight(readers):
    """Slot t reads micro-batches t, t + R, ...: each slot's share of each source stays near its weight, so a
    source's readers advance together (an exact-quota rule gives a slot of R = 2 only one source of 0.5/0.5)."""
    for weights in ({"a": 0.5, "b": 0.5}, {"web": 0.7, "code": 0.2, "math": 0.1}):
        s = MixSchedule(list(weights), plan([phase(0, **weights)], 4), 1)
        w = np.array(list(weights.values())) / sum(weights.values())
        for slot in range(0, readers, max(1, readers // 4)):
            src = s.source_of(slot + readers * np.arange(20_000))
            running = np.cumsum(np.eye(len(w), dtype=np.int64)[src], axis=0)
            lag = np.abs(running - np.arange(1, len(src) + 1)[:, None] * w).max()
            assert lag < 50, (weights, slot, lag)


def test_counts_equal_counting_and_the_running_total_follows_any_order_of_questions():
    s = MixSchedule(["a", "b", "c"], plan([phase(0, a=0.7, b=0.2, c=0.1), phase(10, a=0, b=1, c=3)], 6), 3)
    src = s.source_of(np.arange(5000))
    for end in (0, 1, 59, 60, 61, 4999, 17, 3000):   # later, then earlier ends: the running total restarts
        for begin in (0, 13, 60):
            if begin <= end:
                assert list(s.counts(end, begin)) == list(np.bincount(src[begin:end], minlength=3))
    for slot, stride in ((0, 1), (3, 8), (7, 8)):
        done = 400
        assert list(s.slot_counts(slot, stride, done, chunk=64)) == \
            list(np.bincount(src[slot + stride * np.arange(done)], minlength=3))
    assert s.source_of(61) == src[61] and isinstance(s.source_of(61), int)


def test_a_phase_starts_at_its_step_and_a_zero_weight_is_never_drawn():
    s = MixSchedule(["a", "b"], plan([phase(0, a=1, b=0), phase(5, a=0, b=1)], 8), 0)
    src = s.source_of(np.arange(100))
    assert (src[:40] == 0).all() and (src[40:] == 1).all()       # step 5 begins at micro-batch 5 × 8


def test_the_seed_moves_the_pattern_not_the_proportions():
    a = MixSchedule(["a", "b"], plan([phase(0, a=0.5, b=0.5)], 1), 0).source_of(np.arange(1000))
    b = MixSchedule(["a", "b"], plan([phase(0, a=0.5, b=0.5)], 1), 1).source_of(np.arange(1000))
    c = MixSchedule(["a", "b"], plan([phase(0, a=0.5, b=0.5)], 1), 0).source_of(np.arange(1000))
    assert (a == c).all() and (a != b).any() and abs(int(a.sum()) - 500) < 3 and abs(int(b.sum()) - 500) < 3


def test_a_resume_keeps_the_past_and_plans_the_rest_from_the_config():
    phases = [phase(0, a=0.5, b=0.5), phase(10, a=0.2, b=0.8)]
    fresh = plan(phases, 4)
    # resumed at step 6 (micro-batch 24) with the same config: the same segments, hence the same schedule
    assert plan(phases, 4, history=fresh, at_step=6, at_micro=24) == fresh
    # resumed at step 12 inside phase 1: nothing changes either
    assert plan(phases, 4, history=fresh, at_step=12, at_micro=48) == fresh
    # a larger global batch from step 6 on moves the phases still to come, not the past
    moved = plan(phases, 8, history=fresh, at_step=6, at_micro=24)
    assert [(s.start, s.step) for s in moved] == [(0, 0), (24 + 4 * 8, 10)]
    # the weights of phase 1 changed at step 12 (allowed): the history stays, a new segment from micro-batch 48
    changed = [phases[0], phase(10, a=0.9, b=0.1)]
    cut = plan(changed, 4, history=fresh, at_step=12, at_micro=48)
    assert cut[:2] == fresh and (cut[2].start, cut[2].step, cut[2].phase) == (48, 12, 1)
    s_old, s_new = MixSchedule(["a", "b"], fresh, 0), MixSchedule(["a", "b"], cut, 0)
    g = np.arange(48)
    assert (s_old.source_of(g) == s_new.source_of(g)).all()


def test_only_phases_that_have_begun_count_as_changes():
    saved = [phase(0, a=0.5, b=0.5), phase(10, a=0.2, b=0.8)]
    later = [saved[0], phase(10, a=0.9, b=0.1)]
    assert started_changes(saved, later, at_step=8) == []            # phase 1 not begun at step 8
    assert started_changes(saved, later, at_step=10) == []           # begins with the next step: still free
    (change,) = started_changes(saved, later, at_step=11)
    assert change.startswith("phase 1: was from step 10: a 0.2, b 0.8, now from step 10: a 0.9, b 0.1")
    assert started_changes(saved, [saved[0], phase(4, a=0.2, b=0.8)], at_step=8)   # moved before the resume
    assert started_changes(saved, [phase(0, a=0.6, b=0.4), saved[1]], at_step=1)


@pytest.mark.parametrize("override,message", [
    ("data.path=x", "data.path: x is set together with data.sources; give one of them (data.path=null with sources)"),
    ("data.phases=[{start: 3, weights: {middle: 1}}]", "data.phases[0].weights.middle: not a source (sources: "
                                                       "early, late)"),
    ("data.phases=[{start: 3, weights: {early: 0}}]", "data.phases[0].weights: every weight is 0"),
    ("data.phases=[{start: 0, weights: {early: 1}}]", "data.phases[0].start: 0 must be greater than 0"),
    ("data.phases=[{start: 9, weights: {early: 1}}, {start: 9, weights: {late: 1}}]",
     "data.phases[1].start: 9 must be greater than data.phases[0].start (9)"),
    ("data.sources.early.weight=-1", "data.sources.early.weight: must be >= 0, got -1.0"),
])
def test_a_mixture_config_mistake_is_one_line_naming_the_key(override, message):
    from conf import load_config, run_file
    from conf.errors import ConfigError
    from pretrain.config import RunConfig
    with pytest.raises(ConfigError) as e:
        load_config(run_file("demo_mix"), [override], schema=RunConfig)
    assert message in str(e.value) and "\n" not in str(e.value), str(e.value)


def test_no_data_at_all_is_one_line():
    from conf import load_config, run_file
    from conf.errors import ConfigError
    from pretrain.config import RunConfig
    with pytest.raises(ConfigError, match="data.path: null without data.sources; give the tokenized folder"):
        load_config(run_file("tiny_cpu"), ["data.path=null"], schema=RunConfig)
