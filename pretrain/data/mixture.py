"""Which source each global micro-batch of a data mixture comes from.

A mixture has sources with weights; phases give other weights from an optimizer step on. Global micro-batch ``g``
(counted over the run and over every data-parallel rank: rank r's k-th micro-batch is g = k·DP + r, as in
pretrain/data/loader.py) comes from source ``source_of(g)``, a function of the seed, g and the schedule only: the
same under any number of ranks, loader workers or readers.

The rule, per segment of constant weights: the sources (those of positive weight, in config order) split the
circle [0, 2^64) into arcs proportional to their weights, and the n-th micro-batch of the segment takes the source
whose arc holds u_n = β + n·Φ mod 2^64, with Φ = 2^64/φ (φ the golden ratio; Fibonacci hashing's multiplier) and β
drawn from (seed, segment). This Weyl sequence of the golden ratio is the most evenly spread rotation there is:
its count in any arc over any N consecutive n departs from N × the arc's length by O(log N) (Kesten, Ostrowski).
Measured (tests/pretrain/test_mixture_schedule.py, and for the numbers here the first 3·10^6 micro-batches with
weights 0.7/0.2/0.1, 0.5/0.5, 0.99/0.01 and five uneven ones, three seeds): every window of N consecutive global
micro-batches inside one segment holds each source weight·N ± at most 4 of them, for every N up to 10^6 (± 2 up to
N = 1000). Not coin flips: the proportions hold from the first window on.

It also holds on strided subsequences — what one reader slot sees (pretrain/data/mixed_loader.py: slot t reads
micro-batches t, t + R, t + 2R, ...), a rotation by R·Φ, irrational in effect for every R — so each source's readers
advance together and every sample of a source is read once per pass over it. (An exact-quota rule such as
floor(w·n) has a rational rotation: with weights 1/2 and an even R each slot would only ever see one source.)
Lookups are one multiply; counts over a range add up the lookups, incrementally for the running total.

Segments come from the config (phase p from step S_p on starts at micro-batch S_p × micro-batches per step) and,
on resume, from the checkpoint: the segments already trained are history and stay as they were; the config plans
the rest (``plan``). Changing a phase that has begun needs ``data.allow_mix_change``: it takes effect from the
resume step, as a new segment there.
"""
from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction
from typing import Optional, Sequence

import numpy as np

_MIX = 0x5EED2                  # stream id for the numpy SeedSequence (pretrain/data/readers.py has 0x5EED0/1)
GOLDEN = 0x9E3779B97F4A7C15     # round(2^64 / φ): the Weyl step


def as_fraction(w: float | str | Fraction) -> Fraction:
    """A weight as an exact fraction: 0.7 is 7/10 (its decimal form), not the nearest binary float."""
    return Fraction(str(w)) if not isinstance(w, Fraction) else w


@dataclass(frozen=True)
class Phase:
    """The weights from optimizer step ``start`` on (phase 0 starts at 0: the sources' own weights)."""
    start: int
    weights: tuple[tuple[str, Fraction], ...]        # (source, weight >= 0), config order

    def describe(self) -> str:
        total = sum(w for _, w in self.weights)
        return ", ".join(f"{n} {float(w / total):.3g}" for n, w in self.weights if w > 0)

    def to_state(self) -> list:
        return [self.start, [[n, str(w)] for n, w in self.weights]]

    @staticmethod
    def from_state(s: list) -> "Phase":
        return Phase(int(s[0]), tuple((n, Fraction(w)) for n, w in s[1]))


@dataclass(frozen=True)
class Segment:
    """Micro-batches from ``start`` on (until the next segment) follow ``phase``'s weights; ``step`` is the
    optimizer step at ``start``, ``salt`` seeds the tree's offsets."""
    start: int
    step: int
    phase: int
    weights: tuple[tuple[str, Fraction], ...]
    salt: int

    def to_state(self) -> list:
        return [self.start, self.step, self.phase, [[n, str(w)] for n, w in self.weights], self.salt]

    @staticmethod
    def from_state(s: list) -> "Segment":
        return Segment(int(s[0]), int(s[1]), int(s[2]), tuple((n, Fraction(w)) for n, w in s[3]), int(s[4]))


