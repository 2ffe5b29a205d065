"""Continuous depth-wise batching (model/inference/engine.py): with greedy decoding every request gets exactly the
tokens and logits of decoding it alone, for every routing variant, with KV sharing on and off, under slot refills,
different generation lengths, EOS in the middle and KV pools too small for the realised depths (sequences are
preempted and fed again); the block really runs tokens of different depths together; and the plain batched decode
with a static cache (model/inference/static.py) gives the engine's tokens."""
from __future__ import annotations

import pytest
import torch

from model.config import RouterConfig
from model.inference import Sampling, generate
from model.inference.depths import calibrate_depths
from model.inference.engine import DepthBatchServer, Request
from model.inference.static import StaticBatchServer
from model.mor import MoRModel
from tests.model.helpers import tiny

STD = 0.1   # as tests/model/test_decode.py: a wrong position or key moves logits by ~0.1-1, agreement is ~1e-6

VARIANTS = {
    "vanilla": dict(sharing="none"),
    "recursive-cycle": dict(routing="none", sharing="cycle"),
    "recursive-middle_sequence-kv": dict(routing="none", sharing="middle_sequence", kv_sharing=True),
    "ec": dict(routing="expert_choice", router=RouterConfig(capacities=[0.9, 0.6, 0.3])),
    "ec-default-capacities": dict(routing="expert_choice"),
    "ec-kv": dict(routing="expert_choice", kv_sharing=True, router=RouterConfig(capacities=[0.9, 0.6, 0.3])),
    "ec-aux-cycle": dict(routing="expert_choice", sharing="cycle", router=RouterConfig(aux_router=True)),
    "ec-sequence": dict(routing="expert_choice", sharing="middle_sequence"),
    "tc": dict(routing="token_choice"),
    "tc-kv": dict(routing="token_choice", kv_sharing=True),
    "tc-untied": dict(routing="token_choice", tie_embeddings=False),
}


def _model(**kw) -> MoRModel:
    torch.manual_seed(0)
    kw = {"sharing": "middle_cycle", **kw}
    return MoRModel(tiny(init_std=STD, max_seq_len=64, **kw)).eval()


def _requests(n: int, seed: int = 0) -> list[Request]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        prompt = torch.randint(0, 128, (int(torch.randint(1, 6, (1,), generator=g)),), generator=g).tolist()
        out.append(Request(prompt, int(torch.randint(3, 20, (1,), generator=g))))
    return out


def _alone(model: MoRModel, req: Request, eos_id=None) -> tuple[list[int], torch.Tensor]:
    """Decoding the request alone (model/inference/decode.py), and the full forward's logits over its tokens."""
    new = generate(model, [req.prompt], req.max_new_tokens, sampling=Sampling(temperature=0), eos_id=eos_id)[0]
    ids = req.prompt + new
    with torch.no_grad():
        logits = model(torch.tensor([ids]), causal_routing=True).logits[0]
    return new, logits[len(req.prompt) - 1:len(ids) - 1]


@pytest.mark.slow
@pytest.mark.parametrize("name", list(VARIANTS))
def test_every_request_gets_what_decoding_it_alone_gives(name):
    model = _model(**VARIANTS[name])
    requests = _requests(9)                       # 9 requests through 3 slots: slots are refilled mid-run
    engine = DepthBatchServer(model, slots=3, max_len=32, keep_logits=True)
    done = engine.run(requests)
    for req, got in zip(requests, done):
        want, logits = _alone(model, req)
        assert got.tokens == want
        torch.testing.assert_close(torch.stack(got.logits), logits, rtol=0, atol=1e-5)
    assert engine.stats.tokens == sum(r.max_new_tokens for r in requests)
    assert engine.pool.used_positions() == [0] * len(engine.pool.sizes)   # every position went back


