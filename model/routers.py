"""Routers of Mixture-of-Recursions: expert-choice (per-step top-k) and token-choice (per-token depth).

Router logits, gates and top-k are computed in fp32 with autocast off. In bf16 the gates at initialisation take
only a few distinct values and most candidates tie with the k-th score, so tie-breaking rather than the router
would pick the tokens (and differently under another parallel layout).

Everything here is vectorised over the batch with static shapes: k_r is known before the forward pass, so no
host-device synchronisation is needed.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from megatron.core import parallel_state

from model.config import ModelConfig


class RouterHead(nn.Module):
    """Linear(d, out) or a small MLP; always evaluated in fp32."""

    def __init__(self, d_model: int, out: int, arch: str, std: float = 0.02):
        super().__init__()
        if arch == "linear":
            self.net = nn.Linear(d_model, out, bias=False)
        else:
            self.net = nn.Sequential(nn.Linear(d_model, d_model, bias=False), nn.GELU(),
                                     nn.Linear(d_model, out, bias=False))
        for m in self.net.modules():
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, mean=0.0, std=std)

    def forward(self, h: torch.Tensor, temperature: float) -> torch.Tensor:
        # fp32 even when the model's parameters are bf16 (DeepSpeed's bf16 mode) or autocast is on.
        with torch.autocast(device_type=h.device.type, enabled=False):
            x = h.float() / temperature
            for m in self.net.modules() if isinstance(self.net, nn.Sequential) else [self.net]:
                if isinstance(m, nn.Linear):
                    x = F.linear(x, m.weight.float())
                elif isinstance(m, nn.GELU):
                    x = F.gelu(x)
            return x


@dataclass
class ExpertChoiceStep:
    sel: torch.Tensor      # (B, k) sorted indices into the step's candidates
    gate: torch.Tensor     # (B, k) fp32 gate g = alpha * sigmoid(logit) of the kept tokens
    logits: torch.Tensor   # (B, n) fp32 router logits of all candidates
    target: torch.Tensor   # (B, n) 1.0 where the candidate was kept


class ExpertChoiceRouter(nn.Module):
    """One router per recursion step; step r keeps the top-k_r of the candidates that step r-1 kept."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        rc = cfg.router
        self.alpha, self.temperature = cfg.alpha, rc.temperature
        self.aux_coef, self.z_coef = rc.aux_loss_coef, cfg.z_loss_coef
        self.routers = nn.ModuleList(RouterHead(cfg.d_model, 1, rc.arch) for _ in range(cfg.num_recursions))
        # Optional causal-inference routers: trained on detached inputs, so they never change the main model.
        self.aux_routers = (nn.ModuleList(RouterHead(cfg.d_model, 1, rc.arch) for _ in range(cfg.num_recursions))
                            if rc.aux_router else None)

    def select(self, step: int, h_cand: torch.Tensor, k: int) -> ExpertChoiceStep:
        logits = self.routers[step](h_cand, self.temperature).squeeze(-1)
        gate_all = self.alpha * torch.sigmoid(logits)
        top = torch.topk(gate_all, k, dim=1, sorted=False).indices
        sel = torch.sort(top, dim=1).values  # keep causal order inside the compacted sequence
        target = torch.zeros_like(logits).scatter_(1, sel, 1.0)
        return ExpertChoiceStep(sel, torch.gather(gate_all, 1, sel), logits, target)

    def losses(self, step: int, h_cand: torch.Tensor, out: ExpertChoiceStep) -> dict[str, torch.Tensor]:
        """Loss terms of one step, each already multiplied by its coefficient, averaged over the candidates."""
        terms = {"bce": self.aux_coef * F.binary_cross_entropy_with_logits(out.logits, out.target)}
        if self.z_coef > 0:
            terms["z"] = self.z_coef * out.logits.square().mean()
        if self.aux_routers is not None:
            aux_logits = self.aux_routers[step](h_cand.detach(), self.temperature).squeeze(-1)
            terms["aux_router_bce"] = F.binary_cross_entropy_with_logits(aux_logits, out.target)
        return terms


@dataclass
class TokenChoice:
    depth: torch.Tensor    # (B, T) long in 1..Nr: recursions this token runs
    gate: torch.Tensor     # (B, T) fp32 alpha * p(depth)
    logits: torch.Tensor   # (B, T, Nr) fp32
    probs: torch.Tensor    # (B, T, Nr) fp32 softmax


class TokenChoiceRouter(nn.Module):
    """Softmax over depths 1..Nr on the stream entering the first recursion; top-1 picks a token's depth."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        rc = cfg.router
        self.nr = cfg.num_recursions
        self.alpha, self.temperature = cfg.alpha, rc.temperature
        self.balance, self.balance_coef, self.z_coef = rc.balance, rc.balance_coef, cfg.z_loss_coef
        self.bias_update_rate = rc.bias_update_rate
        self.router = RouterHead(cfg.d_model, self.nr, rc.arch)
        # Loss-free balancing bias: shifts only the choice of depth, never the gate. Every update moves it by
        # exactly ±u or 0, so it is stored as an integer count of steps: exact, and immune to a bf16 cast.
        self.register_buffer("bias_steps", torch.zeros(self.nr, dtype=torch.long))
        # Depth loads of the last training forward pass (fraction of tokens per depth), read by update_bias().
        self.last_load = torch.full((self.nr,), 1.0 / self.nr)

    def route(self, h: torch.Tensor) -> TokenChoice:
        logits = self.router(h, self.temperature)
        probs = torch.softmax(logits, dim=-1)
        choice = probs + self.depth_bias.to(probs.device) if self.balance == "loss_free" else probs
        idx = choice.argmax(dim=-1, keepdim=True)
        gate = self.alpha * torch.gather(probs, -1, idx).squeeze(-1)
        return TokenChoice(idx.squeeze(-1) + 1, gate, logits, probs)

    def losses(self, out: TokenChoice) -> dict[str, torch.Tensor]:
        load = F.one_hot(out.depth - 1, self.nr).float().mean(dim=(0, 1))  # f_i, no gradient
        if self.training:
            self.last_load = load.detach()
        terms: dict[str, torch.Tensor] = {}
        if self.balance == "loss":
            importance = out.probs.mean(dim=(0, 1))  # P_i
            # Switch-style: Nr * sum_i f_i P_i, which is 1 under perfectly uniform routing.
            terms["balance"] = self.balance_coef * self.nr * (load * importance).sum()
        if self.z_coef > 0:
            terms["z"] = self.z_coef * torch.logsumexp(out.logits, dim=-1).square().mean()
        return terms

    @torch.no_grad()
    def update_bias(self, load: torch.Tensor | None = None) -> None:
        """Loss-free balancing, once per optimizer step: b_i += u * sign(mean load - load_i)."""
        if self.balance != "loss_free":
            return
        load = (self.last_load if load is None else load).float().clone()
        if parallel_state.model_parallel_is_initialized() and parallel_state.get_data_parallel_world_size() > 1:
            # Every data-parallel replica must move its bias the same way: balance the global load.
            torch.distributed.all_reduce(load, group=parallel_state.get_data_parallel_group())
            load /= parallel_state.get_data_parallel_world_size()
        self.bias_steps.add_(torch.sign(load.mean() - load).long().to(self.bias_steps.device))

    @property
    def depth_bias(self) -> torch.Tensor:
        return self.bias_update_rate * self.bias_steps.float()
