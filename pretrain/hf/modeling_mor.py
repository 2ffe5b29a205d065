"""A Mixture-of-Recursions language model for Hugging Face transformers, in plain PyTorch.

Shipped beside ``configuration_mor.py`` in every folder that ``python -m pretrain.export`` writes, and loaded from
there with ``AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)``. It needs torch and transformers
only (no megatron-core, no DeepSpeed, nothing of the training project) and computes what the training project's
``MoRModel.forward(tokens, causal_routing=True)`` computes, with the same parameter names, so the training state dict
loads as it is:

    tokens -> embedding -> prelude layers -> recursion step 1 .. Nr (shared block) -> coda layers -> norm -> head

- Sharing (``sharing``: none, cycle, sequence, middle_cycle, middle_sequence): which unique layer runs at each
  unrolled position. A shared layer is one module, run at every position that uses it.
- Routing is the causal inference rule, each token deciding alone from its own state (no token reads a later one):
  expert-choice — a token runs step r iff it ran step r - 1 and its router logit at step r is >= 0 (the auxiliary
  router's logit with ``router.aux_router``); a step of capacity 1 runs every token that reaches it; the kept tokens
  are updated h <- h + g·block(h) (``gating: residual``: h + g·(block(h) - h)), g = α·G(logit). Token-choice — each
  token picks its depth once from the stream entering the first recursion (argmax of α·G(logits), plus the
  loss-free balancing bias), runs that many steps, and leaves with h1 + g·block(h). No routing — every token runs
  every step.
- Attention at a recursion step sees the tokens that ran that step (and, with ``kv_sharing``, the keys and values
  that the first step's layer at the same place in the block made).
- KV cache (``MoRCache``): one buffer per unrolled layer position that makes keys; a recursion step's buffers hold
  only the tokens that ran that step (recursion-wise caching); under ``kv_sharing`` only the first step's exist.
  ``generate()`` makes one and passes it from step to step; ``use_cache=False`` recomputes the whole sequence at
  every new token instead (same tokens, slower).
- Padding: ``attention_mask`` zeros are neither attended to nor cached, and positions count real tokens only, so a
  left-padded batch gives each row what it gets alone.

This model is for inference and evaluation: the loss it returns with ``labels`` is the next-token loss under
causal routing, without the router losses of training (train with ``python -m pretrain.train``).
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import GenerationMixin, PreTrainedModel
from transformers.cache_utils import Cache
from transformers.modeling_outputs import CausalLMOutputWithPast

from .configuration_mor import MoRConfig

_ACTIVATION = {"sigmoid": torch.sigmoid, "tanh": torch.tanh}
_DEFAULTS = {  # router settings whose defaults depend on the routing (model/routing/*.py)
    "none": {"alpha": 1.0, "func": None},
    "expert_choice": {"alpha": 0.1, "func": "sigmoid"},
    "token_choice": {"alpha": 1.0, "func": "softmax"},
}


# ---- the unrolled stack ----------------------------------------------------------------------------------------
class LayerOp:
    """One layer application of the unrolled model: unique layer ``layer`` at unrolled position ``pos`` (its KV
    cache), in recursion ``step`` (-1: prelude or coda); ``kv_from`` >= 0: attend to the keys of that position."""

    __slots__ = ("layer", "pos", "step", "kv_from")

    def __init__(self, layer: int, pos: int, step: int, kv_from: int = -1):
        self.layer, self.pos, self.step, self.kv_from = layer, pos, step, kv_from


def build_ops(cfg: MoRConfig) -> tuple[list[LayerOp], list[list[LayerOp]], list[LayerOp]]:
    """(prelude, steps, coda) of the unrolled stack, as model/sharing.py and model/program.py lay it out."""
    if cfg.sharing == "none":
        prelude, steps, coda = [], [list(range(cfg.n_layers))], []
    else:
        nr, per_step = cfg.num_recursions, cfg.layers_per_recursion
        offset = 1 if cfg.middle else 0
        body = nr * per_step
        if cfg.sharing in ("cycle", "middle_cycle"):
            order = [offset + i % per_step for i in range(body)]
        else:  # sequence: each block layer repeated nr times in place
            order = [offset + i // nr for i in range(body)]
        steps = [order[r * per_step:(r + 1) * per_step] for r in range(nr)]
        prelude, coda = ([0], [per_step + 1]) if cfg.middle else ([], [])
    first = len(prelude)
    pre = [LayerOp(i, p, -1) for p, i in enumerate(prelude)]
    rec = [[LayerOp(i, first + r * len(ids) + j, r, first + j if cfg.kv_sharing and r > 0 else -1)
            for j, i in enumerate(ids)] for r, ids in enumerate(steps)]
    coda_at = first + sum(len(ids) for ids in steps)
    return pre, rec, [LayerOp(i, coda_at + p, -1) for p, i in enumerate(coda)]


# ---- layers ----------------------------------------------------------------------------------------------------------
class MoRRMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # in fp32 whatever the model's dtype, as in training
        return F.rms_norm(x.float(), (x.shape[-1],), self.weight.float(), self.eps).to(x.dtype)


def rotary(positions: torch.Tensor, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """positions (B, S) -> cos, sin (B, S, 1, head_dim / 2), fp32, at each token's own position."""
    exponent = torch.arange(0, head_dim, 2, dtype=torch.float32, device=positions.device) / head_dim
    angles = positions.to(torch.float32)[..., None] * theta ** -exponent
    return angles.cos()[:, :, None, :], angles.sin()[:, :, None, :]


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half].float(), x[..., half:].float()
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).to(x.dtype)


