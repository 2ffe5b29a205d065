"""Process-group and megatron-core parallel-state set-up.

This first version covers a single process (world size 1), which is what model tests, the demo and
``model.inspect`` need; tensor/pipeline/data-parallel layouts build on it.
"""
from __future__ import annotations

import atexit
import os
import socket

import torch
import torch.distributed as dist
from megatron.core import parallel_state


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def init_single_process(seed: int = 0) -> None:
    """Make a world of one (gloo on CPU, NCCL on GPU) and megatron's groups with TP = PP = 1. Idempotent."""
    if not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
        # With a GPU, NCCL serves CUDA tensors and gloo still serves CPU ones (tests mix both).
        backend = "cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend, rank=0, world_size=1)
        atexit.register(_shutdown)
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(tensor_model_parallel_size=1, pipeline_model_parallel_size=1)
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        # GPU-side weight init draws from megatron's CUDA RNG tracker, which needs seeding.
        from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed
        model_parallel_cuda_manual_seed(seed)
