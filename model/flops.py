"""Parameter and FLOP counts that follow the routing.

6·N_params per token is wrong for a recursive model: shared layers run several times, and under routing each
step runs on only part of the sequence. We count what runs, per sequence of length T, then divide by T.

Forward FLOPs (a multiply-add is 2 FLOPs; elementwise work such as norms, RoPE and softmax is not counted):

    layer on n tokens      2·n·P_lin + attn(n)         P_lin = d·(H + 2·Hkv)·hd + H·hd·d + 3·d·F
    attn(n), causal        4·H·hd · n(n+1)/2           query-key pairs actually computed by a causal kernel
    attn(n), full          4·H·hd · n²                 the convention of torch's FlopCounterMode and PaLM's MFU
    KV sharing, step r > 1 4·H·hd · n_r·(n_1+1)/2      its n_r queries attend to the first step's n_1 keys
                           (4·H·hd · n_r·n_1 full)     (the layer still projects its own keys: counted in P_lin)
    head                   2·T·d·V
    expert-choice router   step r scores its n_{r-1} candidates: 2·n_{r-1}·d (n_0 = T), ×2 with aux routers
    token-choice router    2·T·d·Nr

Tokens per step n_r: prelude and coda run on T; recursion step r runs on k_r = max(1, ⌊c_r·T⌋) under expert
choice, on T under no routing, and on T·Σ_{i≥r} f_i under token choice, where f_i is the fraction of tokens
choosing depth i (balanced, f_i = 1/Nr, unless given). Training = 3 × forward (backward is two matmuls per
forward matmul: gradient of the input and of the weight).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Optional, Sequence

from model.config import ModelConfig
from model.routing import routing_class
from model.sharing import build_plan


def layer_linear_params(cfg: ModelConfig) -> int:
    hd = cfg.head_dim
    return (cfg.d_model * (cfg.n_heads + 2 * cfg.n_kv_heads) * hd + cfg.n_heads * hd * cfg.d_model
            + 3 * cfg.d_model * cfg.ffn_hidden)


def router_params(cfg: ModelConfig) -> int:
    return routing_class(cfg).router_params(cfg)


def param_counts(cfg: ModelConfig) -> dict[str, int]:
    """Unique parameters (what is stored and optimised) and parameters as unrolled (what a token passes)."""
    per_layer = layer_linear_params(cfg) + 2 * cfg.d_model  # + two RMSNorm weights
    embed = cfg.vocab_size * cfg.d_model * (1 if cfg.tie_embeddings else 2)
    common = embed + cfg.d_model + router_params(cfg)  # + final norm
    return {"unique": common + per_layer * cfg.unique_layers, "unrolled": common + per_layer * cfg.n_layers}


@dataclass
class FlopsReport:
    seq_len: int
    tokens_per_step: list[float]     # n_r for each recursion step
    forward_per_sequence: float
    training_per_token: float        # 3 × forward / T
    layers: float                    # forward FLOPs per sequence, by part
    attention: float
    routers: float
    head: float

    def as_dict(self) -> dict:
        return asdict(self)


def _attn(cfg: ModelConfig, n: float, causal: bool) -> float:
    pairs = n * (n + 1) / 2 if causal else n * n
    return 4.0 * cfg.n_heads * cfg.head_dim * pairs


def step_tokens(cfg: ModelConfig, seq_len: int, depth_loads: Optional[Sequence[float]] = None) -> list[float]:
    """n_r: tokens each recursion step runs on (the routing variant decides)."""
    return routing_class(cfg).step_tokens(cfg, seq_len, len(build_plan(cfg).steps), depth_loads)


def training_flops(cfg: ModelConfig, seq_len: int, *, causal: bool = True,
                   depth_loads: Optional[Sequence[float]] = None) -> FlopsReport:
    plan = build_plan(cfg)
    t = float(seq_len)
    lin = 2.0 * layer_linear_params(cfg)
    n_steps = step_tokens(cfg, seq_len, depth_loads)
    runs = [(t, len(plan.prelude) + len(plan.coda))] + [(n, len(ids)) for n, ids in zip(n_steps, plan.steps)]
    layers = sum(lin * n * count for n, count in runs)
    attention = sum(_attn(cfg, n, causal) * count for n, count in runs)
    if cfg.kv_sharing:  # steps after the first: queries of step r against the first step's keys
        n1 = n_steps[0]
        for n, ids in list(zip(n_steps, plan.steps))[1:]:
            shared = 4.0 * cfg.n_heads * cfg.head_dim * (n * (n1 + 1) / 2 if causal else n * n1)
            attention += (shared - _attn(cfg, n, causal)) * len(ids)
    d = cfg.d_model
    routers = routing_class(cfg).router_flops(cfg, seq_len, n_steps)
    head = 2.0 * t * d * cfg.vocab_size
    forward = layers + attention + routers + head
    return FlopsReport(seq_len, n_steps, forward, 3.0 * forward / t, layers, attention, routers, head)
