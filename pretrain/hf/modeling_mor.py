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
- Length: ``generate()`` stops at ``max_seq_len`` tokens in all, prompt included (the longest sequence the model
  was trained on), whatever ``max_new_tokens`` asks; a prompt of ``max_seq_len`` tokens or more is refused.
- Padding: ``attention_mask`` zeros are neither attended to nor cached, and positions count real tokens only, so a
  left-padded batch gives each row what it gets alone.

This model is for inference and evaluation: the loss it returns with ``labels`` is the next-token loss under
causal routing, without the router losses of training (train with ``python -m pretrain.train``).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from .cache_mor import MoRCache
from .configuration_mor import MoRConfig
from .layers_mor import MoRExpertChoiceRouter, MoRLayer, MoRRMSNorm, MoRTokenChoiceRouter, rotary

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

    def _prepare_generated_length(self, generation_config, *args, **kwargs):
        # generate() stops at max_seq_len tokens in all, prompt included: the longest sequence the model was trained
        # on, where the training project's generation stops too. generation_config.json sets max_length to it, but
        # transformers replaces max_length by prompt + max_new_tokens when max_new_tokens is given: cap that here.
        cap = self.config.max_seq_len
        length = kwargs.get("input_ids_length")
        if length is not None and length >= cap:
            raise ValueError(f"the prompt is {length} tokens; this model was trained on sequences of at most "
                             f"max_seq_len={cap} tokens and generates within them: shorten the prompt")
        if (kwargs.get("has_default_max_length") is False and generation_config.max_new_tokens is not None
                and generation_config.max_length == cap):
            # that max_length is the cap of generation_config.json, not the caller's: no "both were set" warning
            kwargs["has_default_max_length"] = True
        generation_config = super()._prepare_generated_length(generation_config, *args, **kwargs)
        if generation_config.max_length is None or generation_config.max_length > cap:
            generation_config.max_length = cap
        return generation_config

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
