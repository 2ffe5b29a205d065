"""Token-choice routing: each token picks its recursion depth once, before the first recursion.

The paper's equations, with θ the router, H^1 the stream entering the first recursion and f the shared block:

    g_t       = α · G(θ^T H_t^1)         G: softmax over depths (``router.func`` default) or a sigmoid per depth
    i_t       = argmax_j (g_t^j + b_j)   the token's depth; b = 0 unless loss-free balancing
    H_t^{r+1} = f(H_t^r)                     r < i_t   (continues: the block output, ungated)
              = H_t^1 + g_t^{i_t}·f(H_t^r)   r = i_t   (leaves)

- The bias b only moves the choice of depth; the gate g_t^{i_t} stays the unbiased α·G.
- Balancing loss (Switch-style, ``balance: loss``): coef · Nr · Σ_i f_i·P_i, f_i the fraction of tokens with
  depth i (no gradient) and P_i = mean_t α·p_t^i; 1·coef under perfectly uniform routing when α = 1. Router
  z-loss: mean_t (logsumexp_j logit_t^j)².
- Loss-free balancing (``balance: loss_free``): once per optimizer step, b_i += u·sign(mean_j load_j − load_i),
  loads summed over every training micro-batch of the step and every data-parallel replica. b is stored as an
  integer count of ±u steps: exact, and immune to a bf16 cast.
- ``router.bal_warmup_step`` W > 0: while the optimizer step s < W (training only) every token takes depth Nr,
  with gate α·p(Nr), and b stays 0.
- Inference (continues): a token runs step r iff i_t > r, computed from H_t^1 alone.

At step r > 1 the block runs on the tokens still recursing, gathered into a shorter sequence (``tc_compact``), or
on every token with a key mask; in both, attention sees only the tokens with i_t ≥ r.

Capacity (``tc_capacity`` f > 0, training routing only): step r ≥ 2 holds at most L_r tokens per row, L_r a static
length (``step_capacity``), so a compiled step has fixed shapes and never reads a count on the host. A row's
tokens beyond L_r at step r — its latest ones — get depth r − 1 (they leave one step early, with their gate),
decided once, when the depths are chosen; the losses and loads still see the router's own choice.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from model.config import ModelConfig
from model.state import ForwardState
from model.routing.base import Op, Routing, RouterHead, StateSpec, Stream, all_reduce_over_replicas, head_params


@dataclass
class DepthChoice:
    depth: torch.Tensor    # (B, T) long in 1..Nr: recursions this token runs
    gate: torch.Tensor     # (B, T) fp32 alpha * p(depth)
    logits: torch.Tensor   # (B, T, Nr) fp32
    probs: torch.Tensor    # (B, T, Nr) fp32 p = G(logits), before alpha


class TokenChoiceRouting(Routing):
    """One router ``Linear(d, Nr)`` on the stream entering the first recursion; top-1 picks a token's depth.

    State between its ops: ``h1`` (B, T, d) the stream before any recursion, ``depth`` (B, T), ``gate`` (B, T),
    and inside a step ``y`` (B, T, d) the stream of the tokens still recursing.
    """

    name = "token_choice"
    display_name = "token-choice routing"
    has_router = True
    router_funcs = ("softmax", "sigmoid")
    options = frozenset({"router.bal_warmup_step", "tc_capacity"})
    export_name = "token_choice"
    default_alpha = 1.0
    default_z_loss_coef = 1e-5
    default_func = "softmax"

    def __init__(self, cfg: ModelConfig):
        super().__init__(cfg)
        rc = cfg.router
        self.balance, self.balance_coef = rc.balance, rc.balance_coef
        self.bias_update_rate, self.bal_warmup_step = rc.bias_update_rate, rc.bal_warmup_step
        self.router = RouterHead(cfg.d_model, self.nr, rc.arch)
        # Loss-free balancing bias: every update moves it by exactly ±u or 0, so it is kept as steps of u.
        self.register_buffer("bias_steps", torch.zeros(self.nr, dtype=torch.long))
        # Tokens per depth over the training micro-batches since the last end_step (loss-free balancing).
        self.load_counts: Optional[torch.Tensor] = None
        # whether the balancing warm-up is on (set by begin_step): a bool, not the step, because torch.compile
        # guards on what the forward reads, and a bool changes once
        self._balancing_warmup = self.bal_warmup_step > 0

    # ---- program --------------------------------------------------------------------------------------------
    @classmethod
    def entry_ops(cls, cfg: ModelConfig) -> list[Op]:
        return [Op("tc_route")]

    @classmethod
    def step_ops(cls, cfg: ModelConfig, step: int) -> tuple[list[Op], list[Op]]:
        return [Op("tc_begin", step)], [Op("tc_end", step, closes=True)]

    @classmethod
    def state_after(cls, cfg: ModelConfig, op: Op, spec: StateSpec, batch: int, seq_len: int,
                    kept: Sequence[int], causal: bool = False) -> None:
        full = (batch, seq_len, cfg.d_model)
        if op.kind == "tc_route":
            spec.update(h1=(full, False), depth=((batch, seq_len), True), gate=((batch, seq_len), False))
        elif op.kind == "tc_begin":
            spec["y"] = (full, False)
        elif op.kind == "tc_end":
            spec.pop("y")
            if op.step == cfg.num_recursions - 1:
                for key in ("h1", "depth", "gate"):
                    spec.pop(key)

    # ---- FLOPs ----------------------------------------------------------------------------------------------
    @classmethod
    def step_tokens(cls, cfg: ModelConfig, seq_len: int, n_steps: int,
                    depth_loads: Optional[Sequence[float]] = None) -> list[float]:
        # step r runs the tokens with depth >= r: T·Σ_{i≥r} f_i (balanced loads unless given)
        loads = list(depth_loads) if depth_loads is not None else [1.0 / n_steps] * n_steps
        return [seq_len * sum(loads[r:]) for r in range(n_steps)]

    @classmethod
    def router_params(cls, cfg: ModelConfig) -> int:
        return head_params(cfg, cfg.num_recursions)

    @classmethod
    def router_flops(cls, cfg: ModelConfig, seq_len: int, step_tokens: Sequence[float]) -> float:
        return 2.0 * float(seq_len) * head_params(cfg, cfg.num_recursions)

    # ---- the forward pass -----------------------------------------------------------------------------------
    @property
    def depth_bias(self) -> torch.Tensor:
        return self.bias_update_rate * self.bias_steps.float()

    def begin_step(self, step: int) -> None:
        super().begin_step(step)
        self._balancing_warmup = step < self.bal_warmup_step

    def warming_up(self) -> bool:
        return self.training and self._balancing_warmup

    def step_capacity(self, r: int, t: int) -> int:
        """L_r: the most tokens of a row that recursion step r (1-based) may run on under training routing; T
        without a capacity factor, at step 1, and during the balancing warm-up (every token runs every step)."""
        f = self.cfg.tc_capacity
        if f <= 0 or r == 1 or self.warming_up():
            return t
        expected = f * t * (self.nr - r + 1) / self.nr
        return min(t, max(64, math.ceil(expected / 64) * 64))

    def cap_depth(self, depth: torch.Tensor) -> torch.Tensor:
        """Depths after the capacity: at each step r ≥ 2 a row's running tokens past the first L_r leave at r−1.
        Steps are nested (a token capped at r runs no later step), so one pass in step order is exact."""
        t = depth.shape[1]
        for r in range(2, self.nr + 1):
            cap = self.step_capacity(r, t)
            if cap >= t:
                continue
            running = depth >= r
            over = running & (running.cumsum(dim=1) > cap)
            depth = torch.where(over, torch.full_like(depth, r - 1), depth)
        return depth

    def _scores(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        logits = self.router(h, self.temperature)
        probs = torch.softmax(logits, dim=-1) if self.func == "softmax" else torch.sigmoid(logits)
        return logits, probs, self.alpha * probs

    def _choose(self, scaled: torch.Tensor) -> torch.Tensor:
        """Index of the chosen depth (0-based), (..., 1): argmax of α·p + b."""
        choice = scaled + self.depth_bias.to(scaled.device) if self.balance == "loss_free" else scaled
        return choice.argmax(dim=-1, keepdim=True)

    def route(self, h: torch.Tensor) -> DepthChoice:
        logits, probs, scaled = self._scores(h)
        if self.warming_up():
            idx = torch.full_like(scaled[..., :1], self.nr - 1, dtype=torch.long)  # every recursion
        else:
            idx = self._choose(scaled)
        gate = torch.gather(scaled, -1, idx).squeeze(-1)
        return DepthChoice(idx.squeeze(-1) + 1, gate, logits, probs)

    def losses(self, out: DepthChoice) -> dict[str, torch.Tensor]:
        terms: dict[str, torch.Tensor] = {}
        if self.balance == "loss":
            load = F.one_hot(out.depth - 1, self.nr).float().mean(dim=(0, 1))  # f_i, no gradient
            importance = (self.alpha * out.probs).mean(dim=(0, 1))            # P_i
            terms["balance"] = self.balance_coef * self.nr * (load * importance).sum()
        if self.z_coef > 0:
            terms["z"] = self.z_coef * torch.logsumexp(out.logits, dim=-1).square().mean()
        return terms

    def write_back(self, r: int, h: torch.Tensor, h1: torch.Tensor, y: torch.Tensor, depth: torch.Tensor,
                   gate: torch.Tensor) -> torch.Tensor:
        """After step r (1-based): y = f(H^r) where depth > r, H^1 + g·y where depth == r, else h unchanged."""
        leaving = h1 + gate[..., None].to(y.dtype) * y
        return torch.where((depth > r)[..., None], y, torch.where((depth == r)[..., None], leaving, h))

    def run_op(self, op: Op, s: ForwardState, stats: dict) -> Optional[dict[str, torch.Tensor]]:
        if op.kind == "tc_route":
            route = self.route(s["h"])
            depth = route.depth if s.causal else self.cap_depth(route.depth)
            s.update(h1=s["h"], depth=depth, gate=route.gate)
            terms = self.losses(route)
            s["aux"] = s["aux"] + sum(terms.values())
            stats["gate_mean"] = route.gate.detach().mean()
            stats.update({n: v.detach() for n, v in terms.items()})
            if self.balance == "loss_free" and self.training and torch.is_grad_enabled():
                counts = F.one_hot(route.depth.detach() - 1, self.nr).sum(dim=(0, 1))
                self.load_counts = counts if self.load_counts is None else self.load_counts + counts
            return None
        if op.kind == "tc_begin":
            s["y"] = s["h"]
            return None
        if op.kind == "tc_end":
            r, depth, y = op.step + 1, s["depth"], s.pop("y")
            s["h"] = self.write_back(r, s["h"], s["h1"], y, depth, s["gate"])
            stats[f"r{r}/kept_frac"] = (depth >= r).float().mean().detach()
            record = {"depth": depth, "h": s["h"]}
            if op.step == self.nr - 1:
                for key in ("h1", "depth", "gate"):
                    s.pop(key)
            return record
        return super().run_op(op, s, stats)

    def stream(self, step: int, s: ForwardState, compact: bool) -> Stream:
        if step == 0:
            return Stream("y")  # every token runs the first recursion
        if not compact:
            return Stream("y", key_active=s["depth"] > step)
        active = s["depth"] > step
        t = active.shape[1]
        if self.cfg.tc_capacity > 0 and not s.causal:
            k = self.step_capacity(step + 1, t)   # static: cap_depth left at most this many per row
        else:
            k = int(active.sum(dim=1).max())      # dropless: the one host sync of the step
            k = min(t, max(64, -(-k // 64) * 64))  # fewer distinct shapes for torch.compile
        idx = self._active(active, k)
        return Stream("y", positions=idx, index=idx)

    @staticmethod
    def _active(active: torch.Tensor, k: int) -> torch.Tensor:
        """Positions of the tokens still recursing, first in each row and in position order, then the row's other
        tokens as padding: (B, k), k at least the most active tokens of any row. In that order causal attention
        is exactly the masked attention among active tokens: no active token comes after a padding slot, and a
        padding slot's output is never read."""
        t = active.shape[1]
        ar = torch.arange(t, device=active.device)
        return torch.argsort((~active).to(torch.int64) * t + ar, dim=1)[:, :k]

    # ---- once per optimizer step ------------------------------------------------------------------------------
    @torch.no_grad()
    def update_bias(self, load: torch.Tensor) -> torch.Tensor:
        """One loss-free balancing update, b_i += u·sign(mean load − load_i), from per-depth loads (counts or
        fractions) summed over pipeline stages and data-parallel replicas; none during the balancing warm-up.
        Returns the summed loads."""
        # float64: token counts summed over a large global batch stay exact
        load = all_reduce_over_replicas(load.detach().double().clone().to(self.bias_steps.device))
        if self.balance == "loss_free" and not self.optimizer_step < self.bal_warmup_step:
            self.bias_steps.add_(torch.sign(load.mean() - load).long())
        return load

    def end_step(self, applied: bool = True) -> dict[str, float]:
        counts, self.load_counts = self.load_counts, None
        if self.balance != "loss_free" or not applied:
            return {}
        if counts is None:  # this stage runs no router, or saw no training forward: it still joins the sum
            counts = torch.zeros(self.nr, dtype=torch.long, device=self.bias_steps.device)
        load = self.update_bias(counts)
        if self.optimizer_step < self.bal_warmup_step:
            self.bias_steps.zero_()
        bias = [self.bias_update_rate * n for n in self.bias_steps.tolist()]
        frac = (load / load.sum().clamp(min=1.0)).tolist()
        return {**{f"bias/d{i + 1}": b for i, b in enumerate(bias)},
                **{f"load/d{i + 1}": f for i, f in enumerate(frac)}}

    # ---- inference --------------------------------------------------------------------------------------------
    def continues(self, step: int, h: torch.Tensor) -> torch.Tensor:
        """``h``: the tokens' stream entering the first recursion (not the stream at step r)."""
        return self._choose(self._scores(h)[2]).squeeze(-1) + 1 > step

    def token_enter(self, h: torch.Tensor) -> dict[str, torch.Tensor]:
        route = self.route(h)
        return {"h1": h, "depth": route.depth, "gate": route.gate}

    def token_runs(self, step: torch.Tensor, h: torch.Tensor, st: dict[str, torch.Tensor]
                   ) -> tuple[torch.Tensor, torch.Tensor]:
        return st["depth"] > step, st["gate"]

    def token_update(self, step: torch.Tensor, h: torch.Tensor, y: torch.Tensor, st: dict[str, torch.Tensor],
                     gate: torch.Tensor) -> torch.Tensor:
        leaving = st["h1"] + gate[..., None].to(y.dtype) * y
        return torch.where((st["depth"] > step + 1)[..., None], y, leaving)
