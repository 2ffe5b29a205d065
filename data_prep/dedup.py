"""Exact deduplication (``tokenize.py --dedup exact``): which documents to drop, decided before tokenizing.

Key. A document's key is BLAKE2b with a 128-bit digest of the UTF-8 of its normalised text (``normalise``):
  1. the text as the pipeline reads it, the text that would be tokenized (invalid UTF-8 replaced, NUL removed,
     a .txt line without its trailing \\r, the records of a ``--doc-per file`` document joined with \\n);
  2. Unicode NFC: canonically equivalent spellings ("é" as one code point, or "e" + U+0301) are one text;
  3. every run of whitespace characters (``str.isspace``: spaces, tabs, line ends, no-break and other Unicode
     spaces) replaced by one space, and whitespace at both ends removed.
Case is kept, and so are compatibility forms (NFKC would turn "ﬁ" into "fi" and full-width letters into ASCII):
documents that differ there differ in what a cased model reads. Whitespace-only documents are skipped by the
pipeline anyway and have no key.

Order. Documents are taken in a fixed order: corpora as given, then the inputs of each in path order, then the
documents of an input in file order. The first document with a key is kept, every later one dropped, in the same
or a later corpus. The pass below reads every input once and hashes every document in worker processes (units of
one-document-per-line inputs, else whole files; data_prep/units.py) and takes the results in order; the tokenize
pass then skips the dropped documents by record number (the line of a .jsonl or line-read .txt, the parquet row,
0 for a document that is a whole file). Neither depends on the number of workers.

Memory: 16 bytes of key and 12 of position per document; a long document is hashed as it is read, in parts cut at
whitespace or else before an ASCII character, where NFC of the parts is NFC of the whole. (A run of more than
1 Mi characters with neither is held whole.)
"""
from __future__ import annotations

import hashlib
import json
import time
import unicodedata
from collections import Counter, deque
from dataclasses import dataclass, replace
from typing import Any, Callable, Iterator, Optional

import numpy as np

from data_prep import units
from data_prep.inputs import InputFile
from data_prep.segment import _Assembler
from data_prep.sources import Reader

MODES = ("none", "exact")
KEY_BYTES = 16
FLUSH_CHARS = 1 << 20             # a document's text is hashed in parts of about this many characters
DEDUP_KEYS = ("duplicates_dropped", "duplicates_dropped_across")   # manifest counts with --dedup
KEY_RULE = "blake2b-128 of UTF-8 after NFC, whitespace runs as one space, ends stripped; case kept"
ORDER_RULE = "first copy kept: corpora as given, inputs in path order, documents in file order"


def normalise(text: str) -> str:
    """The text a key is made of: NFC, whitespace runs as one space, no whitespace at the ends."""
    return " ".join(unicodedata.normalize("NFC", text).split())


def key(text: str) -> bytes:
    return hashlib.blake2b(normalise(text).encode("utf-8"), digest_size=KEY_BYTES).digest()


class _Key:
    """``key`` of a text given in parts, each cut where NFC does not look across the cut (see ``_cut``)."""

    def __init__(self):
        self.h = hashlib.blake2b(digest_size=KEY_BYTES)
        self.words = False                # a word has been hashed
        self.space = False                # whitespace followed the last word hashed

    def update(self, part: str) -> None:
        n = unicodedata.normalize("NFC", part)
        words = n.split()
        if words:
            if self.words and (self.space or n[0].isspace()):
                self.h.update(b" ")
            self.h.update(" ".join(words).encode("utf-8"))
            self.words, self.space = True, n[-1].isspace()
        elif n:
            self.space = True

    def digest(self) -> Optional[bytes]:
        return self.h.digest() if self.words else None


def _cut(buf: str) -> int:
    """Where ``buf`` may be cut for hashing in parts (0: nowhere near its end): before a whitespace character (no
    canonical composition starts or ends with one) or else before an ASCII one (never the second of a composition,
    never reordered)."""
    k = max(buf.rfind(" "), buf.rfind("\n"))
    if k > 0:
        return k
    for k in range(len(buf) - 1, max(len(buf) - 4096, 0), -1):
        if buf[k] < "\x80" or buf[k].isspace():
            return k
    return 0


