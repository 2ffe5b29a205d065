"""Decoding with the KV cache equals the full forward pass with causal routing, for every variant; the caches hold
what recursion-wise caching and recursive KV sharing say, and their byte counts follow the formula."""
from __future__ import annotations

import pytest
import torch

from model.config import RouterConfig
from model.inference import KVCache, Sampling, cache_bytes, decode_step, generate, prefill
from model.mor import MoRModel
from model.routing import ExpertChoiceRouting, TokenChoiceRouting, routing_class
from tests.model.helpers import SHARINGS, tiny
from tests.model.variants import matrix

# Large enough weights that a token at a wrong position or a missing key moves the logits by ~0.1-1 (a cache whose
# positions were shifted by one moved them by 0.2), while prefill + decode and the full forward agree to ~1e-6.
STD = 0.1
PROMPTS = [5, 11, 2]   # prompt lengths: a batch of different lengths
DECODE = 64            # decode steps of the longest-running sequence
TOTAL = min(PROMPTS) + DECODE

# The registry's matrix (tests/model/variants.py) and option cases of the routings beside it.
VARIANTS = {
    **matrix(),
    **{f"none-{s}-kv": dict(routing="none", sharing=s, kv_sharing=True) for s in SHARINGS},
    "ec-aux": dict(routing="expert_choice", router=RouterConfig(aux_router=True)),
    "ec-aux-kv": dict(routing="expert_choice", kv_sharing=True, router=RouterConfig(aux_router=True)),
    "ec-tanh-residual-cycle": dict(routing="expert_choice", sharing="cycle",
                                   router=RouterConfig(func="tanh", gating="residual")),
    "tc-sequence-sigmoid": dict(routing="token_choice", sharing="middle_sequence",
                                router=RouterConfig(func="sigmoid")),
}


def _model(**kw) -> MoRModel:
    torch.manual_seed(0)
    kw = {"sharing": "middle_cycle", **kw}
    return MoRModel(tiny(init_std=STD, max_seq_len=TOTAL + 8, **kw)).eval()


def _tokens(b: int, t: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 128, (b, t), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def _decode_all(model: MoRModel, seqs: torch.Tensor, prompts: list[int]) -> tuple[list[torch.Tensor], KVCache]:
    """Prefill each row's prompt, then feed the row's following tokens one by one (rows end at different steps);
    the logits at every position of every row."""
    b, total = seqs.shape
    cache = KVCache(model.cfg, b, total)
    first = prefill(model, cache, [seqs[i, :n].tolist() for i, n in enumerate(prompts)])
    rows = [[first[i, j] for j in range(n)] for i, n in enumerate(prompts)]
    pos = torch.tensor(prompts)
    while bool((pos < total).any()):
        live = pos < total
        out = decode_step(model, cache, seqs[torch.arange(b), pos.clamp(max=total - 1)], live)
        for i in range(b):
            if live[i]:
                rows[i].append(out[i])
        pos = pos + live.long()
    return [torch.stack(r) for r in rows], cache


@pytest.mark.parametrize("name", list(VARIANTS))
def test_prefill_and_decode_equal_the_full_forward(name):
    check_decode(VARIANTS[name])


def check_decode(variant: dict) -> None:
    model = _model(**variant)
    seqs = _tokens(len(PROMPTS), TOTAL)
    with torch.no_grad():
        full = model(seqs, causal_routing=True).logits
    got, cache = _decode_all(model, seqs, PROMPTS)
    for i in range(len(PROMPTS)):
        torch.testing.assert_close(got[i], full[i], rtol=0, atol=1e-5)
    assert torch.equal(cache.lengths, torch.full((len(PROMPTS),), TOTAL))


def _depths(model: MoRModel, seqs: torch.Tensor) -> torch.Tensor:
    """(B, T) recursion steps each token runs in the full forward with causal routing (from the trace)."""
    model.trace = []
    with torch.no_grad():
        model(seqs, causal_routing=True)
    trace, model.trace = model.trace, None
    routing = routing_class(model.cfg)
    if issubclass(routing, TokenChoiceRouting):
        return trace[0]["depth"]
    if issubclass(routing, ExpertChoiceRouting):
        return torch.stack([t["active"] for t in trace]).sum(dim=0)
    return torch.full(seqs.shape, model.cfg.num_recursions)


@pytest.mark.parametrize("name", list(matrix()))
def test_each_step_caches_only_its_tokens(name):
    """Recursion-wise caching: the cache of a step-r layer holds exactly the tokens that ran step r, at their
    positions; under KV sharing the later steps keep no cache at all."""
    check_caches(VARIANTS[name])


def check_caches(variant: dict) -> None:
    model = _model(**variant)
    seqs = _tokens(len(PROMPTS), 24)
    depth = _depths(model, seqs)
    assert 0 < int((depth < model.cfg.num_recursions).sum()) or not routing_class(model.cfg).has_router
    _, cache = _decode_all(model, seqs, [3, 7, 1])
    for op in cache.layer_ops:
        if op.kv_from >= 0:
            assert op.pos not in cache.buffers
            continue
        buf = cache.buffers[op.pos]
        for i in range(len(PROMPTS)):
            want = torch.arange(24) if op.step < 0 else torch.nonzero(depth[i] > op.step).squeeze(-1)
            assert torch.equal(buf.pos[i, :int(buf.count[i])], want)
    assert torch.equal(cache.used_bytes(), torch.tensor([cache_bytes(model.cfg, d) for d in depth]))


def _forced_depth_model(depths: list[int], kv_sharing: bool) -> MoRModel:
    """An expert-choice model whose tokens run hand-made depths: the block is the identity (zero output
    projections), so h stays a multiple of the embedding; token t's embedding is (x_t, 1, 0, ...), and router r
    reads x_t - θ_r, so token t runs step r iff x_t ≥ θ_r (capacities below 1: at capacity 1 every token runs
    the step)."""
    model = MoRModel(tiny(routing="expert_choice", sharing="cycle", nr=3, kv_sharing=kv_sharing,
                          router=RouterConfig(capacities=[0.9, 0.6, 0.3]))).eval()
    thresholds = torch.tensor([0.5, 1.5, 2.5])
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("attn.proj.weight", "mlp.down.weight")):
                p.zero_()
        emb = model.embedding.weight
        emb.zero_()
        for tok in range(4):  # token id d runs d steps
            emb[tok, 0], emb[tok, 1] = float(tok), 1.0
        for r, head in enumerate(model.router.routers):
            head.net.weight.zero_()
            head.net.weight[0, 0], head.net.weight[0, 1] = 1.0, -thresholds[r]
    return model


