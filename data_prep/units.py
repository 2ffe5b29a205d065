"""Record-per-line inputs in parallel: the main process cuts an input's (decompressed) bytes into units at line
ends; worker processes decode, parse, clean, cut into pieces, split and encode each unit.

Why: for a ``.jsonl`` corpus, JSON parsing, UTF-8 decoding and the split hash cost about a tenth of encoding. Done
in the main process they cap a many-worker run at a fraction of linear speed-up; in the workers the main process
only decompresses, finds line ends, packs and writes.

Which inputs: ``.txt`` read one document per line and ``.jsonl`` read one document per record — every document
lies on one line, so a unit cut at a line end holds whole documents and parsing it alone gives what parsing the
whole file gives. (A document that spans a file — ``--doc-per file`` — and ``.parquet`` are read in the main
process, see ``Reader.pieces``.) A unit is ``UNIT_BYTES`` or more, up to the next line end. From a line longer
than ``LONG_LINE_BYTES`` on, the rest of the file is read in the main process, which cuts a long document into
pieces as it reads, so memory stays bounded whatever the line length.

Piece ids: the piece with index k in unit u of input i is ``i << 40 | u << 20 | k``; the k-th piece of the rest
of a file after unit u - 1 is ``(i << 40 | u << 20) + k``. Ids therefore grow in input order, as those of the
main-process reader do, and a resume position (piece id, token offset) means the same whatever the worker count.
"""
from __future__ import annotations

import itertools
from collections import Counter
from dataclasses import replace
from typing import Any, Iterator, Optional

import numpy as np

from data_prep import tokenizer as T
from data_prep.inputs import InputFile, UserError
from data_prep.sources import Reader

UNIT_BYTES = 1 << 20
LONG_LINE_BYTES = 4 << 20        # a line longer than this, and the rest of its file, is read in the main process
UNIT_BITS = 20                   # piece index within a unit
INPUT_BITS = 40                  # unit and piece bits together (the piece-id layout of the main-process reader)


def by_units(reader: Reader, f: InputFile) -> bool:
    """True when ``f`` is read as units in the workers (every document on one line)."""
    mode = reader.mode(f)
    return (f.kind == "txt" and mode == "line") or (f.kind == "jsonl" and mode == "record")


def cut(reader: Reader, f: InputFile) -> Iterator[tuple]:
    """The units of ``f`` in order, each ("unit", bytes, lines before it, bytes of the file consumed): a unit ends
    at the first line end at or after its ``UNIT_BYTES``-th byte (or at the end of the file). A line longer than
    ``LONG_LINE_BYTES`` ends the units: then comes ("rest", blocks, lines before it), the rest of the file as
    (block, position) from that line on, for the main process to read as pieces with bounded memory."""
    parts: list[bytes] = []
    size = lines = pos = 0
    blocks = reader._blocks(f)
    for block, pos in blocks:
        start = 0
        while True:
            k = block.find(b"\n", start + max(UNIT_BYTES - size, 1) - 1)
            if k < 0:
                break
            parts.append(block[start:k + 1])
            unit = b"".join(parts)             # joined once, so a long line costs linear time
            yield "unit", unit, lines, pos
            lines += unit.count(b"\n")
            parts, size, start = [], 0, k + 1
        if start < len(block):
            parts.append(block[start:])
            size += len(block) - start
        if size > LONG_LINE_BYTES:
            data = b"".join(parts)
            k = data.rfind(b"\n") + 1          # whole lines before the long one still go as a unit
            if k:
                yield "unit", data[:k], lines, pos
                lines += data.count(b"\n", 0, k)
            step = len(block) or 1             # hand the gathered part on in blocks the size the reader reads
            head = [(data[j:j + step], pos) for j in range(k, len(data), step)]
            del data, parts
            yield "rest", itertools.chain(head, blocks), lines
            return
    if parts:
        yield "unit", b"".join(parts), lines, pos


# ---------------------------------------------------------------------------------------------------------------
# Worker side

_R: dict[str, Any] = {}


def init_worker(proto: bytes, info: dict, dtype: str, bos: bool, reader_args: dict,
                in_worker: bool = True) -> None:
    """Process initialiser: the tokenizer (see tokenizer.init_worker) and a Reader with the run's settings."""
    T.init_worker(proto, info, dtype, bos, in_worker=in_worker)
    _R["reader"] = Reader(**reader_args)


def encode_unit(item: tuple) -> tuple:
    """Parse and encode one unit. ``item`` = (InputFile, input index, unit index, bytes, lines before it,
    resume points per split or None, {line: across} of duplicates to skip or None). Returns (tokens, stream
    lengths, piece ids, splits, token skips, documents, counts, issues, warnings) for the pieces at or after the
    resume points; counts cover the whole unit."""
    f, i, u, data, line0, resume, drop = item
    if u >= 1 << (INPUT_BITS - UNIT_BITS):
        raise UserError(f"{f.path}: longer than {(1 << (INPUT_BITS - UNIT_BITS)) * UNIT_BYTES >> 40} TiB "
                        "uncompressed; split it into several files")
    reader: Reader = _R["reader"]
    warnings: list[str] = []
    reader.warn = warnings.append
    counts: Counter = Counter()
    unit_file = replace(f, gz=False, size=len(data))
    base = (i << INPUT_BITS) | (u << UNIT_BITS)
    batch = PieceBatch()
    blocks = iter([(data, len(data)), (b"", len(data))])
    for pieces in reader.pieces(unit_file, counts, blocks=blocks, line0=line0, report=False, drop=drop):
        for piece in pieces:
            if piece[0] >= 1 << UNIT_BITS:
                raise RuntimeError(f"{f.path}: more than 2**{UNIT_BITS} pieces in one unit")
            batch.offer(piece, base | piece[0], resume)
    tokens, lens = T.encode_batch(batch.payload()) if batch.texts else (None, None)
    return (tokens, lens, *batch.arrays(), dict(counts), reader.issues, warnings)


class PieceBatch:
    """Pieces gathered for one encode call (in a worker for a unit, in the main process for other inputs): their
    texts, BOS/EOS flags, ids, splits and the tokens each had written before a resume."""

    def __init__(self):
        self.texts: list[str] = []
        self.first: list[bool] = []
        self.last: list[bool] = []
        self.pids: list[int] = []
        self.splits: list[int] = []
        self.skips: list[int] = []
        self.chars = 0

    def offer(self, piece: tuple, pid: int, resume: Optional[list]) -> None:
        """Add ``piece`` (index, text, first, last, split) as ``pid``, unless it was written before a resume."""
        _, text, fst, lst, split = piece
        skip = _skip(resume, split, pid)
        if skip is None:
            return
        self.texts.append(text)
        self.first.append(fst)
        self.last.append(lst)
        self.pids.append(pid)
        self.splits.append(split)
        self.skips.append(skip)
        self.chars += len(text)

    def payload(self) -> tuple[list[str], bytes, bytes]:
        """What tokenizer.encode_batch takes."""
        return self.texts, bytes(self.first), bytes(self.last)

    def arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
        """(piece ids, splits, token skips, documents started)."""
        return (np.asarray(self.pids, dtype=np.int64), np.asarray(self.splits, dtype=np.int8),
                np.asarray(self.skips, dtype=np.int64), sum(self.first))


def _skip(resume: Optional[list], split: int, pid: int) -> Optional[int]:
    """Tokens of piece ``pid`` already written before a resume (None: the whole piece was)."""
    ra = resume[split] if resume is not None else None
    if ra is None or pid > ra[0]:
        return 0
    return ra[1] if pid == ra[0] else None
