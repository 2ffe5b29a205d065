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

The forward pass runs the flat op program of model/program.py. A pipeline stage (``pp_size`` > 1) builds only
the layers its slice of the program uses, and receives / returns the packed state at its edges.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint
from megatron.core import ModelParallelConfig
from megatron.core.tensor_parallel import (ColumnParallelLinear, VocabParallelEmbedding,
                                           gather_from_sequence_parallel_region, scatter_to_sequence_parallel_region)

from model.config import ModelConfig
from model.layers import (RMSNorm, Rotary, TransformerLayer, make_parallel_config, normal_init, tp_group,
                          tp_world_size)
from model.loss import lm_cross_entropy
from model.program import Op, build_program, pack, packed_rows, stage_ranges, state_spec, unpack
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
    def __init__(self, cfg: ModelConfig, mp: Optional[ModelParallelConfig] = None, *, pp_rank: int = 0,
                 pp_size: int = 1):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        mp = mp or make_parallel_config(cfg)
        self.sequence_parallel = mp.sequence_parallel
        self.plan = build_plan(cfg)
        self.program = build_program(cfg)
        self.pp_rank, self.pp_size = pp_rank, pp_size
        self.op_range = stage_ranges(cfg, pp_size)[pp_rank]
        self.is_first, self.is_last = pp_rank == 0, pp_rank == pp_size - 1
        my_ops = self.program[self.op_range[0]:self.op_range[1]]
        if self.is_first or (self.is_last and cfg.tie_embeddings):
            # The last stage of a tied model keeps a replica of the embedding for its head (kept in sync by
            # summing the replicas' gradients, as for shared layers).
            self.embedding = VocabParallelEmbedding(cfg.vocab_size, cfg.d_model,
                                                    init_method=normal_init(cfg.init_std), config=mp,
                                                    tp_group=tp_group())
        # Each unique layer exists once per stage; the program refers to it by index wherever it is reused, so
        # sharing is parameter identity, norms included. Keys are the unique layer indices.
        self.layers = nn.ModuleDict({str(i): TransformerLayer(cfg, mp)
                                     for i in sorted({op.layer for op in my_ops if op.kind == "layer"})})
        self.rotary = Rotary(cfg.head_dim, cfg.rope_theta)
        if self.is_last:
            self.final_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
            # Tied: the head borrows the embedding matrix at call time (skip_weight_param_allocation). It sees
            # the whole sequence (sequence parallelism ends before the final norm), so no SP gather here.
            self.output_layer = ColumnParallelLinear(cfg.d_model, cfg.vocab_size,
                                                     config=dataclasses.replace(mp, sequence_parallel=False),
                                                     init_method=normal_init(cfg.init_std), bias=False,
                                                     gather_output=False,
                                                     skip_weight_param_allocation=cfg.tie_embeddings,
                                                     tp_group=tp_group())
        self.router: Optional[nn.Module] = None
        if cfg.routing == "expert_choice":
            self.router = ExpertChoiceRouter(cfg)
        elif cfg.routing == "token_choice":
            self.router = TokenChoiceRouter(cfg)
        self.input_tensor: Optional[torch.Tensor] = None  # set by the pipeline schedule on non-first stages
        self.pipeline_dtype = torch.float32
        self.activation_checkpointing = False  # recompute each layer in backward (set by the trainer)
        # Tests and debugging set this to a list to record each recursion step's state (see _record).
        self.trace: Optional[list[dict[str, torch.Tensor]]] = None

    def _record(self, **state: torch.Tensor) -> None:
        if self.trace is not None:
            self.trace.append({k: v.detach().clone() for k, v in state.items()})

    def _run(self, layer_ids: tuple[int, ...], h: torch.Tensor, positions: torch.Tensor,
             key_active: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Run unique layers ``layer_ids`` in order (tests and references use this directly)."""
        rope = self.rotary(positions)
        for i in layer_ids:
            h = self.layers[str(i)](h, rope, key_active)
        return h

    def _layer(self, i: int, x: torch.Tensor, rope, active) -> torch.Tensor:
        layer = self.layers[str(i)]
        if self.activation_checkpointing and self.training and torch.is_grad_enabled():
            # keep only the layer's input; recompute its activations in backward
            return torch.utils.checkpoint.checkpoint(layer, x, rope, active, use_reentrant=False)
        return layer(x, rope, active)

    # ---- the op interpreter -----------------------------------------------------------------------------------
    def _op(self, op: Op, s: dict, stats: dict) -> None:
        """Apply one op to the state ``s`` in place. Keys with a leading "_" are local caches."""
        cfg, d = self.cfg, self.cfg.d_model
        b, t = s["h"].shape[:2]
        if op.kind == "layer" and self.sequence_parallel:
            self._sp_layer(op, s)
            return
        self._sp_gather(s)  # routing ops and plain layers see whole sequences
        if op.kind == "layer":
            if "x" in s:  # inside an expert-choice step: the compacted kept tokens
                if "_rope" not in s:
                    s["_rope"] = self.rotary(s["idx"])
                s["x"] = self._layer(op.layer, s["x"], s["_rope"], None)
                return
            if "_pos_rope" not in s:
                s["_pos_rope"] = self.rotary(torch.arange(t, device=s["h"].device).expand(b, t))
            key = "y" if "y" in s else "h"
            if key == "y" and op.step > 0 and cfg.tc_compact:
                idx, rope = self._tc_active(s, op.step)
                where = idx[..., None].expand(-1, -1, d)
                x = self._layer(op.layer, torch.gather(s["y"], 1, where), rope, None)
                # Slots past a row's active tokens hold inactive ones: their y is never read again.
                s["y"] = s["y"].scatter(1, where, x)
                return
            active = s["depth"] > op.step if ("y" in s and op.step > 0) else None
            s[key] = self._layer(op.layer, s[key], s["_pos_rope"], active)
        elif op.kind == "ec_route":
            k = cfg.capacity_tokens(t)[op.step]
            cand = s.pop("cand", None)
            h_cand = s["h"] if cand is None else torch.gather(s["h"], 1, cand[..., None].expand(-1, -1, d))
            step = self.router.select(op.step, h_cand, k)
            idx = step.sel if cand is None else torch.gather(cand, 1, step.sel)  # original positions, sorted
            s.update(idx=idx, gate=step.gate, x=torch.gather(s["h"], 1, idx[..., None].expand(-1, -1, d)))
            s.pop("_rope", None)
            if cfg.router.gating == "residual":
                s["x0"] = s["x"]
            terms = self.router.losses(op.step, h_cand, step)
            s["aux"] = s["aux"] + sum(terms.values())
            s["_logits"] = step.logits
            stats[f"r{op.step + 1}/kept_frac"] = torch.tensor(k / t)
            stats[f"r{op.step + 1}/gate_mean"] = step.gate.detach().mean()
            stats.update({f"r{op.step + 1}/{n}": v.detach() for n, v in terms.items()})
        elif op.kind == "ec_merge":
            x, idx, gate = s.pop("x"), s.pop("idx"), s.pop("gate")
            g = gate[..., None].to(x.dtype)
            update = g * x if cfg.router.gating == "weighted" else g * (x - s.pop("x0"))
            s["h"] = s["h"].scatter_add(1, idx[..., None].expand(-1, -1, d), update.to(s["h"].dtype))
            if op.step < cfg.num_recursions - 1:
                s["cand"] = idx
            self._record(idx=idx, h=s["h"], gate=gate, logits=s.pop("_logits", torch.empty(0)))
            s.pop("_rope", None)
        elif op.kind == "tc_route":
            route = self.router.route(s["h"])
            s.update(h1=s["h"], depth=route.depth, gate=route.gate)
            terms = self.router.losses(route)
            s["aux"] = s["aux"] + sum(terms.values())
            stats["gate_mean"] = route.gate.detach().mean()
            stats.update({n: v.detach() for n, v in terms.items()})
        elif op.kind == "tc_begin":
            s["y"] = s["h"]
        elif op.kind == "tc_end":
            r, depth, y = op.step + 1, s["depth"], s.pop("y")
            leaving = s["h1"] + s["gate"][..., None].to(y.dtype) * y
            s["h"] = torch.where((depth > r)[..., None], y, torch.where((depth == r)[..., None], leaving, s["h"]))
            stats[f"r{r}/kept_frac"] = (depth >= r).float().mean().detach()
            self._record(depth=depth, h=s["h"])
            if op.step == cfg.num_recursions - 1:
                for key in ("h1", "depth", "gate"):
                    s.pop(key)

    def _tc_active(self, s: dict, step: int) -> tuple[torch.Tensor, tuple]:
        """Positions of the tokens still recursing at token-choice ``step`` (depth > step), first in each row
        and in position order, then the row's other tokens as padding: (B, K) with K the most active tokens of
        any row, rounded up to a multiple of 64 (fewer distinct shapes for torch.compile). In that order causal
        attention is exactly the masked attention among active tokens: no active token comes after a padding
        slot. Cached for the step's layers."""
        cached = s.get("_tc_active")
        if cached is not None and cached[0] == step:
            return cached[1], cached[2]
        active = s["depth"] > step
        t = active.shape[1]
        k = int(active.sum(dim=1).max())                  # the one host sync of the step
        k = min(t, max(64, -(-k // 64) * 64))
        ar = torch.arange(t, device=active.device)
        idx = torch.argsort((~active).to(torch.int64) * t + ar, dim=1)[:, :k]
        rope = self.rotary(idx)
        s["_tc_active"] = (step, idx, rope)
        return idx, rope

    # ---- sequence parallelism ---------------------------------------------------------------------------------
    # Between routing ops the stream a layer runs on (h, the compacted x, or token-choice's y) is split along the
    # sequence over the TP group, padded to a multiple of TP at the end (causal attention keeps the padding from
    # touching real tokens). Routing ops gather it back whole, so routers see exactly what a TP = 1 run sees and
    # keep the same tokens under any layout.
    def _sp_layer(self, op: Op, s: dict) -> None:
        key = "x" if "x" in s else ("y" if "y" in s else "h")
        if s.get("_sp_key") != key:
            self._sp_gather(s)
            full = s[key]
            b, n = full.shape[:2]
            pad = (-n) % tp_world_size()
            positions = s["idx"] if key == "x" else torch.arange(n, device=full.device).expand(b, n)
            active = s["depth"] > op.step if (key == "y" and op.step > 0) else None
            if pad:
                full = F.pad(full, (0, 0, 0, pad))
                positions = F.pad(positions, (0, pad))
                active = F.pad(active, (0, pad)) if active is not None else None
            local = scatter_to_sequence_parallel_region(full.transpose(0, 1).contiguous(), group=tp_group())
            s.update(_sp_key=key, _sp_x=local.transpose(0, 1), _sp_len=n, _sp_rope=self.rotary(positions),
                     _sp_active=active)
        s["_sp_x"] = self._layer(op.layer, s["_sp_x"], s["_sp_rope"], s["_sp_active"])

    def _sp_gather(self, s: dict) -> None:
        key = s.pop("_sp_key", None)
        if key is None:
            return
        local, n = s.pop("_sp_x"), s.pop("_sp_len")
        s.pop("_sp_rope"), s.pop("_sp_active")
        # Everything after this point is computed identically on every TP rank: backward splits the gradient.
        full = gather_from_sequence_parallel_region(local.transpose(0, 1).contiguous(),
                                                    tensor_parallel_output_grad=False, group=tp_group())
        s[key] = full.transpose(0, 1)[:, :n]

    # ---- forward ----------------------------------------------------------------------------------------------
    def set_input_tensor(self, tensor) -> None:
        """megatron's pipeline schedule hands a non-first stage its received activations here."""
        self.input_tensor = tensor[0] if isinstance(tensor, (list, tuple)) else tensor

    def forward(self, tokens: torch.Tensor, labels: Optional[torch.Tensor] = None,
                loss_mask: Optional[torch.Tensor] = None):
        """tokens, labels, loss_mask: (B, T). Returns the mean next-token loss over loss_mask when labels given;
        labels equal to model.loss.IGNORE_INDEX (padding) count nowhere.

        On a pipeline stage other than the last, returns the packed state tensor for the next stage instead.
        """
        b, t = tokens.shape
        start, end = self.op_range
        if self.is_first:
            s = {"h": self.embedding(tokens), "aux": torch.zeros((), device=tokens.device)}
        else:
            s = unpack(self.input_tensor, state_spec(self.cfg, start, b, t), torch.float32)
        stats: dict[str, torch.Tensor] = {}
        for op in self.program[start:end]:
            self._op(op, s, stats)
        self._sp_gather(s)
        if not self.is_last:
            rows = packed_rows(self.cfg, self.pp_size, b, t)
            return pack(s, state_spec(self.cfg, end, b, t), rows, self.pipeline_dtype)
        h = self.final_norm(s["h"])
        weight = self.embedding.weight if self.cfg.tie_embeddings else None
        logits, _ = self.output_layer(h, weight=weight)
        aux_loss = s["aux"]
        if labels is None:
            return MoROutput(None, None, aux_loss, logits, stats)
        # the mean over the labels that count: loss_mask, and never padding (labels IGNORE_INDEX, model/loss.py)
        lm_loss = lm_cross_entropy(logits, labels, loss_mask=loss_mask, reduction="mean")
        return MoROutput(lm_loss + aux_loss, lm_loss, aux_loss, None, stats)

    # ---- introspection ----------------------------------------------------------------------------------------
    def external_parameters(self) -> list[tuple[nn.Module, nn.Parameter]]:
        """(module, parameter) pairs where a module uses a parameter it does not own: the tied head."""
        if self.is_last and self.cfg.tie_embeddings:
            return [(self.output_layer, self.embedding.weight)]
        return []

    def shared_parameters(self) -> list[nn.Parameter]:
        """Parameters of the layers that the recursion steps reuse."""
        ids = sorted(set(sum(self.plan.steps, ())))
        return [p for i in ids if str(i) in self.layers for p in self.layers[str(i)].parameters()]
