"""Causal routing (``forward(..., causal_routing=True)``): each token decides alone whether it runs a recursion
step, so the future never changes a past logit, for every routing variant; expert-choice training routing does."""
from __future__ import annotations

import pytest
import torch

from model.config import RouterConfig
from model.mor import MoRModel
from tests.model.helpers import SHARP_STD, tiny

KINDS = [("expert_choice", "middle_cycle"), ("expert_choice", "cycle"), ("token_choice", "middle_cycle"),
         ("none", "middle_cycle"), ("none", "none")]


def _pair(vocab=128, b=2, t=32, cut=16, seed=0):
    """Two batches equal before position ``cut`` and different from it on."""
    g = torch.Generator().manual_seed(seed)
    a = torch.randint(0, vocab, (b, t), generator=g)
    z = a.clone()
    z[:, cut:] = torch.randint(0, vocab, (b, t - cut), generator=g)
    return a, z


def _logits(model, tokens, **kw):
    with torch.no_grad():
        return model(tokens, **kw).logits


def _model(routing, sharing, **kw):
    torch.manual_seed(0)
    return MoRModel(tiny(routing=routing, sharing=sharing, init_std=SHARP_STD, **kw)).eval()


@pytest.mark.parametrize("kind", KINDS, ids=lambda k: "-".join(k))
@pytest.mark.parametrize("func", ["sigmoid", "tanh"])
def test_the_future_never_changes_the_past(kind, func):
    routing, sharing = kind
    if routing != "expert_choice" and func == "tanh":
        pytest.skip("tanh is an expert-choice gate")
    model = _model(routing, sharing, router=RouterConfig(func=func) if routing == "expert_choice" else RouterConfig())
    a, z = _pair()
    la, lz = _logits(model, a, causal_routing=True), _logits(model, z, causal_routing=True)
    assert torch.equal(la[:, :16], lz[:, :16])
    assert not torch.equal(la[:, 16:], lz[:, 16:])


def test_expert_choice_training_routing_reads_the_future():
    """What causal routing exists for: top-k over the sequence lets later tokens move earlier logits."""
    model = _model("expert_choice", "middle_cycle")
    a, z = _pair()
    assert not torch.allclose(_logits(model, a)[:, :16], _logits(model, z)[:, :16], atol=1e-3)


def test_a_token_that_stops_never_runs_again_and_some_stop():
    model = _model("expert_choice", "middle_cycle")
    model.trace = []
    with torch.no_grad():
        model(_pair()[0], causal_routing=True)
    active = [rec["active"] for rec in model.trace]
    assert len(active) == 3
    for before, after in zip(active, active[1:]):
        assert not (after & ~before).any()
    assert 0 < active[-1].sum() < active[0].numel()     # a real mix: some tokens stop, some go on


def test_each_token_follows_its_own_rule():
    """Step r's running tokens are exactly those that ran step r-1 and whose router says go on (``continues``),
    read from the state entering the step; a running token gets h + g·block(h), the others stay as they were."""
    model = _model("expert_choice", "middle_cycle")
    states = []
    real = model.router.run_op

    def spy(op, s, stats):
        if op.kind == "ec_route":
            states.append((s["h"].clone(), s.get("active")))
        return real(op, s, stats)

    model.router.run_op = spy
    model.trace = []
    with torch.no_grad():
        model(_pair()[0], causal_routing=True)
    for r, ((h, before), rec) in enumerate(zip(states, model.trace)):
        want = model.router.continues(r, h)
        if before is not None:
            want = want & before
        assert torch.equal(rec["active"], want)
        assert torch.equal(rec["h"][~want], h[~want])


@pytest.mark.parametrize("gating", ["weighted", "residual"])
def test_when_every_token_goes_on_it_equals_training_routing_at_full_capacity(gating):
    """Router weights of zero: sigmoid(0) = 0.5 meets the threshold, so every token runs every step, with the same
    gates as top-k at capacity 1 keeping every token."""
    model = _model("expert_choice", "middle_cycle", router=RouterConfig(capacities=[1.0, 1.0, 1.0], gating=gating))
    with torch.no_grad():
        for head in model.router.routers:
            head.net.weight.zero_()
    tokens = _pair()[0]
    torch.testing.assert_close(_logits(model, tokens, causal_routing=True), _logits(model, tokens),
                               rtol=1e-5, atol=1e-5)


def test_causal_routing_over_pipeline_stages_is_refused():
    model = MoRModel(tiny(), pp_rank=0, pp_size=2)
    with pytest.raises(NotImplementedError, match="not implemented yet"):
        model(_pair()[0], causal_routing=True)
