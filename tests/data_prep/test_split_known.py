"""The train/val split rule pinned by known answers: BLAKE2b with a 64-bit digest (hashlib.blake2b(text,
digest_size=8), not the first 8 bytes of the default 512-bit digest), read little-endian, against
val_fraction * 2**64. The values below were computed once with hashlib and checked by hand; nothing here asks the
code under test what the answer should be, so a changed hash fails."""
from __future__ import annotations

import hashlib

import pytest

from data_prep.sources import Reader
from tests.data_prep.conftest import decode_docs, run_cli, write_jsonl

# (document, its BLAKE2b-64 digest as a little-endian integer), in increasing order of the value
KNOWN = [
    ("document 210", 9795109486042754),                                   # 0.00053 of 2**64
    ("document 332", 167128011613023313),                                 # 0.00906
    ("a", 3405396810240292928),                                           # 0.185
    ("Mixture-of-Recursions", 5226877957432441055),                       # 0.283
    ("The quick brown fox jumps over the lazy dog.", 10017154722130740371),  # 0.543
    ("document 7", 10751618861524919115),                                 # 0.583
    ("é ☃ naïve café", 13904701825312840498),                             # 0.754
    ("Hello, world.", 14151518281803608295),                              # 0.767
]
# which of them go to val, per val_fraction (the first 8 bytes of the 512-bit digest would put "a", "document 7"
# and the fox in val at 0.3 instead)
VAL = {
    0.01: {"document 210", "document 332"},
    0.3: {"document 210", "document 332", "a", "Mixture-of-Recursions"},
    0.6: {"document 210", "document 332", "a", "Mixture-of-Recursions",
          "The quick brown fox jumps over the lazy dog.", "document 7"},
}


def test_the_literal_values_are_blake2b_64():
    """The table itself, against hashlib (a check of the literals, not of the code)."""
    for text, value in KNOWN:
        assert int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little") == value


@pytest.mark.parametrize("fraction", sorted(VAL))
def test_reader_splits_the_known_documents(fraction: float):
    r = Reader(val_fraction=fraction)
    assert {t for t, _ in KNOWN if r.split_of(t) == 1} == VAL[fraction]


def test_tokenize_puts_the_known_documents_in_val(tmp_path, tiny_model, sp):
    """End to end: .jsonl records are split in the workers (data_prep/units.py), .txt files in the main process."""
    (tmp_path / "in").mkdir()
    (tmp_path / "txt").mkdir()
    write_jsonl(tmp_path / "in" / "docs.jsonl", [{"text": t} for t, _ in KNOWN])
    for i, (text, _) in enumerate(KNOWN):
        (tmp_path / "txt" / f"{i}.txt").write_text(text)
    for src in ("in", "txt"):
        out = tmp_path / f"out-{src}"
        res = run_cli(tmp_path / src, "--out", out, "--tokenizer", tiny_model, "--seq-len", 16,
                      "--val-fraction", 0.3)
        assert res.returncode == 0, res.stderr
        assert set(decode_docs(out, "val", sp)) == VAL[0.3]
        assert set(decode_docs(out, "train", sp)) == {t for t, _ in KNOWN} - VAL[0.3]
