"""Fixtures for the tests of several corpora, --dedup and select.py: small corpora made from the sample corpus,
a tiny SentencePiece model trained once per session, and the tokenize CLI run in this process (its exit status
and output) or as a command (see tests/data_prep/conftest.py for the helpers shared with those tests)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.data_prep.conftest import corpus_records


def texts(n: int, start: int = 0, chars: int = 1500) -> list[str]:
    """``n`` State of the Union addresses cut to about ``chars`` characters at a space (small, still real text)."""
    out = []
    for r in corpus_records(n, start=start):
        t = r["text"]
        out.append(t[:t.find(" ", chars)] if len(t) > chars else t)
    return out


def write_lines(path: Path, docs: list[str]) -> Path:
    """A .jsonl file, one {"text": ...} per line."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in docs), encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def mix_model(tmp_path_factory) -> str:
    """A 400-piece BPE model (byte fallback) trained once per session on a few addresses."""
    from data_prep import tokenizer as T
    path = tmp_path_factory.mktemp("mixtok") / "mix.model"
    T.train(texts(12, chars=20000), str(path), vocab_size=400, sentences=5000, seed=0, threads=1,
            log=lambda m: None)
    return str(path)


@pytest.fixture
def cli(capsys):
    """tokenize.py's main() in this process: (exit status, stdout, stderr)."""
    from data_prep.tokenize import main

    def run(*args) -> tuple[int, str, str]:
        capsys.readouterr()
        try:
            rc = main([str(a) for a in args] + ["--no-progress"])
        except SystemExit as e:                  # argparse's own errors
            rc = e.code
        out, err = capsys.readouterr()
        return rc, out, err
    return run
