"""Mixture-of-Recursions model: config, megatron-core layers, sharing, routing (one module per variant), the
forward program and its assembly, FLOPs."""
import warnings

from conf.imports import defer_compile_in_megatron

# Before anything here imports megatron-core: its import then skips torch.compile's ~2 s start-up (conf/imports.py).
defer_compile_in_megatron()

# megatron-core warns at import when the optional Transformer Engine / Apex kernels are absent; we use neither.
warnings.filterwarnings("ignore", message="Transformer Engine and Apex are not installed")

# The routing registry (model.config.ROUTINGS) is filled when model.routing is imported: importing it here keeps
# it full for anything that validates a ModelConfig.
from model import routing as _routing  # noqa: E402,F401
