"""Validation under a parallel layout reports what one process reports: both losses (training and causal
routing) and every per-step fraction of the inference rule, on every rank alike.

The reference is computed here, in one process, by tests/pretrain/validation_reference.py (plain forward passes
of the whole model; fractions counted from the trace). The layout runs the trainer's own engine and validation in
2 gloo processes (tests/distributed/validation_worker.py) with the same weights and sequences. Under PP = 2 the
tiny middle-cycle model's first routing op (r1) runs on the first stage and the others on the second, so the
statistics of both stages must be put together; under TP = 2 the vocabulary-parallel loss sums in another order;
under DP = 2 two ranks' batches (4 + 1 sequences each) must be pooled by their tokens.

The same runs score few-shot requests (context, continuation) as the in-loop downstream evaluation does
(pretrain/training/downstream.py: the engine's causal forward pass, batches shared over data-parallel ranks), to
be compared with one process's KV-cache scorer (model/inference/score.py): log-likelihoods 1e-5, greedy flags and
token counts exactly.

Tolerances: losses 1e-5 relative (the layouts' summation orders; layouts agree with one process to ~1e-7 here);
fractions 1e-6 absolute, i.e. every token routed as in one process (one token moves a fraction by at least
1/(10·16)). Every rank's record is the same, exactly.
"""
from __future__ import annotations

import json
from dataclasses import asdict

import pytest
import torch

from model.inference.score import score
from model.loss import IGNORE_INDEX
from model.mor import MoRModel
from tests.distributed.harness import SEQ, VARIANTS, spawn_ranks
from tests.pretrain.validation_reference import reference_metrics

N_SEQ, MICRO, PAD = 10, 4, 5
LAYOUTS = {"pp2": {"pipeline_parallel": 2}, "tp2": {"tensor_parallel": 2}, "dp2": {}}


def _reference(tmp_path, variant: str) -> dict[str, float]:
    torch.manual_seed(0)
    model = MoRModel(VARIANTS[variant]())
    data = torch.randint(0, model.cfg.vocab_size, (N_SEQ, SEQ + 1))
    tokens, labels = data[:, :-1], data[:, 1:].clone()
    labels[-1, -PAD:] = IGNORE_INDEX          # the split's last sequence ends in padding
    # few-shot requests (context, continuation) of mixed lengths; the last is longer than the model's window
    g = torch.Generator().manual_seed(1)
    shapes = [(5, 1), (9, 3), (2, 4), (20, 2), (7, 1), (12, 5), (3, 3), (60, 10)]
    requests = [tuple(torch.randint(0, model.cfg.vocab_size, (n,), generator=g).tolist() for n in shape)
                for shape in shapes]
    torch.save({"state": model.state_dict(), "tokens": tokens, "labels": labels, "requests": requests},
               tmp_path / f"{variant}_val.pt")
    ref = reference_metrics(model, [(tokens, labels)])
    ref["scores"] = [[s.logprob, s.greedy, s.tokens] for s in score(model, requests, batch_size=2)]
    return ref


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_validation_under_a_layout_matches_one_process(tmp_path, layout):
    variants = ["mor_ec", "mor_tc"]
    refs = {v: _reference(tmp_path, v) for v in variants}
    case = {"parallel": {**LAYOUTS[layout], "micro_batch_size": MICRO, "zero_stage": 0}, "variants": variants,
            "configs": {v: asdict(VARIANTS[v]()) for v in variants}, "dir": str(tmp_path)}
    (tmp_path / "case.json").write_text(json.dumps(case))
    spawn_ranks(2, ["-m", "tests.distributed.validation_worker", str(tmp_path / "case.json")], tmp_path)
    for v in variants:
        ranks = json.loads((tmp_path / f"{v}_val_result.json").read_text())
        assert all(r == ranks[0] for r in ranks), f"{v}: ranks report different validation metrics"
        got, ref = ranks[0], refs[v]
        if v == "mor_ec":
            assert {f"val_r{r}_{n}" for r in (1, 2, 3) for n in ("rule_continue", "sampling_acc")} <= set(ref)
            assert abs(ref["val_loss_causal"] - ref["val_loss"]) > 1e-5   # two different numbers to match
        # the engine's causal forward pass scores as the one-process KV cache does (model/inference/score.py)
        for (lp, greedy, n), (want_lp, want_greedy, want_n) in zip(got.pop("scores"), ref.pop("scores"), strict=True):
            assert (greedy, n) == (want_greedy, want_n) and lp == pytest.approx(want_lp, rel=1e-5, abs=1e-5), v
        for key, want in ref.items():
            tol = dict(rel=1e-5) if key.startswith("val_loss") else dict(abs=1e-6)
            assert got[key] == pytest.approx(want, **tol), (v, key, got[key], want)
        assert set(got) == set(ref) | {"val_ppl", "val_ppl_causal"}
