"""The encoding stage of the tokenize pipeline (see data_prep/pack.py): inputs in order → work items → worker
processes → token streams fed, in submission order, to the split writers.

Two kinds of work item. Inputs with one document per line go as raw byte units, parsed and encoded in the workers
(data_prep/units.py); the others are read into pieces here (data_prep/sources.py) and sent in batches of text.
Either way results are consumed in submission order, so the shards do not depend on the number of workers.
"""
from __future__ import annotations

import signal
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Optional

import numpy as np

from data_prep import sources, units
from data_prep import tokenizer as T
from data_prep.dedup import DEDUP_KEYS, Drops
from data_prep.inputs import InputFile
from data_prep.sources import MAX_WARNINGS_PER_KIND, Reader, add_issue
from data_prep.writer import SplitWriter, _excl_cumsum

BATCH_CHARS = 1 << 18             # text per batch of pieces sent to a worker
BATCH_PIECES = 4096
PIECE_BITS = units.INPUT_BITS


@dataclass
class Item:
    """One work item and what the main process needs to consume its result."""
    fn: Optional[Callable]            # worker function (None: nothing to encode)
    payload: Any
    position: int                     # bytes of all inputs consumed once this item is
    dones: list[tuple[int, Counter, dict]] = field(default_factory=list)   # inputs that end here
    unit_of: Optional[int] = None     # the input of a unit item
    pieces: Optional[tuple] = None    # (piece ids, splits, skips, documents) of a batch of pieces


@dataclass
class _Input:                         # per input, what the unit results add up to
    counts: Counter = field(default_factory=Counter)
    issues: dict = field(default_factory=dict)
    shown: int = 0


