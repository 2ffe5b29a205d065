"""The mixture's training loader over real WebDataset shards (pretrain/data/mixed_loader.py): the source and the
samples of every global micro-batch do not depend on the layout, a saved position continues under another one,
a small source starts over while the others go on, and sources that do not fit together are one line."""
from __future__ import annotations

import hashlib
from fractions import Fraction
from pathlib import Path

import pytest

from data_prep.shards import Manifest
from pretrain.data.mixed_loader import MixtureLoader, load_sources
from pretrain.data.mixture import Phase
from tests.pretrain.fixtures import make_shards

PHASES = [Phase(0, (("a", Fraction(7, 10)), ("b", Fraction(2, 10)), ("c", Fraction(1, 10)))),
          Phase(4, (("a", Fraction(0)), ("b", Fraction(1)), ("c", Fraction(1))))]
B, READERS, MICRO_PER_STEP = 2, 8, 8


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("mix")
    # c is small: 24 samples, 12 batches; it starts over several times in the runs below
    return {name: str(make_shards(root / name, train=n, val=8, per_shard=8, seed=i))
            for i, (name, n) in enumerate((("a", 128), ("b", 64), ("c", 24)))}


def loaders(sources, dp: int, workers: int, phases=PHASES, **kw) -> list[MixtureLoader]:
    return [MixtureLoader(sources, phases, micro_per_step=MICRO_PER_STEP, micro_batch_size=B, seed=3, dp_rank=r,
                          dp_size=dp, num_workers=workers, readers=READERS, **kw) for r in range(dp)]