def position_mask(q_pos: torch.Tensor, k_pos: torch.Tensor, k_valid: torch.Tensor) -> torch.Tensor:
    """(B, Sq, Sk): key j is visible to query i iff it is valid and not after it. A query that would see no key
    (padding, or a token that does not run this step: its output is never used) sees key 0, so that softmax has
    no empty row."""
    mask = (k_pos[:, None, :] <= q_pos[:, :, None]) & k_valid[:, None, :]
    empty = ~mask.any(dim=-1, keepdim=True)
    first = torch.zeros_like(mask)
    first[..., 0] = True
    return mask | (empty & first)


def masked_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """q (B, Sq, H, D) over k, v (B, Sk, Hkv, D) where ``mask`` (B, Sq, Sk); (B, Sq, H, D)."""
    h, hkv = q.shape[2], k.shape[2]
    if h != hkv:
        k = k.repeat_interleave(h // hkv, dim=2)
        v = v.repeat_interleave(h // hkv, dim=2)
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2).to(q.dtype),
                                         v.transpose(1, 2).to(q.dtype), attn_mask=mask[:, None])
    return out.transpose(1, 2)


# Where a layer's attention takes its keys from: called with its own (k, v) after RoPE, returns the keys, values
# and (B, S, Sk) mask to attend over (MoRCache.writer / MoRCache.reader).
KeySource = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor, torch.Tensor]]


class MoRAttention(nn.Module):
    """Grouped-query attention. ``qkv`` rows are grouped by kv head: [q heads of group 0, k_0, v_0, q heads of
    group 1, k_1, v_1, ...] (the training layout)."""

    def __init__(self, cfg: MoRConfig):
        super().__init__()
        self.head_dim, self.n_kv = cfg.head_dim, cfg.n_kv_heads
        self.q_per_kv = cfg.n_heads // cfg.n_kv_heads
        self.qkv = nn.Linear(cfg.d_model, (cfg.n_heads + 2 * cfg.n_kv_heads) * cfg.head_dim, bias=False)
        self.proj = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.d_model, bias=False)
        self.proj.mor_init_std = cfg.init_std / (2 * cfg.n_layers) ** 0.5

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], keys: KeySource) -> torch.Tensor:
        qkv = self.qkv(x)
        b, s, _ = qkv.shape
        qkv = qkv.view(b, s, self.n_kv, self.q_per_kv + 2, self.head_dim)
        q = qkv[:, :, :, :self.q_per_kv].reshape(b, s, self.n_kv * self.q_per_kv, self.head_dim)
        k, v = qkv[:, :, :, self.q_per_kv], qkv[:, :, :, self.q_per_kv + 1]
        cos, sin = rope
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        out = masked_attention(q, *keys(k, v))
        return self.proj(out.reshape(b, s, -1))


class MoRMLP(nn.Module):
    """SwiGLU; ``gate_up`` holds [gate; up]."""

    def __init__(self, cfg: MoRConfig):
        super().__init__()
        self.gate_up = nn.Linear(cfg.d_model, 2 * cfg.ffn_hidden, bias=False)
        self.down = nn.Linear(cfg.ffn_hidden, cfg.d_model, bias=False)
        self.down.mor_init_std = cfg.init_std / (2 * cfg.n_layers) ** 0.5

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return self.down(F.silu(gate) * up)


