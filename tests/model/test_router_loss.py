"""The router loss a model returns is the sum of every recursion step's terms, not of some of them.

Each step's terms are recomputed from what the step recorded (its candidates' logits and the tokens it kept), so
a term left out of the total, or a total taken over one step, shows as a difference of a whole step's loss.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from model.config import RouterConfig
from model.mor import MoRModel
from tests.model.helpers import SHARINGS, tiny

B, T = 2, 24
LOSS_TERMS = ("bce", "z", "aux_router_bce", "balance")


def _forward(model: MoRModel):
    x = torch.randint(0, model.cfg.vocab_size, (B, T + 1))
    model.trace = []
    out = model(x[:, :-1], x[:, 1:])
    trace, model.trace = model.trace, None
    return x[:, :-1], out, trace


def _loss_stats(out) -> dict[str, torch.Tensor]:
    return {k: v for k, v in out.router_stats.items() if k.rsplit("/", 1)[-1] in LOSS_TERMS}


@pytest.mark.parametrize("sharing", SHARINGS)
def test_expert_choice_total_is_the_sum_over_every_step(sharing):
    cfg = tiny(sharing=sharing, router=RouterConfig(z_loss_coef=0.01))
    model = MoRModel(cfg)
    _, out, trace = _forward(model)
    stats = _loss_stats(out)
    assert len(trace) == cfg.num_recursions == 3
    cand = torch.arange(T).expand(B, T)
    for r, step in enumerate(trace, start=1):
        logits, kept = step["logits"], step["idx"]
        target = (cand[..., None] == kept[:, None, :]).any(-1).float()
        assert target.sum(dim=1).tolist() == [kept.shape[1]] * B
        bce = cfg.router.aux_loss_coef * F.binary_cross_entropy_with_logits(logits, target)
        torch.testing.assert_close(stats[f"r{r}/bce"], bce, rtol=1e-6, atol=0)
        torch.testing.assert_close(stats[f"r{r}/z"], 0.01 * logits.square().mean(), rtol=1e-6, atol=0)
        cand = kept
    assert set(stats) == {f"r{r}/{n}" for r in (1, 2, 3) for n in ("bce", "z")}
    # each step's share is far above the tolerance: a step left out cannot hide
    per_step = [sum(v for k, v in stats.items() if k.startswith(f"r{r}/")) for r in (1, 2, 3)]
    assert min(per_step) > 1e3 * 1e-6 * out.aux_loss
    torch.testing.assert_close(out.aux_loss, sum(stats.values()), rtol=1e-6, atol=0)
    torch.testing.assert_close(out.loss, out.lm_loss + out.aux_loss, rtol=1e-6, atol=0)


@pytest.mark.parametrize("balance", ["loss", "loss_free"])
def test_token_choice_total_is_the_sum_of_its_terms(balance):
    cfg = tiny(routing="token_choice", router=RouterConfig(z_loss_coef=0.01, balance=balance))
    model = MoRModel(cfg)
    tokens, out, trace = _forward(model)
    stats = _loss_stats(out)
    # the router's own terms on the stream entering the first recursion, recomputed here
    with torch.no_grad():
        h1 = model.run_layers(model.plan.prelude, model.embed(tokens), torch.arange(T).expand(B, T))
        terms = model.router.losses(model.router.route(h1))
    assert torch.equal(model.router.route(h1).depth, trace[0]["depth"])
    assert set(stats) == set(terms) == ({"balance", "z"} if balance == "loss" else {"z"})
    for name, value in terms.items():
        torch.testing.assert_close(stats[name], value, rtol=1e-6, atol=0)
        assert value > 1e3 * 1e-6 * out.aux_loss
    torch.testing.assert_close(out.aux_loss, sum(terms.values()), rtol=1e-6, atol=0)
    torch.testing.assert_close(out.loss, out.lm_loss + out.aux_loss, rtol=1e-6, atol=0)
