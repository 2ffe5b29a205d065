"""Cross-check few-shot scores with EleutherAI's lm-evaluation-harness on the exported model.

    python -m pretrain.fewshot runs/demo --limit 100 --dump /tmp/demo-dump.jsonl
    python -m pretrain.export runs/demo /tmp/demo-hf
    python -m pretrain.tools.lmeval_check /tmp/demo-dump.jsonl /tmp/demo-hf

DUMP.jsonl holds one line per (item, choice) as ``python -m pretrain.fewshot --dump`` writes it (task, shots,
doc_id, choice, gold, context, continuation, logprob, greedy, context_tokens, continuation_tokens); HF_DIR is
``python -m pretrain.export`` of the same checkpoint. Every request's context and continuation *text* goes through
lm-eval's own Hugging Face model class (``lm_eval.models.huggingface.HFLM``, ``loglikelihood``) with its own
tokenisation rules — ``add_bos_token=True`` (the exported tokenizer's BOS: the piece that started every training
document), the trailing-space move, the window of max_length + 1 tokens, the prefix token for an empty context —
so nothing of this project's scoring or tokenisation is shared with what it is compared against.

Prints the number of requests, how many lm-eval tokenises into as many context and continuation tokens as the
dump counts (the context with the document-start token in front), the largest absolute and relative difference
of the log-likelihoods, how many greedy flags agree, and per task the accuracy each side gives (acc: the highest
log-likelihood; acc_per_char: the highest per character of the continuation; LAMBADA: greedy) with the number of
items whose pick differs. Needs lm-eval (the ``dev`` extra) and the ``hf`` extra.

Exit status: 0 every relative difference within --rtol and every pick the same; 1 otherwise; 2 a mistake (a
missing or malformed dump, a folder that is not an export), said in one line.
"""
from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

from conf.errors import ConfigError

KEYS = ("task", "shots", "doc_id", "choice", "gold", "context", "continuation", "logprob", "greedy",
        "context_tokens", "continuation_tokens")


@dataclass
class Report:
    """What ``compare`` found."""
    requests: int = 0             # compared
    skipped: int = 0              # continuations longer than max_length: lm-eval refuses them
    same_tokens: int = 0          # lm-eval's context and continuation tokens: as many as the dump's (its ids, where
                                  # the dump gives ids)
    max_abs: float = 0.0
    max_rel: float = 0.0
    worst: Optional[dict[str, Any]] = None      # the request of max_rel
    same_greedy: int = 0
    # task -> {"items", "acc": (dump, lm-eval), "acc_per_char": (dump, lm-eval), "differ": picks that differ}
    tasks: dict[str, dict[str, Any]] = field(default_factory=dict)


def read_dump(path: Path) -> list[dict[str, Any]]:
    """The dump's rows; ConfigError (one line) naming the line of the first malformed one."""
    if not path.is_file():
        raise ConfigError(f"DUMP {path}: no such file; write one with python -m pretrain.fewshot RUN --dump FILE")
    rows = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError:
                raise ConfigError(f"{path}:{n}: not a JSON object; give a dump of python -m pretrain.fewshot "
                                  "--dump") from None
            missing = [k for k in KEYS if not isinstance(row, dict) or k not in row]
            if missing:
                raise ConfigError(f"{path}:{n}: lacks {', '.join(missing)}; give a dump of python -m "
                                  "pretrain.fewshot --dump")
            rows.append(row)
    if not rows:
        raise ConfigError(f"{path}: no requests in it")
    return rows


def open_lm(hf_dir: Path, *, batch_size: int = 16, device: str = "cpu"):
    """lm-eval's HFLM on the export at ``hf_dir`` in fp32, BOS added as lm-eval adds it."""
    if not (hf_dir / "config.json").is_file() or not (hf_dir / "tokenizer_config.json").is_file():
        raise ConfigError(f"HF_DIR {hf_dir}: no config.json and tokenizer_config.json; give a folder written by "
                          "python -m pretrain.export")
    try:
        from lm_eval.models.huggingface import HFLM
    except ImportError:
        raise ConfigError("lm-eval is not installed; pip install -e '.[dev]' (lm-eval[hf]==0.4.13)") from None
    return HFLM(pretrained=str(hf_dir), backend="causal", trust_remote_code=True, device=device,
                dtype="float32", batch_size=batch_size, add_bos_token=True)


