"""Reading raw text inputs as a stream of bounded document pieces.

Inputs are files, folders (searched recursively) or globs of ``.txt``, ``.txt.gz``, ``.jsonl``, ``.jsonl.gz`` and
``.parquet``; they are read in sorted path order. What a document is (``doc_per``):

    auto    .txt: the whole file; .jsonl / .parquet: one record (the default)
    file    the whole file (records of a .jsonl / .parquet file joined with "\\n")
    line    one line of a .txt file (a trailing "\\r" is dropped); a .jsonl line is a record anyway
    record  one record of a .jsonl / .parquet file; for .txt the same as ``line``

Memory stays bounded whatever the input: text is read in ``CHUNK_BYTES`` chunks and a document longer than
``PIECE_CHARS`` characters is handed on in pieces cut at whitespace (a .jsonl record or a parquet value is loaded
whole, then cut the same way). Each piece carries whether it starts and ends its document (for BOS/EOS) and the
document's split.

Split: a document goes to ``val`` when BLAKE2b with a 64-bit digest of its first piece (UTF-8),
``hashlib.blake2b(text, digest_size=8)`` read as a little-endian integer, is below ``val_fraction * 2**64`` (not
the first 8 bytes of the default 512-bit digest, which is another value). The first piece is the whole text for
every document up to ``PIECE_CHARS`` characters, so the split depends on the text only, never on order or worker
count.

Clean-up, counted per input: invalid UTF-8 is replaced with U+FFFD, NUL characters are removed, whitespace-only
documents are skipped. A bad .jsonl line (not JSON, not an object, text field missing or not a string) or a null
parquet value stops the run with ``path:line`` unless ``skip_bad_records`` is set; then it is skipped and counted.
"""
from __future__ import annotations

import codecs
import gzip
import hashlib
import json
import os
import queue
import threading
import zlib
from collections import Counter
from typing import Callable, Iterator, Optional

from data_prep.inputs import (EXTENSIONS, InputFile, UserError, find_inputs, input_kind,  # noqa: F401
                              sha256_files)
from data_prep.segment import Piece, _Assembler, find_cut, is_safe_space, segment  # noqa: F401

CHUNK_BYTES = 1 << 20          # read size for .txt inputs
PIECE_CHARS = 1 << 18          # longest piece of a document handed to a worker
MAX_WARNINGS_PER_KIND = 5      # per input file; the rest are counted, not printed

DOC_PER = ("auto", "file", "line", "record")

# Names of the per-input counters (all ints).
COUNT_KEYS = ("documents", "documents_val", "empty_skipped", "invalid_utf8_replaced", "nul_removed",
              "bad_records_skipped", "long_documents_split", "pieces", "text_chars")

_REPLACED = [0]


def _count_replace(exc: UnicodeDecodeError):
    _REPLACED[0] += 1
    return "\ufffd", exc.end


codecs.register_error("data_prep.count_replace", _count_replace)


def add_issue(issues: dict[str, list], kind: str, n: int, where: str) -> None:
    """Count ``n`` more replaced characters of ``kind`` in ``issues`` ({kind: [count, where the first was]})."""
    if kind in issues:
        issues[kind][0] += n
    else:
        issues[kind] = [n, where]


