"""The tokenizer's training sample over several corpora, weighted (``tokenize.py --corpus ... --train-tokenizer``).

The sample holds S = min(N, all sentences of all corpora) sentences (N: ``--tokenizer-sentences``; a sentence is
a training line, as one corpus alone is read: data_prep/tokenizer.py), and corpus i's share of it is W_i / ΣW
(``--weight NAME=W``), rounded by largest remainder so that the shares add up to S. A corpus with more sentences
than its share gives a uniform sample of them without repetition; one with fewer gives every sentence, repeated
as often as its share needs (each the same number of times, or one more for a uniform sample of them). So the
weights hold whatever the corpora's sizes — upweighting a small corpus repeats it — and the sample is no larger
than one corpus alone would give.

Deterministic: which sentences are drawn depends only on the corpora, weights, N and ``--tokenizer-seed``: for a
corpus of A sentences that gives m more than a whole number of passes, the m with the smallest values of a fixed
64-bit mixing function (splitmix64) of (seed, corpus index, sentence index), found in chunks, so memory stays
O(m) and the draw does not depend on NumPy's random generators. Sentences go to SentencePiece corpus by corpus,
each in file order; the corpora are read twice (once to count the sentences, once to draw).
"""
from __future__ import annotations

import hashlib
from typing import Callable, Iterable, Iterator

import numpy as np

from data_prep.sources import UserError
from data_prep.tokenizer import _sentences

RULE = "weighted/1: share W/sum(W) of min(N, all sentences) per corpus; fewer repeated, more drawn (splitmix64)"
_CHUNK = 1 << 20


def shares(size: int, weights: list[float]) -> list[int]:
    """``size`` split in proportion to ``weights`` by largest remainder (ties: the earlier corpus)."""
    total = sum(weights)
    exact = [size * w / total for w in weights]
    out = [int(e) for e in exact]
    by_remainder = sorted(range(len(weights)), key=lambda i: (-(exact[i] - out[i]), i))
    for i in by_remainder[:size - sum(out)]:
        out[i] += 1
    return out


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser over uint64 (a bijection: distinct inputs, distinct outputs)."""
    x = x + np.uint64(0x9E3779B97F4A7C15)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def draw(n: int, m: int, seed: int, corpus: int) -> np.ndarray:
    """``m`` of the indices 0..n-1 (m <= n), ascending: those whose mixed (seed, corpus, index) values are the
    smallest."""
    if m >= n:
        return np.arange(n, dtype=np.int64)
    salt = np.uint64(int.from_bytes(hashlib.blake2b(f"{seed}:{corpus}".encode(), digest_size=8).digest(), "little"))
    best_v = np.empty(0, dtype=np.uint64)
    best_i = np.empty(0, dtype=np.int64)
    with np.errstate(over="ignore"):
        for start in range(0, n, _CHUNK):
            idx = np.arange(start, min(n, start + _CHUNK), dtype=np.int64)
            v = np.concatenate([best_v, _mix(idx.astype(np.uint64) ^ salt)])
            i = np.concatenate([best_i, idx])
            if len(v) > m:
                keep = np.argpartition(v, m - 1)[:m] if m else np.empty(0, dtype=np.int64)
                v, i = v[keep], i[keep]
            best_v, best_i = v, i
    return np.sort(best_i)


def weighted(corpora: list[tuple[str, float, Callable[[bool], Iterable[str]]]], total: int, seed: int,
             made_of: dict, log: Callable[[str], None]) -> Iterator[str]:
    """The sample's sentences. ``corpora``: (name, weight, a function giving the corpus's document texts afresh,
    warning about bad input when told so: on the second reading only); ``made_of`` is filled with
    {name: {"sentences": in the corpus, "drawn": in the sample}} before the first sentence."""
    counts = []
    for name, _, texts in corpora:
        counts.append(sum(1 for _ in _sentences(texts(False))))
        if counts[-1] == 0:
            raise UserError(f"--corpus {name}: no text to train the tokenizer on")
    size = min(total, sum(counts))
    quota = shares(size, [w for _, w, _ in corpora])
    made_of.update({name: {"sentences": n, "drawn": q} for (name, _, _), n, q in zip(corpora, counts, quota)})
    log(f"tokenizer: a sample of {size:,} sentences by weight: " + ", ".join(
        f"{name} {q:,} of {n:,}" + (" (repeated)" if q > n else "")
        for (name, _, _), n, q in zip(corpora, counts, quota)))
    for c, ((_, _, texts), n, q) in enumerate(zip(corpora, counts, quota)):
        passes, extra = divmod(q, n)
        once_more = draw(n, extra, seed, c)
        k = 0
        for j, sentence in enumerate(_sentences(texts(True))):
            times = passes
            if k < len(once_more) and once_more[k] == j:
                times += 1
                k += 1
            for _ in range(times):
                yield sentence
