"""Synthetic token shards for trainer tests: a learnable pattern, written in the real shard format."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from data_prep.shards import Manifest, shard_name, write_shard


def make_shards(folder: Path, *, vocab: int = 128, seq_len: int = 32, train: int = 64, val: int = 16,
                per_shard: int = 16, seed: int = 0) -> Path:
    """Sequences of a noisy counting pattern (next = current + 1 mod vocab, 10 % random), so loss can fall."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    manifest = Manifest(seq_len=seq_len, dtype="uint16", vocab_size=vocab,
                        tokenizer={"path": "synthetic", "sha256": "synthetic", "bos_id": -1, "eos_id": 0,
                                   "pad_id": -1, "unk_id": -1})
    for split, n in (("train", train), ("val", val)):
        seqs = []
        for _ in range(n):
            start = rng.integers(0, vocab)
            s = (start + np.arange(seq_len + 1)) % vocab
            noise = rng.random(seq_len + 1) < 0.1
            s[noise] = rng.integers(0, vocab, noise.sum())
            seqs.append(s.astype("<u2"))
        for i in range(0, n, per_shard):
            entry = write_shard(folder / shard_name(split, i // per_shard), split, i // per_shard,
                                seqs[i:i + per_shard])
            manifest.splits[split].append(entry)
    manifest.complete = True
    manifest.save(folder)
    return folder



def train_tokenizer(prefix: Path, vocab: int) -> Path:
    """A small SentencePiece model (BPE, ``vocab`` pieces, byte fallback) trained on the first sentences of the
    shipped corpus, written to ``prefix``.model; returns that path."""
    import gzip
    import json

    import sentencepiece as spm
    corpus = Path(__file__).resolve().parents[2] / "data_prep" / "corpus" / "sotu-1900-2021.jsonl.gz"
    with gzip.open(corpus, "rt", encoding="utf-8") as f:
        docs = [json.loads(line)["text"] for _, line in zip(range(5), f)]
    lines = [s for d in docs for s in d.split(". ") if s.strip()][:2000]   # sentences: SentencePiece skips long lines
    spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_prefix=str(prefix), vocab_size=vocab,
                                   model_type="bpe", minloglevel=2, byte_fallback=True)
    return prefix.with_suffix(".model")


def with_tokenizer(folder: Path, vocab: int) -> Path:
    """Give the shards at ``folder`` a real SentencePiece model (``train_tokenizer``, written beside the folder as
    tok.model) in their manifest, for tests that need text: few-shot tasks, export. The shards' token ids stay the
    synthetic pattern."""
    import hashlib
    model = train_tokenizer(folder.parent / "tok", vocab)
    manifest = Manifest.load(folder)
    manifest.tokenizer.update(path=str(model), sha256=hashlib.sha256(model.read_bytes()).hexdigest(),
                              bos_id=1, eos_id=2)
    manifest.save(folder)
    return folder
