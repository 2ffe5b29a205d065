"""Tiny configs for model tests (fp32, CPU)."""
from __future__ import annotations

from model.config import ModelConfig, RouterConfig

SHARINGS = ["cycle", "sequence", "middle_cycle", "middle_sequence"]

# Tests that compare two computations of the same forward pass (vectorised against a loop, compact against
# masked) use weights this large. At the default 0.02 attention is nearly uniform, so a token at a wrong RoPE
# position moved the states by under 1e-5; at 0.3 it moves them by ~0.3 while correct fp32 computations still
# agree to ~1e-6. (Layouts against one process train 3 steps and use 0.1: tests/distributed/harness.py.)
SHARP_STD = 0.3


def tiny(routing: str = "expert_choice", sharing: str = "middle_cycle", nr: int = 3, **kw) -> ModelConfig:
    """A model small enough for CPU tests; n_layers fits the strategy with 2 layers per recursion."""
    if sharing == "none":
        n_layers = kw.pop("n_layers", 6)
        nr, routing = 1, "none"
    else:
        n_layers = kw.pop("n_layers", 2 * nr + (2 if sharing.startswith("middle") else 0))
    router = kw.pop("router", RouterConfig())
    base = dict(name="test", vocab_size=128, d_model=32, n_layers=n_layers, n_heads=4, n_kv_heads=2, ffn_hidden=64,
                max_seq_len=64, sharing=sharing, num_recursions=nr, routing=routing, router=router)
    base.update(kw)
    return ModelConfig(**base).validate()
