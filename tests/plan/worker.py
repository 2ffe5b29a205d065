"""One rank of the planner's measured runs (started by tests/plan/test_measured.py through spawn_ranks, never by
pytest itself).

The case file lists runs, all of this world size: a model config and a layout each. For each run this rank
rebuilds megatron's groups for the layout, builds the real training engine (pretrain/parallel/engine.py) under
``count_traffic``, trains ``steps`` (at least 3) optimizer steps on random tokens and measures the peak tensor memory of each of
the last two. Rank 0 writes every rank's numbers to the case's result file: per step, payload bytes by kind/group, model
traffic and bookkeeping apart; start-up traffic; the live tensor bytes before the engine was built and the peak.
"""
from __future__ import annotations

import contextlib
import gc
import json
import sys
import warnings
from pathlib import Path

import torch
import torch.distributed as dist

warnings.filterwarnings("ignore")


def _named(totals: dict) -> dict[str, int]:
    return {f"{kind}/{group}": n for (kind, group), n in sorted(totals.items())}


def run_one(run: dict, world: int, rank: int) -> dict:
    from megatron.core import parallel_state as ps

    from conf import build_dataclass
    from model.config import ModelConfig
    from pretrain.config import RunConfig, TrainConfig
    from pretrain.parallel.engine import TrainEngine
    from pretrain.parallel.layout import Layout, ParallelConfig, check_layout, grad_accumulation_steps
    from pretrain.parallel.traffic import count_traffic, live_tensor_bytes, peak_tensor_memory

    model = build_dataclass(ModelConfig, run["model"])
    pcfg = ParallelConfig(**run["parallel"])
    dp = check_layout(pcfg, world, model)
    # a new layout in the same world: megatron's groups again (init_distributed builds them once per process)
    ps.destroy_model_parallel()
    ps.initialize_model_parallel(tensor_model_parallel_size=pcfg.tensor_parallel,
                                 pipeline_model_parallel_size=pcfg.pipeline_parallel)
    torch.manual_seed(pcfg.seed)
    layout = Layout(world, rank, rank, pcfg.tensor_parallel, pcfg.pipeline_parallel, dp, torch.device("cpu"))
    cfg = RunConfig(model=model, parallel=pcfg,
                    train=TrainConfig(precision="fp32", activation_checkpointing=run["checkpointing"]))
    gas = grad_accumulation_steps(pcfg, dp)
    b, t = pcfg.micro_batch_size, run["seq_len"]
    gen = torch.Generator().manual_seed(1000 + ps.get_data_parallel_rank())
    data = [torch.randint(0, model.vocab_size, (gas, b, t + 1), generator=gen) for _ in range(run["steps"])]
    micro = [[(d[i, :, :-1], d[i, :, 1:]) for i in range(gas)] for d in data]
    gc.collect()
    before = live_tensor_bytes()
    with count_traffic() as counter, contextlib.ExitStack() as profiled:
        engine = TrainEngine(cfg, layout, bf16=False)
        for i, batches in enumerate(micro):
            # the memory of the last two steps, each; the profiler runs from the step before them, so that it sees
            # the frees of what that step allocated (it reports none of memory allocated before it started)
            if i == len(micro) - 3:
                memory = profiled.enter_context(peak_tensor_memory())
            if i >= len(micro) - 2:
                memory.mark()
            with counter.step(i):
                engine.train_step(batches)
    out = {"steps": {i: _named(counter.totals(step=i)) for i in counter.steps()},
           "bookkeeping": {i: _named(counter.totals(step=i, bookkeeping=True)) for i in counter.steps()},
           "startup": _named(counter.totals(phase="startup")),
           "stage": ps.get_pipeline_model_parallel_rank(),
           "memory": {"before": before, "steps": memory.segments}}
    del engine
    gc.collect()
    return out


def main(case_path: str) -> None:
    from pretrain.parallel.layout import ParallelConfig, init_distributed

    case = json.loads(Path(case_path).read_text())
    layout = init_distributed(ParallelConfig(), None)
    results = []
    for run in case["runs"]:
        every = [None] * layout.world
        dist.all_gather_object(every, run_one(run, layout.world, layout.rank))
        results.append(every)
    if layout.rank == 0:
        Path(case["out"]).write_text(json.dumps(results))
    dist.barrier()


if __name__ == "__main__":
    main(sys.argv[1])