class Reader:
    """Reads inputs as pieces. ``warn(msg)`` prints one warning line; per-input counts go to ``counts``."""

    def __init__(self, doc_per: str = "auto", text_field: str = "text", val_fraction: float = 0.0,
                 skip_bad_records: bool = False, drop_space: bool = True,
                 warn: Callable[[str], None] = lambda m: None, piece_chars: int = PIECE_CHARS):
        if doc_per not in DOC_PER:
            raise UserError(f"--doc-per {doc_per!r}: expected one of {', '.join(DOC_PER)}")
        if not 0.0 <= val_fraction <= 1.0:
            raise UserError(f"--val-fraction {val_fraction}: expected a number in [0, 1]")
        self.doc_per, self.text_field, self.val_fraction = doc_per, text_field, val_fraction
        self.skip_bad, self.drop_space, self.warn, self.piece_chars = skip_bad_records, drop_space, warn, piece_chars
        self._threshold = min(int(val_fraction * 2**64), 2**64)
        self.position = 0                     # bytes of the current input consumed (for progress)

    def split_of(self, text: str) -> int:
        if self._threshold == 0:
            return 0
        h = hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest()
        return 1 if int.from_bytes(h, "little") < self._threshold else 0

    def mode(self, f: InputFile) -> str:
        if self.doc_per == "auto":
            return "file" if f.kind == "txt" else "record"
        if self.doc_per == "record" and f.kind == "txt":
            return "line"
        if self.doc_per == "line" and f.kind != "txt":
            return "record"
        return self.doc_per

    def pieces(self, f: InputFile, counts: Counter, blocks: Optional[Iterator[tuple[bytes, int]]] = None,
               line0: int = 0, report: bool = True, drop: Optional[dict[int, bool]] = None,
               asm: Optional[_Assembler] = None) -> Iterator[list[Piece]]:
        """Yields lists of consecutive pieces of one input (possibly empty lists), bounded in size. With ``blocks``
        ((bytes, position) ending with an empty block) the text is those bytes — a unit of a larger file or its
        rest, whose first line is line ``line0 + 1`` (see data_prep/units.py). With ``report`` the input's
        replaced characters are warned about at its end; else they are left in ``self.issues`` for the caller.
        ``drop``: records to skip (_Assembler.begin); ``asm``: another taker of the text (data_prep/dedup.py)."""
        self.position = 0
        if asm is None:
            asm = _Assembler(self.piece_chars, self.drop_space, self.split_of, counts, drop)
        self.issues: dict[str, list] = {}
        blocks = self._blocks(f) if blocks is None else blocks
        if f.kind == "txt":
            gen = self._txt(f, asm, counts, blocks, line0)
        elif f.kind == "jsonl":
            gen = self._jsonl(f, asm, counts, blocks, line0)
        else:
            gen = self._parquet(f, asm, counts)
        for _ in gen:
            if asm.out:
                out, asm.out = asm.out, []
                yield out
        if asm.out:
            yield asm.out
        self.position = f.size
        if report:
            self.report(f.path, self.issues)

    def report(self, path: str, issues: dict[str, list]) -> None:
        """Warn about an input's replaced characters: ``issues`` = {kind: [count, where the first was]}."""
        for kind, (n, where) in issues.items():
            if kind == "utf8":
                self.warn(f"{path}: {n} invalid UTF-8 sequence(s) replaced with U+FFFD (first at {where})")
            elif kind == "nul":
                self.warn(f"{path}: {n} NUL character(s) removed (first at {where})")

    # -- helpers ------------------------------------------------------------------------------------------------

    def _note(self, kind: str, n: int, where: str) -> None:
        add_issue(self.issues, kind, n, where)

    def _clean(self, text: str, counts: Counter, where: Callable[[str, int], str]) -> str:
        if "\x00" in text:
            n = text.count("\x00")
            self._note("nul", n, where(text, text.index("\x00")))
            counts["nul_removed"] += n
            text = text.replace("\x00", "")
        return text

    def _open(self, f: InputFile):
        try:
            raw = open(f.path, "rb")
        except OSError as e:
            raise UserError(f"{f.path}: cannot read ({e.strerror or e})") from None
        return raw, (gzip.GzipFile(fileobj=raw, mode="rb") if f.gz else raw)

    def _blocks(self, f: InputFile) -> Iterator[tuple[bytes, int]]:
        """(block, bytes of the file consumed) over the input's (decompressed) bytes, ending with an empty block.
        A thread reads ahead (4 blocks at most), so gzip decompression, which releases the GIL, overlaps the
        main process's other work."""
        raw, fh = self._open(f)
        q: queue.Queue = queue.Queue(maxsize=4)
        stop = threading.Event()

        def put(item) -> None:
            while not stop.is_set():
                try:
                    q.put(item, timeout=0.1)
                    return
                except queue.Full:
                    pass

        def run() -> None:
            try:
                with raw, fh:
                    while not stop.is_set():
                        block = fh.read(CHUNK_BYTES)
                        put((block, raw.tell()))
                        if not block:
                            return
            except BaseException as e:  # noqa: BLE001 - handed to the reading thread
                put((e, 0))

        t = threading.Thread(target=run, name=f"read {os.path.basename(f.path)}", daemon=True)
        t.start()
        try:
            while True:
                block, pos = q.get()
                if isinstance(block, BaseException):
                    if isinstance(block, (EOFError, OSError, zlib.error)):
                        raise self._read_error(f, block) from None
                    raise block
                yield block, pos
                if not block:
                    return
        finally:
            stop.set()

    @staticmethod
    def _read_error(f: InputFile, e: BaseException) -> UserError:
        if isinstance(e, (EOFError, zlib.error, gzip.BadGzipFile)):
            return UserError(f"{f.path}: truncated or corrupt gzip file ({e})")
        return UserError(f"{f.path}: read error ({getattr(e, 'strerror', None) or e})")

    def _bad(self, f: InputFile, where: str, msg: str, counts: Counter) -> None:
        if not self.skip_bad:
            raise UserError(f"{f.path}:{where}: {msg}; fix it or pass --skip-bad-records")
        counts["bad_records_skipped"] += 1
        if counts["bad_records_skipped"] <= MAX_WARNINGS_PER_KIND:
            self.warn(f"{f.path}:{where}: {msg}; record skipped")
        elif counts["bad_records_skipped"] == MAX_WARNINGS_PER_KIND + 1:
            self.warn(f"{f.path}: more bad records skipped; see the count in the summary")

    # -- formats ------------------------------------------------------------------------------------------------

    def _txt(self, f: InputFile, asm: _Assembler, counts: Counter, blocks, line0: int) -> Iterator[None]:
        decoder = codecs.getincrementaldecoder("utf-8")(errors="data_prep.count_replace")
        by_line = self.mode(f) == "line"
        lines_before = line0                  # line mode: the unfinished line so far is in asm.buf
        asm.begin(line0 + 1 if by_line else 0)
        for block, pos in blocks:
            final = not block
            _REPLACED[0] = 0
            text = decoder.decode(block, final)
            if _REPLACED[0]:
                k = text.find("\ufffd")
                self._note("utf8", _REPLACED[0], f"line {lines_before + text.count(chr(10), 0, max(k, 0)) + 1}")
                counts["invalid_utf8_replaced"] += _REPLACED[0]
            text = self._clean(text, counts,
                               lambda t, k: f"line {lines_before + t.count(chr(10), 0, k) + 1}")
            if by_line:
                parts = text.split("\n")
                for n, part in enumerate(parts[:-1], lines_before + 2):
                    asm.add(part)
                    if asm.buf.endswith("\r"):
                        asm.buf = asm.buf[:-1]
                    asm.end()
                    asm.begin(n)
                if parts[-1]:
                    asm.add(parts[-1])
                lines_before += len(parts) - 1
            else:
                lines_before += text.count("\n")
                if text:
                    asm.add(text)
            self.position = pos
            yield
        if not by_line or asm.open():
            if by_line and asm.buf.endswith("\r"):
                asm.buf = asm.buf[:-1]
            asm.end()
        yield

    def _record_text(self, f: InputFile, where: str, obj, counts: Counter) -> Optional[str]:
        field = self.text_field
        if not isinstance(obj, dict):
            self._bad(f, where, f"not a JSON object but {type(obj).__name__}", counts)
            return None
        if field not in obj:
            keys = ", ".join(map(str, list(obj)[:8])) or "none"
            self._bad(f, where, f"no field {field!r} (fields: {keys}; choose one with --text-field)", counts)
            return None
        text = obj[field]
        if not isinstance(text, str):
            self._bad(f, where, f"field {field!r} is {type(text).__name__ if text is not None else 'null'}, "
                                "not a string", counts)
            return None
        return text

    def _fix_surrogates(self, text: str, counts: Counter, where: str) -> str:
        try:
            text.encode("utf-8")
            return text
        except UnicodeEncodeError:
            _REPLACED[0] = 0
            text = text.encode("utf-8", "surrogatepass").decode("utf-8", "data_prep.count_replace")
            self._note("utf8", _REPLACED[0], where)
            counts["invalid_utf8_replaced"] += _REPLACED[0]
            return text

    def _add_record(self, asm: _Assembler, text: str, mode: str, first_record: bool, record: int) -> None:
        if mode == "file":                    # the file is the document: its record number is 0 (begun above)
            if not first_record:
                asm.add("\n")
            asm.add(text)
        else:
            asm.begin(record)
            asm.add(text)
            asm.end()

    @staticmethod
    def _lines(blocks: Iterator[tuple[bytes, int]]) -> Iterator[tuple[bytes, int]]:
        """(line without its newline, position) from blocks; a long line is gathered from parts."""
        parts: list[bytes] = []
        pos = 0
        for block, pos in blocks:
            start = 0
            while (k := block.find(b"\n", start)) >= 0:
                if parts:
                    parts.append(block[start:k])
                    yield b"".join(parts), pos
                    parts = []
                else:
                    yield block[start:k], pos
                start = k + 1
            if start < len(block):
                parts.append(block[start:])
        if parts:
            yield b"".join(parts), pos

    def _jsonl(self, f: InputFile, asm: _Assembler, counts: Counter, blocks, line0: int) -> Iterator[None]:
        mode = self.mode(f)
        first = True
        lineno = line0
        asm.begin(0)
        for line, pos in self._lines(blocks):
            lineno += 1
            if not line.strip():
                continue
            where = str(lineno)
            _REPLACED[0] = 0
            s = line.decode("utf-8", "data_prep.count_replace")
            if _REPLACED[0]:
                self._note("utf8", _REPLACED[0], f"line {lineno}")
                counts["invalid_utf8_replaced"] += _REPLACED[0]
            try:
                obj = json.loads(s)
            except json.JSONDecodeError as e:
                self._bad(f, where, f"bad JSON ({e.msg} at column {e.colno})", counts)
                continue
            text = self._record_text(f, where, obj, counts)
            if text is None:
                continue
            text = self._fix_surrogates(text, counts, f"line {lineno}")
            text = self._clean(text, counts, lambda t, k: f"line {lineno}")
            self._add_record(asm, text, mode, first, lineno)
            first = False
            if lineno % 64 == 0:
                self.position = pos
                yield
        if mode == "file" and not first:
            asm.end()
        yield

    def _parquet(self, f: InputFile, asm: _Assembler, counts: Counter) -> Iterator[None]:
        import pyarrow as pa
        import pyarrow.parquet as pq
        try:
            pf = pq.ParquetFile(f.path)
        except Exception as e:  # pyarrow raises several types for a bad file
            raise UserError(f"{f.path}: not a readable parquet file ({e})") from None
        schema = pf.schema_arrow
        field = self.text_field
        if field not in schema.names:
            raise UserError(f"{f.path}: no column {field!r} (columns: {', '.join(schema.names)}; "
                            "choose one with --text-field)")
        typ = schema.field(field).type
        if not (pa.types.is_string(typ) or pa.types.is_large_string(typ)):
            raise UserError(f"{f.path}: column {field!r} holds {typ}, not strings")
        mode = self.mode(f)
        total = max(pf.metadata.num_rows, 1)
        row, first = 0, True
        asm.begin(0)
        try:
            for batch in pf.iter_batches(batch_size=256, columns=[field]):
                for text in batch.column(0).to_pylist():
                    row += 1
                    where = f"row {row}"
                    if text is None:
                        self._bad(f, where, f"column {field!r} is null", counts)
                        continue
                    text = self._fix_surrogates(text, counts, where)
                    text = self._clean(text, counts, lambda t, k: where)
                    self._add_record(asm, text, mode, first, row)
                    first = False
                self.position = f.size * row // total
                yield
        except UserError:
            raise
        except Exception as e:
            raise UserError(f"{f.path}: cannot read parquet data near row {row} ({e})") from None
        if mode == "file" and not first:
            asm.end()
        yield


def iter_documents(inputs: list[InputFile], reader: Reader) -> Iterator[tuple[list[str], int]]:
    """Documents in order as (their pieces' texts, split): for tools and tests; the pipeline works on pieces."""
    for f in inputs:
        parts: list[str] = []
        for pieces in reader.pieces(f, Counter()):
            for _, text, first, last, split in pieces:
                if first:
                    parts = []
                parts.append(text)
                if last:
                    yield parts, split
