"""Causal routing (``forward(..., causal_routing=True)``): each token decides alone whether it runs a recursion
step, so the future never changes a past logit, for every routing variant; expert-choice training routing does."""
from __future__ import annotations

import pytest
import torch

from model.config import RouterConfig
from model.mor import MoRModel
from model.program import packed_rows, stage_ranges, state_spec
from tests.model.helpers import SHARP_STD, tiny
from tests.model.variants import matrix

# The registry's matrix (tests/model/variants.py), and the expert-choice options beside it: the tanh gate (an
# expert-choice gate only) and the auxiliary router, with and without KV sharing.
CASES = {
    **matrix(),
    "ec-middle_cycle-tanh": dict(routing="expert_choice", sharing="middle_cycle", router=RouterConfig(func="tanh")),
    "ec-cycle-tanh": dict(routing="expert_choice", sharing="cycle", router=RouterConfig(func="tanh")),
    "ec-middle_cycle-aux": dict(routing="expert_choice", sharing="middle_cycle", router=RouterConfig(aux_router=True)),
    "ec-middle_sequence-aux-kv": dict(routing="expert_choice", sharing="middle_sequence", kv_sharing=True,
                                      router=RouterConfig(aux_router=True, func="tanh")),
    "ec-middle_sequence-aux-kv-sigmoid": dict(routing="expert_choice", sharing="middle_sequence", kv_sharing=True,
                                              router=RouterConfig(aux_router=True)),
    "ec-middle_cycle-kv-tanh": dict(routing="expert_choice", sharing="middle_cycle", kv_sharing=True,
                                    router=RouterConfig(func="tanh")),
    "tc-sequence-kv": dict(routing="token_choice", sharing="sequence", kv_sharing=True),
    "none-cycle-kv": dict(routing="none", sharing="cycle", kv_sharing=True),
    "none-middle_sequence-kv": dict(routing="none", sharing="middle_sequence", kv_sharing=True),
}


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


@pytest.mark.parametrize("case", list(CASES))
def test_the_future_never_changes_the_past(case):
    check_causal(CASES[case])


def check_causal(case: dict) -> None:
    kw = dict(case)
    model = _model(kw.pop("routing"), kw.pop("sharing"), **kw)
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
