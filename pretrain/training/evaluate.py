"""Validation on the manifest's validation split, under both routings.

Expert-choice routing keeps the top-k tokens of the whole sequence at each recursion step ("training routing";
the paper's code evaluates with it too), so a token's path depends on later tokens. A deployed model routes
causally: each token continues iff its router (or auxiliary router) logit is ≥ 0, hierarchically
(MoRModel.forward ``causal_routing``). Validation runs the same batches both ways and reports both losses,
never one in place of the other:

    val_loss            training routing (top-k over the sequence) — what the paper's code reports
    val_loss_causal     inference routing (each token decides alone) — what a deployed model gets

and, per recursion step r (1-based), from the training-routing pass: the fraction of the step's candidates that
the inference rule would send on (``val_r{r}_rule_continue``) and how often it agrees with top-k
(``val_r{r}_sampling_acc``, the paper's "sampling accuracy"); from the causal pass: the fraction of all tokens
that run step r (``val_r{r}_causal_kept``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Iterable, Optional

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps

from model.routing import routing_class
from pretrain.parallel.engine import Batch, EvalSums, TrainEngine, merge_stat_sums


@dataclass
class StepStats:
    """One recursion step's routing on the validation batches (None: the routing has no such statistic)."""
    rule_continue: float | None   # training pass: fraction of the step's candidates the inference rule sends on
    sampling_acc: float | None    # training pass: agreement of the inference rule with top-k on those candidates
    causal_kept: float | None     # causal pass: fraction of all tokens that run this step


@dataclass
class ValidationMetrics:
    loss: float                   # training routing (expert-choice: top-k over the sequence; the paper's code)
    loss_causal: float            # inference routing: each token decides alone (what a deployed model gets)
    steps: list[StepStats] = field(default_factory=list)   # r = 1, 2, ...

    def record(self) -> dict[str, float]:
        """The metrics.jsonl / wandb names (README: "Validation: two routings")."""
        rec = {"val_loss": self.loss, "val_ppl": _ppl(self.loss),
               "val_loss_causal": self.loss_causal, "val_ppl_causal": _ppl(self.loss_causal)}
        for r, st in enumerate(self.steps, 1):
            for name, value in (("rule_continue", st.rule_continue), ("sampling_acc", st.sampling_acc),
                                ("causal_kept", st.causal_kept)):
                if value is not None:
                    rec[f"val_r{r}_{name}"] = value
        return rec

    def line(self, step: int) -> str:
        """The log line: both losses, each named by its routing, then per step what the inference rule does."""
        causal = self.loss_causal
        parts = [f"step {step:>6d}", f"val loss {self.loss:.4f} ppl {_ppl(self.loss):.2f} [training routing]",
                 f"val loss causal {causal:.4f} ppl {_ppl(causal):.2f} [causal routing, as deployed]"]
        labels = [(label, attr) for label, attr in (("rule on", "rule_continue"), ("sampling acc", "sampling_acc"),
                                                    ("causal kept", "causal_kept"))
                  if any(getattr(st, attr) is not None for st in self.steps)]
        if labels:
            values = ["/".join("-" if getattr(st, a) is None else f"{getattr(st, a):.3f}" for _, a in labels)
                      for st in self.steps]
            parts.append("/".join(label for label, _ in labels) + ": "
                         + "  ".join(f"r{r} {v}" for r, v in enumerate(values, 1)))
        return "  ".join(parts)


def _ppl(loss: float) -> float:
    return math.exp(min(loss, 50.0))


def _all_ranks(sums: EvalSums) -> tuple[float, dict[str, float]]:
    """One pass over every DP rank's batches: (mean loss per real token, router statistic -> pooled mean);
    identical on every rank (for the statistics every rank adds the same gathered list in rank order)."""
    total = sums.loss.clone()
    dist.all_reduce(total, group=ps.get_data_parallel_group())
    parts: list = [None] * ps.get_data_parallel_world_size()
    dist.all_gather_object(parts, sums.stats, group=ps.get_data_parallel_group())
    stats = {k: s / w for k, (s, w) in merge_stat_sums(parts).items() if w > 0}
    return (total[0] / total[1].clamp(min=1)).item(), stats


