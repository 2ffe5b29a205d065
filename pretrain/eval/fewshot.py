"""Few-shot accuracy of one model on the tasks of pretrain/eval/tasks.py.

Every choice of every item is scored as the loglikelihood of its continuation after its context
(model/inference/score.py: causal routing, the KV cache's prefill). Tokenization follows lm-eval: the context
(after the token that starts a document in the run's data) and context + continuation are encoded, and the
continuation's tokens are what the second adds; whitespace that ends the context moves to the continuation.

Metrics per task: ``acc`` — the choice with the highest loglikelihood is the gold one; ``acc_per_char`` — the
same after dividing each loglikelihood by its continuation's length in characters (the package's
"acc_per_char", lm-eval's acc_norm up to bytes vs characters); LAMBADA: ``acc`` — every token of the target word
is the model's greedy choice. ``primary`` is the metric the task's config names (acc for LAMBADA), and the
average over tasks is the mean of the primaries, as the paper averages its task accuracies.

``dump_records`` gives every scored request (one per item and choice) with its texts, token counts and score, for
comparing item by item with another harness (``python -m pretrain.fewshot --dump``).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Callable, Iterator, Optional, Sequence

from model.inference.score import Scored, score
from model.mor import MoRModel
from pretrain.eval.tasks import Task


@dataclass
class TaskResult:
    task: str
    shots: int
    items: int
    acc: float
    acc_per_char: Optional[float]   # None for LAMBADA (one continuation)
    primary: float
    primary_metric: str

    def as_dict(self) -> dict:
        return asdict(self)


def encode_pair(sp, context: str, continuation: str, doc_start: Optional[int]) -> tuple[list[int], list[int]]:
    """Token ids of (context, continuation) as lm-eval's HFLM splits them: whitespace that ends the context moves to
    the continuation, whose tokens are what encoding context + continuation adds to the context's (even where the
    two encodings disagree on the context's last tokens, as lm-eval does; an empty remainder, which lm-eval would
    score as nothing, falls back to the continuation encoded alone)."""
    trailing = len(context) - len(context.rstrip())
    if trailing:
        context, continuation = context[:-trailing], context[-trailing:] + continuation
    start = [doc_start] if doc_start is not None else []
    ctx = sp.encode(context)
    cont = sp.encode(context + continuation)[len(ctx):]
    return start + ctx, cont or sp.encode(continuation)


def encode_task(sp, task: Task, doc_start: Optional[int]) -> list[tuple[list[int], list[int]]]:
    """Every choice of every item of ``task`` as token ids (``encode_pair``), items in order, choices in order."""
    return [encode_pair(sp, c, k, doc_start) for item in task.items for c, k in item.pairs]


def task_result(task: Task, scored: Sequence[Scored]) -> TaskResult:
    """The task's metrics from the scores of ``encode_task``'s requests (same order)."""
    right = right_per_char = 0
    at = 0
    for item in task.items:
        n = len(item.pairs)
        mine, texts = scored[at:at + n], [k for _, k in item.pairs]
        at += n
        if n == 1:   # LAMBADA: the target word, greedily
            right += mine[0].greedy
            continue
        right += max(range(n), key=lambda j: mine[j].logprob) == item.gold
        right_per_char += max(range(n), key=lambda j: mine[j].logprob / max(1, len(texts[j]))) == item.gold
    if at != len(scored):
        raise ValueError(f"{task.name}: {len(scored)} scores for {at} requests")
    count = max(1, len(task.items))
    per_char = None if all(len(item.pairs) == 1 for item in task.items) else right_per_char / count
    use_per_char = task.primary_metric == "acc_per_char" and per_char is not None
    return TaskResult(task.name, task.shots, len(task.items), right / count, per_char,
                      per_char if use_per_char else right / count, "acc_per_char" if use_per_char else "acc")


@dataclass
class TaskScores:
    """One task's requests (``encode_task``'s order), their scores and the metrics computed from them."""
    task: Task
    requests: list[tuple[list[int], list[int]]]
    scored: list[Scored]
    result: TaskResult


def score_tasks(model: MoRModel, sp, doc_start: Optional[int], tasks: Sequence[Task], *, batch_size: int = 16,
                progress: Optional[Callable[[int], None]] = None) -> list[TaskScores]:
    """Each task's requests scored in one process (model/inference/score.py), and its metrics."""
    out = []
    for task in tasks:
        requests = encode_task(sp, task, doc_start)
        scored = score(model, requests, batch_size=batch_size, progress=progress)
        out.append(TaskScores(task, requests, scored, task_result(task, scored)))
    return out


def evaluate(model: MoRModel, sp, doc_start: Optional[int], tasks: Sequence[Task], *, batch_size: int = 16,
             progress: Optional[Callable[[int], None]] = None) -> list[TaskResult]:
    """Each task's metrics, its requests scored in one process (model/inference/score.py)."""
    return [s.result for s in score_tasks(model, sp, doc_start, tasks, batch_size=batch_size, progress=progress)]


def dump_records(scores: TaskScores) -> Iterator[dict]:
    """One record per (item, choice), in request order: the request's texts as the task file gives them, the
    item's gold choice, the score (``logprob``: the sum of the continuation tokens' log-probabilities;
    ``greedy``: every one of them the model's top choice) and the token counts as encoded — the context's with the
    document-start token in front. A request longer than the model's max_seq_len + 1 tokens is scored on its last
    max_seq_len + 1 (model/inference/score.py), as lm-eval cuts it; the counts are those before the cut."""
    task, at = scores.task, 0
    for item in task.items:
        for choice, (context, continuation) in enumerate(item.pairs):
            (ctx_ids, cont_ids), s = scores.requests[at], scores.scored[at]
            at += 1
            yield {"task": task.name, "shots": task.shots, "doc_id": item.doc_id, "choice": choice,
                   "gold": item.gold, "context": context, "continuation": continuation, "logprob": s.logprob,
                   "greedy": s.greedy, "context_tokens": len(ctx_ids), "continuation_tokens": len(cont_ids)}


def average(results: Sequence[TaskResult]) -> float:
    return sum(r.primary for r in results) / max(1, len(results))


def markdown(results: Sequence[TaskResult]) -> str:
    lines = ["| task | shots | items | acc | acc_per_char | primary |", "|---|---|---|---|---|---|"]
    for r in results:
        pc = "—" if r.acc_per_char is None else f"{r.acc_per_char:.4f}"
        lines.append(f"| {r.task} | {r.shots} | {r.items} | {r.acc:.4f} | {pc} | {r.primary:.4f} "
                     f"({r.primary_metric}) |")
    lines.append(f"| **average** | | | | | **{average(results):.4f}** |")
    return "\n".join(lines)
