"""Causal routing (``forward(..., causal_routing=True)``): each token decides alone whether it runs a recursion
step, so the future never changes a past logit, for every routing variant; expert-choice training routing does."""
from __future__ import annotations

import pytest
import torch

from model.config import RouterConfig
from model.mor import MoRModel
from model.program import packed_rows, stage_ranges, state_spec
from tests.model.helpers import SHARP_STD, tiny

KINDS = [("expert_choice", "middle_cycle"), ("expert_choice", "cycle"), ("token_choice", "middle_cycle"),
         ("none", "middle_cycle"), ("none", "none"), ("expert_choice", "middle_cycle", "kv"),
         ("expert_choice", "middle_cycle", "aux"), ("expert_choice", "middle_sequence", "aux", "kv"),
         ("token_choice", "sequence", "kv"), ("token_choice", "middle_cycle", "kv"), ("none", "cycle", "kv"),
         ("none", "sequence"), ("none", "middle_sequence", "kv")]


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


# expert-choice with both gates (tanh is an expert-choice gate only)
CASES = [k + (f,) for k in KINDS for f in (("sigmoid", "tanh") if k[0] == "expert_choice" else ("default",))]


@pytest.mark.parametrize("kind", CASES, ids=lambda k: "-".join(k))
def test_the_future_never_changes_the_past(kind):
    routing, sharing, *extra, func = kind
    router = (RouterConfig(func=func, aux_router="aux" in extra) if routing == "expert_choice" else RouterConfig())
    model = _model(routing, sharing, router=router, kv_sharing="kv" in extra)
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


@pytest.mark.parametrize("kv_sharing", [False, True])
@pytest.mark.parametrize("routing", ["expert_choice", "token_choice"])
def test_causal_routing_over_pipeline_stages_equals_one_process(routing, kv_sharing):
    """Stage 0 then stage 1 of a 2-stage split in this process, with the same weights, cut inside a recursion
    step: the causal state (running tokens, gates, the shared first-step keys) crosses the cut."""
    cfg = tiny(routing=routing, init_std=SHARP_STD, kv_sharing=kv_sharing)
    full = _model(routing, "middle_cycle", kv_sharing=kv_sharing)
    cut = stage_ranges(cfg, 2, 32)[0][1]
    assert full.program[cut - 1].step >= 0 and full.program[cut].step >= 0   # inside the recursions
    spec = state_spec(cfg, cut, 2, 32, causal=True)
    assert ("active" in spec) == (routing == "expert_choice")
    assert any(k.startswith("kv") for k in spec) == kv_sharing
    stages = [MoRModel(cfg, pp_rank=r, pp_size=2).eval() for r in range(2)]
    weights = full.state_dict()
    for stage in stages:
        stage.load_state_dict({k: weights[k] for k in stage.state_dict()})
    tokens = _pair()[0]
    with torch.no_grad():
        packed = stages[0](tokens, causal_routing=True)
        assert packed.shape[0] == packed_rows(cfg, 2, 2, 32)
        stages[1].set_input_tensor(packed)
        got = stages[1](tokens, causal_routing=True).logits
    torch.testing.assert_close(got, _logits(full, tokens, causal_routing=True), rtol=0, atol=1e-5)