def _batches(engine: TrainEngine, loader: Iterable[Batch], max_batches: int) -> list:
    batches = []
    for i, (tokens, labels) in enumerate(loader):
        if i >= max_batches:
            break
        batches.append((tokens.to(engine.device), labels.to(engine.device)))
    return batches


def _sums(engine: TrainEngine, batches: list) -> tuple[EvalSums, Optional[EvalSums]]:
    """This rank's sums under training routing and under causal routing (None: a routing whose training pass is
    causal already — the class's causal_already: token-choice picks each token's depth from its own state; no
    router: every token runs every step — would repeat it exactly)."""
    train = engine.eval_sums(batches)
    causal = None if routing_class(engine.cfg.model).causal_already else engine.eval_sums(batches, causal_routing=True)
    return train, causal


def _metrics(engine: TrainEngine, train: EvalSums, causal: Optional[EvalSums]) -> ValidationMetrics:
    """Collective: every DP rank's sums pooled into the metrics (identical on every rank)."""
    loss, stats = _all_ranks(train)
    # without a causal pass both losses are the same number, and token-choice's causal kept fractions its
    # training pass's depth loads
    loss_causal, causal_stats = (loss, stats) if causal is None else _all_ranks(causal)
    steps = [StepStats(stats.get(f"r{r}/rule_continue_frac"), stats.get(f"r{r}/sampling_acc"),
                       causal_stats.get(f"r{r}/kept_frac"))
             for r in range(1, engine.cfg.model.num_recursions + 1)]
    if not any(v is not None for st in steps for v in vars(st).values()):
        steps = []   # no router (vanilla, recursive): nothing to report per step
    return ValidationMetrics(loss, loss_causal, steps)


def _add(parts: list[EvalSums]) -> EvalSums:
    return EvalSums(torch.stack([p.loss for p in parts]).sum(0), merge_stat_sums([p.stats for p in parts]))


@torch.no_grad()
def validate(engine: TrainEngine, loader: Iterable[Batch], max_batches: int) -> ValidationMetrics:
    """Both routings over the first ``max_batches`` micro-batches of each DP rank's share of the validation split
    (``loader``: this rank's TokenLoader over it), all DP ranks together; identical on every rank. Losses are the
    mean next-token loss (without router losses) per real token: batches weigh by their real tokens (padding
    labels count nowhere), so a short or padded last batch counts as much as it holds. Per-step fractions pool
    every position (or candidate) of every batch."""
    return _metrics(engine, *_sums(engine, _batches(engine, loader, max_batches)))


@torch.no_grad()
def validate_sources(engine: TrainEngine, loaders: dict[str, Iterable[Batch]], max_batches: int
                     ) -> tuple[ValidationMetrics, dict[str, ValidationMetrics]]:
    """A mixture's validation: each source's own validation split as ``validate`` reads one, and all of them
    pooled (every real token of every source's batches counts once: the sums add, nothing is run twice)."""
    sums = {name: _sums(engine, _batches(engine, loader, max_batches)) for name, loader in loaders.items()}
    per_source = {name: _metrics(engine, *s) for name, s in sums.items()}
    train = _add([t for t, _ in sums.values()])
    causal = None if any(c is None for _, c in sums.values()) else _add([c for _, c in sums.values()])
    return _metrics(engine, train, causal), per_source


def sources_record(per_source: dict[str, ValidationMetrics]) -> dict[str, float]:
    """metrics.jsonl / wandb names of each source's losses: val_loss/<source>, val_loss_causal/<source>."""
    out: dict[str, float] = {}
    for name, m in per_source.items():
        out[f"val_loss/{name}"], out[f"val_loss_causal/{name}"] = m.loss, m.loss_causal
    return out


def sources_line(step: int, per_source: dict[str, ValidationMetrics]) -> str:
    return f"step {step:>6d}  val loss by source [training / causal routing]: " + "  ".join(
        f"{name} {m.loss:.4f} / {m.loss_causal:.4f}" for name, m in per_source.items())
