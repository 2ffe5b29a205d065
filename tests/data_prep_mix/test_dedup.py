"""--dedup exact drops exactly the planted duplicates — exact copies and copies equal after NFC and whitespace
normalisation, within a file, across files and across corpora — and keeps near-duplicates (a word changed, a
case changed): the shards equal, byte for byte, those of the corpus with the duplicates removed by hand, whatever
the worker count and unit size, and a single-corpus run gives what the first corpus of a run of several gets."""
from __future__ import annotations

import gzip
import random
import unicodedata
from pathlib import Path

import pytest

from data_prep import dedup, units
from data_prep.shards import Manifest
from tests.data_prep.conftest import shard_bytes
from tests.data_prep_mix.conftest import texts, write_lines

ARGS = ["--seq-len", 32, "--val-fraction", 0.3, "--samples-per-shard", 8]
ACCENTS = "Le café de la Société, naïve coöperation; Ångström. "


def _spaced(t: str) -> str:
    """The same words with other whitespace: tabs, runs, line ends, no-break spaces, blanks at both ends."""
    words = t.split(" ")
    seps = [" ", "  ", "\t", "\n", " \u00a0 ", "\r\n"]
    return "\n  " + "".join(w + seps[i % len(seps)] for i, w in enumerate(words[:-1])) + words[-1] + " \n"


