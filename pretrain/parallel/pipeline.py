"""Pipeline parallelism over a weight-shared model, on megatron-core's 1F1B schedule.

Each stage runs a contiguous slice of the model's op program (model/program.py). A shared layer whose uses fall
on several stages is *replicated* there, like Megatron's tied input/output embedding on the first and last
stage: replicas start equal (``sync_replicas``), their gradients are summed across the stages holding them after
every backward (``reduce_replica_grads``), so every optimizer step keeps them bit-identical. The gradient norm
for clipping counts every parameter once across TP, PP and replicas (``clip_grad_norm``).

DeepSpeed does not run megatron's schedule, so with PP > 1 the step is: schedule (forward + backward over the
micro-batches) → sum replica grads → average over data-parallel ranks → clip → ``engine.step()`` (ZeRO ≤ 1).
"""
from __future__ import annotations

import warnings
from functools import partial
from typing import Iterator, Optional, Sequence

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps
from megatron.core.enums import ModelType
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.transformer import TransformerConfig

from model.config import ModelConfig
from model.layers import make_parallel_config
from model.mor import MoRModel
from model.program import packed_rows


def build_stage(cfg: ModelConfig, *, sequence_parallel: bool = False,
                use_cpu_initialization: bool = True) -> MoRModel:
    """This rank's part of the model under the current layout (the whole model when PP = 1), with the
    TransformerConfig that megatron's schedules read."""
    pp_rank, pp_size = ps.get_pipeline_model_parallel_rank(), ps.get_pipeline_model_parallel_world_size()
    mp = make_parallel_config(cfg, use_cpu_initialization=use_cpu_initialization,
                              sequence_parallel=sequence_parallel)
    model = MoRModel(cfg, mp, pp_rank=pp_rank, pp_size=pp_size)
    model.config = schedule_config(cfg)
    model.model_type = ModelType.encoder_or_decoder
    return model


def schedule_config(cfg: ModelConfig) -> TransformerConfig:
    """What megatron's schedules need to know: sizes for p2p buffers, dtype, and no fused/async features."""
    # TransformerConfig warns about CUDA-graph defaults we never use; keep the run's log readable.
    warnings.filterwarnings("ignore", message=".*cuda_graph_scope.*")
    return TransformerConfig(
        num_layers=cfg.n_layers, hidden_size=cfg.d_model, num_attention_heads=cfg.n_heads,
        tensor_model_parallel_size=ps.get_tensor_model_parallel_world_size(),
        pipeline_model_parallel_size=ps.get_pipeline_model_parallel_world_size(),
        pipeline_dtype=torch.float32, params_dtype=torch.float32, use_cpu_initialization=True,
        gradient_accumulation_fusion=False, bias_activation_fusion=False, bias_dropout_fusion=False,
        masked_softmax_fusion=False, apply_rope_fusion=False, deallocate_pipeline_outputs=False,
        variable_seq_lengths=False,
    )


# ---- replicated parameters ------------------------------------------------------------------------------------
def _stage_param_names(cfg: ModelConfig, pp_size: int) -> list[dict[str, tuple[int, ...]]]:
    """Every stage's parameter names and (TP-local) shapes, from models built on the meta device."""
    out = []
    for rank in range(pp_size):
        mp = make_parallel_config(cfg, use_cpu_initialization=True)
        mp.perform_initialization = False
        with torch.device("meta"):
            stage = MoRModel(cfg, mp, pp_rank=rank, pp_size=pp_size)
        out.append({n: tuple(p.shape) for n, p in stage.named_parameters()})
    return out


def replica_layout(cfg: ModelConfig) -> list[tuple[str, tuple[int, ...], list[int]]]:
    """(name, shape, holding stages) for every parameter present on two or more stages, in a fixed order."""
    stages = _stage_param_names(cfg, ps.get_pipeline_model_parallel_world_size())
    names = sorted(set().union(*stages))
    return [(n, next(s[n] for s in stages if n in s), [i for i, s in enumerate(stages) if n in s])
            for n in names if sum(n in s for s in stages) > 1]


