"""Typed model configuration for vanilla, recursive and Mixture-of-Recursions transformers.

Names follow Bae et al., "Mixture-of-Recursions" (arXiv 2507.10524): a *recursion* is one pass of the shared
block, ``num_recursions`` (Nr) passes in all; *capacity* c_r is the fraction of a sequence's tokens that
expert-choice routing keeps at step r; *middle-cycle* keeps a unique first and last layer around the cycled block.

``n_layers`` is always the unrolled depth: the number of layer applications a token that runs every recursion
goes through. The number of unique layers follows from it and the sharing strategy (see ``unique_layers``).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, Optional

from conf.errors import ConfigError

Sharing = Literal["none", "cycle", "sequence", "middle_cycle", "middle_sequence"]
# The routing variants: name -> its class, which holds the variant's traits (model/routing/base.py). Filled by
# model/routing when it is imported; model/__init__ imports it, so the registry is full wherever a ModelConfig is.
ROUTINGS: dict[str, Any] = {}


@dataclass
class RouterConfig:
    # Gate scale α. None: the variant's default, 0.1 for expert-choice (the reference runs), 1.0 for token-choice.
    alpha: Optional[float] = None
    # The router's activation G. Expert-choice: sigmoid (default) or tanh, gate g = α·G(logit). Token-choice:
    # softmax over depths (default) or sigmoid per depth. None: the variant's default.
    func: Optional[Literal["sigmoid", "tanh", "softmax"]] = None
    # Per-step capacities c_r (expert-choice). Default (Nr - r + 1) / Nr, e.g. 1, 2/3, 1/3 for Nr = 3.
    capacities: Optional[list[float]] = None
    # Expert-choice capacity warm-up over this many optimizer steps (0: off): a cosine from every token kept
    # (c = 1) down to c_r, in training only.
    cap_warmup_step: int = 0
    # How a kept token's state is updated at a recursion step (expert-choice):
    #   weighted: h <- h + g * block(h)        (reference code; block output includes its own residuals)
    #   residual: h <- h + g * (block(h) - h)  (only the block's update is gated)
    gating: Literal["weighted", "residual"] = "weighted"
    arch: Literal["linear", "mlp"] = "linear"
    # The router's input is divided by this (the reference's "temperature"); 1.0 leaves it as is.
    temperature: float = 1.0
    # Expert-choice: BCE auxiliary loss on router logits (target 1 for kept tokens), summed over steps.
    aux_loss_coef: float = 0.001
    # Expert-choice: a separate router per step, trained on detached inputs to predict the top-k choice, that the
    # causal inference rule reads instead of the main router (the paper's "auxiliary router").
    aux_router: bool = False
    # Coefficient of the auxiliary router's BCE loss. It never reaches the model's weights (detached inputs); kept
    # small so that its gradients weigh little in the global clipping norm (AdamW makes its scale matter little).
    aux_router_coef: float = 0.001
    # Router z-loss coefficient. None: the variant's default, 0 for expert-choice, 1e-5 for token-choice.
    z_loss_coef: Optional[float] = None
    # Token-choice load balancing: Switch-style loss, or a bias on the depth choice nudged towards balance.
    balance: Literal["loss", "loss_free"] = "loss"
    balance_coef: float = 0.1
    bias_update_rate: float = 0.001
    # Token-choice balancing warm-up (0: off): for this many optimizer steps every token runs every recursion
    # (training only) and the loss-free bias stays 0.
    bal_warmup_step: int = 0


@dataclass
class ModelConfig:
    name: str = "custom"
    vocab_size: int = 49152
    d_model: int = 960
    n_layers: int = 32
    n_heads: int = 15
    n_kv_heads: int = 5
    ffn_hidden: int = 2560
    max_seq_len: int = 2048
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = True
    init_std: float = 0.02
    sharing: Sharing = "none"
    num_recursions: int = 1
    routing: str = "none"          # a variant of ROUTINGS: none, expert_choice, token_choice
    router: RouterConfig = field(default_factory=RouterConfig)
    # Recursive KV sharing: every recursion step after the first attends to the keys and values that the first
    # step made (layer j of step r reads layer j of step 1), in training and at inference, so only the first
    # step's KV cache is kept. It changes the model: train with it to use it.
    kv_sharing: bool = False
    # Attention kernel: auto picks flash-attn on GPU when installed, else PyTorch SDPA.
    attention_backend: Literal["auto", "sdpa", "flash"] = "auto"
    # Token-choice recursion steps after the first run on the tokens still recursing, gathered into a shorter
    # sequence (the saving MoR promises; costs one host sync per step for the length). False: every token, with
    # a key mask (no sync). Same results either way; sequence parallelism always uses the masked form.
    tc_compact: bool = True
    # Token-choice capacity factor f (training routing). 0: dropless, the paper's routing; the compact steps then
    # read their length on the host (one sync and torch.compile graph break per step after the first). f > 0:
    # static lengths — recursion step r >= 2 runs on L_r = min(T, f·T·(Nr−r+1)/Nr rounded up to 64) tokens per
    # row, the tokens balanced routing would send there times f; a row's tokens beyond L_r (its latest, in
    # position order) leave at step r−1 with their gate. Inference (causal routing) never caps.
    tc_capacity: float = 0.0
    # The output head and its cross-entropy run over chunks of this many tokens (model/head.py): the fp32
    # logits of the whole micro-batch never exist at once, and the gradients are made in the same pass. 0: one
    # matmul over the micro-batch and the plain loss (the logits kept for backward).
    loss_chunk: int = 2048

    # ---- derived quantities -------------------------------------------------------------------------------
    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def middle(self) -> bool:
        return self.sharing in ("middle_cycle", "middle_sequence")

    @property
    def layers_per_recursion(self) -> int:
        """Unrolled layers in one recursion step (the block that routing gates)."""
        if self.sharing == "none":
            return self.n_layers
        return (self.n_layers - 2 * self.middle) // self.num_recursions

    @property
    def unique_layers(self) -> int:
        if self.sharing == "none":
            return self.n_layers
        return self.layers_per_recursion + 2 * self.middle

    @property
    def capacities(self) -> list[float]:
        if self.router.capacities is not None:
            return list(self.router.capacities)
        nr = self.num_recursions
        return [(nr - r + 1) / nr for r in range(1, nr + 1)]

    def capacity_tokens(self, seq_len: int, capacities: Optional[list[float]] = None) -> list[int]:
        """k_r = max(1, floor(c_r * T)): tokens kept per sequence at each step (static, known before forward), for
        the configured capacities or the given ones."""
        # The small epsilon keeps e.g. (2/3) * 3 from flooring to 1 through rounding error.
        return [max(1, int(c * seq_len + 1e-6)) for c in (self.capacities if capacities is None else capacities)]

    # ---- validation -----------------------------------------------------------------------------------------
    def validate(self) -> "ModelConfig":
        """Raise ConfigError (one line, naming the key) for an impossible combination."""
        def need(cond: bool, key: str, msg: str) -> None:
            if not cond:
                raise ConfigError(f"{key}: {msg}")

        for key in ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "ffn_hidden", "max_seq_len",
                    "num_recursions"):
            need(getattr(self, key) >= 1, key, f"must be >= 1, got {getattr(self, key)}")
        need(self.d_model % self.n_heads == 0, "d_model",
             f"{self.d_model} is not divisible by n_heads={self.n_heads}")
        need(self.head_dim % 2 == 0, "d_model", f"head dimension {self.head_dim} must be even for RoPE")
        need(self.n_heads % self.n_kv_heads == 0, "n_kv_heads",
             f"n_heads={self.n_heads} is not divisible by n_kv_heads={self.n_kv_heads}")
        need(self.routing in ROUTINGS, "routing",
             f"{self.routing!r} is not a routing; choose from {', '.join(ROUTINGS)}")
        need(self.init_std > 0, "init_std", "must be > 0")
        need(self.router.temperature > 0, "router.temperature", "must be > 0")
        if self.sharing == "none":
            need(self.num_recursions == 1, "num_recursions",
                 f"sharing=none (vanilla) needs num_recursions=1, got {self.num_recursions}; "
                 "pick a sharing strategy to recurse")
            need(self.routing == "none", "routing", "routing needs a sharing strategy (sharing=none is vanilla)")
        else:
            nr = self.num_recursions
            body = self.n_layers - 2 * self.middle
            need(body >= nr and body % nr == 0, "n_layers",
                 f"{self.n_layers} layers do not fit sharing={self.sharing} with num_recursions={nr}: "
                 f"need {'2 + ' if self.middle else ''}a positive multiple of {nr}")
        if self.routing != "none":
            need(self.num_recursions >= 2, "num_recursions", "routing needs at least 2 recursions")
        if self.router.capacities is not None:
            caps = self.router.capacities
            need(len(caps) == self.num_recursions, "router.capacities",
                 f"has {len(caps)} entries, num_recursions={self.num_recursions}")
            need(all(0 < c <= 1 for c in caps), "router.capacities", "each capacity must be in (0, 1]")
            need(all(a >= b for a, b in zip(caps, caps[1:])), "router.capacities",
                 "must be non-increasing (kept sets are nested)")
        rc = self.router
        funcs, reads = ROUTINGS[self.routing].router_funcs, ROUTINGS[self.routing].options
        need(rc.func is None or rc.func in funcs, "router.func",
             f"{rc.func!r} is not an activation of routing={self.routing}; "
             + (f"choose from {', '.join(funcs)}" if funcs else "there is no router, leave it unset"))
        need(rc.cap_warmup_step >= 0, "router.cap_warmup_step", f"must be >= 0, got {rc.cap_warmup_step}")
        need(rc.cap_warmup_step == 0 or "router.cap_warmup_step" in reads, "router.cap_warmup_step",
             "the capacity warm-up applies to expert-choice routing only; leave it 0")
        need(rc.bal_warmup_step >= 0, "router.bal_warmup_step", f"must be >= 0, got {rc.bal_warmup_step}")
        need(rc.bal_warmup_step == 0 or "router.bal_warmup_step" in reads, "router.bal_warmup_step",
             "the balancing warm-up applies to token-choice routing only; leave it 0")
        need(not rc.aux_router or "router.aux_router" in reads, "router.aux_router",
             "the auxiliary router predicts expert-choice decisions; leave it false for other routings")
        need(rc.aux_router_coef >= 0, "router.aux_router_coef", f"must be >= 0, got {rc.aux_router_coef}")
        need(self.tc_capacity >= 0, "tc_capacity", f"must be >= 0, got {self.tc_capacity}")
        need(self.tc_capacity == 0 or "tc_capacity" in reads, "tc_capacity",
             "a capacity factor is for routing=token_choice")
        need(self.loss_chunk >= 0, "loss_chunk", f"must be >= 0 tokens (0 = no chunking), got {self.loss_chunk}")
        need(not self.kv_sharing or self.num_recursions >= 2, "kv_sharing",
             "recursive KV sharing reuses the first recursion's keys and values in later ones: it needs "
             "num_recursions >= 2")
        return self