def _one_word_changed(t: str) -> str:
    words = t.split(" ")
    words[len(words) // 2] += "s"
    return " ".join(words)


def _plant(root: Path, by_hand: bool) -> dict[str, list[Path]]:
    """Corpus "one" (a.jsonl, b.jsonl.gz, c.txt) and "two" (x.jsonl, y.parquet). ``by_hand``: without the
    duplicates."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    d = texts(10, start=20, chars=500)
    acc = ACCENTS + d[9]
    nfd = unicodedata.normalize("NFD", acc)
    assert nfd != acc and unicodedata.normalize("NFC", nfd) == acc
    case = d[4][0].swapcase() + d[4][1:]
    dup = None if by_hand else True                       # marks a planted duplicate
    a = [d[0], d[1], dup and d[0], acc, d[2], dup and _spaced(d[2]), d[3], _one_word_changed(d[3]), d[4], case,
         "  \t "]
    b = [dup and nfd, dup and d[0], d[5]]
    two = [dup and d[1], dup and nfd, d[7], dup and _spaced(d[5]), _one_word_changed(d[7]), d[8], dup and d[7]]
    one_dir, two_dir = root / "one", root / "two"
    write_lines(one_dir / "a.jsonl", [t for t in a if t])
    (one_dir / "b.jsonl.gz").write_bytes(gzip.compress((write_lines(root / "b.tmp", [t for t in b if t])
                                                        .read_bytes()), mtime=0))
    (root / "b.tmp").unlink()
    if not by_hand:                                       # a whole-file document: d[1] with line ends for spaces
        (one_dir / "c.txt").write_text(d[1].replace(" ", "\n", 7) + "\n", encoding="utf-8")
    write_lines(two_dir / "x.jsonl", [t for t in two if t])
    rows = [dup and _spaced(d[8]), ACCENTS + d[6]]
    pq.write_table(pa.table({"text": [t for t in rows if t]}), two_dir / "y.parquet")
    return {"one": one_dir, "two": two_dir}


@pytest.fixture(scope="module")
def planted(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("planted")
    _plant(root / "dups", by_hand=False)
    _plant(root / "clean", by_hand=True)
    return root / "dups", root / "clean"


def _corpora(root: Path) -> list[str]:
    return ["--corpus", f"one={root / 'one'}", "--corpus", f"two={root / 'two'}"]


def test_exactly_the_planted_duplicates_are_dropped(planted, cli, mix_model, tmp_path):
    dups, clean = planted
    rc, stdout, log = cli(*_corpora(dups), "--tokenizer", mix_model, "--out", tmp_path / "dedup", "--dedup", "exact",
                          "--workers", 1, *ARGS)
    assert rc == 0, log
    rc, _, err = cli(*_corpora(clean), "--tokenizer", mix_model, "--out", tmp_path / "by_hand", "--workers", 1, *ARGS)
    assert rc == 0, err
    for name, dropped, across, files in (("one", 5, 0, 3), ("two", 5, 3, 2)):
        got, want = Manifest.load(tmp_path / "dedup" / name), Manifest.load(tmp_path / "by_hand" / name)
        assert shard_bytes(tmp_path / "dedup" / name) == shard_bytes(tmp_path / "by_hand" / name)
        assert len(shard_bytes(tmp_path / "dedup" / name)) >= 3
        assert got.splits == want.splits
        assert got.counts["duplicates_dropped"] == dropped and got.counts["duplicates_dropped_across"] == across
        assert got.counts["input_files"] == files
        for k in ("documents", "documents_val", "tokens_train", "tokens_val", "empty_skipped"):
            assert got.counts[k] == want.counts[k], k
        assert got.settings["dedup"]["mode"] == "exact"
        assert f"{name}: {got.counts['documents']} documents ({got.counts['documents_val']} val; {dropped} " \
               "duplicate(s) dropped" in stdout
    assert Manifest.load(tmp_path / "dedup" / "one").counts["empty_skipped"] == 1
    earlier = Manifest.load(tmp_path / "dedup" / "two").settings["dedup"]["earlier_corpora"]
    assert [e["corpus"] for e in earlier] == ["one"] and len(earlier[0]["inputs"]) == 3
    assert "earlier_corpora" not in Manifest.load(tmp_path / "dedup" / "one").settings["dedup"]
    assert "dedup: 10 of" in log and ", 10 duplicate(s) dropped" in stdout


def test_workers_and_unit_size_do_not_change_what_is_dropped(planted, cli, mix_model, tmp_path, monkeypatch):
    dups, _ = planted
    rc, _, err = cli(*_corpora(dups), "--tokenizer", mix_model, "--out", tmp_path / "w1", "--dedup", "exact",
                     "--workers", 1, *ARGS)
    assert rc == 0, err
    monkeypatch.setattr(units, "UNIT_BYTES", 700)          # several units per file: drops looked up per unit
    rc, _, err = cli(*_corpora(dups), "--tokenizer", mix_model, "--out", tmp_path / "w2", "--dedup", "exact",
                     "--workers", 2, *ARGS)
    assert rc == 0, err
    for name in ("one", "two"):
        assert shard_bytes(tmp_path / "w1" / name) == shard_bytes(tmp_path / "w2" / name)
        assert Manifest.load(tmp_path / "w1" / name).counts == Manifest.load(tmp_path / "w2" / name).counts


def test_single_corpus_dedup_is_the_first_corpus_of_several(planted, cli, mix_model, tmp_path):
    """Within the inputs of one run: the first corpus of several depends on nothing before it, so a run on it
    alone writes the same data set, manifest included."""
    dups, _ = planted
    rc, stdout, err = cli(dups / "one", "--tokenizer", mix_model, "--out", tmp_path / "alone", "--dedup", "exact",
                          "--workers", 2, *ARGS)
    assert rc == 0, err
    assert "duplicate(s) dropped" in stdout.splitlines()[0]
    rc, _, err = cli(*_corpora(dups), "--tokenizer", mix_model, "--out", tmp_path / "mix", "--dedup", "exact",
                     "--workers", 1, *ARGS)
    assert rc == 0, err
    for p in sorted((tmp_path / "alone").iterdir()):
        assert p.read_bytes() == (tmp_path / "mix" / "one" / p.name).read_bytes(), p.name
    # without --dedup the folder holds other settings: refused, naming the difference
    rc, _, err = cli(dups / "one", "--tokenizer", mix_model, "--out", tmp_path / "alone", "--workers", 1, *ARGS)
    assert rc == 2 and err.count("\n") == 1 and "dedup" in err and "--overwrite" in err


@pytest.mark.parametrize("units_of", ["files", "small units", "a long last line"])
def test_lines_of_a_txt_file(units_of, cli, mix_model, tmp_path, monkeypatch):
    """--doc-per line: duplicate lines dropped by line number, in the workers' units (a duplicate last line without
    its line end too) and in the rest of a file that the main process reads after a long line."""
    d = texts(4, start=70, chars=400)
    lines = [d[0], d[1], d[0], "  " + d[1] + " ", "", d[2], d[2] + "\r", _one_word_changed(d[2]), d[3], d[0]]
    (tmp_path / "dups.txt").write_text("\n".join(lines), encoding="utf-8")                # no line end at the end
    (tmp_path / "clean.txt").write_text("\n".join([d[0], d[1], "", d[2], _one_word_changed(d[2]), d[3]]) + "\n",
                                        encoding="utf-8")
    args = ["--tokenizer", mix_model, "--doc-per", "line", *ARGS]
    rc, _, err = cli(tmp_path / "clean.txt", "--out", tmp_path / "by_hand", "--workers", 1, *args)
    assert rc == 0, err
    if units_of == "small units":
        monkeypatch.setattr(units, "UNIT_BYTES", 300)
    elif units_of == "a long last line":
        monkeypatch.setattr(units, "LONG_LINE_BYTES", len(d[0]) * 2)
    rc, _, err = cli(tmp_path / "dups.txt", "--out", tmp_path / "dedup", "--dedup", "exact", "--workers", 2, *args)
    assert rc == 0, err
    assert shard_bytes(tmp_path / "dedup") == shard_bytes(tmp_path / "by_hand")
    got, want = Manifest.load(tmp_path / "dedup").counts, Manifest.load(tmp_path / "by_hand").counts
    assert got["duplicates_dropped"] == 4 and got["empty_skipped"] == want["empty_skipped"] == 1
    assert got["documents"] == want["documents"] == 5


def test_the_key_normalises_nfc_and_whitespace_only():
    k = dedup.key
    assert k("caf\u00e9") == k("cafe\u0301") and k("Å") == k("A\u030a") == k("\u212b")
    assert k(" a\t\tb\n\nc \u00a0") == k("a b c") and dedup.normalise("\r\n x  y \u3000") == "x y"
    assert k("A b") != k("a b") and k("\ufb01") != k("fi") and k("ab") != k("a b")
    assert dedup.normalise(" \t\n") == "" and len(k("x")) == dedup.KEY_BYTES


@pytest.mark.parametrize("seed", range(4))
def test_a_long_text_hashed_in_parts_gets_the_key_of_the_whole(seed, monkeypatch):
    """The first pass hashes a long document as it reads it, in parts; the cuts must not change the key."""
    monkeypatch.setattr(dedup, "FLUSH_CHARS", 16)
    rng = random.Random(seed)
    atoms = ["word", " ", "  ", "\t", "\n", "e\u0301", "\u00e9", "\u0301", "A\u030a", "\u1100\u1161", "\u11a8",
             "\u00e9" * 40, "x" * 40, " \u00a0 ", "\u3000", "\u4e2d\u6587"]
    for _ in range(20):
        text = "".join(rng.choice(atoms) for _ in range(rng.randint(1, 60)))
        h = dedup._Hasher()
        h.begin(3)
        i = 0
        while i < len(text):
            n = rng.randint(1, 30)
            h.add(text[i:i + n])
            i += n
        h.end()
        if dedup.normalise(text):
            assert h.records == [3] and h.keys == [dedup.key(text)], repr(text)
        else:
            assert h.records == [] and h.keys == []
