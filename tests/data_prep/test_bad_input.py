"""Bad input gives one clear line naming the file (and line), is counted, and user errors exit with status 2
without a traceback."""
from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys

import pytest

from data_prep.shards import Manifest
from tests.data_prep.conftest import ROOT, SCRIPT, run_cli, write_jsonl


def _error_line(res) -> str:
    assert res.returncode == 2, (res.returncode, res.stderr)
    assert "Traceback" not in res.stderr
    lines = res.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), res.stderr
    return lines[0]


@pytest.fixture
def tok(tiny_model):
    return ["--tokenizer", tiny_model, "--seq-len", 64, "--val-fraction", 0]


def test_invalid_utf8_nul_and_empty_documents_are_counted(tmp_path, tok, sp):
    (tmp_path / "a.txt").write_bytes(b"good line\nbad \xff\xfe bytes here\nnul\x00 here\x00\n\n   \nlast\n")
    (tmp_path / "b.txt").write_bytes(b"")
    out = tmp_path / "out"
    res = run_cli(tmp_path / "a.txt", tmp_path / "b.txt", "--out", out, *tok, "--doc-per", "line")
    assert res.returncode == 0, res.stderr
    a = str(tmp_path / "a.txt")
    assert f"warning: {a}: 2 invalid UTF-8 sequence(s) replaced with U+FFFD (first at line 2)" in res.stderr
    assert f"warning: {a}: 2 NUL character(s) removed (first at line 3)" in res.stderr
    c = Manifest.load(out).counts
    assert (c["invalid_utf8_replaced"], c["nul_removed"], c["documents"]) == (2, 2, 4)
    assert c["empty_skipped"] == 2                     # the "" and "   " lines (b.txt has no lines)
    assert "2 empty documents skipped" in res.stdout and "2 invalid UTF-8" in res.stdout
    from tests.data_prep.conftest import decode_docs
    assert decode_docs(out, "train", sp) == ["good line", "bad \ufffd\ufffd bytes here", "nul here", "last"]


