"""Which source each global micro-batch of a data mixture comes from.

A mixture has sources with weights; phases give other weights from an optimizer step on. Global micro-batch ``g``
(counted over the run and over every data-parallel rank: rank r's k-th micro-batch is g = k·DP + r, as in
pretrain/data/loader.py) comes from source ``source_of(g)``, a function of the seed, g and the schedule only: the
same under any number of ranks, loader workers or readers.

The rule, per segment of constant weights: a binary tree over the segment's sources (config order, cut in the
middle). An inner node sends the n-th micro-batch that reaches it (n = 0, 1, ...) to its left side iff
floor((a·(n+1) + o) / b) > floor((a·n + o) / b), where a/b is the left side's exact share of the node's weight and
o in [0, b) is drawn from (seed, segment, node). The left side thus gets exactly floor((a·n + o) / b) of the node's
first n micro-batches (a Beatty sequence of rate a/b): over any run of N consecutive ones, its share a/b·N rounded
up or down. Errors add along a path, each level's below one micro-batch, so over ANY window of N consecutive global
micro-batches inside one segment, a source at depth d receives weight·N ± less than d of them; with K sources
d ≤ ⌈log2 K⌉ (two sources: ± less than 1; three: ± less than 2). Not coin flips: the proportions hold from the first
window on. Lookup and counts are closed form, O(depth), so resuming at micro-batch 10⁹ costs nothing.

Segments come from the config (phase p from step S_p on starts at micro-batch S_p × micro-batches per step) and,
on resume, from the checkpoint: the segments already trained are history and stay as they were; the config plans
the rest (``plan``). Changing a phase that has started needs ``data.allow_mix_change``: it takes effect from the
resume step, as a new segment there.
"""
from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction
from typing import Optional, Sequence

import numpy as np

_MIX = 0x5EED2               # stream id for the numpy SeedSequence (pretrain/data/readers.py has 0x5EED0/1)
MAX_DENOMINATOR = 10**6      # weights are exact fractions; a share with a larger denominator is rounded to one


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


class _Node:
    """A leaf (``source``: its index among all sources) or a cut of the node's micro-batches into left and right."""

    def __init__(self, items: Sequence[tuple[int, Fraction]], seed: int, salt: int, counter: list[int]):
        self.source: Optional[int] = items[0][0] if len(items) == 1 else None
        if self.source is not None:
            return
        half = (len(items) + 1) // 2
        left, right = items[:half], items[half:]
        share = sum(w for _, w in left) / sum(w for _, w in items)
        share = share.limit_denominator(MAX_DENOMINATOR)
        self.a, self.b = share.numerator, share.denominator
        self.o = int(np.random.default_rng([seed, salt, counter[0], _MIX]).integers(self.b))
        counter[0] += 1
        self.left, self.right = _Node(left, seed, salt, counter), _Node(right, seed, salt, counter)

    def route(self, n: np.ndarray) -> np.ndarray:
        """The source of each of the node's micro-batches ``n`` (int64 array)."""
        if self.source is not None:
            return np.full(n.shape, self.source, dtype=np.int64)
        before = (self.a * n + self.o) // self.b
        go_left = (self.a * (n + 1) + self.o) // self.b > before
        out = np.empty(n.shape, dtype=np.int64)
        out[go_left] = self.left.route(before[go_left])
        out[~go_left] = self.right.route((n - before)[~go_left])
        return out

    def count(self, n: int, out: np.ndarray) -> None:
        """Add to ``out`` how many of the node's first ``n`` micro-batches each source gets."""
        if self.source is not None:
            out[self.source] += n
            return
        left = (self.a * n + self.o) // self.b
        self.left.count(left, out)
        self.right.count(n - left, out)


class MixSchedule:
    """The segments of a run, compiled: ``source_of`` and ``counts`` over global micro-batch indices."""

    def __init__(self, names: Sequence[str], segments: Sequence[Segment], seed: int):
        self.names, self.segments, self.seed = list(names), list(segments), seed
        index = {n: i for i, n in enumerate(self.names)}
        self._trees = [_Node([(index[n], w) for n, w in s.weights if w > 0], seed, s.salt, [0])
                       for s in self.segments]
        self._starts = np.array([s.start for s in self.segments], dtype=np.int64)

    def source_of(self, g: np.ndarray | int) -> np.ndarray | int:
        """The source index of global micro-batch(es) ``g``."""
        scalar = np.isscalar(g)
        g = np.atleast_1d(np.asarray(g, dtype=np.int64))
        seg = np.searchsorted(self._starts, g, side="right") - 1
        out = np.empty(g.shape, dtype=np.int64)
        for i in np.unique(seg):
            mask = seg == i
            out[mask] = self._trees[i].route(g[mask] - self._starts[i])
        return int(out[0]) if scalar else out

    def counts(self, end: int, begin: int = 0) -> np.ndarray:
        """Micro-batches of each source among global ``begin`` .. ``end - 1``."""
        return self._counts_to(end) - self._counts_to(begin)

    def _counts_to(self, g: int) -> np.ndarray:
        out = np.zeros(len(self.names), dtype=np.int64)
        for i, s in enumerate(self.segments):
            stop = self.segments[i + 1].start if i + 1 < len(self.segments) else None
            upto = g if stop is None else min(g, stop)
            if upto > s.start:
                self._trees[i].count(upto - s.start, out)
        return out

    def slot_counts(self, slot: int, stride: int, done: int, chunk: int = 1 << 20) -> np.ndarray:
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
