"""Downstream evaluation in the training loop: few-shot accuracy on a fixed subset, on any parallel layout.

Every ``eval.downstream_every`` steps the model scores the first ``eval.downstream_limit`` items of each task in
``eval.downstream_tasks`` (pretrain/eval/tasks.py: the registry package's requests) with causal routing, as
``python -m pretrain.fewshot`` does after training: the same requests, tokenized the same way, the same metrics
(pretrain/eval/fewshot.py). Only the forward pass differs: here it is the training engine's own, under TP × PP ×
DP and ZeRO (TrainEngine.token_scores), where the command uses one process and a KV cache; both are causal, so the
numbers agree (tests/distributed/test_validation_layouts.py checks every layout against one process).

Requests are sorted by length and cut into batches of ``eval.downstream_batch_size`` rows, padded to a multiple of
8 tokens (and of TP, for sequence parallelism); batch i runs on data-parallel rank i mod DP, and every rank runs
as many forward passes as the others (an empty batch fills in), because ZeRO-3 gathers weights collectively. The
scores are then gathered on every rank, so every rank computes the same record:

    downstream_avg             the mean over tasks of each task's primary metric (the paper's average)
    downstream_<task>          the task's primary metric (acc, or acc_per_char where its config names it)
    downstream_<task>_acc      its raw accuracy
    downstream_items           items per task (the limit, or fewer where a task has fewer)
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps

from model.inference.score import Scored, window
from model.loss import IGNORE_INDEX
from pretrain.config import EvalConfig
from pretrain.eval.fewshot import TaskResult, average, encode_task, task_result
from pretrain.eval.tasks import Task, load_task

Request = tuple[Sequence[int], Sequence[int]]   # (context ids, continuation ids)


class DownstreamEval:
    """The tasks of ``cfg``, read and tokenized once (at start-up: a missing package or an unknown task stops the
    run before its first step, not hours into it)."""

    def __init__(self, cfg: EvalConfig, tokenizer: Path, bos: bool):
        from sentencepiece import SentencePieceProcessor
        sp = SentencePieceProcessor(model_file=str(tokenizer))
        eos, bos_id = sp.eos_id(), sp.bos_id()
        # the token that starts a document in the run's data (BOS when its documents begin with one, else the EOS
        # that ended the previous document), as pretrain.generate and pretrain.fewshot prefix every context
        doc_start = bos_id if bos and bos_id >= 0 else (eos if eos >= 0 else None)
        self.cfg = cfg
        self.tasks: list[Task] = [load_task(name, cfg.downstream_shots, cfg.downstream_limit)
                                  for name in cfg.downstream_tasks]
        self.requests = [encode_task(sp, task, doc_start) for task in self.tasks]

    def run(self, engine) -> tuple[list[TaskResult], dict[str, float]]:
        """Collective over every rank: the tasks' results and the metrics record (identical on every rank)."""
        flat = [r for reqs in self.requests for r in reqs]
        scored = score_requests(engine, flat, self.cfg.downstream_batch_size)
        results, at = [], 0
        for task, reqs in zip(self.tasks, self.requests):
            results.append(task_result(task, scored[at:at + len(reqs)]))
            at += len(reqs)
        return results, record(results)


def record(results: Sequence[TaskResult]) -> dict[str, float]:
    rec: dict[str, float] = {"downstream_avg": average(results)}
    for r in results:
        rec[f"downstream_{r.task}"] = r.primary
        rec[f"downstream_{r.task}_acc"] = r.acc
    rec["downstream_items"] = max((r.items for r in results), default=0)
    return rec


def line(step: int, results: Sequence[TaskResult]) -> str:
    tasks = "  ".join(f"{r.task} {r.primary:.3f}" for r in results)
    return (f"step {step:>6d}  downstream avg {average(results):.4f} ({results[0].shots}-shot, "
            f"{max(r.items for r in results)} items/task, causal routing)  {tasks}")


def _batches(requests: Sequence[Request], max_seq_len: int, batch_size: int, multiple: int
             ) -> list[tuple[list[int], torch.Tensor, torch.Tensor]]:
    """(request indices, tokens, labels) per batch: labels are the continuation's tokens, IGNORE_INDEX elsewhere."""
    seqs = [window(c, k, max_seq_len, i) for i, (c, k) in enumerate(requests)]
    order = sorted(range(len(seqs)), key=lambda i: -len(seqs[i][0]))
    out = []
    for start in range(0, len(order), batch_size):
        rows = order[start:start + batch_size]
        longest = max(len(seqs[i][0]) - 1 for i in rows)
        t = min(max_seq_len, multiple * math.ceil(longest / multiple))
        tokens = torch.zeros(len(rows), t, dtype=torch.long)
        labels = torch.full((len(rows), t), IGNORE_INDEX, dtype=torch.long)
        for row, i in enumerate(rows):
            ids, n = seqs[i]
            tokens[row, :len(ids) - 1] = torch.tensor(ids[:-1])
            labels[row, len(ids) - 1 - n:len(ids) - 1] = torch.tensor(ids[-n:])
        out.append((rows, tokens, labels))
    return out


def score_requests(engine, requests: Sequence[Request], batch_size: int,
                   progress: Optional[Callable[[int], None]] = None) -> list[Scored]:
    """Collective: the scores of ``requests`` (each rank passes the same list) through the engine's causal forward
    pass, data-parallel ranks sharing the batches; the full list on every rank."""
    dp, dp_rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
    multiple = math.lcm(8, ps.get_tensor_model_parallel_world_size())
    batches = _batches(requests, engine.model.cfg.max_seq_len, batch_size, multiple)
    mine = batches[dp_rank::dp]
    rounds = math.ceil(len(batches) / dp)
    device = engine.device
    # an empty batch (no label counts) for a rank with one batch fewer than the others
    filler = (torch.zeros(1, multiple, dtype=torch.long), torch.full((1, multiple), IGNORE_INDEX, dtype=torch.long))
    inputs = [(t, y) for _, t, y in mine] + [filler] * (rounds - len(mine))
    scores = engine.token_scores([(t.to(device), y.to(device)) for t, y in inputs])
    found: dict[int, tuple[float, bool, int]] = {}
    for (rows, _, labels), (logprob, greedy) in zip(mine, scores):
        counted = labels != IGNORE_INDEX
        for row, i in enumerate(rows):
            mask = counted[row].to(logprob.device)
            found[i] = (float(logprob[row][mask].sum()), bool(greedy[row][mask].all()), int(mask.sum()))
        if progress is not None:
            progress(len(rows))
    parts: list = [None] * dp
    dist.all_gather_object(parts, found, group=ps.get_data_parallel_group())
    merged = {i: v for part in parts for i, v in part.items()}
    return [Scored(*merged[i]) for i in range(len(requests))]
