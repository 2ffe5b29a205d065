"""The README demo, end to end on CPU: tokenize the sample corpus, train a small MoR, evaluate, sample, plot.

    python -m pretrain.tools.demo [MODEL] [--steps N] [--out runs]

1. ``data_prep/tokenize.py`` trains a 2048-piece SentencePiece model on data_prep/corpus/ and writes shards of
   128-token sequences to runs/demo/data (skipped when they already exist);
2. ``conf/run/demo_cpu.yaml`` trains for --steps steps (a rerun of a finished run only evaluates and reports);
   MODEL, a preset of conf/model/ (e.g. tiny_mor_tc) or a YAML path, replaces the run file's model, and the run
   then lives in runs/demo-MODEL, beside the default one in runs/demo; the data is shared;
3. prints the validation loss against the unigram entropy of the validation tokens (what a model that ignores
   context would reach), a greedy sample from the run's newest checkpoint (loaded as ``python -m
   pretrain.generate`` loads it), 0-shot accuracy on the first FEWSHOT_LIMIT items of each few-shot task (as
   ``python -m pretrain.fewshot --limit`` scores them), and the run's metrics summary; writes curves.png in the
   run folder.

It says first about how long it will take (from the last measurement on a 2-core CPU), and while training shows
the step, tokens/s and the time left: a tqdm bar on a terminal, a line every log_every steps otherwise.
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
# The last measurement on the 2-core CPU machine (2026-12-06): 600 steps of the default model trained at ~7,100
# tokens/s, in-loop evaluations included; tokenizing took a few seconds and the report after training about 20 s.
MEASURED_TOKENS_PER_S = 7100
TOKENIZE_S, REPORT_S = 5, 20


def duration(seconds: float) -> str:
    seconds = max(0, round(seconds))
    return f"{seconds} s" if seconds < 60 else f"{seconds // 60} min {seconds % 60:02d} s"


def estimate(steps_left: int, tokens_per_step: int, tokenize: bool) -> str:
    """How long the demo should take on the 2-core CPU it was measured on, rounded as an estimate deserves."""
    seconds = steps_left * tokens_per_step / MEASURED_TOKENS_PER_S + REPORT_S + (TOKENIZE_S if tokenize else 0)
    return f"{max(10, round(seconds, -1)):.0f} s" if seconds < 90 else f"{round(seconds / 30) / 2:g} min"


def trained_step(run_dir: Path) -> int:
    """The step of the run's newest completed checkpoint (0 without one)."""
    from pretrain.checkpoint.verify import list_checkpoints, step_of
    found = list_checkpoints(run_dir / "checkpoints")
    return step_of(found[-1]) if found else 0


def progress_lines(total: int, every: int):
    """A callback that, where the trainer shows no progress bar (stderr is no terminal: ``make demo | tee``, a
    log file), prints every ``every`` steps how far training is, its rate and about how long is left."""
    from pretrain.training.callbacks import Callback

    class ProgressLines(Callback):
        def __init__(self) -> None:
            self.start, self.first, self.tokens = None, 0, 0

        def step_end(self, trainer, rec: dict) -> None:
            if self.start is None:   # the first step's end: start-up and resume are behind us
                self.start, self.first, self.tokens = time.perf_counter(), trainer.step, trainer.tokens
                return
            if trainer.progress.bar is not None or trainer.step % every or trainer.step >= total:
                return   # the end of training needs no line of its own: the next one says [3/4]
            elapsed = time.perf_counter() - self.start
            done = trainer.step - self.first
            left = elapsed / done * (total - trainer.step)
            trainer.progress.say(f"      train {trainer.step}/{total} steps ({100 * trainer.step / total:.0f} %), "
                                 f"{(trainer.tokens - self.tokens) / elapsed:,.0f} tokens/s, "
                                 f"about {duration(left)} left")

    return ProgressLines()


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
    if hasattr(sys.stdout, "reconfigure"):   # into a pipe or file too (make demo | tee), each line as it comes
        sys.stdout.reconfigure(line_buffering=True)
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
        planned = load_config(run, overrides, schema=RunConfig)
    shared = args.out / base.name  # tokenizer and shards, the same whatever the model
    run_dir = args.out / planned.name
    steps, done = planned.train.steps, trained_step(run_dir)
    need_shards = not (shared / "data" / "manifest.json").exists()
    takes = estimate(max(0, steps - done), planned.parallel.micro_batch_size * base.model.max_seq_len, need_shards)
    if done >= steps:
        print(f"demo: {run_dir} is trained (step {done}): evaluating and reporting only, about {takes} on a "
              "2-core CPU")
    else:
        print(f"demo: about {takes} on a 2-core CPU ({steps - done} steps of "
              f"{planned.parallel.micro_batch_size} x {base.model.max_seq_len} tokens at the ~"
              f"{MEASURED_TOKENS_PER_S:,} tokens/s last measured there, then evaluation); longer on a busy machine")
    data = tokenize(shared, base.model.max_seq_len, base.model.vocab_size)
    sp = spm.SentencePieceProcessor(model_file=str(shared / "tokenizer.model"))
    overrides += [f"data.path={data}", f"model.vocab_size={sp.get_piece_size()}"]
    with cli_errors():
        cfg = load_config(run, overrides, schema=RunConfig)
    torch.manual_seed(0)
    with cli_errors():  # e.g. a preset whose max_seq_len is below the data's 128 tokens
        trainer = Trainer(cfg)
    counts = param_counts(cfg.model)
    if trainer.step >= cfg.train.steps:   # a rerun: the trainer resumed the finished run, and fit() returns at once
        print(f"[2/4] already trained: {run_dir} at step {trainer.step}")
    else:
        resumed = f", resuming at step {trainer.step}" if trainer.step else ""
        print(f"[2/4] training {cfg.model.name}: {counts['unique'] / 1e6:.2f}M unique parameters "
              f"({counts['unrolled'] / 1e6:.2f}M as unrolled), {cfg.train.steps} steps of "
              f"{cfg.parallel.micro_batch_size} x {trainer.seq_len} tokens{resumed}")
        trainer.callbacks.append(progress_lines(cfg.train.steps, cfg.train.log_every))
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