class Encoder:
    """Runs the encoding stage for ``files[start_input:]``. ``on_input(i, counts)`` is called in order when input
    ``i`` has been read to its end and all its tokens fed; ``progress(position, docs, tokens)`` after each item.
    ``drops``: per input, the documents to skip (duplicates, data_prep/dedup.py), or None."""

    def __init__(self, files: list[InputFile], start_input: int, done_bytes: int, reader: Reader,
                 writers: list[SplitWriter], workers: int, init_args: tuple, reader_args: dict,
                 on_input: Callable[[int, dict], None], progress: Callable[[int, int, int], None],
                 drops: Optional[list[Drops]] = None):
        self.files, self.start_input, self.done_bytes, self.reader = files, start_input, done_bytes, reader
        self.writers, self.workers, self.init_args, self.reader_args = writers, workers, init_args, reader_args
        self.on_input, self.progress, self.drops = on_input, progress, drops
        self.count_keys = sources.COUNT_KEYS + (DEDUP_KEYS if drops is not None else ())
        self.resume = [list(w.resume_at) for w in writers]
        self.acc: dict[int, _Input] = {}
        self.docs = self.tokens = 0

    # -- producing work ---------------------------------------------------------------------------------------

    def items(self) -> Iterator[Item]:
        batch = _Batch()
        base = self.done_bytes
        for i in range(self.start_input, len(self.files)):
            f = self.files[i]
            counts: Counter = Counter()
            pieces, first_pid = None, i << PIECE_BITS
            drops = self.drops[i] if self.drops is not None else None
            if units.by_units(self.reader, f):
                if batch.pieces.texts or batch.dones:
                    yield batch.item(base)
                    batch = _Batch()
                self.acc[i] = _Input()
                u = 0
                for part in units.cut(self.reader, f):
                    if part[0] == "unit":
                        _, data, line0, pos = part
                        # the unit's lines: line0 + 1 ... line0 + its line ends (+ 1 for an unended last line);
                        # not the next unit's first, which the reader begins after the unit's last line end
                        last = line0 + data.count(b"\n") + (not data.endswith(b"\n"))
                        drop = drops.lookup(line0, last) if drops is not None else None
                        yield Item(units.encode_unit, (f, i, u, data, line0, self.resume, drop), base + pos,
                                   unit_of=i)
                        u += 1
                    else:                         # a very long line: the rest of the file is read here
                        _, blocks, line0 = part
                        pieces = self.reader.pieces(f, counts, blocks=blocks, line0=line0, report=False,
                                                    drop=drops.lookup() if drops is not None else None)
                        first_pid |= u << units.UNIT_BITS
            else:
                pieces = self.reader.pieces(f, counts, drop=drops.lookup() if drops is not None else None)
            for group in pieces or ():
                for piece in group:
                    batch.pieces.offer(piece, first_pid + piece[0], self.resume)
                    if batch.full():
                        yield batch.item(base + self.reader.position)
                        batch = _Batch()
            batch.dones.append((i, counts, self.reader.issues if i in self.acc and pieces is not None else {}))
            base += f.size
        yield batch.item(base)

    # -- consuming results ------------------------------------------------------------------------------------

    def consume(self, item: Item, result: Optional[tuple]) -> None:
        if item.unit_of is not None:
            tokens, lens, pids, splits, skips, docs, counts, issues, warnings = result
            acc = self.acc[item.unit_of]
            acc.counts.update(counts)
            _merge(acc.issues, issues)
            self._warn_bad(acc, warnings, self.files[item.unit_of].path)
        elif item.pieces is not None:
            (tokens, lens), (pids, splits, skips, docs) = result, item.pieces
        else:
            tokens = None
        if tokens is not None and len(pids):
            self._feed(tokens, lens, pids, splits, skips)
            self.docs += docs
            self.tokens += len(tokens)
        for i, counts, issues in item.dones:
            acc = self.acc.pop(i, None)
            if acc is not None:                   # read as units (and maybe a rest read here)
                acc.counts.update(counts)
                _merge(acc.issues, issues)
                self.reader.report(self.files[i].path, acc.issues)
                counts = acc.counts
            self.on_input(i, {k: int(counts[k]) for k in self.count_keys})
        self.progress(item.position, self.docs, self.tokens)

    def _warn_bad(self, acc: _Input, warnings: list[str], path: str) -> None:
        """Bad-record warnings of units: the first few of an input, then one line saying more were skipped."""
        for w in warnings:
            if "more bad records skipped" in w:
                continue
            if acc.shown < MAX_WARNINGS_PER_KIND:
                self.reader.warn(w)
            elif acc.shown == MAX_WARNINGS_PER_KIND:
                self.reader.warn(f"{path}: more bad records skipped; see the count in the summary")
            acc.shown += 1

    def _feed(self, tokens, lens, pids, splits, skips) -> None:
        if skips.any():                       # the first piece after a resume point: drop what is written
            offs = _excl_cumsum(lens)
            keep = np.ones(len(tokens), dtype=bool)
            for j in np.nonzero(skips)[0]:
                if skips[j] > lens[j]:
                    raise RuntimeError("resume point lies beyond its piece: inputs or tokenizer changed")
                keep[offs[j]:offs[j] + skips[j]] = False
            tokens, lens = tokens[keep], lens - skips
        for s, w in enumerate(self.writers):
            sel = splits == s
            if sel.all():
                w.feed(tokens, pids, lens, skips)
            elif sel.any():
                w.feed(tokens[np.repeat(sel, lens)], pids[sel], lens[sel], skips[sel])
            w.fed_through = max(w.fed_through, int(pids[-1]))

    # -- running ----------------------------------------------------------------------------------------------

    def run(self) -> None:
        """Encode everything. KeyboardInterrupt (also raised for SIGTERM) and errors stop the workers."""
        pool = None
        old_term = signal.getsignal(signal.SIGTERM)

        def on_term(signum, frame):
            raise KeyboardInterrupt

        try:
            if self.workers > 1:
                import multiprocessing as mp
                ctx = mp.get_context("fork") if "fork" in mp.get_all_start_methods() else mp.get_context()
                pool = ctx.Pool(self.workers, initializer=units.init_worker,
                                initargs=(*self.init_args, self.reader_args))
            else:
                units.init_worker(*self.init_args, self.reader_args, in_worker=False)
            try:                                        # after the fork: workers keep the default SIGTERM
                signal.signal(signal.SIGTERM, on_term)
            except ValueError:                          # not the main thread
                pass
            inflight: deque = deque()
            depth = 2 * self.workers + 2
            for item in self.items():
                if pool is None:
                    self.consume(item, item.fn(item.payload) if item.fn else None)
                    continue
                inflight.append((item, pool.apply_async(item.fn, (item.payload,)) if item.fn else None))
                while len(inflight) > depth:
                    it, r = inflight.popleft()
                    self.consume(it, r.get() if r is not None else None)
            while inflight:
                it, r = inflight.popleft()
                self.consume(it, r.get() if r is not None else None)
            if pool is not None:
                pool.close()
                pool.join()
                pool = None
        finally:
            try:
                signal.signal(signal.SIGTERM, old_term)
            except ValueError:
                pass
            if pool is not None:
                pool.terminate()


def _merge(into: dict[str, list], issues: dict[str, list]) -> None:
    """Add a later part's replaced-character counts to an input's: {kind: [count, where the first was]}."""
    for kind, (n, where) in issues.items():
        add_issue(into, kind, n, where)


class _Batch:
    """Pieces read in the main process, gathered into one work item, and the inputs that end with it."""

    def __init__(self):
        self.pieces = units.PieceBatch()
        self.dones: list[tuple[int, Counter, dict]] = []

    def full(self) -> bool:
        return self.pieces.chars >= BATCH_CHARS or len(self.pieces.texts) >= BATCH_PIECES

    def item(self, position: int) -> Item:
        if not self.pieces.texts:
            return Item(None, None, position, dones=self.dones)
        return Item(T.encode_batch, self.pieces.payload(), position, dones=self.dones, pieces=self.pieces.arrays())
