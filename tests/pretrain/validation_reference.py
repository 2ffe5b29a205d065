"""Validation metrics computed independently of pretrain/training/evaluate.py, for its tests: plain forward passes
of a whole (one-process) MoRModel over all the batches, the per-step fractions counted from the model's trace
(the tokens each recursion step actually kept or ran), never from its router statistics."""
from __future__ import annotations

from typing import Iterable

import torch

from model.loss import IGNORE_INDEX
from model.mor import MoRModel


@torch.no_grad()
def reference_metrics(model: MoRModel, batches: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> dict[str, float]:
    """val_loss, val_loss_causal (means over real labels) and, per recursion step r, val_r{r}_rule_continue /
    val_r{r}_sampling_acc (expert-choice, training routing: over the step's candidates) and val_r{r}_causal_kept
    (over every position)."""
    was_training = model.training
    model.eval()
    routing = model.cfg.routing
    loss = {"val_loss": [0.0, 0.0], "val_loss_causal": [0.0, 0.0]}
    counts: dict[str, list[float]] = {}

    def add(key: str, hits: torch.Tensor, n: int) -> None:
        c = counts.setdefault(key, [0.0, 0.0])
        c[0] += float(hits.sum())
        c[1] += n

    for tokens, labels in batches:
        b, t = tokens.shape
        real = float((labels != IGNORE_INDEX).sum())
        for key, causal in (("val_loss", False), ("val_loss_causal", True)):
            model.trace = []
            out = model(tokens, labels, causal_routing=causal)
            loss[key][0] += float(out.lm_loss) * real
            loss[key][1] += real
            trace, model.trace = model.trace, None
            for r, rec in enumerate(trace, 1):
                if routing == "token_choice":       # a token runs steps 1..depth
                    if causal:
                        add(f"val_r{r}_causal_kept", rec["depth"] >= r, b * t)
                elif causal:                        # expert-choice, inference rule: the tokens that ran
                    add(f"val_r{r}_causal_kept", rec["active"], b * t)
                else:                               # expert-choice, top-k over the step's candidates
                    cand = (torch.arange(t).expand(b, t) if r == 1 else trace[r - 2]["idx"])
                    # the inference rule on the same candidates; a step of capacity 1 keeps every candidate
                    goes_on = rec["logits"] >= 0
                    if model.cfg.capacities[r - 1] >= 1.0:
                        goes_on = torch.ones_like(goes_on)
                    chosen = torch.stack([torch.isin(c, i) for c, i in zip(cand, rec["idx"])])
                    add(f"val_r{r}_rule_continue", goes_on, cand.numel())
                    add(f"val_r{r}_sampling_acc", goes_on == chosen, cand.numel())
    model.train(was_training)
    return {k: s / n for k, (s, n) in {**loss, **counts}.items()}