@pytest.mark.slow
@pytest.mark.parametrize("name", ["ec", "ec-kv"])
def test_full_pools_preempt_and_every_request_still_gets_what_decoding_it_alone_gives(name):
    """Routers steered deep (70 % of tokens take 3 steps) against pools sized for 30/20/10 %: the pools fill, the
    youngest sequences go back to the queue and are fed again, and the tokens and logits stay exact."""
    model = _model(**VARIANTS[name])
    calibrate_depths(model, [0.1, 0.2, 0.7])
    requests = _requests(9)
    engine = DepthBatchServer(model, slots=3, max_len=32, keep_logits=True, capacities=[0.3, 0.2, 0.1])
    assert engine.pool.sizes == ([32] if name == "ec-kv" else [32, 32, 32])   # one sequence's worth each
    done = engine.run(requests)
    assert engine.stats.preemptions > 0
    for req, got in zip(requests, done):
        want, logits = _alone(model, req)
        assert got.tokens == want
        assert len(got.depths) == len(got.logits) == req.max_new_tokens   # nothing recorded twice
        torch.testing.assert_close(torch.stack(got.logits), logits, rtol=0, atol=1e-5)
    assert engine.stats.tokens == sum(r.max_new_tokens for r in requests)
    assert engine.stats.fed > sum(len(r.prompt) + r.max_new_tokens - 1 for r in requests)   # re-fed tokens
    assert engine.pool.used_positions() == [0] * len(engine.pool.sizes)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["vanilla", "recursive-middle_sequence-kv", "ec"])
def test_the_plain_batched_decode_gives_the_engines_tokens(name):
    """The baseline server (one forward pass of every slot per iteration, static cache) and the depth-wise
    engine make the same greedy tokens and logits, also with more requests than slots."""
    model = _model(**VARIANTS[name])
    requests = _requests(7, seed=2)
    static = StaticBatchServer(model, slots=3, max_len=32, keep_logits=True)
    got = static.run(requests)
    want = DepthBatchServer(model, slots=2, max_len=32, keep_logits=True).run(requests)
    for a, b in zip(got, want):
        assert a.tokens == b.tokens
        torch.testing.assert_close(torch.stack(a.logits), torch.stack(b.logits), rtol=0, atol=1e-5)
    assert static.stats.tokens == sum(r.max_new_tokens for r in requests)
    # every iteration ran every slot; depths are known where no router decides them
    assert static.stats.depth_counts == (None if name == "ec" else [0] * model.cfg.num_recursions
                                         + [sum(len(r.prompt) + r.max_new_tokens - 1 for r in requests)])


@pytest.mark.slow
def test_eos_in_the_middle_frees_the_slot_and_the_rest_still_match():
    model = _model(**VARIANTS["ec"], tie_embeddings=False)   # untied: greedy does not just repeat its input
    requests = _requests(6, seed=3)
    first = DepthBatchServer(model, slots=2, max_len=32).run(requests)
    # a request whose output has a token first made at position cut > 0: as EOS it stops that request there
    which, cut = next((i, j) for i, c in enumerate(first) for j in range(1, len(c.tokens))
                      if c.tokens[j] not in c.tokens[:j])
    eos = first[which].tokens[cut]
    engine = DepthBatchServer(model, slots=2, max_len=32, eos_id=eos)
    done = engine.run(requests)
    assert done[which].tokens == first[which].tokens[:cut + 1]
    for req, got in zip(requests, done):
        assert got.tokens == _alone(model, req, eos_id=eos)[0]
        assert got.tokens[-1] == eos or len(got.tokens) == req.max_new_tokens


def test_the_block_batches_tokens_of_different_depths_together():
    """Depth-wise batching: some block calls hold tokens at different steps, and a slot whose token leaves early
    takes its next token at once — the block runs on more rows per tick than the last-step tokens alone."""
    model = _model(**VARIANTS["ec"])
    engine = DepthBatchServer(model, slots=4, max_len=32)
    mixed = []
    real = engine._block

    def spy(rows, *rest):
        mixed.append(len(torch.unique(engine.step[rows])) > 1)
        return real(rows, *rest)

    engine._block = spy
    done = engine.run(_requests(8, seed=1))
    depths = [d for c in done for d in c.depths]
    assert min(depths) < max(depths)              # tokens leave at different depths
    assert any(mixed)
    # every token fed in was counted once: the prompts and every new token but the last of each request
    assert sum(engine.stats.depth_counts) == sum(len(r.prompt) + r.max_new_tokens - 1 for r in _requests(8, seed=1))


def test_more_slots_than_requests():
    model = _model(**VARIANTS["tc"])
    requests = _requests(2, seed=4)
    done = DepthBatchServer(model, slots=5, max_len=32).run(requests)
    assert [c.tokens for c in done] == [_alone(model, r)[0] for r in requests]
