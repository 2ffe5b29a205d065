"""One rank of tests/model/test_head.py's TP=2 case (started by the test, never by pytest itself).

Builds each variant twice under TP=2 with the same layout-free initial weights — the chunked head + loss, and
the plain path (megatron-core's vocab-parallel cross-entropy over whole logits) — and writes, on rank 0, the
largest differences of loss, gradient shards and per-token scores over both ranks, plus the loss itself (which
the test compares with one process's)."""
from __future__ import annotations

import dataclasses
import json
import sys
import warnings
from pathlib import Path

import torch
import torch.distributed as dist

warnings.filterwarnings("ignore")


def main(case_path: str) -> None:
    from megatron.core import parallel_state as ps

    from model.init import init_weights
    from model.mor import MoRModel
    from pretrain.parallel.layout import ParallelConfig, init_distributed
    from tests.model.test_head import VARIANTS, batch, rel

    case = json.loads(Path(case_path).read_text())
    init_distributed(ParallelConfig(tensor_parallel=2), device="cpu")
    tp_rank = ps.get_tensor_model_parallel_rank()
    result = {}
    for variant, make in VARIANTS.items():
        cfg = make()
        runs = []
        for chunk in (0, 7):
            c = dataclasses.replace(cfg, loss_chunk=chunk)
            model = MoRModel(c)
            with torch.no_grad():
                init_weights(model, c, seed=3, tp_rank=tp_rank, tp_size=2)
            tokens, labels, mask = batch(cfg)
            out = model(tokens, labels, mask)
            out.loss.backward()
            with torch.no_grad():
                scored = model(tokens, labels, per_token=True)
            runs.append((out.lm_loss.detach(), {n: p.grad for n, p in model.named_parameters()}, scored))
        (l0, g0, s0), (l1, g1, s1) = runs
        diffs = torch.tensor([float((l1 - l0).abs()), max(rel(g1[n], g0[n]) for n in g0),
                              float((s1.token_logprob - s0.token_logprob).abs().max()),
                              float(not torch.equal(s1.token_greedy, s0.token_greedy))])
        dist.all_reduce(diffs, op=dist.ReduceOp.MAX)
        result[variant] = {"loss": float(diffs[0]), "grad": float(diffs[1]), "logprob": float(diffs[2]),
                           "greedy": diffs[3] == 0, "value": float(l1)}
    if dist.get_rank() == 0:
        Path(case["out"]).write_text(json.dumps({k: {**v, "greedy": bool(v["greedy"])} for k, v in result.items()}))


if __name__ == "__main__":
    main(sys.argv[1])
