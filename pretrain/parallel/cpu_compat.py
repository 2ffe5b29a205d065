"""Run megatron-core's parallel code on CPU (gloo): the one place that knows where it hard-codes CUDA.

megatron-core 0.16 allocates some buffers with ``device="cuda"`` or ``torch.cuda.current_device()`` (pipeline
schedules, p2p receive buffers, sequence-parallel gathers) and calls ``torch.cuda.synchronize()``. On a machine
without a GPU we give those modules a stand-in for their ``torch`` name that sends such allocations to the CPU
and makes the CUDA calls no-ops; everything else passes straight through to the real torch. Only CPU runs call
this; on GPU megatron-core runs unmodified.
"""
from __future__ import annotations

import importlib
from typing import Any

import torch

# The megatron-core modules whose CUDA device arguments we redirect.
_MODULES = (
    "megatron.core.pipeline_parallel.schedules",
    "megatron.core.pipeline_parallel.p2p_communication",
    "megatron.core.tensor_parallel.mappings",
    "megatron.core.tensor_parallel.layers",
    "megatron.core.tensor_parallel.utils",
    "megatron.core.utils",  # the global memory buffer used by sequence-parallel gathers
)


def _to_cpu(device: Any) -> Any:
    if device is None:
        return None
    if isinstance(device, int) or (isinstance(device, str) and device.startswith("cuda")) or (
            isinstance(device, torch.device) and device.type == "cuda"):
        return torch.device("cpu")
    return device


class _CpuCuda:
    """Stands in for ``torch.cuda``: the current device is the CPU, synchronisation is a no-op."""

    def current_device(self) -> torch.device:
        return torch.device("cpu")

    def synchronize(self, *args: Any, **kwargs: Any) -> None:
        return None

    def __getattr__(self, name: str) -> Any:
        return getattr(torch.cuda, name)


class _CpuTorch:
    """Stands in for the ``torch`` module inside the modules above."""

    cuda = _CpuCuda()

    def __getattr__(self, name: str) -> Any:
        attr = getattr(torch, name)
        if name in ("zeros", "empty", "ones", "full", "tensor", "arange"):
            def alloc(*args: Any, device: Any = None, **kwargs: Any) -> torch.Tensor:
                return attr(*args, device=_to_cpu(device), **kwargs)
            return alloc
        return attr


_PROXY = _CpuTorch()


def patch_megatron_for_cpu() -> None:
    """Idempotent. Never call it on a GPU run."""
    for name in _MODULES:
        module = importlib.import_module(name)
        if module.__dict__.get("torch") is not _PROXY:
            module.torch = _PROXY