class _Hasher(_Assembler):
    """Takes the place of the pipeline's assembler (data_prep/segment.py) in the first pass: the documents of an
    input as (record number, key); nothing is cut into pieces or counted."""

    def __init__(self):
        super().__init__(FLUSH_CHARS, True, lambda text: 0, Counter())
        self.records: list[int] = []
        self.keys: list[bytes] = []
        self.key, self.limit = _Key(), FLUSH_CHARS

    def begin(self, record: int) -> None:
        self.record = record

    def add(self, text: str) -> None:
        self.buf = self.buf + text if self.buf else text
        if len(self.buf) > self.limit:
            k = _cut(self.buf)
            if k:
                self.key.update(self.buf[:k])
                self.buf, self.first, self.limit = self.buf[k:], False, FLUSH_CHARS
            else:
                self.limit = len(self.buf) + FLUSH_CHARS

    def end(self) -> None:
        self.key.update(self.buf)
        digest = self.key.digest()
        if digest is not None:
            self.records.append(self.record)
            self.keys.append(digest)
        self.key, self.buf, self.first, self.limit = _Key(), "", True, FLUSH_CHARS

    def result(self) -> tuple[np.ndarray, bytes]:
        return np.asarray(self.records, dtype=np.int64), b"".join(self.keys)


@dataclass
class Drops:
    """The documents of one input to drop: record numbers (ascending) and whether each one's kept copy is in an
    earlier corpus."""
    records: np.ndarray
    across: np.ndarray

    def lookup(self, lo: Optional[int] = None, hi: Optional[int] = None) -> dict[int, bool]:
        """{record: across} for the records in (lo, hi], or all of them."""
        a, b = (0, len(self.records)) if lo is None else np.searchsorted(self.records, [lo, hi], side="right")
        return dict(zip(self.records[a:b].tolist(), self.across[a:b].tolist()))


def settings_entry(earlier: list[dict[str, Any]]) -> dict[str, Any]:
    """What a data set's manifest records of its deduplication. ``earlier``: the corpora before it in the same
    run (their documents come first), each {"corpus", "inputs": [paths], "sha256": of their inputs' records}."""
    entry: dict[str, Any] = {"mode": "exact", "key": KEY_RULE, "order": ORDER_RULE}
    if earlier:
        entry["earlier_corpora"] = earlier
    return entry


def inputs_sha256(inputs: list[dict[str, Any]]) -> str:
    """One sha256 for a corpus's inputs (their path, bytes and sha256 records, as a manifest lists them)."""
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()


# ---------------------------------------------------------------------------------------------------------------
# The pass

_R: dict[str, Any] = {}


def _init(reader_args: dict, in_worker: bool = True) -> None:
    if in_worker:
        from data_prep.tokenizer import worker_process_setup
        worker_process_setup()
    _R["reader"] = Reader(**reader_args)


def _hash(item: tuple) -> tuple[np.ndarray, bytes]:
    """Keys of the documents of a unit ("unit", file, bytes, lines before it) or of a whole file ("file", file)."""
    reader: Reader = _R["reader"]
    h = _Hasher()
    if item[0] == "unit":
        _, f, data, line0 = item
        blocks = iter([(data, len(data)), (b"", len(data))])
        parts = reader.pieces(replace(f, gz=False, size=len(data)), Counter(), blocks=blocks, line0=line0,
                              report=False, asm=h)
    else:
        parts = reader.pieces(item[1], Counter(), report=False, asm=h)
    for _ in parts:
        pass
    return h.result()


def _work(corpora: list[list[InputFile]], reader: Reader) -> Iterator[tuple[tuple[int, int], bool, Any, int]]:
    """((corpus, input), done, work item for ``_hash`` or (done) its result, bytes consumed) in order. The rest of
    a file after a very long line is read here, as the tokenize pass does (data_prep/stream.py)."""
    base = 0
    for c, files in enumerate(corpora):
        for i, f in enumerate(files):
            if units.by_units(reader, f):
                for part in units.cut(reader, f):
                    if part[0] == "unit":
                        yield (c, i), False, ("unit", f, part[1], part[2]), base + part[3]
                    else:
                        h = _Hasher()
                        for _ in reader.pieces(f, Counter(), blocks=part[1], line0=part[2], report=False, asm=h):
                            pass
                        yield (c, i), True, h.result(), base + f.size
            else:
                yield (c, i), False, ("file", f), base + f.size
            base += f.size


