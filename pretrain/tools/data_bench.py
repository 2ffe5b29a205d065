"""Throughput of ``pretrain.data.loader.TokenLoader`` from local disk.

    python -m pretrain.tools.data_bench [FOLDER] [--seq-len 2048] [--batch 16] [--workers 0] [--seconds 10]

Without FOLDER, writes synthetic shards (random uint16 tokens) to a temporary folder first. Reads the train split
unbounded and reports tokens/s (tokens = batch * seq_len per batch) after one warm-up batch.
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path


def make_shards(folder: Path, *, seq_len: int, shards: int, samples: int, seed: int = 0) -> None:
    import numpy as np

    from data_prep.shards import Manifest, shard_name, write_shard
    rng = np.random.default_rng(seed)
    m = Manifest(seq_len=seq_len, dtype="uint16", vocab_size=2**16, tokenizer={})
    for i in range(shards):
        rows = list(rng.integers(0, 2**16, size=(samples, seq_len + 1), dtype=np.uint16))
        m.splits["train"].append(write_shard(folder / shard_name("train", i), "train", i, rows))
    m.complete = True
    m.save(folder)


def bench(folder: Path, *, batch: int, workers: int, seconds: float, shuffle_buffer: int) -> float:
    from pretrain.data.loader import TokenLoader
    loader = TokenLoader(folder, "train", micro_batch_size=batch, num_workers=workers, shuffle_buffer=shuffle_buffer)
    it = iter(loader)
    next(it)
    tokens, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        x, _ = next(it)
        tokens += x.numel()
    rate = tokens / (time.perf_counter() - start)
    it.close()
    return rate


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m pretrain.tools.data_bench", description=__doc__.split("\n\n")[0])
    p.add_argument("folder", nargs="?", help="shard folder (default: synthetic shards in a temporary folder)")
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--workers", type=int, default=0)
    p.add_argument("--seconds", type=float, default=10.0)
    p.add_argument("--shuffle-buffer", type=int, default=8192)
    p.add_argument("--shards", type=int, default=8, help="synthetic shards (default 8)")
    p.add_argument("--samples", type=int, default=2048, help="samples per synthetic shard (default 2048)")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(args.folder) if args.folder else Path(tmp)
        if not args.folder:
            make_shards(folder, seq_len=args.seq_len, shards=args.shards, samples=args.samples)
        rate = bench(folder, batch=args.batch, workers=args.workers, seconds=args.seconds,
                     shuffle_buffer=args.shuffle_buffer)
    print(f"seq_len {args.seq_len}  batch {args.batch}  workers {args.workers}: {rate / 1e6:.2f}M tokens/s")


if __name__ == "__main__":
    main()
