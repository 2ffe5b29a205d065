"""The README demo, end to end on CPU: tokenize the sample corpus, train a small MoR, evaluate, sample, plot.

    python -m pretrain.tools.demo [MODEL] [--steps N] [--out runs]

1. ``data_prep/tokenize.py`` trains a 2048-piece SentencePiece model on data_prep/corpus/ and writes shards of
   128-token sequences to runs/demo/data (skipped when they already exist);
2. ``conf/run/demo_cpu.yaml`` trains for --steps steps (a rerun resumes the finished run and just reports);
   MODEL, a preset of conf/model/ (e.g. tiny_mor_tc) or a YAML path, replaces the run file's model, and the run
   then lives in runs/demo-MODEL, beside the default one in runs/demo; the data is shared;
3. prints the validation loss against the unigram entropy of the validation tokens (what a model that ignores
   context would reach), a greedy sample from the run's newest checkpoint (loaded as ``python -m
   pretrain.generate`` loads it), 0-shot accuracy on the first FEWSHOT_LIMIT items of each few-shot task (as
   ``python -m pretrain.fewshot --limit`` scores them), and the run's metrics summary; writes curves.png in the
   run folder.
"""
from __future__ import annotations

import argparse
import math
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]  # the checkout: pretrain/tools/demo.py
CORPUS = ROOT / "data_prep" / "corpus"
PROMPT = "The state of our Union is"
FEWSHOT_LIMIT = 20   # items per task: ~15 s on 2 cores


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
    """Entropy (nats/token) of the validation labels' own unigram distribution; the padding that ends the split
    is no label (as in the validation loss)."""
    from data_prep.shards import Manifest, read_shard
    m = Manifest.load(folder)
    counts = np.zeros(m.vocab_size, dtype=np.int64)
    for entry, pad in zip(m.splits["val"], m.padding("val")):
        samples = read_shard(folder / entry["name"], m.np_dtype)
        for i, sample in enumerate(samples):
            labels = sample[1:len(sample) - pad] if i == len(samples) - 1 else sample[1:]
            counts += np.bincount(labels, minlength=m.vocab_size)
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pretrain.tools.demo", description=__doc__.split("\n\n")[0],
                                     epilog=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("model", nargs="?", default=None,
                        help="model preset (conf/model/NAME.yaml) or YAML path (default: the run file's model, "
                             "a 1.0M-parameter expert-choice MoR)")
    parser.add_argument("--steps", type=int, default=None, help="training steps (default: the run file's, 600)")
    parser.add_argument("--out", type=Path, default=Path("runs"), help="where the demo run lives (default runs/)")
    args = parser.parse_args(argv)
    if args.steps is not None and args.steps < 1:
        parser.error(f"--steps must be >= 1, got {args.steps}")
    start = time.perf_counter()
    import sentencepiece as spm
    import torch

    from conf import cli_errors, load_config, run_file
    from model.flops import param_counts
    from model.inference import Sampling
    from pretrain.config import RunConfig
    from pretrain.serve.generate import complete, open_generator
    from pretrain.tools.plot import plot
    from pretrain.train import run_name_override
    from pretrain.training.trainer import Trainer

    run = run_file("demo_cpu")
    base = load_config(run, [], schema=RunConfig)
    overrides = [f"out_dir={args.out}"] + ([f"model={args.model}"] if args.model else [])
    if args.steps:
        overrides.append(f"train.steps={args.steps}")
    with cli_errors():  # a misspelt preset stops here, before the tokenizer is trained
        # another model gets its own run folder, as in pretrain.train: resuming runs/demo would stop on the
        # config difference
        name = run_name_override(str(run), overrides)
        overrides += [name] if name else []
        load_config(run, overrides, schema=RunConfig)
    shared = args.out / base.name  # tokenizer and shards, the same whatever the model
    data = tokenize(shared, base.model.max_seq_len, base.model.vocab_size)
    sp = spm.SentencePieceProcessor(model_file=str(shared / "tokenizer.model"))
    overrides += [f"data.path={data}", f"model.vocab_size={sp.get_piece_size()}"]
    with cli_errors():
        cfg = load_config(run, overrides, schema=RunConfig)
    run_dir = args.out / cfg.name
    torch.manual_seed(0)
    with cli_errors():  # e.g. a preset whose max_seq_len is below the data's 128 tokens
        trainer = Trainer(cfg)
    counts = param_counts(cfg.model)
    print(f"[2/4] training {cfg.model.name}: {counts['unique'] / 1e6:.2f}M unique parameters "
          f"({counts['unrolled'] / 1e6:.2f}M as unrolled), {cfg.train.steps} steps of "
          f"{cfg.parallel.micro_batch_size} x {trainer.seq_len} tokens")
    code = trainer.fit()
    if code != 0:
        trainer.close()
        return code
    print("[3/4] evaluating")
    val = trainer.evaluate()
    entropy = unigram_entropy(data)
    print(f"      validation loss {val:.3f} nats/token (perplexity {math.exp(val):.1f}); "
          f"unigram entropy of the same tokens {entropy:.3f} — {abs(entropy - val):.3f} nats "
          f"{'below' if val <= entropy else 'above'} it")
    # from the checkpoint the run just saved, through the path `python -m pretrain.generate` takes
    with cli_errors():
        gen = open_generator(run_dir)
        text = complete(gen, [PROMPT], 40, Sampling(temperature=0.0))[0]
    print(f"      greedy sample: {PROMPT + text!r}")
    from pretrain.eval.fewshot import average, evaluate
    from pretrain.eval.tasks import NAMES, load_task
    with cli_errors():
        tasks = [load_task(name, 0, FEWSHOT_LIMIT) for name in NAMES]
    results = evaluate(gen.model, gen.sp, gen.doc_start, tasks)
    print(f"      0-shot, first {FEWSHOT_LIMIT} items per task (causal routing): "
          + ", ".join(f"{r.task} {r.primary:.2f}" for r in results) + f"; average {average(results):.2f}")
    print("[4/4] summary")
    from pretrain.tools.plot import load_records
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