class MoRLayer(nn.Module):
    """Pre-norm decoder layer; its output includes both residual connections."""

    def __init__(self, cfg: MoRConfig):
        super().__init__()
        self.attn_norm = MoRRMSNorm(cfg.d_model, cfg.norm_eps)
        self.attn = MoRAttention(cfg)
        self.mlp_norm = MoRRMSNorm(cfg.d_model, cfg.norm_eps)
        self.mlp = MoRMLP(cfg)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], keys: KeySource) -> torch.Tensor:
        h = x + self.attn(self.attn_norm(x), rope, keys)
        return h + self.mlp(self.mlp_norm(h))


# ---- routers -----------------------------------------------------------------------------------------------------
class MoRRouterHead(nn.Module):
    """Linear(d, out) or Linear-GELU-Linear; always evaluated in fp32 (as in training)."""

    def __init__(self, d_model: int, out: int, arch: str):
        super().__init__()
        if arch == "linear":
            self.net = nn.Linear(d_model, out, bias=False)
        else:
            self.net = nn.Sequential(nn.Linear(d_model, d_model, bias=False), nn.GELU(),
                                     nn.Linear(d_model, out, bias=False))
        for m in self.net.modules():
            if isinstance(m, nn.Linear):
                m.mor_init_std = 0.02

    def forward(self, h: torch.Tensor, temperature: float) -> torch.Tensor:
        with torch.autocast(device_type=h.device.type, enabled=False):
            x = h.float() / temperature
            for m in self.net.modules() if isinstance(self.net, nn.Sequential) else [self.net]:
                if isinstance(m, nn.Linear):
                    x = F.linear(x, m.weight.float(), None if m.bias is None else m.bias.float())
                elif isinstance(m, nn.GELU):
                    x = F.gelu(x)
            return x


class MoRExpertChoiceRouter(nn.Module):
    """One router per recursion step (and one auxiliary router per step with ``router.aux_router``)."""

    def __init__(self, cfg: MoRConfig):
        super().__init__()
        rc, nr = cfg.router, cfg.num_recursions
        self.routers = nn.ModuleList(MoRRouterHead(cfg.d_model, 1, rc["arch"]) for _ in range(nr))
        self.aux_routers = (nn.ModuleList(MoRRouterHead(cfg.d_model, 1, rc["arch"]) for _ in range(nr))
                            if rc["aux_router"] else None)


class MoRTokenChoiceRouter(nn.Module):
    """One router ``Linear(d, Nr)`` choosing each token's depth; ``bias_steps``: the loss-free balancing bias in
    steps of ``router.bias_update_rate``."""

    def __init__(self, cfg: MoRConfig):
        super().__init__()
        self.router = MoRRouterHead(cfg.d_model, cfg.num_recursions, cfg.router["arch"])
        self.register_buffer("bias_steps", torch.zeros(cfg.num_recursions, dtype=torch.long))