def _flat_allreduce_over_stages(model: MoRModel, layout, pick) -> None:
    """One all-reduce over the pipeline group: each stage contributes ``pick(param, holders)`` (zeros where it
    holds no such parameter) and receives the sum, written back into ``pick.target(param)``."""
    if not layout:
        return
    params = dict(model.named_parameters())
    chunks = []
    for name, shape, holders in layout:
        p = params.get(name)
        src = pick(p, holders) if p is not None else None
        chunks.append(src.reshape(-1).float() if src is not None else torch.zeros(torch.Size(shape).numel()))
    flat = torch.cat([c.to(next(model.parameters()).device) for c in chunks])
    dist.all_reduce(flat, group=ps.get_pipeline_model_parallel_group())
    at = 0
    for (name, shape, holders), c in zip(layout, chunks):
        n = c.numel()
        p = params.get(name)
        if p is not None:
            target = pick.target(p)
            target.copy_(flat[at:at + n].view(shape).to(target.dtype))
        at += n


class _FirstHolderWeights:
    """Replica sync: the first stage holding a parameter contributes its value, the others zeros."""

    def __init__(self, rank: int):
        self.rank = rank

    def __call__(self, p, holders):
        return p.data if self.rank == holders[0] else torch.zeros_like(p.data)

    @staticmethod
    def target(p):
        return p.data


class _Grads:
    """Replica gradient sum: each holder contributes its gradient (zeros when it has none)."""

    def __call__(self, p, holders):
        return p.grad if p.grad is not None else torch.zeros_like(p.data)

    @staticmethod
    def target(p):
        if p.grad is None:
            p.grad = torch.zeros_like(p.data)
        return p.grad


@torch.no_grad()
def sync_replicas(model: MoRModel, layout) -> None:
    _flat_allreduce_over_stages(model, layout, _FirstHolderWeights(ps.get_pipeline_model_parallel_rank()))


@torch.no_grad()
def reduce_replica_grads(model: MoRModel, layout) -> None:
    _flat_allreduce_over_stages(model, layout, _Grads())


@torch.no_grad()
def average_data_parallel_grads(model: torch.nn.Module) -> None:
    dp = ps.get_data_parallel_world_size()
    if dp == 1:
        return
    for p in model.parameters():
        if p.grad is None:
            p.grad = torch.zeros_like(p.data)
        dist.all_reduce(p.grad, group=ps.get_data_parallel_group())
        p.grad.div_(dp)


@torch.no_grad()
def clip_grad_norm(model: MoRModel, layout, max_norm: float) -> torch.Tensor:
    """Clip to a global norm that counts each parameter once: TP-sharded weights on every TP rank, replicated ones
    on TP rank 0 only, and a pipeline replica only on the first stage holding it. Returns the norm."""
    first_holder = {name: holders[0] for name, _, holders in layout}
    pp_rank, tp_rank = ps.get_pipeline_model_parallel_rank(), ps.get_tensor_model_parallel_rank()
    sq = torch.zeros((), dtype=torch.float64, device=next(model.parameters()).device)
    for name, p in model.named_parameters():
        if p.grad is None:
            continue
        if first_holder.get(name, pp_rank) != pp_rank:
            continue
        if not getattr(p, "tensor_model_parallel", False) and tp_rank != 0:
            continue
        sq += p.grad.double().square().sum()
    dist.all_reduce(sq, group=ps.get_model_parallel_group())
    norm = sq.sqrt()
    if max_norm > 0:
        scale = (max_norm / (norm + 1e-6)).clamp(max=1.0).float()
        for p in model.parameters():
            if p.grad is not None:
                p.grad.mul_(scale)
    return norm


# ---- the schedule ---------------------------------------------------------------------------------------------
def _schedule(model: MoRModel, micro_batches: Sequence[tuple[torch.Tensor, torch.Tensor]], *,
              forward_only: bool, causal_routing: bool = False, per_token: bool = False,
              router_stats: Optional[list[dict[str, torch.Tensor]]] = None) -> list[dict]:
    """megatron's schedule over ``micro_batches`` (all of one shape); the last stage gets one dict per micro-batch.
    ``causal_routing``: every stage routes as a deployed model does (MoRModel.forward). ``router_stats``: a list
    that receives, on every stage, the router statistics this stage computed for each micro-batch, in order."""
    b, t = micro_batches[0][0].shape
    rows = packed_rows(model.cfg, model.pp_size, b, t, ps.get_tensor_model_parallel_world_size())
    return get_forward_backward_func()(
        forward_step_func=partial(forward_step, causal_routing=causal_routing, per_token=per_token,
                                  router_stats=router_stats),
        data_iterator=iter(micro_batches), model=[model], num_microbatches=len(micro_batches), seq_length=rows,
        micro_batch_size=b, forward_only=forward_only)


