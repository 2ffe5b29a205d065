"""Inference: KV caches (recursion-wise, with recursive KV sharing), prefill and decoding with causal routing,
sampling, and serving: the plain batched decode with a static cache, and continuous depth-wise batching over
recursion-wise KV pools."""
from model.inference.cache import KVCache, cache_bytes
from model.inference.decode import decode_step, generate, prefill
from model.inference.engine import DepthBatchServer
from model.inference.kv_pool import KVPool, pool_bytes
from model.inference.sampling import Sampling, next_tokens
from model.inference.serving import Completion, ServeStats, Request
from model.inference.static import StaticBatchServer

__all__ = ["Completion", "DepthBatchServer", "ServeStats", "KVCache", "KVPool", "Request", "Sampling",
           "StaticBatchServer", "cache_bytes", "decode_step", "generate", "next_tokens", "pool_bytes", "prefill"]