def read(ls: list[MixtureLoader], global_batches: int, first: int = 0) -> dict[int, tuple[str, str]]:
    """global micro-batch -> (source, sha256 of its tokens), the ranks read in turn as a step would."""
    dp, out, its = len(ls), {}, [iter(x) for x in ls]
    for k in range(global_batches // dp):
        for r, it in enumerate(its):
            tokens, _ = next(it)
            out[first + k * dp + r] = (ls[r].names[ls[r].last_source], hashlib.sha256(tokens.numpy()).hexdigest())
    return out


@pytest.mark.filterwarnings("ignore:This DataLoader will create")   # 4 workers on a 2-core machine, on purpose
def test_the_source_and_samples_of_every_global_micro_batch_do_not_depend_on_the_layout(sources):
    one = read(loaders(sources, 1, 0), 64)
    assert read(loaders(sources, 2, 0), 64) == one
    assert read(loaders(sources, 4, 2), 64) == one                   # DP=4 × 2 workers
    assert read(loaders(sources, 2, 4), 64) == one
    names = [one[g][0] for g in range(64)]
    assert abs(names[:32].count("a") - 0.7 * 32) < 3 and "a" not in names[32:]   # phase 1 from step 4: g = 32


def test_a_position_saved_under_one_layout_continues_under_another(sources):
    straight = read(loaders(sources, 1, 0), 96)
    first = loaders(sources, 4, 1)
    read(first, 40)                                                   # 5 steps of 8: inside phase 1
    state = first[0].state_dict()
    for dp, workers in ((2, 2), (1, 0), (8, 1)):
        again = loaders(sources, dp, workers)
        for x in again:
            x.load_state_dict(state)
        assert read(again, 56, first=40) == {g: straight[g] for g in range(40, 96)}, (dp, workers)


def test_a_small_source_starts_over_while_the_others_go_on(sources):
    """c holds 24 samples and is read more often than that: every sample of it comes back; a (128 samples) has not
    finished its first pass, so none of its samples repeats."""
    from collections import Counter
    per_source: dict[str, Counter] = {"a": Counter(), "c": Counter()}
    its = loaders(sources, 1, 0)
    it = iter(its[0])
    for _ in range(96):
        tokens, _ = next(it)
        name = its[0].names[its[0].last_source]
        if name in per_source:
            per_source[name].update(hashlib.sha256(row.numpy()).hexdigest() for row in tokens)
    c, a = per_source["c"], per_source["a"]
    # read three times over, every one of c's samples came back (how often each depends on which of c's 8 readers
    # holds it: 3 shards cut in 9 parts give a reader 1 or 2 parts per pass, rotating from pass to pass)
    assert sum(c.values()) >= 3 * 24 and len(c) == 24
    assert set(a.values()) == {1}


def test_changing_a_phase_that_has_begun_is_refused_unless_allowed(sources):
    first = loaders(sources, 1, 0)
    read(first, 48)                                                   # step 6: phase 1 began at step 4
    state = first[0].state_dict()
    other = [PHASES[0], Phase(4, (("a", Fraction(1)), ("b", Fraction(1)), ("c", Fraction(0))))]
    with pytest.raises(ValueError) as e:
        loaders(sources, 1, 0, phases=other)[0].load_state_dict(state)
    assert "data.phases: changed where training has begun (resumed at step 6): phase 1: was from step 4" in \
        str(e.value) and "data.allow_mix_change=true" in str(e.value) and "\n" not in str(e.value)
    (allowed,) = loaders(sources, 1, 0, phases=other, allow_mix_change=True)
    allowed.load_state_dict(state)
    assert "apply from step 6" in allowed.note
    after = read([allowed], 16, first=48)
    assert {name for name, _ in after.values()} == {"a", "b"}         # the new weights, from the resume on
    # a later phase may change freely before it begins
    later = PHASES + [Phase(9, (("a", Fraction(1)), ("b", Fraction(0)), ("c", Fraction(0))))]
    (free,) = loaders(sources, 1, 0, phases=later)
    free.load_state_dict(state)
    assert free.note is None


def test_a_source_the_checkpoint_read_must_still_be_there_with_its_shards(sources, tmp_path):
    first = loaders(sources, 1, 0)
    assert "c" in {name for name, _ in read(first, 32).values()}
    state = first[0].state_dict()
    moved = {**sources, "c": str(make_shards(tmp_path / "c2", train=24, val=8, per_shard=8, seed=9))}
    with pytest.raises(ValueError, match=r"data.sources.c: holds other shards now, but the checkpoint read \d+ "):
        loaders(moved, 1, 0)[0].load_state_dict(state)


def test_sources_of_another_tokenizer_or_sequence_length_are_one_line_naming_both(sources, tmp_path):
    other_len = make_shards(tmp_path / "long", seq_len=64, train=32, val=8)
    with pytest.raises(ValueError) as e:
        load_sources({"a": sources["a"], "long": str(other_len)})
    assert str(e.value) == (f"sources.long: {other_len} has seq_len 64 but {sources['a']} has 32; tokenize every "
                            "source with the same --seq-len")
    other_tok = make_shards(tmp_path / "tok", train=32, val=8)
    m = Manifest.load(other_tok)
    m.tokenizer = {**m.tokenizer, "sha256": "0123456789abcdef" * 4}
    m.save(other_tok)
    with pytest.raises(ValueError) as e:
        load_sources({"a": sources["a"], "tok": str(other_tok)})
    msg = str(e.value)
    assert msg.startswith(f"sources.tok: {other_tok} was tokenized with another tokenizer than {sources['a']}") \
        and "\n" not in msg


def test_every_source_needs_a_sample_per_reader(sources, tmp_path):
    tiny = make_shards(tmp_path / "tiny", train=4, val=2, per_shard=4)
    with pytest.raises(ValueError, match="sources.t: .* has 4 training samples, fewer than the 8 readers"):
        MixtureLoader({"a": sources["a"], "t": str(tiny)}, [Phase(0, (("a", Fraction(1)), ("t", Fraction(1))))],
                      micro_per_step=8, micro_batch_size=B, readers=8)


def test_the_state_is_refused_by_a_single_data_set_and_vice_versa(sources):
    from pretrain.data.loader import TokenLoader
    (mix,) = loaders(sources, 1, 0)
    with pytest.raises(ValueError, match="trained on a mixture"):
        TokenLoader(sources["a"], micro_batch_size=B, readers=READERS).load_state_dict(mix.state_dict())
    single = TokenLoader(sources["a"], micro_batch_size=B, readers=READERS).state_dict()
    with pytest.raises(ValueError, match="trained on one data set"):
        mix.load_state_dict(single)
    assert Path(sources["a"]).is_dir()