class _Arcs:
    """One segment's rule: the sources' arcs of the 64-bit circle and the start β."""

    def __init__(self, items: Sequence[tuple[int, Fraction]], seed: int, salt: int):
        total = sum(w for _, w in items)
        self.sources = np.array([i for i, _ in items], dtype=np.int64)
        cumulative, ends = Fraction(0), []
        for _, w in items[:-1]:
            cumulative += w / total
            ends.append((cumulative.numerator << 64) // cumulative.denominator)   # exact, no float
        self.ends = np.array(ends, dtype=np.uint64)
        self.beta = np.uint64(np.random.default_rng([seed, salt, _MIX]).integers(0, 2**64, dtype=np.uint64))

    def route(self, n: np.ndarray) -> np.ndarray:
        """The source of each of the segment's micro-batches ``n`` (int64 array, n >= 0)."""
        with np.errstate(over="ignore"):            # uint64 arithmetic is modulo 2^64 on purpose
            u = self.beta + n.astype(np.uint64) * np.uint64(GOLDEN)
        return self.sources[np.searchsorted(self.ends, u, side="right")]


class MixSchedule:
    """The segments of a run, compiled: ``source_of`` and ``counts`` over global micro-batch indices."""

    def __init__(self, names: Sequence[str], segments: Sequence[Segment], seed: int):
        self.names, self.segments, self.seed = list(names), list(segments), seed
        index = {n: i for i, n in enumerate(self.names)}
        self._arcs = [_Arcs([(index[n], w) for n, w in s.weights if w > 0], seed, s.salt) for s in self.segments]
        self._starts = np.array([s.start for s in self.segments], dtype=np.int64)
        self._upto, self._counts = 0, np.zeros(len(self.names), dtype=np.int64)   # the running total

    def source_of(self, g: np.ndarray | int) -> np.ndarray | int:
        """The source index of global micro-batch(es) ``g``."""
        scalar = np.isscalar(g)
        g = np.atleast_1d(np.asarray(g, dtype=np.int64))
        seg = np.searchsorted(self._starts, g, side="right") - 1
        out = np.empty(g.shape, dtype=np.int64)
        for i in np.unique(seg):
            mask = seg == i
            out[mask] = self._arcs[i].route(g[mask] - self._starts[i])
        return int(out[0]) if scalar else out

    def counts(self, end: int, begin: int = 0) -> np.ndarray:
        """Micro-batches of each source among global ``begin`` .. ``end - 1``. From 0, the running total is kept:
        asking for a later end costs only the micro-batches since the last call."""
        if begin:
            return self._count_range(begin, end)
        if end < self._upto:
            self._upto, self._counts = 0, np.zeros(len(self.names), dtype=np.int64)
        self._counts = self._counts + self._count_range(self._upto, end)
        self._upto = end
        return self._counts.copy()

    def _count_range(self, begin: int, end: int, chunk: int = 1 << 22) -> np.ndarray:
        out = np.zeros(len(self.names), dtype=np.int64)
        for first in range(begin, end, chunk):
            out += np.bincount(self.source_of(np.arange(first, min(end, first + chunk), dtype=np.int64)),
                               minlength=len(self.names))
        return out

    def slot_counts(self, slot: int, stride: int, done: int, chunk: int = 1 << 22) -> np.ndarray:
        """Micro-batches of each source among global slot, slot + stride, ..., slot + (done - 1)·stride: what one
        reader slot has read of each source after ``done`` batches (pretrain/data/mixed_loader.py)."""
        out = np.zeros(len(self.names), dtype=np.int64)
        for first in range(0, done, chunk):
            j = np.arange(first, min(done, first + chunk), dtype=np.int64)
            out += np.bincount(self.source_of(slot + stride * j), minlength=len(self.names))
        return out

    def segment_of(self, g: int) -> int:
        """The index of the segment that global micro-batch ``g`` belongs to (segments begin at steps, so all the
        micro-batches of one step share one)."""
        return int(np.searchsorted(self._starts, g, side="right")) - 1

    def to_state(self) -> list:
        return [s.to_state() for s in self.segments]


def phase_at(phases: Sequence[Phase], step: int) -> int:
    """Index of the phase in effect after ``step`` steps: the last one that starts at or before it."""
    return max(i for i, p in enumerate(phases) if p.start <= step)


def plan(phases: Sequence[Phase], micro_per_step: int, *, history: Sequence[Segment] = (), at_step: int = 0,
         at_micro: int = 0) -> list[Segment]:
    """The run's segments: ``history`` (those before micro-batch ``at_micro``, which is step ``at_step``) and, from
    there, the phase in effect at that step, then each later phase at its step (micro_per_step micro-batches per
    step from here: a changed global batch moves only the phases still to come)."""
    kept = [s for s in history if s.start < at_micro]
    now = phase_at(phases, at_step)
    out = list(kept)
    if not kept or kept[-1].phase != now or kept[-1].weights != phases[now].weights:
        out.append(Segment(at_micro, at_step, now, phases[now].weights, salt=at_micro))
    for i, p in enumerate(phases):
        if p.start > at_step:
            start = at_micro + (p.start - at_step) * micro_per_step
            out.append(Segment(start, p.start, i, p.weights, salt=start))
    return out


def started_changes(saved: Sequence[Phase], now: Sequence[Phase], at_step: int) -> list[str]:
    """The phases that had begun before step ``at_step`` (some micro-batch trained with them) whose start or
    weights differ now, as 'phase i (from step S): was ..., now ...' (phase 0: the sources' weights)."""
    out = []
    for i in range(max(len(saved), len(now))):
        a = saved[i] if i < len(saved) else None
        b = now[i] if i < len(now) else None
        started = (a is not None and a.start < at_step) or (b is not None and b.start < at_step)
        if started and a != b:
            def say(p: Optional[Phase]) -> str:
                return "none" if p is None else f"from step {p.start}: {p.describe()}"
            out.append(f"phase {i}: was {say(a)}, now {say(b)}")
    return out
