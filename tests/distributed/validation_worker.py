"""One rank of a distributed validation check (started by tests/distributed/test_validation_layouts.py through
harness.spawn_ranks, never by pytest itself).

For each variant: the run's engine under the case's layout (pretrain/parallel/engine.py), the reference weights
loaded into this rank's shard, validation (pretrain/training/evaluate.py) over this data-parallel rank's share of
the reference sequences; then the scores of the reference's few-shot requests through the engine
(pretrain/training/downstream.py). Global rank 0 saves every rank's record, so the test can compare them with the
one-process reference and with each other.
"""
from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path

import torch
import torch.distributed as dist

warnings.filterwarnings("ignore")


def main(case_path: str) -> None:
    from megatron.core import parallel_state as ps

    from conf import build_dataclass
    from model.config import ModelConfig
    from model.tp_shard import shard_state_dict
    from pretrain.config import RunConfig
    from pretrain.parallel.engine import TrainEngine
    from pretrain.parallel.layout import ParallelConfig, init_distributed
    from pretrain.training.downstream import score_requests
    from pretrain.training.evaluate import validate

    case = json.loads(Path(case_path).read_text())
    pcfg = ParallelConfig(**case["parallel"])
    cfgs = {v: build_dataclass(ModelConfig, c) for v, c in case["configs"].items()}
    layout = init_distributed(pcfg, next(iter(cfgs.values())))
    tp_rank, dp_rank = ps.get_tensor_model_parallel_rank(), ps.get_data_parallel_rank()
    micro = pcfg.micro_batch_size
    for variant in case["variants"]:
        ref = torch.load(Path(case["dir"]) / f"{variant}_val.pt")
        run = RunConfig(model=cfgs[variant], parallel=pcfg)
        run.train.precision = "fp32"
        engine = TrainEngine(run, layout, bf16=False)
        full = shard_state_dict(ref["state"], tp_rank, layout.tp)
        engine.model.load_state_dict({k: full[k] for k in engine.model.state_dict()}, strict=True)
        # this DP rank's share of the sequences (which ones does not matter: every metric pools real tokens or
        # positions over all ranks); its last batch may be short
        tokens, labels = (x.tensor_split(layout.dp)[dp_rank] for x in (ref["tokens"], ref["labels"]))
        batches = [(tokens[i:i + micro], labels[i:i + micro]) for i in range(0, len(tokens), micro)]
        record = validate(engine, batches, max_batches=len(batches)).record()
        # few-shot scoring as the in-loop downstream evaluation does it: requests of mixed lengths, batches of 3
        # shared over the data-parallel ranks (one rank gets one batch fewer and runs a filler)
        scored = score_requests(engine, [tuple(r) for r in ref["requests"]], batch_size=3)
        record["scores"] = [[s.logprob, s.greedy, s.tokens] for s in scored]
        everyone = [None] * layout.world
        dist.all_gather_object(everyone, record)
        if dist.get_rank() == 0:
            (Path(case["dir"]) / f"{variant}_val_result.json").write_text(json.dumps(everyone))
        dist.barrier()


if __name__ == "__main__":
    main(sys.argv[1])
