"""Fixtures for the data pipeline tests: a small slice of the sample corpus, a tiny SentencePiece model trained on
it once per session (no downloads), and helpers to run the CLI and read shards back."""
from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]
CORPUS = ROOT / "data_prep" / "corpus" / "sotu-1900-2021.jsonl.gz"
SCRIPT = ROOT / "data_prep" / "tokenize.py"


def corpus_records(n: int | None = None, start: int = 0) -> list[dict]:
    with gzip.open(CORPUS, "rt", encoding="utf-8") as f:
        recs = [json.loads(line) for line in f]
    return recs[start:] if n is None else recs[start:start + n]


def write_jsonl(path: Path, records: list[dict], gz: bool | None = None) -> Path:
    data = "".join(json.dumps(r) + "\n" for r in records).encode()
    if gz if gz is not None else path.name.endswith(".gz"):
        data = gzip.compress(data, mtime=0)
    path.write_bytes(data)
    return path


@pytest.fixture(scope="session")
def docs() -> list[str]:
    """Eight State of the Union addresses (~300k characters)."""
    return [r["text"] for r in corpus_records(8, start=40)]


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> str:
    """A 500-piece BPE model trained on a slice of the corpus, once per test session."""
    from data_prep import tokenizer as T
    path = tmp_path_factory.mktemp("tok") / "tiny.model"
    texts = [r["text"] for r in corpus_records(16)]
    T.train(texts, str(path), vocab_size=500, sentences=20000, seed=0, threads=2, log=lambda m: None)
    return str(path)


@pytest.fixture(scope="session")
def sp(tiny_model):
    import sentencepiece as spm
    return spm.SentencePieceProcessor(model_file=tiny_model)


@pytest.fixture
def jsonl_input(tmp_path, docs) -> Path:
    folder = tmp_path / "in"
    folder.mkdir()
    return write_jsonl(folder / "docs.jsonl.gz", [{"text": t, "id": i} for i, t in enumerate(docs)])


def run_cli(*args, env: dict | None = None, timeout: float = 120, **kw) -> subprocess.CompletedProcess:
    e = dict(os.environ)
    e.pop("DATA_PREP_KILL_AT", None)
    e.update(env or {})
    return subprocess.run([sys.executable, str(SCRIPT), *map(str, args), "--no-progress"], cwd=ROOT, env=e,
                          capture_output=True, text=True, timeout=timeout, **kw)


def shard_bytes(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(Path(out).glob("*.tar"))}


def read_samples(out: Path, split: str) -> list[np.ndarray]:
    """Samples of a split in order, read with webdataset (the manifest says which shards and the dtype)."""
    import webdataset as wds
    from data_prep.shards import Manifest
    m = Manifest.load(out)
    urls = [str(Path(out) / e["name"]) for e in m.splits[split]]
    if not urls:
        return []
    ds = wds.WebDataset(urls, shardshuffle=False, empty_check=False)
    return [np.frombuffer(s["tokens"], dtype=m.np_dtype) for s in ds]


def stream_of(out: Path, split: str) -> np.ndarray:
    """The split's token stream: samples overlap by one token; padding cut off by the manifest's token count."""
    from data_prep.shards import Manifest
    m = Manifest.load(out)
    samples = read_samples(out, split)
    if not samples:
        return np.empty(0, dtype=np.int64)
    assert all(len(s) == m.seq_len + 1 for s in samples)
    stream = np.concatenate([samples[0]] + [s[1:] for s in samples[1:]]).astype(np.int64)
    return stream[:m.counts[f"tokens_{split}"]]


def decode_docs(out: Path, split: str, sp) -> list[str]:
    stream = stream_of(out, split)
    ends = np.nonzero(stream == sp.eos_id())[0]
    assert len(ends) == 0 or ends[-1] == len(stream) - 1
    docs = np.split(stream, ends + 1)[:-1]
    return [sp.decode([int(t) for t in d if t not in (sp.eos_id(), sp.bos_id())]) for d in docs]
