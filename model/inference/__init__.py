"""Inference: KV caches (recursion-wise, with recursive KV sharing), prefill and decoding with causal routing,
sampling."""
from model.inference.cache import KVCache, cache_bytes
from model.inference.decode import decode_step, generate, prefill
from model.inference.sampling import Sampling, next_tokens

__all__ = ["KVCache", "Sampling", "cache_bytes", "decode_step", "generate", "next_tokens", "prefill"]
