"""One rank of a real training run whose checkpoint tests/pretrain/test_generate.py loads (started by that test
through tests/distributed/harness.spawn_ranks, never by pytest itself):

    python -m tests.pretrain.generate_worker OUT RUN_FILE key=value ...

Trains with pretrain's Trainer — the real engine, DeepSpeed and checkpoint code — then records what the trained
parallel model computes, without pretrain/checkpoint/consolidate.py: the logits of a fixed batch as the parallel
forward pass gives them (vocab-parallel logits gathered over the TP ranks; with PP > 1 the batch's loss, the only
output of the pipeline schedule), and every full weight and buffer (ZeRO-3 partitions gathered by DeepSpeed, TP
shards joined, pipeline stages united: the first stage's copy of a replica). Rank 0 saves them in
OUT/reference.pt.
"""
from __future__ import annotations

import sys
import warnings
from pathlib import Path

warnings.filterwarnings("ignore")

SEQ = 24   # tokens of the fixed batch (within the runs' max_seq_len)


def gather(obj, group, size: int) -> list:
    import torch.distributed as dist
    out = [None] * size
    dist.all_gather_object(out, obj, group=group)
    return out


def main(out: str, run: str, overrides: list[str]) -> None:
    import torch
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from conf import load_config
    from model.tp_shard import unshard_tensor
    from pretrain.config import RunConfig
    from pretrain.parallel.pipeline import pipeline_forward_only
    from pretrain.parallel.zero import full_parameters
    from pretrain.training.trainer import Trainer

    cfg = load_config(run, overrides, schema=RunConfig)
    trainer = Trainer(cfg, log=lambda *_: None)
    assert trainer.fit() == 0
    layout, model = trainer.layout, trainer.model
    tp_group, pp_group = ps.get_tensor_model_parallel_group(), ps.get_pipeline_model_parallel_group()
    batch = torch.randint(0, cfg.model.vocab_size, (2, SEQ + 1), generator=torch.Generator().manual_seed(1234))
    tokens, labels = batch[:, :-1], batch[:, 1:]
    ref: dict = {"tokens": tokens, "labels": labels}
    model.eval()
    with torch.no_grad():
        if layout.pp == 1:
            local = trainer.engine._ds(tokens).logits.float().contiguous()   # (B, T, V / TP)
            parts = [torch.empty_like(local) for _ in range(layout.tp)]
            dist.all_gather(parts, local, group=tp_group)
            ref["logits"] = torch.cat(parts, dim=-1)
        else:
            losses = pipeline_forward_only(model, [(tokens, labels)])       # the last stage has it
            loss = losses[0].float().reshape(()) if losses else torch.zeros(())
            dist.all_reduce(loss, group=pp_group)
            ref["lm_loss"] = loss
    mine = full_parameters(trainer.engine._ds)                              # gathered under ZeRO-3
    mine.update({n: b.detach().clone() for n, b in model.named_buffers()})
    tp_parts = gather(mine, tp_group, layout.tp)
    whole = {n: unshard_tensor(n, [p[n] for p in tp_parts]) for n in mine}
    weights: dict = {}
    for stage in gather(whole, pp_group, layout.pp):
        for n, w in stage.items():
            weights.setdefault(n, w)
    if dist.get_rank() == 0:
        torch.save({**ref, "weights": weights}, Path(out) / "reference.pt")
    dist.barrier()
    trainer.close()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3:])
