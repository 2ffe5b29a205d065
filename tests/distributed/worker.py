"""One rank of a distributed test run (started by tests/distributed/harness.py, never by pytest itself).

Builds each variant under the case's layout, loads its shard of the reference weights, trains the reference's
steps on this rank's share of the data, and on global rank 0 saves losses, kept tokens and full final weights.
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
    from model.mor import MoRModel
    from model.tp_shard import shard_state_dict, unshard_tensor
    from pretrain.parallel import ParallelConfig, grad_accumulation_steps, init_distributed
    from pretrain.zero import build_engine, full_parameters, param_groups

    case = json.loads(Path(case_path).read_text())
    pcfg = ParallelConfig(**case["parallel"])
    cfgs = {v: build_dataclass(ModelConfig, c) for v, c in case["configs"].items()}
    layout = init_distributed(pcfg, next(iter(cfgs.values())))
    tp_rank, dp_rank = ps.get_tensor_model_parallel_rank(), ps.get_data_parallel_rank()
    gas = grad_accumulation_steps(pcfg, layout.dp)
    micro = pcfg.micro_batch_size
    for variant in case["variants"]:
        ref = torch.load(Path(case["dir"]) / f"{variant}_ref.pt")
        model = MoRModel(cfgs[variant])
        model.load_state_dict(shard_state_dict(ref["state"], tp_rank, layout.tp), strict=True)
        opt = torch.optim.AdamW(param_groups(model, 0.1), lr=case["lr"], betas=(0.9, 0.95), eps=1e-8)
        engine = build_engine(model, opt, pcfg, layout, grad_clip=case["clip"])
        losses, kept = [], []
        per_rank = micro * gas
        for step in range(case["steps"]):
            mine = ref["data"][step, dp_rank * per_rank:(dp_rank + 1) * per_rank]
            total = torch.zeros(())
            for i in range(gas):
                batch = mine[i * micro:(i + 1) * micro]
                model.trace = [] if step == 0 else None
                out = engine(batch[:, :-1], batch[:, 1:])
                if step == 0:
                    kept.append([t["idx"] if "idx" in t else t["depth"] for t in model.trace])
                engine.backward(out.loss)
                engine.step()
                total += out.loss.detach() / gas
            dist.all_reduce(total, group=ps.get_data_parallel_group())
            losses.append(total.item() / layout.dp)
        model.trace = None
        all_kept = [None] * layout.dp
        dist.all_gather_object(all_kept, kept, group=ps.get_data_parallel_group())
        local = full_parameters(engine)
        shards = [None] * layout.tp
        dist.all_gather_object(shards, local, group=ps.get_tensor_model_parallel_group())
        if dist.get_rank() == 0:
            final = {n: unshard_tensor(n, [s[n] for s in shards]) for n in local}
            torch.save({"losses": losses, "kept": [k for r in all_kept for k in r], "final": final},
                       Path(case["dir"]) / f"{variant}_result.pt")
        dist.barrier()


if __name__ == "__main__":
    main(sys.argv[1])
