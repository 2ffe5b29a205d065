"""The README demo, end to end on CPU: tokenize the sample corpus, train a small MoR, evaluate, sample, plot.

    python -m pretrain.demo [--steps N] [--out runs]

1. ``data_prep/tokenize.py`` trains a 2048-piece SentencePiece model on data_prep/corpus/ and writes shards
   (skipped when they already exist);
2. ``conf/run/demo_cpu.yaml`` trains for --steps steps (a rerun resumes the finished run and just reports);
3. prints the validation loss against the unigram entropy of the validation tokens (what a model that ignores
   context would reach), a greedy sample, and the run's metrics summary; writes runs/demo/curves.png.
"""
from __future__ import annotations

import argparse
import math
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
CORPUS = ROOT / "data_prep" / "corpus"
PROMPT = "The state of our Union is"


def tokenize(out: Path, seq_len: int, vocab: int) -> Path:
    data = out / "data"
    if (data / "manifest.json").exists() and '"complete": true' in (data / "manifest.json").read_text():
        print(f"[1/4] shards already in {data}")
        return data
    print(f"[1/4] tokenizing {CORPUS.relative_to(ROOT)} -> {data}")
    cmd = [sys.executable, str(ROOT / "data_prep" / "tokenize.py"), str(CORPUS), "--out", str(data),
           "--train-tokenizer", str(out / "tokenizer.model"), "--vocab-size", str(vocab), "--seq-len", str(seq_len),
           "--val-fraction", "0.05", "--samples-per-shard", "256"]
    subprocess.run(cmd, check=True)
    return data


def unigram_entropy(folder: Path) -> float:
    """Entropy (nats/token) of the validation tokens' own unigram distribution."""
    from data_prep.shards import Manifest, read_shard
    m = Manifest.load(folder)
    counts = np.zeros(m.vocab_size, dtype=np.int64)
    for entry in m.splits["val"]:
        for sample in read_shard(folder / entry["name"], m.np_dtype):
            counts += np.bincount(sample[1:], minlength=m.vocab_size)
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pretrain.demo", description=__doc__.split("\n\n")[0],
                                     epilog=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--steps", type=int, default=None, help="training steps (default: the run file's, 600)")
    parser.add_argument("--out", type=Path, default=Path("runs"), help="where the demo run lives (default runs/)")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    import sentencepiece as spm
    import torch

    from conf import cli_errors, load_config
    from conf.loader import CONF_DIR
    from model.flops import param_counts
    from model.generate import greedy
    from pretrain.config import RunConfig
    from pretrain.plot import plot
    from pretrain.trainer import Trainer

    base = load_config(CONF_DIR / "run" / "demo_cpu.yaml", [], schema=RunConfig)
    run_dir = args.out / base.name
    data = tokenize(run_dir, base.model.max_seq_len, base.model.vocab_size)
    sp = spm.SentencePieceProcessor(model_file=str(run_dir / "tokenizer.model"))
    overrides = [f"data.path={data}", f"out_dir={args.out}", f"model.vocab_size={sp.get_piece_size()}"]
    if args.steps:
        overrides.append(f"train.steps={args.steps}")
    with cli_errors():
        cfg = load_config(CONF_DIR / "run" / "demo_cpu.yaml", overrides, schema=RunConfig)
    counts = param_counts(cfg.model)
    print(f"[2/4] training {cfg.model.name}: {counts['unique'] / 1e6:.2f}M unique parameters "
          f"({counts['unrolled'] / 1e6:.2f}M as unrolled), {cfg.train.steps} steps of "
          f"{cfg.parallel.micro_batch_size} x {cfg.model.max_seq_len} tokens")
    torch.manual_seed(0)
    trainer = Trainer(cfg)
    code = trainer.fit()
    if code != 0:
        trainer.close()
        return code
    print("[3/4] evaluating")
    val = trainer.evaluate()
    entropy = unigram_entropy(data)
    print(f"      validation loss {val:.3f} nats/token (perplexity {math.exp(val):.1f}); "
          f"unigram entropy of the same tokens {entropy:.3f} — {entropy - val:.3f} nats below it")
    ids = greedy(trainer.model, sp.encode(PROMPT), 40, eos_id=sp.eos_id())
    print(f"      greedy sample: {sp.decode(ids)!r}")
    print("[4/4] summary")
    from pretrain.plot import load_records
    recs = [r for r in load_records(run_dir / "metrics.jsonl") if "loss" in r and "event" not in r]
    if recs:
        last = recs[-1]
        speed = sum(r["tokens_per_s"] for r in recs) / len(recs)
        print(f"      steps {last['step']}, tokens {last['tokens']:,}, final train loss {last['loss']:.3f}, "
              f"mean {speed:,.0f} tokens/s")
    print(f"      curves: {plot(run_dir, run_dir / 'curves.png')}   metrics: {run_dir / 'metrics.jsonl'}")
    print(f"      done in {time.perf_counter() - start:.0f} s")
    trainer.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