def test_truncated_gzip(tmp_path, tok):
    data = gzip.compress(("some text " * 20000).encode())
    (tmp_path / "t.txt.gz").write_bytes(data[: len(data) // 2])
    line = _error_line(run_cli(tmp_path / "t.txt.gz", "--out", tmp_path / "out", *tok))
    assert str(tmp_path / "t.txt.gz") in line and "truncated or corrupt gzip" in line
    (tmp_path / "n.jsonl.gz").write_bytes(b"not gzip at all")
    line = _error_line(run_cli(tmp_path / "n.jsonl.gz", "--out", tmp_path / "out2", *tok))
    assert "n.jsonl.gz: truncated or corrupt gzip" in line


def test_unreadable_and_missing_inputs(tmp_path, tok):
    os.symlink(tmp_path / "nowhere.txt", tmp_path / "broken.txt")
    line = _error_line(run_cli(tmp_path / "broken.txt", "--out", tmp_path / "out", *tok))
    assert "broken.txt: cannot read (broken symbolic link)" in line
    line = _error_line(run_cli(tmp_path, "--out", tmp_path / "out", *tok))          # found inside a folder
    assert "broken.txt: cannot read" in line
    if os.geteuid() != 0:                          # root reads anything
        (tmp_path / "secret.txt").write_text("x")
        os.chmod(tmp_path / "secret.txt", 0)
        assert "cannot read" in _error_line(run_cli(tmp_path / "secret.txt", "--out", tmp_path / "o", *tok))
    assert "no such file or folder" in _error_line(run_cli(tmp_path / "missing.txt", "--out", tmp_path / "o", *tok))
    (tmp_path / "data.csv").write_text("a,b")
    assert "unsupported input type" in _error_line(run_cli(tmp_path / "data.csv", "--out", tmp_path / "o", *tok))
    assert "matches no" in _error_line(run_cli(str(tmp_path / "*.jsonl"), "--out", tmp_path / "o", *tok))


def test_bad_json_lines(tmp_path, tok):
    p = tmp_path / "d.jsonl"
    p.write_text(json.dumps({"text": "fine"}) + "\n" + '{"text": "broken\n' + json.dumps({"body": "x"}) + "\n"
                 + json.dumps({"text": None}) + "\n" + "[1, 2]\n" + json.dumps({"text": "also fine"}) + "\n")
    line = _error_line(run_cli(p, "--out", tmp_path / "out", *tok))
    assert f"{p}:2: bad JSON" in line and "--skip-bad-records" in line
    res = run_cli(p, "--out", tmp_path / "out", *tok, "--skip-bad-records")
    assert res.returncode == 0, res.stderr
    assert f"{p}:2: bad JSON" in res.stderr
    assert f"{p}:3: no field 'text' (fields: body; choose one with --text-field); record skipped" in res.stderr
    assert f"{p}:4: field 'text' is null, not a string" in res.stderr and f"{p}:5: not a JSON object" in res.stderr
    c = Manifest.load(tmp_path / "out").counts
    assert c["bad_records_skipped"] == 4 and c["documents"] == 2


def test_missing_field_and_parquet_column(tmp_path, tok):
    write_jsonl(tmp_path / "d.jsonl.gz", [{"content": "x"}])
    line = _error_line(run_cli(tmp_path / "d.jsonl.gz", "--out", tmp_path / "out", *tok))
    assert f"{tmp_path / 'd.jsonl.gz'}:1: no field 'text'" in line
    import pyarrow as pa
    import pyarrow.parquet as pq
    pq.write_table(pa.table({"body": ["a", None, "b"]}), tmp_path / "t.parquet")
    line = _error_line(run_cli(tmp_path / "t.parquet", "--out", tmp_path / "o2", *tok))
    assert "t.parquet: no column 'text' (columns: body" in line
    line = _error_line(run_cli(tmp_path / "t.parquet", "--out", tmp_path / "o3", *tok, "--text-field", "body"))
    assert "t.parquet:row 2: column 'body' is null" in line
    (tmp_path / "bad.parquet").write_bytes(b"PAR1 nonsense")
    assert "not a readable parquet file" in _error_line(run_cli(tmp_path / "bad.parquet", "--out", tmp_path / "o4",
                                                                *tok))


def test_option_errors_are_one_line(tmp_path, tiny_model, tok):
    (tmp_path / "a.txt").write_text("hello")
    assert "--seq-len" in _error_line(run_cli(tmp_path / "a.txt", "--out", tmp_path / "o", *tok, "--seq-len", "x"))
    assert "--tokenizer" in _error_line(run_cli(tmp_path / "a.txt", "--out", tmp_path / "o"))
    assert "not a SentencePiece model" in _error_line(
        run_cli(tmp_path / "a.txt", "--out", tmp_path / "o", "--tokenizer", tmp_path / "a.txt"))
    (tmp_path / "file").write_text("")
    assert "not a folder" in _error_line(run_cli(tmp_path / "a.txt", "--out", tmp_path / "file", *tok))
    assert "--val-fraction" in _error_line(run_cli(tmp_path / "a.txt", "--out", tmp_path / "o", "--tokenizer",
                                                   tiny_model, "--val-fraction", 2))


def test_help_and_module_entry_points():
    for cmd in ([sys.executable, str(SCRIPT), "--help"], [sys.executable, "-m", "data_prep.tokenize", "--help"]):
        res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
        assert res.returncode == 0 and "--train-tokenizer" in res.stdout and "--doc-per" in res.stdout


def test_script_does_not_shadow_stdlib_tokenize():
    """Run the script's guard the way `python data_prep/tokenize.py` starts (data_prep/ first on sys.path):
    afterwards `import tokenize` must be the standard library's."""
    code = ("import sys, runpy; sys.path.insert(0, sys.argv[1]); "
            "runpy.run_path(sys.argv[2], run_name='not_main'); "
            "import tokenize, traceback; assert hasattr(tokenize, 'open'), tokenize.__file__; "
            "print(tokenize.__file__)")
    res = subprocess.run([sys.executable, "-c", code, str(SCRIPT.parent), str(SCRIPT)], capture_output=True,
                         text=True, cwd="/")
    assert res.returncode == 0, res.stderr
    assert "data_prep" not in res.stdout


def test_train_tokenizer_cli(tmp_path):
    from tests.data_prep.conftest import corpus_records
    write_jsonl(tmp_path / "c.jsonl", corpus_records(3))
    model = tmp_path / "t.model"
    args = [tmp_path / "c.jsonl", "--train-tokenizer", model, "--vocab-size", 400, "--tokenizer-threads", 1]
    res = run_cli(*args)
    assert res.returncode == 0 and "trained" in res.stdout and model.exists()
    first = model.read_bytes()
    res = run_cli(*args, "--out", tmp_path / "out", "--seq-len", 128)
    assert res.returncode == 0 and "reusing it" in res.stderr and model.read_bytes() == first
    assert Manifest.load(tmp_path / "out").tokenizer["trained"]["vocab_size"] == 400
    assert "both" in _error_line(run_cli(*args, "--tokenizer", model))
