"""Tokenizer training on a bad input stops with the input's own one-line error (the same line the tokenize path
gives for that file), not SentencePiece's wrapping of it; the "smaller --vocab-size" advice is only for failures
of the trainer itself."""
from __future__ import annotations

import gzip

import pytest

from tests.data_prep.conftest import corpus_records, run_cli, write_jsonl
from tests.data_prep.test_bad_input import _error_line


def _truncated(path):
    data = gzip.compress("".join(r["text"] + "\n" for r in corpus_records(3)).encode(), mtime=0)
    path.write_bytes(data[: len(data) // 2])                 # good text first, then the stream ends early


def _garbage(path):
    path.write_bytes(b"\x1f\x8b\x08\x00" + bytes(range(256)) * 8)   # a gzip magic, then nonsense


@pytest.mark.parametrize("make,name", [(_truncated, "t.txt.gz"), (_garbage, "g.jsonl.gz")],
                         ids=["truncated", "garbage"])
def test_training_on_a_corrupt_gz_names_the_file(tmp_path, tiny_model, make, name):
    """A good input comes first (inputs are read in path order): SentencePiece has started reading when the bad
    one fails, which is when it used to wrap the error (an error on its very first sentence came out as is)."""
    folder = tmp_path / "in"
    folder.mkdir()
    write_jsonl(folder / "a.jsonl", corpus_records(2))
    bad = folder / name
    make(bad)
    trained = _error_line(run_cli(folder, "--train-tokenizer", tmp_path / "t.model", "--vocab-size", 400,
                                  "--tokenizer-threads", 1))
    tokenized = _error_line(run_cli(folder, "--tokenizer", tiny_model, "--out", tmp_path / "out"))
    assert trained == tokenized                              # the same line as the tokenize path
    assert trained.startswith(f"error: {bad}: truncated or corrupt gzip file")
    assert "--vocab-size" not in trained and "sources.py" not in trained
    assert not (tmp_path / "t.model").exists()


def test_a_failure_of_the_trainer_itself_keeps_the_advice(tmp_path):
    write_jsonl(tmp_path / "c.jsonl", [{"text": "a tiny text"}])
    line = _error_line(run_cli(tmp_path / "c.jsonl", "--train-tokenizer", tmp_path / "t.model", "--vocab-size", 5000,
                               "--tokenizer-threads", 1))
    assert line.startswith("error: tokenizer training failed (") and "try a smaller --vocab-size" in line


def test_a_vocabulary_smaller_than_the_characters_asks_for_a_larger_one(tmp_path):
    write_jsonl(tmp_path / "c.jsonl", [{"text": "".join(chr(0x4E00 + i) for i in range(400))}])
    line = _error_line(run_cli(tmp_path / "c.jsonl", "--train-tokenizer", tmp_path / "t.model", "--vocab-size", 300,
                               "--tokenizer-threads", 1))
    assert line.startswith("error: tokenizer training failed (") and "try a larger --vocab-size" in line
    assert "smaller --vocab-size" not in line