def find(corpora: list[list[InputFile]], reader_args: dict, workers: int,
         progress: Callable[[int, int], None] = lambda position, docs: None) -> tuple[list[list[Drops]], dict]:
    """Read ``corpora`` (lists of inputs, in order) and decide the drops: for each corpus, a Drops per input, and
    totals {documents, duplicates, across}. ``progress(bytes read, documents)`` after each work item."""
    reader = Reader(**reader_args)
    found: dict[tuple[int, int], list] = {(c, i): [] for c, files in enumerate(corpora) for i in range(len(files))}
    pool = None
    docs = 0

    def take(where, result, position) -> None:
        nonlocal docs
        found[where].append(result)
        docs += len(result[0])
        progress(position, docs)

    try:
        if workers > 1:
            import multiprocessing as mp
            ctx = mp.get_context("fork") if "fork" in mp.get_all_start_methods() else mp.get_context()
            pool = ctx.Pool(workers, initializer=_init, initargs=(reader_args,))
        else:
            _init(reader_args, in_worker=False)
        inflight: deque = deque()                   # (where, done, result or its AsyncResult, position)
        for where, done, work, position in _work(corpora, reader):
            if pool is None or done:
                inflight.append((where, True, work if done else _hash(work), position))
            else:
                inflight.append((where, False, pool.apply_async(_hash, (work,)), position))
            while inflight and (len(inflight) > 2 * workers + 2 or inflight[0][1]):
                w, d, r, p = inflight.popleft()
                take(w, r if d else r.get(), p)
        while inflight:
            w, d, r, p = inflight.popleft()
            take(w, r if d else r.get(), p)
        if pool is not None:
            pool.close()
            pool.join()
            pool = None
    finally:
        if pool is not None:
            pool.terminate()
    return _decide(corpora, found)


def _decide(corpora: list[list[InputFile]], found: dict) -> tuple[list[list[Drops]], dict]:
    """The first document of each key is kept: sort the keys stably (equal keys stay in reading order), and in
    each run of equal keys every one after the first is a duplicate of the first."""
    wheres = list(found)
    records = [np.concatenate([r for r, _ in found[w]]) if found[w] else np.empty(0, np.int64) for w in wheres]
    sizes = np.asarray([len(r) for r in records], dtype=np.int64)
    n = int(sizes.sum())
    keys = np.frombuffer(b"".join(k for w in wheres for _, k in found[w]), dtype="<u8").reshape(n, 2)
    corpus = np.repeat(np.asarray([c for c, _ in wheres], dtype=np.int32), sizes)
    order = np.lexsort((keys[:, 1], keys[:, 0]))           # stable: first by key, then by position
    sk = keys[order]
    dup_sorted = np.zeros(n, dtype=bool)
    dup_sorted[1:] = (sk[1:] == sk[:-1]).all(axis=1)
    kept_sorted = np.maximum.accumulate(np.where(dup_sorted, 0, np.arange(n)))
    dup = np.empty(n, dtype=bool)
    dup[order] = dup_sorted
    kept = np.empty(n, dtype=np.int64)
    kept[order] = order[kept_sorted]
    across = dup & (corpus[kept] != corpus)
    drops: list[list[Drops]] = [[] for _ in corpora]
    start = 0
    for w, r, size in zip(wheres, records, sizes.tolist()):
        sel = dup[start:start + size]
        drops[w[0]].append(Drops(r[sel], across[start:start + size][sel]))
        start += size
    return drops, {"documents": n, "duplicates": int(dup.sum()), "across": int(across.sum())}


class Dedup:
    """The drops of a run's corpora, found once, when the first data set that needs them asks (a resume whose
    data sets are complete reads nothing)."""

    def __init__(self, corpora: list[list[InputFile]], reader_args: dict, workers: int,
                 progress: Callable[[int], Any], log: Callable[[str], None]):
        self.corpora, self.reader_args, self.workers = corpora, reader_args, workers
        self.progress, self.log = progress, log
        self.drops: Optional[list[list[Drops]]] = None

    def of(self, corpus: int) -> list[Drops]:
        if self.drops is None:
            t0 = time.time()
            bar = self.progress(sum(f.size for files in self.corpora for f in files))
            try:
                self.drops, totals = find(self.corpora, self.reader_args, self.workers,
                                          lambda position, docs: bar.update(position, docs, None))
            finally:
                bar.close()
            self.log(f"dedup: {totals['duplicates']:,} of {totals['documents']:,} documents are exact duplicates "
                     f"of an earlier one ({totals['across']:,} of one in an earlier corpus); "
                     f"{time.time() - t0:.1f} s")
        return self.drops[corpus]
