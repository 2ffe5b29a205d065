"""One rank of a distributed test run (started by tests/distributed/harness.py, never by pytest itself).

Builds each variant under the case's layout, loads its shard of the reference weights, trains the reference's
steps on this rank's share of the data, and on global rank 0 saves losses, gradient norms, kept tokens, full final
weights and whether pipeline replicas stayed bit-identical.

Gradient norms are what the trainer logs (``norms``): the pipeline step's own norm with PP > 1, our
``clip_grad_norm`` measured before a ZeRO-0 engine steps, DeepSpeed's ``get_global_grad_norm()`` under ZeRO >= 1.
With ZeRO-0 DeepSpeed clips with a norm it never stores (``get_global_grad_norm()`` is None there), so that norm is
caught on its way out of DeepSpeed's ``clip_grad_norm_`` (``engine_norms``). Adam hardly notices a wrong clipping
scale, so a norm that counts a parameter twice shows only here, not in the losses or weights.
"""
from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path

import torch
import torch.distributed as dist

warnings.filterwarnings("ignore")


def gather(obj, group, size):
    out = [None] * size
    dist.all_gather_object(out, obj, group=group)
    return out


def catch_deepspeed_clip_norms() -> list[float]:
    """Record every norm DeepSpeed's ZeRO-0 engine clips with (it calls runtime.utils.clip_grad_norm_)."""
    import deepspeed.runtime.engine as ds_engine

    seen: list[float] = []
    clip = ds_engine.clip_grad_norm_

    def recording(*args, **kwargs):
        norm = clip(*args, **kwargs)
        seen.append(float(norm))
        return norm

    ds_engine.clip_grad_norm_ = recording
    return seen


def main(case_path: str) -> None:
    from megatron.core import parallel_state as ps

    from conf import build_dataclass
    from model.config import ModelConfig
    from model.init import init_weights
    from model.tp_shard import shard_state_dict, unshard_tensor
    from pretrain.parallel.layout import ParallelConfig, grad_accumulation_steps, init_distributed
    from pretrain.parallel.pipeline import build_stage, clip_grad_norm, pipeline_train_step, replica_layout, sync_replicas
    from pretrain.parallel.zero import build_engine, full_parameters, param_groups

    case = json.loads(Path(case_path).read_text())
    pcfg = ParallelConfig(**case["parallel"])
    cfgs = {v: build_dataclass(ModelConfig, c) for v, c in case["configs"].items()}
    layout = init_distributed(pcfg, next(iter(cfgs.values())))
    tp_rank, dp_rank = ps.get_tensor_model_parallel_rank(), ps.get_data_parallel_rank()
    tp_group, pp_group, dp_group = (ps.get_tensor_model_parallel_group(), ps.get_pipeline_model_parallel_group(),
                                    ps.get_data_parallel_group())
    gas = grad_accumulation_steps(pcfg, layout.dp)
    micro = pcfg.micro_batch_size
    ds_clip_norms = catch_deepspeed_clip_norms()

    def whole(local: dict) -> tuple[dict, bool]:
        """This rank's parameters as full tensors (TP shards joined, stages merged), and whether the pipeline's
        replicas of a parameter are identical. Collective."""
        tp_whole = {n: unshard_tensor(n, [s[n] for s in gather(local, tp_group, layout.tp)]) for n in local}
        merged, same = {}, True
        for st in gather(tp_whole, pp_group, layout.pp):
            for n, w in st.items():
                if n in merged:
                    same &= torch.equal(merged[n], w)
                else:
                    merged[n] = w
        return merged, same

    for variant in case["variants"]:
        cfg = cfgs[variant]
        ref = torch.load(Path(case["dir"]) / f"{variant}_ref.pt")
        model = build_stage(cfg, sequence_parallel=pcfg.sequence_parallel)
        # the layout-free initial weights (the engine draws them so): whole, to compare with one process's
        init_weights(model, cfg, pcfg.seed, tp_rank, layout.tp)
        initial, _ = whole({n: p.detach().clone() for n, p in model.named_parameters()})
        full = shard_state_dict(ref["state"], tp_rank, layout.tp)
        model.load_state_dict({k: full[k] for k in model.state_dict()}, strict=True)
        replicas = replica_layout(cfg) if layout.pp > 1 else []
        sync_replicas(model, replicas)
        opt = torch.optim.AdamW(param_groups(model, 0.1), lr=case["lr"], betas=(0.9, 0.95), eps=1e-8)
        engine = build_engine(model, opt, pcfg, layout, grad_clip=case["clip"])
        losses, kept, norms = [], [], []
        ds_clip_norms.clear()
        per_rank = micro * gas
        for step in range(case["steps"]):
            mine = ref["data"][step, dp_rank * per_rank:(dp_rank + 1) * per_rank]
            batches = [(mine[i * micro:(i + 1) * micro, :-1], mine[i * micro:(i + 1) * micro, 1:])
                       for i in range(gas)]
            model.trace = [] if step == 0 else None
            if layout.pp > 1:
                loss, norm = pipeline_train_step(engine, model, replicas, batches, max_grad_norm=case["clip"])
                norms.append(norm.item())
                total = loss.detach().clone()
                dist.all_reduce(total, group=pp_group)  # only the last stage holds the loss
            else:
                total = torch.zeros(())
                for i, (tokens, labels) in enumerate(batches):
                    out = engine(tokens, labels)
                    engine.backward(out.loss)
                    if i == gas - 1 and pcfg.zero_stage == 0:  # as the trainer measures it
                        norms.append(clip_grad_norm(model, [], 0.0).item())
                    engine.step()
                    total += out.loss.detach() / gas
                if pcfg.zero_stage > 0:
                    norms.append(float(engine.get_global_grad_norm()))
            if step == 0:
                kept = [t["idx"] if "idx" in t else t["depth"] for t in model.trace]
            dist.all_reduce(total, group=dp_group)
            losses.append(total.item() / layout.dp)
        model.trace = None
        # kept tokens: per micro-batch, in recursion order (stages in order, each holding a run of steps)
        per_stage = gather(kept, pp_group, layout.pp)
        per_micro = [sum((s[len(s) // gas * i:len(s) // gas * (i + 1)] for s in per_stage), []) for i in range(gas)]
        all_kept = [k for r in gather(per_micro, dp_group, layout.dp) for k in r]
        final, identical = whole(full_parameters(engine))
        if dist.get_rank() == 0:
            torch.save({"losses": losses, "norms": norms, "engine_norms": list(ds_clip_norms), "kept": all_kept,
                        "final": final, "replicas_identical": identical, "replicated": [r[0] for r in replicas],
                        "initial": initial},
                       Path(case["dir"]) / f"{variant}_result.pt")
        dist.barrier()


if __name__ == "__main__":
    main(sys.argv[1])