# ---- the cache ---------------------------------------------------------------------------------------------------
class MoRCache(Cache):
    """Recursion-wise KV cache of an MoR model (model/inference/cache.py of the training project, growing).

    One buffer per unrolled layer position that makes keys and values: per sequence of the batch, the keys of the
    tokens that ran that layer, packed in arrival order, with their positions and a count; one scratch slot past
    the end takes the writes of tokens that are not cached, so every write has a static shape. A recursion step's
    layers cache only the tokens that ran the step; with KV sharing the later steps' layers own no buffer (they
    read the first step's). ``get_seq_length()`` counts the input columns seen (padding included), as generate()
    expects; ``seen`` (B,) the real tokens of each sequence, which give the positions of the next ones.
    """

    def __init__(self):
        super().__init__(layers=[])
        self.buffers: dict[int, dict[str, torch.Tensor]] = {}
        self.seen: Optional[torch.Tensor] = None
        self.columns = 0

    # ---- what transformers asks -------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.buffers)

    def __repr__(self) -> str:
        return f"MoRCache(buffers={sorted(self.buffers)}, columns={self.columns})"

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.columns

    def get_max_length(self, layer_idx: Optional[int] = None) -> int:
        return -1

    @property
    def is_compileable(self) -> bool:
        return False

    @property
    def is_croppable(self) -> bool:
        return False

    @property
    def is_initialized(self) -> bool:
        return self.seen is not None

    @property
    def batch_size(self) -> int:
        return 0 if self.seen is None else int(self.seen.shape[0])

    def reset(self) -> None:
        self.buffers, self.seen, self.columns = {}, None, 0

    def _rows(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        for buf in self.buffers.values():
            for key in buf:
                buf[key] = fn(buf[key])
        if self.seen is not None:
            self.seen = fn(self.seen)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._rows(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._rows(lambda t: t[indices.to(t.device)])

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._rows(lambda t: t.repeat_interleave(repeats, dim=0))

    def crop(self, max_length: int) -> None:
        raise NotImplementedError("MoRCache cannot be cropped: a recursion step's cache holds only the tokens that "
                                  "ran the step")

    # ---- what the model asks ------------------------------------------------------------------------------------
    def positions(self, valid: torch.Tensor) -> torch.Tensor:
        """(B, T) positions of the next T input columns: each real token's count of real tokens before it (padding
        gets a position too, never used)."""
        if self.seen is None:
            self.seen = torch.zeros(valid.shape[0], dtype=torch.long, device=valid.device)
        return (self.seen[:, None] + valid.long().cumsum(dim=1) - 1).clamp(min=0)

    def advance(self, valid: torch.Tensor) -> None:
        self.seen = self.seen + valid.long().sum(dim=1)
        self.columns += valid.shape[1]

    def cached_tokens(self) -> dict[int, torch.Tensor]:
        """Unrolled layer position -> (B,) tokens of each sequence in its buffer."""
        return {pos: buf["count"].clone() for pos, buf in sorted(self.buffers.items())}

    def _buffer(self, pos: int, k: torch.Tensor, need: int) -> dict[str, torch.Tensor]:
        """The buffer of position ``pos`` with room for ``need`` tokens per sequence plus the scratch slot."""
        buf = self.buffers.get(pos)
        b, hkv, d = k.shape[0], k.shape[2], k.shape[3]
        if buf is None:
            buf = {"k": k.new_zeros(b, 0, hkv, d), "v": k.new_zeros(b, 0, hkv, d),
                   "pos": torch.zeros(b, 0, dtype=torch.long, device=k.device),
                   "count": torch.zeros(b, dtype=torch.long, device=k.device)}
            self.buffers[pos] = buf
        slots = buf["k"].shape[1]
        if need + 1 > slots:
            grow = max(need + 1, 2 * slots, 64) - slots
            buf["k"] = torch.cat([buf["k"], buf["k"].new_zeros(b, grow, hkv, d)], dim=1)
            buf["v"] = torch.cat([buf["v"], buf["v"].new_zeros(b, grow, hkv, d)], dim=1)
            buf["pos"] = torch.cat([buf["pos"], buf["pos"].new_zeros(b, grow)], dim=1)
        return buf

    def writer(self, pos: int, positions: torch.Tensor, write: torch.Tensor) -> KeySource:
        """Key source of the layer at unrolled position ``pos``: appends the keys of the tokens where ``write``
        (B, T), then lets the queries at ``positions`` attend to the buffer."""

        def source(k: torch.Tensor, v: torch.Tensor):
            count = self.buffers[pos]["count"] if pos in self.buffers else 0
            buf = self._buffer(pos, k, int((count + write.long().sum(dim=1)).max()))   # one host sync per layer
            scratch = buf["k"].shape[1] - 1
            dest = torch.where(write, buf["count"][:, None] + write.long().cumsum(dim=1) - 1, scratch)
            dest = dest.clamp(max=scratch)
            idx = dest[..., None, None].expand_as(k)
            buf["k"].scatter_(1, idx, k.detach().to(buf["k"].dtype))
            buf["v"].scatter_(1, idx, v.detach().to(buf["v"].dtype))
            buf["pos"].scatter_(1, dest, positions)
            buf["count"] += write.long().sum(dim=1)
            return self._read(buf, positions, k)

        return source

    def reader(self, pos: int, positions: torch.Tensor) -> KeySource:
        """Key source of a layer under KV sharing: the buffer of the first-step layer at ``pos``, unchanged."""
        return lambda k, v: self._read(self.buffers[pos], positions, k)

    @staticmethod
    def _read(buf: dict[str, torch.Tensor], positions: torch.Tensor, k: torch.Tensor):
        slot = torch.arange(buf["k"].shape[1], device=k.device)
        in_use = slot[None, :] < buf["count"][:, None]
        return buf["k"].to(k.dtype), buf["v"].to(k.dtype), position_mask(positions, buf["pos"], in_use)


# ---- the model -----------------------------------------------------------------------------------------------------
class MoRPreTrainedModel(PreTrainedModel):
    config_class = MoRConfig
    base_model_prefix = "mor"
    main_input_name = "input_ids"
    supports_gradient_checkpointing = False
    _no_split_modules = ["MoRLayer"]

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        # The training project's initialisation (model/init.py): N(0, init_std) for the embedding, the head and the
        # projections into a layer, N(0, init_std / sqrt(2 n_layers)) for those into the residual stream (their
        # ``mor_init_std``), N(0, 0.02) for routers, ones for norms. from_pretrained draws only missing weights.
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=getattr(module, "mor_init_std", self.config.init_std))
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=self.config.init_std)
        elif isinstance(module, MoRRMSNorm):
            nn.init.ones_(module.weight)
        elif isinstance(module, MoRTokenChoiceRouter):
            nn.init.zeros_(module.bias_steps)