@pytest.mark.parametrize("kv_sharing", [False, True])
def test_cache_bytes_equal_the_formula_for_a_hand_made_depth_assignment(kv_sharing):
    depths = [[3, 1, 2, 0, 3, 3, 1, 2], [0, 0, 1, 1, 2, 2, 3, 3]]
    model = _forced_depth_model(depths, kv_sharing)
    seqs = torch.tensor(depths)
    assert torch.equal(_depths(model, seqs), seqs)   # the construction works
    cfg, per_token = model.cfg, 2 * model.cfg.n_kv_heads * model.cfg.head_dim * 4
    cache = KVCache(cfg, 2, 8)
    prefill(model, cache, depths)
    per_step = cfg.layers_per_recursion
    for i, d in enumerate(depths):
        # step r's layers cache the tokens of depth ≥ r (only step 1's with sharing); no prelude/coda in cycle
        steps = [sum(x >= r for x in d) for r in (1, 2, 3)]
        want = per_step * (steps[0] if kv_sharing else sum(steps)) * per_token
        assert cache_bytes(cfg, seqs[i]) == want
        assert int(cache.used_bytes()[i]) == want
    assert cache.allocated_bytes() == len(cache.buffers) * 2 * 2 * 9 * cfg.n_kv_heads * cfg.head_dim * 4


def test_default_capacities_cache_about_nr_plus_1_over_2nr():
    """Depths 1..Nr in equal shares (the default capacities' split): the recursion block's caches hold
    (Nr + 1) / (2 Nr) of caching every token at every step."""
    depths = torch.tensor([1, 2, 3] * 8)
    model = _forced_depth_model([], False)
    cfg = model.cfg
    full = cache_bytes(cfg, torch.full((24,), 3))
    assert cache_bytes(cfg, depths) / full == pytest.approx((3 + 1) / (2 * 3))
    shared = _forced_depth_model([], True).cfg
    assert cache_bytes(shared, depths) / full == pytest.approx(1 / 3)


def test_aux_router_decides_at_inference():
    """With router.aux_router the causal rule reads the auxiliary routers, not the main ones."""
    model = _model(**VARIANTS["ec-aux"])
    seqs = _tokens(2, 24)
    before = _depths(model, seqs)
    with torch.no_grad():
        for head in model.router.aux_routers:
            head.net.weight.zero_()   # logit 0 everywhere: every token goes on
    assert not torch.equal(before, _depths(model, seqs))
    assert bool((_depths(model, seqs) == model.cfg.num_recursions).all())


def test_generate_matches_greedy_full_forward_and_streams():
    model = _model(**VARIANTS["expert_choice-middle_cycle"])
    prompts = [[1, 2, 3], [4, 5, 6, 7, 8, 9], [10]]
    seen: list[tuple[int, int]] = []
    out = generate(model, prompts, 12, sampling=Sampling(temperature=0), on_token=lambda i, t: seen.append((i, t)))
    for p, new in zip(prompts, out):
        ids = list(p)
        for _ in range(12):
            with torch.no_grad():
                ids.append(int(model(torch.tensor([ids]), causal_routing=True).logits[0, -1].argmax()))
        assert new == ids[len(p):]
    assert sorted(seen) == sorted((i, t) for i, new in enumerate(out) for t in new)


def test_generate_stops_at_eos_and_sampling_repeats_with_a_seed():
    model = _model(**VARIANTS["token_choice-middle_cycle"])
    prompts = [[1, 2, 3], [7]]
    a = generate(model, prompts, 20, sampling=Sampling(temperature=1.0, top_k=20, top_p=0.9, seed=3))
    b = generate(model, prompts, 20, sampling=Sampling(temperature=1.0, top_k=20, top_p=0.9, seed=3))
    assert a == b and all(len(x) == 20 for x in a)
    eos = a[0][4]
    c = generate(model, prompts, 20, sampling=Sampling(temperature=1.0, top_k=20, top_p=0.9, seed=3), eos_id=eos)
    assert c[0] == a[0][:a[0].index(eos) + 1]


def test_a_full_cache_is_refused():
    model = _model()
    cache = KVCache(model.cfg, 1, 4)
    prefill(model, cache, [[1, 2, 3, 4]])
    with pytest.raises(ValueError, match="KV cache full"):
        decode_step(model, cache, torch.tensor([1]), torch.tensor([True]))
    decode_step(model, cache, torch.tensor([1]), torch.tensor([False]))   # a finished row feeds nothing: fine
