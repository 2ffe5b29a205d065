"""Inference: KV caches (recursion-wise, with recursive KV sharing), prefill and decoding with causal routing,
sampling, and the serving engine with continuous depth-wise batching."""
from model.inference.cache import KVCache, cache_bytes
from model.inference.decode import decode_step, generate, prefill
from model.inference.engine import Completion, DepthBatchEngine, Request
from model.inference.sampling import Sampling, next_tokens

__all__ = ["Completion", "DepthBatchEngine", "KVCache", "Request", "Sampling", "cache_bytes", "decode_step",
           "generate", "next_tokens", "prefill"]