def pipeline_forward_only(model: MoRModel, batches: Sequence[tuple[torch.Tensor, torch.Tensor]], *,
                          causal_routing: bool = False,
                          router_stats: Optional[list[dict[str, torch.Tensor]]] = None) -> list[torch.Tensor]:
    """The language-model loss of each batch, in order, on the last stage (an empty list on the others).
    ``router_stats``: a list that receives, on every stage, one dict per batch (same order) of the router
    statistics that this stage's routing ops computed (empty on a stage without one)."""
    out: list[torch.Tensor] = []
    # The pipeline's p2p buffers have one shape per schedule call: a short last batch gets a call of its own.
    for shape in dict.fromkeys(bt[0].shape for bt in batches):
        group = [bt for bt in batches if bt[0].shape == shape]
        out += [r["lm_loss"] for r in _schedule(model, group, forward_only=True, causal_routing=causal_routing,
                                                router_stats=router_stats)]
    return out


def pipeline_token_scores(model: MoRModel, batches: Sequence[tuple[torch.Tensor, torch.Tensor]], *,
                          causal_routing: bool = False) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per batch, in order, on the last stage: (log p(label), label is the argmax), each (B, T) (MoRModel.forward
    ``per_token``); an empty list on the other stages."""
    out: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    for shape in dict.fromkeys(bt[0].shape for bt in batches):   # one schedule call per shape, as above
        where = [i for i, bt in enumerate(batches) if bt[0].shape == shape]
        results = _schedule(model, [batches[i] for i in where], forward_only=True, causal_routing=causal_routing,
                            per_token=True)
        out.update((i, (r["token_logprob"], r["token_greedy"])) for i, r in zip(where, results))
    return [out[i] for i in sorted(out)]


# ---- one optimizer step ---------------------------------------------------------------------------------------
def forward_step(data_iterator: Iterator, model: MoRModel, causal_routing: bool = False, per_token: bool = False,
                 router_stats: Optional[list[dict[str, torch.Tensor]]] = None):
    tokens, labels = next(data_iterator)
    out = model(tokens, labels if model.is_last else None, causal_routing=causal_routing,
                per_token=per_token and model.is_last)
    if router_stats is not None:  # every stage's own: the routing ops it ran (a stage returns no MoROutput)
        router_stats.append(model.last_router_stats)
    if not model.is_last:
        return out, None
    return out.loss, partial(_loss_func, out)


def _loss_func(out, loss: torch.Tensor):
    # clones: the schedule divides the returned loss by the micro-batch count in place
    record = {"loss": loss.detach().clone(), "lm_loss": out.lm_loss.detach().clone()}
    if out.token_logprob is not None:
        record.update(token_logprob=out.token_logprob, token_greedy=out.token_greedy)
    return loss, record


def pipeline_forward_backward(model: MoRModel, layout, micro_batches: Sequence[tuple[torch.Tensor, torch.Tensor]],
                              *, max_grad_norm: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward + backward over ``micro_batches`` with 1F1B, replica grads summed, DP-averaged and clipped.
    Returns the mean loss (on the last stage; zero elsewhere) and the global gradient norm before clipping."""
    results = _schedule(model, micro_batches, forward_only=False)
    reduce_replica_grads(model, layout)
    average_data_parallel_grads(model)
    norm = clip_grad_norm(model, layout, max_grad_norm)
    loss = torch.stack([r["loss"] for r in results]).mean() if results else torch.zeros(())
    return loss, norm


def finish_pipeline_step(engine) -> None:
    """The optimizer step after ``pipeline_forward_backward``."""
    engine.allreduce_gradients()  # hands the (already averaged) grads to ZeRO-1's partitions; a no-op in value
    engine.step()


def pipeline_train_step(engine, model: MoRModel, layout, micro_batches: Sequence[tuple[torch.Tensor, torch.Tensor]],
                        *, max_grad_norm: float) -> tuple[torch.Tensor, torch.Tensor]:
    """One optimizer step through the pipeline: returns (mean loss on the last stage, gradient norm)."""
    loss, norm = pipeline_forward_backward(model, layout, micro_batches, max_grad_norm=max_grad_norm)
    finish_pipeline_step(engine)
    return loss, norm
