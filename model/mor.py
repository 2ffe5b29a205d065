"""The Mixture-of-Recursions language model: vanilla, recursive and MoR (expert- or token-choice) in one class.

    tokens -> embedding -> prelude layers -> recursion step 1 .. Nr (shared block, routed) -> coda -> norm -> head

Expert-choice, step r (hierarchical filtering): the candidates are the tokens kept at step r-1 (all tokens at
r = 1); the step's router scores them, keeps the top k_r per sequence (indices sorted, so causal order holds), runs
the block on that compacted subsequence (RoPE at the original positions) and writes back
``h <- h + g * block(h)`` (gating ``weighted``, the default) for the kept tokens; the others stay as they were.

Token-choice: a router on the stream entering the first recursion gives each token its depth i_t and gate g_t.
At step r the tokens with i_t >= r run the block (attending only to each other); a token continuing past r takes
the block output ungated, and at its last step leaves as ``H1 + g * block(h)``, H1 being the stream before any
recursion.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn as nn
from megatron.core import ModelParallelConfig
from megatron.core.tensor_parallel import ColumnParallelLinear, VocabParallelEmbedding

from model.config import ModelConfig
from model.layers import RMSNorm, Rotary, TransformerLayer, make_parallel_config, normal_init, tp_group
from model.loss import lm_cross_entropy
from model.routers import ExpertChoiceRouter, TokenChoiceRouter
from model.sharing import build_plan


@dataclass
class MoROutput:
    loss: Optional[torch.Tensor]           # lm_loss + aux_loss (None without labels)
    lm_loss: Optional[torch.Tensor]
    aux_loss: torch.Tensor                 # router losses, coefficients applied, summed over steps
    logits: Optional[torch.Tensor] = None  # (B, T, V / TP) when no labels were given
    router_stats: dict[str, torch.Tensor] = field(default_factory=dict)  # detached scalars for logging


class MoRModel(nn.Module):
    def __init__(self, cfg: ModelConfig, mp: Optional[ModelParallelConfig] = None):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        mp = mp or make_parallel_config(cfg)
        self.plan = build_plan(cfg)
        self.embedding = VocabParallelEmbedding(cfg.vocab_size, cfg.d_model, init_method=normal_init(cfg.init_std),
                                                config=mp, tp_group=tp_group())
        # Each unique layer exists once; the plan refers to it by index wherever it is reused, so sharing is
        # parameter identity, norms included.
        self.layers = nn.ModuleList(TransformerLayer(cfg, mp) for _ in range(cfg.unique_layers))
        self.rotary = Rotary(cfg.head_dim, cfg.rope_theta)
        self.final_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        # Tied: the head borrows the embedding matrix at call time (skip_weight_param_allocation).
        self.output_layer = ColumnParallelLinear(cfg.d_model, cfg.vocab_size, config=mp,
                                                 init_method=normal_init(cfg.init_std), bias=False,
                                                 gather_output=False,
                                                 skip_weight_param_allocation=cfg.tie_embeddings,
                                                 tp_group=tp_group())
        self.router: Optional[nn.Module] = None
        if cfg.routing == "expert_choice":
            self.router = ExpertChoiceRouter(cfg)
        elif cfg.routing == "token_choice":
            self.router = TokenChoiceRouter(cfg)
        # Tests and debugging set this to a list to record each recursion step's state (see _record).
        self.trace: Optional[list[dict[str, torch.Tensor]]] = None

    def _record(self, **state: torch.Tensor) -> None:
        if self.trace is not None:
            self.trace.append({k: v.detach().clone() for k, v in state.items()})

    # ---- pieces -----------------------------------------------------------------------------------------------
    def _run(self, layer_ids: tuple[int, ...], h: torch.Tensor, positions: torch.Tensor,
             key_active: Optional[torch.Tensor] = None) -> torch.Tensor:
        rope = self.rotary(positions)
        for i in layer_ids:
            h = self.layers[i](h, rope, key_active)
        return h

    def _expert_choice(self, h: torch.Tensor, positions: torch.Tensor, stats: dict, aux: list) -> torch.Tensor:
        b, t, d = h.shape
        cand = positions  # (B, n) original positions of this step's candidates
        caps = self.cfg.capacity_tokens(t)
        for r, layer_ids in enumerate(self.plan.steps):
            h_cand = h if r == 0 else torch.gather(h, 1, cand[..., None].expand(-1, -1, d))
            step = self.router.select(r, h_cand, caps[r])
            idx = torch.gather(cand, 1, step.sel)                       # (B, k) original positions
            idx_d = idx[..., None].expand(-1, -1, d)
            x = torch.gather(h, 1, idx_d)
            y = self._run(layer_ids, x, idx)
            g = step.gate[..., None].to(y.dtype)
            update = g * y if self.cfg.router.gating == "weighted" else g * (y - x)
            h = h.scatter_add(1, idx_d, update.to(h.dtype))
            terms = self.router.losses(r, h_cand, step)
            aux.extend(terms.values())
            stats[f"r{r + 1}/kept_frac"] = torch.tensor(caps[r] / t)
            stats[f"r{r + 1}/gate_mean"] = step.gate.detach().mean()
            for name, v in terms.items():
                stats[f"r{r + 1}/{name}"] = v.detach()
            self._record(idx=idx, h=h, gate=step.gate, logits=step.logits)
            cand = idx
        return h

    def _token_choice(self, h: torch.Tensor, positions: torch.Tensor, stats: dict, aux: list) -> torch.Tensor:
        h1 = h
        route = self.router.route(h)
        depth, g = route.depth, route.gate[..., None]
        for r, layer_ids in enumerate(self.plan.steps, start=1):
            # Step 1 runs every token, so it needs no key mask (and keeps the fast causal kernel).
            active = None if r == 1 else depth >= r
            y = self._run(layer_ids, h, positions, active)
            leaving = h1 + g.to(y.dtype) * y
            h = torch.where((depth > r)[..., None], y, torch.where((depth == r)[..., None], leaving, h))
            stats[f"r{r}/kept_frac"] = (depth >= r).float().mean().detach()
            self._record(depth=depth, h=h)
        terms = self.router.losses(route)
        aux.extend(terms.values())
        stats["gate_mean"] = route.gate.detach().mean()
        for name, v in terms.items():
            stats[name] = v.detach()
        return h

    # ---- forward ----------------------------------------------------------------------------------------------
    def forward(self, tokens: torch.Tensor, labels: Optional[torch.Tensor] = None,
                loss_mask: Optional[torch.Tensor] = None) -> MoROutput:
        """tokens, labels, loss_mask: (B, T). Returns the mean next-token loss over loss_mask when labels given."""
        b, t = tokens.shape
        positions = torch.arange(t, device=tokens.device).expand(b, t)
        h = self.embedding(tokens)
        h = self._run(self.plan.prelude, h, positions)
        stats: dict[str, torch.Tensor] = {}
        aux: list[torch.Tensor] = []
        if self.cfg.routing == "expert_choice":
            h = self._expert_choice(h, positions, stats, aux)
        elif self.cfg.routing == "token_choice":
            h = self._token_choice(h, positions, stats, aux)
        else:
            for layer_ids in self.plan.steps:
                h = self._run(layer_ids, h, positions)
        h = self._run(self.plan.coda, h, positions)
        h = self.final_norm(h)
        weight = self.embedding.weight if self.cfg.tie_embeddings else None
        logits, _ = self.output_layer(h, weight=weight)
        aux_loss = torch.stack(aux).sum() if aux else logits.new_zeros((), dtype=torch.float32)
        if labels is None:
            return MoROutput(None, None, aux_loss, logits, stats)
        per_token = lm_cross_entropy(logits, labels)
        if loss_mask is None:
            lm_loss = per_token.mean()
        else:
            mask = loss_mask.to(per_token.dtype)
            lm_loss = (per_token * mask).sum() / mask.sum().clamp(min=1.0)
        return MoROutput(lm_loss + aux_loss, lm_loss, aux_loss, None, stats)

    def external_parameters(self) -> list[tuple[nn.Module, nn.Parameter]]:
        """(module, parameter) pairs where a module uses a parameter it does not own: the tied head."""
        return [(self.output_layer, self.embedding.weight)] if self.cfg.tie_embeddings else []

    # ---- introspection ----------------------------------------------------------------------------------------
    def shared_parameters(self) -> list[nn.Parameter]:
        """Parameters of the layers that the recursion steps reuse."""
        ids = sorted(set(sum(self.plan.steps, ())))
        return [p for i in ids for p in self.layers[i].parameters()]
