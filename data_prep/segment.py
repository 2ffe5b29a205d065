"""Cutting long text into bounded pieces at whitespace, and assembling a document's pieces (see
data_prep/sources.py): a document longer than PIECE_CHARS characters is handed on in pieces, each marked with
whether it starts and ends its document."""
from __future__ import annotations

import unicodedata
from collections import Counter
from typing import Callable, Optional


def is_safe_space(text: str, k: int) -> bool:
    """True when ``text[k]`` is a single ASCII space between two non-space characters (the next one not a
    combining mark). For a SentencePiece model that splits at whitespace, cutting the text there (and letting the
    model's dummy prefix stand for the space) leaves the token ids unchanged."""
    if k <= 0 or k + 1 >= len(text) or text[k] != " ":
        return False
    nxt = text[k + 1]
    return not text[k - 1].isspace() and not nxt.isspace() and not unicodedata.combining(nxt)


def find_cut(text: str, limit: int, drop_space: bool, lo: Optional[int] = None) -> tuple[int, int]:
    """Where to cut ``text`` (longer than ``limit``) at or before ``limit``: returns (end of this piece, start of
    the next). Prefers the last safe single space in [lo, limit) (dropped when ``drop_space``, the model's dummy
    prefix restoring it), then the last whitespace character (kept in this piece), then a hard cut."""
    lo = limit // 2 if lo is None else lo
    k = text.rfind(" ", lo, limit)
    while k >= lo:
        if is_safe_space(text, k):
            return (k, k + 1) if drop_space else (k, k)
        k = text.rfind(" ", lo, k)
    for k in range(limit - 1, lo - 1, -1):
        if text[k].isspace():
            return k + 1, k + 1
    return limit, limit


def segment(text: str, limit: int, drop_space: bool) -> list[str]:
    """Cut ``text`` into parts of about ``limit`` characters at safe single spaces only (see is_safe_space), so
    that encoding the parts one by one gives the same ids as encoding the whole (for a whitespace-splitting model).
    A stretch with no safe space is left whole."""
    n = len(text)
    if n <= limit:
        return [text]
    out, i, half = [], 0, limit // 2
    while n - i > limit:
        j = i + limit
        k = text.rfind(" ", i + half, j)
        while k >= i + half and not is_safe_space(text, k):
            k = text.rfind(" ", i + half, k)
        if k < i + half:                      # none in the window: look further on
            k = text.find(" ", j)
            while k != -1 and not is_safe_space(text, k):
                k = text.find(" ", k + 1)
            if k == -1:
                break
        out.append(text[i:k])
        i = k + 1 if drop_space else k
    out.append(text[i:])
    return out


# ---------------------------------------------------------------------------------------------------------------
# Pieces

# A piece: (index within its input, text, first piece of its document, last piece, split: 0 train / 1 val)
Piece = tuple[int, str, bool, bool, int]


class _Assembler:
    """Turns the text of documents, given in parts, into pieces of at most ``piece_chars`` characters.

    Takes the reader's settings one by one rather than the Reader itself: sources.py builds on this module, so
    this one must not need sources.py back."""

    def __init__(self, piece_chars: int, drop_space: bool, split_of: Callable[[str], int], counts: Counter,
                 drop: Optional[dict[int, bool]] = None):
        self.piece_chars, self.drop_space, self.split_of, self.counts = piece_chars, drop_space, split_of, counts
        self.buf, self.first, self.split = "", True, 0
        self.index = 0                        # next piece index within the input
        self.out: list[Piece] = []
        # duplicates to skip (data_prep/dedup.py): record number -> whether the kept copy is in an earlier corpus
        self.drop = drop or {}
        self.record, self.skip = 0, False

    def begin(self, record: int) -> None:
        """The next document is record ``record`` of its input: its line (.jsonl, .txt read by line), its parquet
        row, or 0 for a document that is a whole file. A record in ``drop`` is skipped whole and counted."""
        self.record, self.skip = record, record in self.drop

    def open(self) -> bool:
        """A document has begun and holds text (or is being skipped): it needs an ``end``."""
        return bool(self.buf) or not self.first or self.skip

    def add(self, text: str) -> None:
        if self.skip:
            return
        self.buf = self.buf + text if self.buf else text
        limit = self.piece_chars
        while len(self.buf) > limit:
            end, nxt = find_cut(self.buf, limit, self.drop_space)
            self._emit(self.buf[:end], last=False)
            self.buf = self.buf[nxt:]

    def end(self) -> None:
        if self.skip:
            self.counts["duplicates_dropped"] += 1
            self.counts["duplicates_dropped_across"] += self.drop[self.record]
            self.skip = False
            return
        text, self.buf = self.buf, ""
        self._emit(text, last=True)
        self.first = True

    def _emit(self, text: str, last: bool) -> None:
        c = self.counts
        if self.first:
            if text.isspace() or not text:
                if last:
                    c["empty_skipped"] += 1
                return                        # leading whitespace of a long document is dropped
            self.split = self.split_of(text)
            c["documents"] += 1
            c["documents_val"] += self.split
            if not last:
                c["long_documents_split"] += 1
        c["pieces"] += 1
        c["text_chars"] += len(text)
        self.out.append((self.index, text, self.first, last, self.split))
        self.index += 1
        self.first = False