class MoRForCausalLM(MoRPreTrainedModel, GenerationMixin):
    """The whole model (embedding, unique layers, routers, final norm, head) under the training project's parameter
    names: ``embedding``, ``layers.{i}`` (unique layers; a shared one runs at several unrolled positions),
    ``router``, ``final_norm``, ``output_layer`` (only when the embeddings are not tied)."""

    def __init__(self, config: MoRConfig):
        super().__init__(config)
        cfg = config
        self.prelude, self.steps, self.coda = build_ops(cfg)
        unique = sorted({op.layer for op in [*self.prelude, *sum(self.steps, []), *self.coda]})
        self.embedding = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.layers = nn.ModuleDict({str(i): MoRLayer(cfg) for i in unique})
        self.final_norm = MoRRMSNorm(cfg.d_model, cfg.norm_eps)
        self.output_layer = None if cfg.tie_embeddings else nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        router, self._recurse = _ROUTINGS[cfg.routing]
        self.router = None if router is None else router(cfg)
        rc, defaults = cfg.router, _DEFAULTS[cfg.routing]
        self.alpha = rc["alpha"] if rc["alpha"] is not None else defaults["alpha"]
        self.func = rc["func"] or defaults["func"]
        self.post_init()

    # ---- transformers' accessors ------------------------------------------------------------------------------
    def get_input_embeddings(self) -> nn.Embedding:
        return self.embedding

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.embedding = value

    def get_output_embeddings(self) -> Optional[nn.Linear]:
        return self.output_layer

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        # generate() must not make a DynamicCache: the forward pass makes its own MoRCache and returns it
        return False

    # ---- the forward pass ---------------------------------------------------------------------------------------
    def _apply(self, op: LayerOp, x: torch.Tensor, rope, positions: torch.Tensor, write: torch.Tensor,
               cache: MoRCache) -> torch.Tensor:
        keys = cache.reader(op.kv_from, positions) if op.kv_from >= 0 else cache.writer(op.pos, positions, write)
        return self.layers[str(op.layer)](x, rope, keys)

    def _no_routing(self, h, rope, positions, valid, cache) -> torch.Tensor:
        for ops in self.steps:
            for op in ops:
                h = self._apply(op, h, rope, positions, valid, cache)
        return h

    def _expert_choice(self, h, rope, positions, valid, cache) -> torch.Tensor:
        rc, router = self.config.router, self.router
        caps, temperature = self.config.capacities, rc["temperature"]
        active = None
        for r, ops in enumerate(self.steps):
            logits = router.routers[r](h, temperature).squeeze(-1)
            if caps[r] >= 1.0:        # a step of capacity 1 keeps every token that reaches it
                goes_on = torch.ones_like(logits, dtype=torch.bool)
            elif router.aux_routers is not None:
                goes_on = router.aux_routers[r](h, temperature).squeeze(-1) >= 0
            else:
                goes_on = logits >= 0
            active = goes_on if active is None else active & goes_on
            gate = self.alpha * _ACTIVATION[self.func](logits)
            x = h
            for op in ops:
                x = self._apply(op, x, rope, positions, valid & active, cache)
            g = gate[..., None].to(x.dtype)
            update = g * x if rc["gating"] == "weighted" else g * (x - h)
            h = h + torch.where(active[..., None], update, torch.zeros_like(update)).to(h.dtype)
        return h

    def _token_choice(self, h, rope, positions, valid, cache) -> torch.Tensor:
        rc, router = self.config.router, self.router
        logits = router.router(h, rc["temperature"])
        probs = torch.softmax(logits, dim=-1) if self.func == "softmax" else torch.sigmoid(logits)
        scaled = self.alpha * probs
        choice = scaled
        if rc["balance"] == "loss_free":
            choice = scaled + (rc["bias_update_rate"] * router.bias_steps.float()).to(scaled.device)
        idx = choice.argmax(dim=-1, keepdim=True)
        depth, gate = idx.squeeze(-1) + 1, torch.gather(scaled, -1, idx).squeeze(-1)
        h1 = h
        for r, ops in enumerate(self.steps):
            y = h
            runs = valid if r == 0 else valid & (depth > r)
            for op in ops:
                y = self._apply(op, y, rope, positions, runs, cache)
            leaving = h1 + gate[..., None].to(y.dtype) * y
            step = r + 1
            h = torch.where((depth > step)[..., None], y, torch.where((depth == step)[..., None], leaving, h))
        return h

    def forward(self, input_ids: Optional[torch.LongTensor] = None, attention_mask: Optional[torch.Tensor] = None,
                past_key_values: Optional[MoRCache] = None, inputs_embeds: Optional[torch.Tensor] = None,
                labels: Optional[torch.LongTensor] = None, use_cache: Optional[bool] = None,
                logits_to_keep: int = 0, **kwargs) -> CausalLMOutputWithPast:
        """``input_ids`` (B, T) continue the sequences of ``past_key_values`` (a MoRCache; None: new sequences);
        ``attention_mask`` (B, past + T) or (B, T), 0 for padding. Returns the logits of the last
        ``logits_to_keep`` positions (0: all) and, with ``use_cache``, the cache holding the sequences so far."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("give exactly one of input_ids and inputs_embeds")
        if past_key_values is not None and not isinstance(past_key_values, MoRCache):
            raise TypeError(f"an MoR model keeps its keys in a MoRCache (recursion-wise: a recursion step caches only "
                            f"the tokens that ran it), not a {type(past_key_values).__name__}; pass "
                            "past_key_values=None (generate() makes one) or a MoRCache")
        use_cache = self.config.use_cache if use_cache is None else use_cache
        cache = past_key_values if past_key_values is not None else MoRCache()
        h = self.embedding(input_ids) if inputs_embeds is None else inputs_embeds
        b, t = h.shape[:2]
        if attention_mask is None:
            valid = torch.ones(b, t, dtype=torch.bool, device=h.device)
        else:
            if attention_mask.dim() != 2:
                raise ValueError("attention_mask must be 2-D (batch, columns), 1 for tokens and 0 for padding")
            valid = attention_mask[:, -t:].to(device=h.device, dtype=torch.bool)
        positions = cache.positions(valid)
        rope = rotary(positions, self.config.head_dim, self.config.rope_theta)
        for op in self.prelude:
            h = self._apply(op, h, rope, positions, valid, cache)
        h = getattr(self, self._recurse)(h, rope, positions, valid, cache)
        for op in self.coda:
            h = self._apply(op, h, rope, positions, valid, cache)
        cache.advance(valid)
        h = self.final_norm(h)
        if logits_to_keep:
            h = h[:, -logits_to_keep:]
        weight = self.embedding.weight if self.output_layer is None else self.output_layer.weight
        logits = F.linear(h, weight)
        loss = None
        if labels is not None:   # labels are the inputs: position t predicts label t + 1 (-100: ignored)
            loss = F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]),
                                   labels[:, 1:].reshape(-1).to(logits.device), ignore_index=-100)
        return CausalLMOutputWithPast(loss=loss, logits=logits, past_key_values=cache if use_cache else None)


# routing -> (its router module, the method that runs the recursion steps)
_ROUTINGS = {"none": (None, "_no_routing"), "expert_choice": (MoRExpertChoiceRouter, "_expert_choice"),
             "token_choice": (MoRTokenChoiceRouter, "_token_choice")}

__all__ = ["MoRCache", "MoRConfig", "MoRForCausalLM", "MoRPreTrainedModel"]
