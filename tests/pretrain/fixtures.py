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
