"""Throughput of the data pipeline, printed as Markdown tables.

    python -m data_prep.bench [--tokenizer MODEL] [--inputs PATH ...] [--workers 1,2,4] [--repeat N]

1. Raw SentencePiece: ``SentencePieceProcessor.encode(text)`` on every document, one thread, in this process —
   the baseline; and, for each worker count N, the same in N processes at once (each a 1/N share of the
   documents), since N busy cores each run slower than one (shared caches, memory bandwidth, clock boost).
2. tokenize.py end to end (``data_prep.pack.run``: hashing the inputs, reading, encoding in N worker processes,
   packing, writing shards) on the same documents, for each worker count: tokens/s in all, per worker, and per
   worker against both raw baselines. The shards of every worker count are checked to be byte-identical.

The training loader's speed is not measured here (data_prep stays below the trainer): ``python -m
pretrain.tools.data_bench FOLDER`` reads a shard folder, e.g. the last one this bench wrote, kept with ``--keep``.

Without ``--tokenizer`` a BPE model (``--vocab-size``, default 8000) is first trained on the inputs.
``--repeat N`` repeats the inputs' documents N times (more text, steadier numbers).
"""
from __future__ import annotations

import argparse
import gzip
import json
import os
import platform
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from data_prep import pack, sources  # noqa: E402
from data_prep import tokenizer as T  # noqa: E402

CORPUS = ROOT / "data_prep" / "corpus"


def _ints(s: str) -> list[int]:
    return [int(x) for x in s.split(",") if x.strip()]


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m data_prep.bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokenizer", help="SentencePiece .model (default: train one on the inputs)")
    p.add_argument("--vocab-size", type=int, default=8000, help="for the model trained without --tokenizer")
    p.add_argument("--inputs", nargs="+", default=[str(CORPUS)], help="text inputs (default: the sample corpus)")
    p.add_argument("--repeat", type=int, default=1, help="repeat the documents N times (default 1)")
    p.add_argument("--workers", type=_ints, default=None,
                   help="worker counts to time, e.g. 1,2,4,8 (default: 1, 2, 4, ... up to all cores)")
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--shard-size-mb", type=float, default=128.0, help="shard size for the timed runs")
    p.add_argument("--keep", metavar="DIR", help="keep the work folder here instead of a temporary one")
    return p


def _default_workers() -> list[int]:
    n = pack.default_workers()
    out, w = [], 1
    while w < n:
        out.append(w)
        w *= 2
    return out + [n]


_TEXTS: list[str] = []


def _raw_share(job: tuple[str, int, int]) -> tuple[int, float]:
    import sentencepiece as spm
    model, j, n = job
    sp = spm.SentencePieceProcessor(model_file=model)
    t0 = time.perf_counter()
    tokens = sum(len(sp.encode(t)) for t in _TEXTS[j::n])
    return tokens, time.perf_counter() - t0


def raw_parallel(model: str, texts: list[str], n: int) -> float:
    """Raw encode tokens/s per process with ``n`` processes encoding at once (fork: the texts are inherited)."""
    import multiprocessing as mp
    _TEXTS[:] = texts
    with mp.get_context("fork").Pool(n) as pool:
        res = pool.map(_raw_share, [(model, j, n) for j in range(n)])
    return sum(t / s for t, s in res) / n


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    workers = args.workers or _default_workers()
    work = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="data_prep_bench_"))
    work.mkdir(parents=True, exist_ok=True)
    quiet = lambda m: None  # noqa: E731
    try:
        files = sources.find_inputs(args.inputs)
        reader = sources.Reader(drop_space=True)
        texts = [t for parts, _ in sources.iter_documents(files, reader) for t in parts]
        inputs = args.inputs
        if args.repeat > 1:
            path = work / "repeated.jsonl.gz"
            with gzip.open(path, "wt", encoding="utf-8", compresslevel=1) as f:
                for _ in range(args.repeat):
                    for t in texts:
                        f.write(json.dumps({"text": t}) + "\n")
            texts = texts * args.repeat
            inputs = [str(path)]
        model = args.tokenizer
        if model is None:
            model = str(work / "bench.model")
            t0 = time.perf_counter()
            T.train(iter(texts), model, vocab_size=args.vocab_size, threads=4, log=quiet, overwrite=True)
            print(f"trained a {args.vocab_size}-piece BPE model on the inputs in {time.perf_counter() - t0:.1f} s")
        sp, info, _ = T.load(model)
        n_bytes = sum(len(t.encode("utf-8")) for t in texts)

        # 1. raw SentencePiece
        t0 = time.perf_counter()
        n_tok = sum(len(sp.encode(t)) for t in texts)
        raw_s = time.perf_counter() - t0
        raw_tps = n_tok / raw_s
        print(f"\ntext: {len(texts):,} documents, {n_bytes / 1e6:.1f} MB, {n_tok:,} tokens; tokenizer "
              f"{os.path.basename(model)} ({info.vocab_size:,} pieces, sha256 {info.sha256[:12]}); "
              f"{platform.processor() or platform.machine()}, {pack.default_workers()} cores, "
              f"Python {platform.python_version()}\n")
        print("| what | encoding processes | seconds | tokens/s | tokens/s per process | MB/s per process "
              "| vs raw encode, 1 process | vs raw encode, N processes at once | main process CPU |")
        print("|---|---|---|---|---|---|---|---|---|")
        print(f"| raw `SentencePieceProcessor.encode` | 1 | {raw_s:.2f} | {raw_tps:,.0f} | {raw_tps:,.0f} | "
              f"{n_bytes / raw_s / 1e6:.2f} | 1.00 | 1.00 | |")

        # 2. the pipeline
        reference = None
        identical = True
        out = None
        for w in workers:
            out = work / f"shards-w{w}"
            opt = pack.Options(inputs=inputs, out=str(out), tokenizer=model, seq_len=args.seq_len,
                               shard_size_mb=args.shard_size_mb, workers=w, overwrite=True, progress=False,
                               log=quiet)
            cpu0 = resource.getrusage(resource.RUSAGE_SELF)
            t0 = time.perf_counter()
            pack.run(opt)
            sec = time.perf_counter() - t0
            cpu1 = resource.getrusage(resource.RUSAGE_SELF)
            main_cpu = cpu1.ru_utime - cpu0.ru_utime + cpu1.ru_stime - cpu0.ru_stime
            tps = n_tok / sec                       # the same text as the baseline (EOS tokens not counted)
            raw_n = raw_tps if w == 1 else raw_parallel(model, texts, w)
            print(f"| tokenize.py, {w} worker{'s' if w > 1 else ''} | {w} | {sec:.2f} | {tps:,.0f} | "
                  f"{tps / w:,.0f} | {n_bytes / sec / w / 1e6:.2f} | {tps / w / raw_tps:.2f} | "
                  f"{tps / w / raw_n:.2f} (raw {raw_n:,.0f}/process) | {main_cpu / sec:.0%} |", flush=True)
            shards = {p.name: p.read_bytes() for p in sorted(out.glob("*.tar"))}
            if reference is None:
                reference = shards
            elif shards != reference:
                identical = False
            if w != workers[-1]:
                shutil.rmtree(out)
        print(f"\nshards byte-identical for every worker count: {'yes' if identical else 'NO'}. 'main process CPU': "
              "CPU time of the main process (reading, packing, writing; with 1 worker also encoding) over wall "
              "time.")

        kept = f"{out}" if args.keep else "FOLDER (keep this bench's shards with --keep DIR)"
        print(f"\nthe training loader's speed over such shards: python -m pretrain.tools.data_bench {kept}")
        return 0 if identical else 1
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