def compare(rows: Sequence[dict[str, Any]], lm) -> Report:
    """Score ``rows`` with lm-eval's ``lm`` (an HFLM) and compare with their own scores. A request whose
    continuation alone is longer than the model's max_length is left out (lm-eval refuses it; pretrain.fewshot
    scores the tokens its window holds), and with it its item's accuracy."""
    from lm_eval.api.instance import Instance
    rep = Report()
    encoded = []
    for r in rows:
        # the ids lm-eval scores, as its loglikelihood() makes them (an empty context: its prefix token)
        encoded.append(lm._encode_pair(r["context"], r["continuation"]) if r["context"]
                       else ([lm.prefix_token_id], lm.tok_encode(r["continuation"], add_special_tokens=False)))
    kept = [i for i, (_, cont) in enumerate(encoded) if len(cont) <= lm.max_length]
    rep.skipped = len(rows) - len(kept)
    requests = [Instance(request_type="loglikelihood", doc={},
                         arguments=(rows[i]["context"], rows[i]["continuation"]), idx=n) for n, i in enumerate(kept)]
    theirs = dict(zip(kept, ((float(lp), bool(g)) for lp, g in lm.loglikelihood(requests, disable_tqdm=True))))
    rep.requests = len(kept)
    for i in kept:
        r, (ctx, cont), (lp, greedy) = rows[i], encoded[i], theirs[i]
        rep.same_tokens += _same(ctx, r["context_tokens"]) and _same(cont, r["continuation_tokens"])
        diff = abs(lp - float(r["logprob"]))
        rel = diff / max(abs(float(r["logprob"])), 1e-30)
        rep.max_abs = max(rep.max_abs, diff)
        if rel >= rep.max_rel:
            rep.max_rel, rep.worst = rel, dict(r, lm_eval_logprob=lp)
        rep.same_greedy += greedy == bool(r["greedy"])
    items: dict[tuple, list[int]] = defaultdict(list)
    for i, r in enumerate(rows):
        items[(r["task"], r["shots"], r["doc_id"])].append(i)
    for (task, shots, _), members in items.items():
        if any(i not in theirs for i in members):
            continue
        t = rep.tasks.setdefault(f"{task} {shots}-shot", {"items": 0, "acc": [0, 0], "acc_per_char": [0, 0],
                                                          "differ": 0, "choices": 0})
        t["choices"] = max(t["choices"], len(members))
        t["items"] += 1
        members.sort(key=lambda i: rows[i]["choice"])
        gold, chars = rows[members[0]]["gold"], [max(1, len(rows[i]["continuation"])) for i in members]
        dumped = [(float(rows[i]["logprob"]), bool(rows[i]["greedy"])) for i in members]
        picks = []
        for n, score in enumerate((dumped, [theirs[i] for i in members])):   # 0: the dump, 1: lm-eval
            if len(score) == 1:   # LAMBADA: right when every target token is the greedy one
                acc = pc = score[0][1]
                picks.append((acc,))
            else:
                best = max(range(len(score)), key=lambda j: score[j][0])
                best_pc = max(range(len(score)), key=lambda j: score[j][0] / chars[j])
                acc, pc = best == gold, best_pc == gold
                picks.append((best, best_pc))
            t["acc"][n] += acc
            t["acc_per_char"][n] += pc
        t["differ"] += picks[0] != picks[1]
    return rep


def _same(ids: Sequence[int], dumped: Any) -> bool:
    """``ids`` match the dump's entry: a token count (what pretrain.fewshot --dump writes) or a list of ids."""
    return len(ids) == dumped if isinstance(dumped, int) else list(ids) == list(dumped)


def render(rep: Report, rtol: float) -> str:
    lines = [f"requests: {rep.requests}" + (f" ({rep.skipped} left out: a continuation longer than max_length, "
                                            "which lm-eval refuses)" if rep.skipped else ""),
             f"tokenised as the dump (context and continuation tokens): {rep.same_tokens} of {rep.requests}",
             f"loglikelihood: max abs difference {rep.max_abs:.3g}, max relative difference {rep.max_rel:.3g} "
             f"(tolerance {rtol:g})",
             f"greedy flags agree: {rep.same_greedy} of {rep.requests}"]
    if rep.worst is not None:
        w = rep.worst
        lines.append(f"largest relative difference: {w['task']} doc {w['doc_id']} choice {w['choice']}: dump "
                     f"{w['logprob']:.6f}, lm-eval {w['lm_eval_logprob']:.6f}")
    lines += ["", "| task | items | acc (dump / lm-eval) | acc_per_char (dump / lm-eval) | picks that differ |",
              "|---|---|---|---|---|"]
    for name, t in sorted(rep.tasks.items()):
        n = t["items"]
        per_char = (f"{t['acc_per_char'][0] / n:.4f} / {t['acc_per_char'][1] / n:.4f}" if t["choices"] > 1
                    else "—")   # LAMBADA: one continuation, accuracy from the greedy flag
        lines.append(f"| {name} | {n} | {t['acc'][0] / n:.4f} / {t['acc'][1] / n:.4f} | {per_char} | "
                     f"{t['differ']} |")
    return "\n".join(lines)


def agrees(rep: Report, rtol: float) -> bool:
    return rep.max_rel <= rtol and all(t["differ"] == 0 for t in rep.tasks.values())


def _parser() -> argparse.ArgumentParser:
    doc = __doc__.split("\n\n")
    p = argparse.ArgumentParser(prog="python -m pretrain.tools.lmeval_check", description=doc[0],
                                epilog="\n\n".join(doc[1:]), formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("dump", metavar="DUMP.jsonl", type=Path, help="python -m pretrain.fewshot --dump's file")
    p.add_argument("hf_dir", metavar="HF_DIR", type=Path, help="python -m pretrain.export's folder, same checkpoint")
    p.add_argument("--rtol", type=float, default=1e-4, help="largest relative difference that agrees (1e-4)")
    p.add_argument("--batch-size", type=int, default=16, metavar="B", help="lm-eval's batch size (16)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="where lm-eval runs the model (cpu)")
    return p


def main(argv: Optional[list[str]] = None) -> int:
    args = _parser().parse_args(argv)
    from conf import cli_errors
    with cli_errors():
        if args.batch_size < 1:
            raise ConfigError(f"--batch-size: must be >= 1, got {args.batch_size}")
        if not args.rtol >= 0:
            raise ConfigError(f"--rtol: must be >= 0, got {args.rtol}")
        rows = read_dump(args.dump)
        lm = open_lm(args.hf_dir, batch_size=args.batch_size, device=args.device)
    rep = compare(rows, lm)
    print(render(rep, args.rtol))
    ok = agrees(rep, args.rtol)
    print("agree" if ok else "DISAGREE")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
