"""DeepSpeed engine over megatron-core's groups: ZeRO stage 0-3 across the data-parallel group.

DeepSpeed's ``mpu`` argument wants get_model_parallel_* and get_data_parallel_* methods, which megatron's
``parallel_state`` names differently: ``MegatronMPU`` adapts them. Its "model parallel" group is the
tensor-parallel group, which is what DeepSpeed's gradient-norm code needs to count TP-sharded weights once per
shard and replicated ones once; across pipeline stages the pipeline step clips gradients itself (model/pipeline
and pretrain/pipeline_step), since DeepSpeed's engine does not run megatron's schedule.
"""
from __future__ import annotations

import importlib
import logging
import os
import warnings
from typing import Any, Iterable

import torch
from megatron.core import parallel_state

from pretrain.parallel.layout import Layout, ParallelConfig, grad_accumulation_steps

# ---- DeepSpeed's start-up chatter, kept out of the run's log ----------------------------------------------------
# Set before DeepSpeed's first import, which is in this module only. Each item is one known message; DeepSpeed's
# other warnings and errors, and ours, still show.
#   Its accelerator probe warns "Setting accelerator to CPU ..." on every CPU start unless told the device: tell
# it the one pretrain/parallel/layout.py uses (a user's own DS_ACCELERATOR wins).
os.environ.setdefault("DS_ACCELERATOR", "cuda" if torch.cuda.is_available() else "cpu")
#   ZeRO calls torch.distributed's *_tensor collectives, which this torch deprecates with a warning per call.
warnings.filterwarnings("ignore", category=FutureWarning,
                        message=r"`torch\.distributed\.(all_gather_into_tensor|reduce_scatter_tensor)` is deprecated")


class _KnownHarmless(logging.Filter):
    """ZeRO-3 warns at the first forward that it cannot see tensors inside MoROutput and that its module hooks
    "may not get triggered properly": tests/distributed's dp2-zero3 layout trains exactly as one process does."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("A module has unknown inputs or outputs type (<class "
                                                  "'model.mor.MoROutput'>)")


logging.getLogger("DeepSpeed").addFilter(_KnownHarmless())


def _import_deepspeed():
    import deepspeed

    # Its CPU backend builds (about a minute of g++ at the first start on a machine) and loads a shared-memory
    # all-reduce that only DeepSpeed's inference path calls, then prints "... built successfully" at every start.
    # (By module: the attribute deepspeed.comm.torch is the torch package.)
    importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None
    return deepspeed


class MegatronMPU:
    """DeepSpeed's mpu interface over megatron-core's parallel_state."""

    def get_model_parallel_rank(self) -> int:
        return parallel_state.get_tensor_model_parallel_rank()

    def get_model_parallel_world_size(self) -> int:
        return parallel_state.get_tensor_model_parallel_world_size()

    def get_model_parallel_group(self):
        return parallel_state.get_tensor_model_parallel_group()

    def get_data_parallel_rank(self) -> int:
        return parallel_state.get_data_parallel_rank()

    def get_data_parallel_world_size(self) -> int:
        return parallel_state.get_data_parallel_world_size()

    def get_data_parallel_group(self):
        return parallel_state.get_data_parallel_group()


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """No weight decay on norms, biases and other 1-D parameters; decay on matrices (shared ones count once)."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def deepspeed_config(pcfg: ParallelConfig, layout: Layout, *, grad_clip: float, bf16: bool = False) -> dict:
    gas = grad_accumulation_steps(pcfg, layout.dp) if layout.pp == 1 else 1
    return {
        "train_micro_batch_size_per_gpu": pcfg.micro_batch_size,
        "gradient_accumulation_steps": gas,
        "train_batch_size": pcfg.micro_batch_size * gas * layout.dp,
        # DeepSpeed clips at 1.0 unless told otherwise; with pipelines we clip ourselves (see module docstring).
        "gradient_clipping": grad_clip if layout.pp == 1 else 0.0,
        "zero_optimization": {"stage": pcfg.zero_stage, "overlap_comm": False, "contiguous_gradients": False,
                              "reduce_bucket_size": 5e7, "allgather_bucket_size": 5e7},
        "bf16": {"enabled": bf16},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


def build_engine(model: torch.nn.Module, optimizer: torch.optim.Optimizer, pcfg: ParallelConfig, layout: Layout, *,
                 grad_clip: float, bf16: bool = False):
    """Wrap model and a client optimizer (torch AdamW: no fused-kernel build) in a DeepSpeed engine."""
    deepspeed = _import_deepspeed()

    if pcfg.zero_stage == 3:
        # A tied head reads the embedding matrix outside the embedding's own forward; ZeRO-3 must gather it there.
        for module, param in getattr(model, "external_parameters", lambda: [])():
            deepspeed.zero.register_external_parameter(module, param)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, mpu=MegatronMPU(),
                                           config=deepspeed_config(pcfg, layout, grad_clip=grad_clip, bf16=bf16),
                                           dist_init_required=False)
    return engine


def full_parameters(engine, names: Iterable[str] | None = None) -> dict[str, torch.Tensor]:
    """This rank's parameters by name, gathered whole under ZeRO-3 (a collective: call on every rank)."""
    deepspeed = _import_deepspeed()

    module = engine.module
    out: dict[str, torch.Tensor] = {}
    for name, p in module.named_parameters():
        if names is not None and name not in names:
            continue
        with deepspeed.zero.GatheredParameters([p], modifier_rank=None):
            out[name] = p.detach().clone().float().cpu()
    return out
