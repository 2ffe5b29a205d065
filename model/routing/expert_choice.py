"""Expert-choice routing: each recursion step is an "expert" that picks its top-k tokens.

The paper's equations, with G the router activation (``router.func``: sigmoid, the default, or tanh), θ_r the
step's router and f the shared block:

    g_t^r     = α · G(θ_r^T H_t^r)                                   gate of candidate t at step r
    H_t^{r+1} = g_t^r · f(H_t^r) + H_t^r   if g_t^r > P_β(G^r)        kept: the top k_r candidates
              = H_t^r                      otherwise

- Hierarchical filtering: step r's candidates are the tokens step r-1 kept (all tokens at r = 1); the kept
  indices are sorted, so the block runs on a causal, compacted subsequence at the original RoPE positions.
- Capacity: k_r = max(1, ⌊c_r·T⌋) per sequence, c_r = (Nr - r + 1)/Nr unless ``router.capacities``.
  ``router.cap_warmup_step`` W > 0 (training only): at optimizer step s, c_r(s) = c_r + (1 - c_r)·½(1 + cos(π·
  min(1, s/W))), from every token kept down to c_r.
- Gating ``weighted`` is the equation above (f's output includes its own residuals, as in the reference code);
  ``residual`` gates only the block's update: H ← H + g·(f(H) - H).
- Auxiliary loss: BCE of the raw logit θ_r^T H_t^r against "kept" (1) / "not kept" (0), averaged over the
  step's candidates and summed over steps (whatever G is); optional router z-loss, mean of logit².
- Inference (continues, causal routing): a token runs step r iff it ran step r-1 and G(logit) ≥ ½ (sigmoid) or
  ≥ 0 (tanh), i.e. logit ≥ 0 — what the BCE loss trains the router to predict, without looking at other tokens.
  A step of capacity 1 (step 1 by default) keeps every candidate in training, and so at inference too. With ``router.aux_router`` the logit is the auxiliary router's: one more ``Linear(d, 1)`` per step, trained
  by its own BCE against the top-k choice (``router.aux_router_coef``) on detached inputs, so it never changes the
  model. Training routing logs, per step, the fraction the rule sends on and its agreement with top-k.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from model.config import ModelConfig
from model.state import ForwardState
from model.routing.base import Op, Routing, RouterHead, StateSpec, Stream, head_params

_ACTIVATION = {"sigmoid": (torch.sigmoid, 0.5), "tanh": (torch.tanh, 0.0)}  # G, and G(0): the continue threshold


@dataclass
class ExpertChoiceStep:
    sel: torch.Tensor      # (B, k) sorted indices into the step's candidates
    gate: torch.Tensor     # (B, k) fp32 gate g = alpha * G(logit) of the kept tokens
    logits: torch.Tensor   # (B, n) fp32 router logits of all candidates
    target: torch.Tensor   # (B, n) 1.0 where the candidate was kept


class ExpertChoiceRouting(Routing):
    """One router per recursion step; step r keeps the top-k_r of the candidates that step r-1 kept.

    State between its ops: ``x`` (B, k, d) the kept tokens while the block runs, ``idx`` (B, k) their positions,
    ``gate`` (B, k), ``x0`` (residual gating: x before the block), and between steps ``cand`` (B, k_r).
    """

    name = "expert_choice"
    display_name = "expert-choice routing"
    has_router = True
    causal_already = False      # top-k over the whole sequence reads the future
    router_funcs = ("sigmoid", "tanh")
    options = frozenset({"router.cap_warmup_step", "router.aux_router"})
    export_name = "expert_choice"
    default_alpha = 0.1  # the reference runs
    default_z_loss_coef = 0.0
    default_func = "sigmoid"

    def __init__(self, cfg: ModelConfig):
        super().__init__(cfg)
        rc = cfg.router
        self.aux_coef, self.aux_router_coef, self.gating = rc.aux_loss_coef, rc.aux_router_coef, rc.gating
        self.routers = nn.ModuleList(RouterHead(cfg.d_model, 1, rc.arch) for _ in range(cfg.num_recursions))
        # Causal-inference routers trained on detached inputs, so they never change the main model; with them the
        # inference rule reads these instead of the main routers.
        self.aux_routers = (nn.ModuleList(RouterHead(cfg.d_model, 1, rc.arch) for _ in range(cfg.num_recursions))
                            if rc.aux_router else None)

    # ---- program --------------------------------------------------------------------------------------------
    @classmethod
    def step_ops(cls, cfg: ModelConfig, step: int) -> tuple[list[Op], list[Op]]:
        return [Op("ec_route", step)], [Op("ec_merge", step, closes=True)]

    @classmethod
    def state_after(cls, cfg: ModelConfig, op: Op, spec: StateSpec, batch: int, seq_len: int,
                    kept: Sequence[int], causal: bool = False) -> None:
        d = cfg.d_model
        if op.kind == "ec_route":
            k = seq_len if causal else kept[op.step]  # causal routing runs whole rows with an active mask
            spec.pop("cand", None)
            spec.update(x=((batch, k, d), False), gate=((batch, k), False))
            spec.update(active=((batch, k), True)) if causal else spec.update(idx=((batch, k), True))
            if cfg.router.gating == "residual":
                spec["x0"] = ((batch, k, d), False)
        elif op.kind == "ec_merge":
            for key in ("x", "x0", "idx", "gate"):
                spec.pop(key, None)
            if op.step < cfg.num_recursions - 1:
                spec.update(active=((batch, seq_len), True)) if causal else spec.update(cand=((batch, kept[op.step]),
                                                                                              True))
            else:
                spec.pop("active", None)

    @classmethod
    def stream_len(cls, cfg: ModelConfig, step: int, seq_len: int, kept: Sequence[int], causal: bool) -> int:
        return seq_len if causal else kept[step]

    @classmethod
    def max_kept_tokens(cls, cfg: ModelConfig, seq_len: int) -> list[int]:
        if cfg.router.cap_warmup_step > 0:
            return [seq_len] * cfg.num_recursions  # the warm-up starts with every token kept
        return cfg.capacity_tokens(seq_len)

    def capacities_now(self) -> list[float]:
        """c_r at this optimizer step: the warm-up's in training mode, the configured ones in eval mode."""
        warmup = self.cfg.router.cap_warmup_step
        if not (self.training and warmup > 0):
            return self.cfg.capacities
        extra = 0.5 * (1.0 + math.cos(math.pi * min(1.0, self.optimizer_step / warmup)))
        return [c + (1.0 - c) * extra for c in self.cfg.capacities]

    def kept_tokens(self, seq_len: int) -> list[int]:
        return self.cfg.capacity_tokens(seq_len, self.capacities_now())

    # ---- FLOPs ----------------------------------------------------------------------------------------------
    @classmethod
    def step_tokens(cls, cfg: ModelConfig, seq_len: int, n_steps: int,
                    depth_loads: Optional[Sequence[float]] = None) -> list[float]:
        return [float(k) for k in cfg.capacity_tokens(seq_len)]

    @classmethod
    def router_params(cls, cfg: ModelConfig) -> int:
        return head_params(cfg, 1) * cfg.num_recursions * (2 if cfg.router.aux_router else 1)

    @classmethod
    def router_flops(cls, cfg: ModelConfig, seq_len: int, step_tokens: Sequence[float]) -> float:
        # step r scores the candidates step r-1 kept (all T tokens at step 1)
        candidates = [float(seq_len)] + list(step_tokens[:-1])
        return 2.0 * head_params(cfg, 1) * sum(candidates) * (2 if cfg.router.aux_router else 1)

    # ---- the forward pass -----------------------------------------------------------------------------------
    def select(self, step: int, h_cand: torch.Tensor, k: int) -> ExpertChoiceStep:
        """Score the candidates (B, n, d) with step ``step``'s router; keep the top ``k`` of each row."""
        logits = self.routers[step](h_cand, self.temperature).squeeze(-1)
        gate_all = self.alpha * _ACTIVATION[self.func][0](logits)
        top = torch.topk(gate_all, k, dim=1, sorted=False).indices
        sel = torch.sort(top, dim=1).values  # keep causal order inside the compacted sequence
        target = torch.zeros_like(logits).scatter_(1, sel, 1.0)
        return ExpertChoiceStep(sel, torch.gather(gate_all, 1, sel), logits, target)

    def losses(self, step: int, out: ExpertChoiceStep,
               aux_logits: Optional[torch.Tensor]) -> dict[str, torch.Tensor]:
        """Loss terms of one step, each already multiplied by its coefficient, averaged over the candidates."""
        terms = {"bce": self.aux_coef * F.binary_cross_entropy_with_logits(out.logits, out.target)}
        if self.z_coef > 0:
            terms["z"] = self.z_coef * out.logits.square().mean()
        if aux_logits is not None:
            terms["aux_router_bce"] = self.aux_router_coef * F.binary_cross_entropy_with_logits(aux_logits,
                                                                                               out.target)
        return terms

    def rule(self, step: int, h: torch.Tensor, router_logits: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The inference rule at step ``step`` for tokens h (..., d): bool, True where the token goes on. A step
        of capacity 1 keeps every candidate in training, so every token that reached it runs it. Otherwise the
        token goes on iff G(logit) ≥ G(0), the logit being the auxiliary router's (on detached inputs: it learns
        to predict the main router's choices without changing the model) or the main router's."""
        if self.cfg.capacities[step] >= 1.0:
            return torch.ones(h.shape[:-1], dtype=torch.bool, device=h.device)
        if self.aux_routers is not None:
            logits = self.aux_routers[step](h.detach(), self.temperature).squeeze(-1)
        elif router_logits is not None:
            logits = router_logits
        else:
            logits = self.routers[step](h, self.temperature).squeeze(-1)
        return logits >= 0

    def write_back(self, h: torch.Tensor, x: torch.Tensor, idx: torch.Tensor, gate: torch.Tensor,
                   x0: Optional[torch.Tensor] = None) -> torch.Tensor:
        """H^{r+1} = H^r + g·f(H^r) at the kept positions ``idx`` (gating weighted; residual: g·(f(H^r) - H^r));
        ``x`` is f(H^r) of the kept tokens, ``x0`` their H^r. Other tokens are left as they were."""
        g = gate[..., None].to(x.dtype)
        update = g * x if self.gating == "weighted" else g * (x - x0)
        return h.scatter_add(1, idx[..., None].expand(-1, -1, h.shape[-1]), update.to(h.dtype))

    def run_op(self, op: Op, s: ForwardState, stats: dict) -> Optional[dict[str, torch.Tensor]]:
        if s.causal:
            return self._run_causal_op(op, s, stats)
        b, t, d = s["h"].shape
        r = op.step
        if op.kind == "ec_route":
            k = self.kept_tokens(t)[r]
            cand = s.pop("cand", None)
            h_cand = s["h"] if cand is None else torch.gather(s["h"], 1, cand[..., None].expand(-1, -1, d))
            step = self.select(r, h_cand, k)
            aux_logits = (self.aux_routers[r](h_cand.detach(), self.temperature).squeeze(-1)
                          if self.aux_routers is not None else None)
            idx = step.sel if cand is None else torch.gather(cand, 1, step.sel)  # original positions, sorted
            s.update(idx=idx, gate=step.gate, x=torch.gather(s["h"], 1, idx[..., None].expand(-1, -1, d)))
            if self.gating == "residual":
                s["x0"] = s["x"]
            terms = self.losses(r, step, aux_logits)
            s["aux"] = s["aux"] + sum(terms.values())
            s.trace_logits = step.logits  # for the trace only: never crosses a stage
            stats[f"r{r + 1}/kept_frac"] = torch.tensor(k / t)
            stats[f"r{r + 1}/gate_mean"] = step.gate.detach().mean()
            # What the inference rule would do with these candidates: the fraction it sends on, and how often it
            # agrees with top-k (the paper's "sampling accuracy"), averaged over the step's candidates.
            goes_on = self.rule(r, h_cand.detach(), step.logits.detach()).float()
            stats[f"r{r + 1}/rule_continue_frac"] = goes_on.mean()
            stats[f"r{r + 1}/sampling_acc"] = (goes_on == step.target).float().mean()
            stats.update({f"r{r + 1}/{n}": v.detach() for n, v in terms.items()})
            return None
        if op.kind == "ec_merge":
            x, idx, gate = s.pop("x"), s.pop("idx"), s.pop("gate")
            s["h"] = self.write_back(s["h"], x, idx, gate, s.pop("x0", None))
            if r < self.nr - 1:
                s["cand"] = idx
            logits, s.trace_logits = s.trace_logits, None
            return {"idx": idx, "h": s["h"], "gate": gate, "logits": torch.empty(0) if logits is None else logits}
        return super().run_op(op, s, stats)

    def stream(self, step: int, s: ForwardState, compact: bool) -> Stream:
        if s.causal:  # whole rows; attention among the tokens still running (and each token itself)
            return Stream("x", key_active=s["active"].bool())
        return Stream("x", positions=s["idx"])  # the kept tokens, already compacted at ec_route

    # ---- causal routing (inference) -------------------------------------------------------------------------
    # Each token decides alone whether it runs step r (``continues``), so no token's path depends on a later
    # token. State: ``active`` (B, T) bool, the tokens running this step (a token that stopped never runs
    # again), ``gate`` (B, T), ``x`` (B, T, d) the rows the block runs on, ``x0`` for residual gating.
    def _run_causal_op(self, op: Op, s: ForwardState, stats: dict) -> Optional[dict[str, torch.Tensor]]:
        r = op.step
        if op.kind == "ec_route":
            activation = _ACTIVATION[self.func][0]
            logits = self.routers[r](s["h"], self.temperature).squeeze(-1)
            goes_on = self.rule(r, s["h"], logits)
            before = s.pop("active", None)
            active = goes_on if before is None else before.bool() & goes_on
            s.update(active=active, gate=self.alpha * activation(logits), x=s["h"])
            if self.gating == "residual":
                s["x0"] = s["x"]
            stats[f"r{r + 1}/kept_frac"] = active.float().mean().detach()
            return None
        x, gate, active = s.pop("x"), s.pop("gate"), s["active"].bool()
        g = gate[..., None].to(x.dtype)
        update = g * x if self.gating == "weighted" else g * (x - s.pop("x0"))
        s["h"] = s["h"] + torch.where(active[..., None], update, torch.zeros_like(update)).to(s["h"].dtype)
        if r == self.nr - 1:
            s.pop("active")
        return {"active": active, "h": s["h"], "gate": gate}

    # ---- inference --------------------------------------------------------------------------------------------
    def continues(self, step: int, h: torch.Tensor) -> torch.Tensor:
        return self.rule(step, h)

    def _per_step(self, heads: nn.ModuleList, step: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        """Each row's logit from the router of its own step: (n,)."""
        logits = torch.stack([head(h, self.temperature).squeeze(-1) for head in heads], dim=-1)
        return torch.gather(logits, -1, step[:, None]).squeeze(-1)

    def token_runs(self, step: torch.Tensor, h: torch.Tensor, st: dict[str, torch.Tensor]
                   ) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self._per_step(self.routers, step, h)
        rule = self._per_step(self.aux_routers, step, h) if self.aux_routers is not None else logits
        if getattr(self, "_full", None) is None or self._full.device != h.device:
            self._full = torch.tensor([c >= 1.0 for c in self.cfg.capacities], device=h.device)
        full = self._full[step]   # steps of capacity 1: every token that reaches them runs them
        return full | (rule >= 0), self.alpha * _ACTIVATION[self.func][0](logits)

    def token_update(self, step: torch.Tensor, h: torch.Tensor, y: torch.Tensor, st: dict[str, torch.Tensor],
                     gate: torch.Tensor) -> torch.Tensor:
        g = gate[..., None].to(y.dtype)
        return h + (g * y if self.gating == "weighted" else g * (y - h)).to(h.dtype)
