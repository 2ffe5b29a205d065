"""Routing semantics: nested kept sets, capacities, untouched tokens, gradients, and a slow loop reference."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from model.config import RouterConfig
from model.mor import MoRModel
from tests.model.helpers import SHARINGS, SHARP_STD, tiny

B, T = 3, 24


def batch(vocab: int = 128, b: int = B, t: int = T):
    tokens = torch.randint(0, vocab, (b, t + 1))
    return tokens[:, :-1], tokens[:, 1:]


def run_traced(model: MoRModel, tokens, labels=None):
    model.trace = []
    out = model(tokens, labels)
    trace, model.trace = model.trace, None
    return out, trace


@pytest.mark.parametrize("sharing", SHARINGS)
def test_expert_choice_kept_sets_are_nested_with_exact_capacity(sharing):
    cfg = tiny(sharing=sharing)
    model = MoRModel(cfg)
    tokens, labels = batch()
    _, trace = run_traced(model, tokens, labels)
    ks = cfg.capacity_tokens(T)
    assert ks == [24, 16, 8]
    prev = None
    for step, k in zip(trace, ks):
        idx = step["idx"]
        assert idx.shape == (B, k)
        assert torch.all(idx[:, 1:] > idx[:, :-1]), "kept indices must be sorted and distinct"
        if prev is not None:
            for b in range(B):
                assert set(idx[b].tolist()) <= set(prev[b].tolist())
        prev = idx


def test_tokens_not_kept_leave_the_step_unchanged():
    model = MoRModel(tiny())
    tokens, labels = batch()
    _, trace = run_traced(model, tokens, labels)
    for before, after in zip(trace, trace[1:]):
        kept = torch.zeros(B, T, dtype=torch.bool).scatter_(1, after["idx"], True)
        assert torch.equal(after["h"][~kept], before["h"][~kept])
        assert not torch.allclose(after["h"][kept], before["h"][kept])


def test_token_choice_tokens_past_their_depth_are_unchanged():
    model = MoRModel(tiny(routing="token_choice"))
    tokens, labels = batch()
    _, trace = run_traced(model, tokens, labels)
    depth = trace[0]["depth"]
    for r in range(1, len(trace)):
        done = depth <= r  # finished at or before step r: step r + 1 does not touch them
        assert torch.equal(trace[r]["h"][done], trace[r - 1]["h"][done])


@pytest.mark.parametrize("routing", ["expert_choice", "token_choice"])
@pytest.mark.parametrize("sharing", ["cycle", "middle_cycle"])
def test_every_router_and_shared_parameter_gets_a_gradient(routing, sharing):
    model = MoRModel(tiny(routing=routing, sharing=sharing))
    tokens, labels = batch()
    model(tokens, labels).loss.backward()
    router_params = list(model.router.parameters())
    assert router_params
    for p in router_params + model.shared_parameters() + list(model.parameters()):
        assert p.grad is not None and p.grad.abs().sum() > 0


# ---- hand-computed losses -------------------------------------------------------------------------------------
def test_expert_choice_losses_match_hand_values():
    from model.routing.expert_choice import ExpertChoiceRouting
    cfg = tiny(router=RouterConfig(z_loss_coef=0.01))
    router = ExpertChoiceRouting(cfg)
    with torch.no_grad():
        router.routers[0].net.weight.zero_()
        router.routers[0].net.weight[0, 0] = 1.0  # logit = first feature
    h = torch.zeros(1, 4, cfg.d_model)
    h[0, :, 0] = torch.tensor([2.0, -1.0, 0.5, 3.0])
    step = router.select(0, h, k=2)
    assert step.sel.tolist() == [[0, 3]]
    assert torch.allclose(step.gate, 0.1 * torch.sigmoid(torch.tensor([[2.0, 3.0]])))
    terms = router.losses(0, step, None)

    def sp(x):  # softplus: BCE(logit, 1) = sp(-x), BCE(logit, 0) = sp(x)
        return torch.log1p(torch.exp(torch.tensor(x)))
    bce = (sp(-2.0) + sp(-1.0) + sp(0.5) + sp(-3.0)) / 4
    assert torch.allclose(terms["bce"], 0.001 * bce)
    assert torch.allclose(terms["z"], 0.01 * torch.tensor((4 + 1 + 0.25 + 9) / 4))


def test_token_choice_losses_match_hand_values():
    from model.routing.token_choice import TokenChoiceRouting
    cfg = tiny(routing="token_choice")
    router = TokenChoiceRouting(cfg)
    with torch.no_grad():
        router.router.net.weight.zero_()
        router.router.net.weight[:, :3] = torch.eye(3)  # logits = the first three features
    logits = torch.tensor([[[2.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 3.0, 0.0], [0.0, 0.0, 0.0]]])
    h = torch.zeros(1, 4, cfg.d_model)
    h[..., :3] = logits
    out = router.route(h)
    assert out.depth.tolist() == [[1, 2, 2, 1]]  # argmax; the all-zero row ties and takes depth 1
    p = torch.softmax(logits, -1)
    assert torch.allclose(out.gate, torch.stack([p[0, 0, 0], p[0, 1, 1], p[0, 2, 1], p[0, 3, 0]])[None])
    terms = router.losses(out)
    f = torch.tensor([0.5, 0.5, 0.0])
    P = p.mean(dim=(0, 1))
    assert torch.allclose(terms["balance"], 0.1 * 3 * (f * P).sum())
    assert torch.allclose(terms["z"], 1e-5 * torch.logsumexp(logits, -1).square().mean())


def test_loss_free_bias_moves_towards_balance_and_changes_only_the_choice():
    from model.routing.token_choice import TokenChoiceRouting
    router = TokenChoiceRouting(tiny(routing="token_choice", router=RouterConfig(balance="loss_free")))
    h = torch.randn(2, 8, 32)
    before = router.route(h)
    router.update_bias(torch.tensor([0.6, 0.3, 0.1]))
    assert torch.allclose(router.depth_bias, torch.tensor([-0.001, 0.001, 0.001]))
    router.bias_steps.copy_(torch.tensor([-10**4, -10**4, 10**4]))  # force depth 3 everywhere
    after = router.route(h)
    assert torch.all(after.depth == 3)
    assert torch.allclose(after.gate, after.probs[..., 2])  # the gate still reads the unbiased probability
    assert "balance" not in router.losses(after) and not torch.equal(before.depth, after.depth)


# ---- slow loop references -------------------------------------------------------------------------------------
def run_layers(model, ids, x, pos):
    return model.run_layers(ids, x[None], torch.tensor(pos)[None])[0]


@torch.no_grad()
def reference_expert_choice(model: MoRModel, tokens: torch.Tensor) -> torch.Tensor:
    """Per sequence, per step, plain Python: the obvious reading of the algorithm."""
    cfg, plan = model.cfg, model.plan
    h = model.run_layers(plan.prelude, model.embed(tokens), torch.arange(tokens.shape[1]).expand_as(tokens)).clone()
    for b in range(tokens.shape[0]):
        candidates = list(range(tokens.shape[1]))
        for r, ids in enumerate(plan.steps):
            k = cfg.capacity_tokens(tokens.shape[1])[r]
            gates = {}
            for t in candidates:
                logit = model.router.routers[r].net.weight.double() @ h[b, t].double()
                gates[t] = model.router.alpha * torch.sigmoid(logit).item()
            kept = sorted(sorted(candidates, key=lambda t: -gates[t])[:k])
            y = run_layers(model, ids, h[b, kept], kept)
            for j, t in enumerate(kept):
                h[b, t] = h[b, t] + gates[t] * y[j]
            candidates = kept
    return h


@torch.no_grad()
def reference_token_choice(model: MoRModel, tokens: torch.Tensor) -> torch.Tensor:
    alpha, plan = model.router.alpha, model.plan
    h1 = model.run_layers(plan.prelude, model.embed(tokens), torch.arange(tokens.shape[1]).expand_as(tokens))
    out = h1.clone()
    for b in range(tokens.shape[0]):
        probs = torch.softmax(h1[b].double() @ model.router.router.net.weight.double().T, -1)
        depth = [int(probs[t].argmax()) + 1 for t in range(tokens.shape[1])]
        h = h1[b].clone()
        for r, ids in enumerate(plan.steps, start=1):
            active = [t for t in range(tokens.shape[1]) if depth[t] >= r]
            y = run_layers(model, ids, h[active], active)  # attention among the active tokens only
            for j, t in enumerate(active):
                if depth[t] == r:
                    out[b, t] = h1[b, t] + alpha * probs[t, r - 1].item() * y[j]
                h[t] = y[j]
    return out


@pytest.mark.parametrize("sharing", SHARINGS)
def test_vectorised_expert_choice_equals_loop_reference(sharing):
    model = MoRModel(tiny(sharing=sharing, init_std=SHARP_STD)).eval()
    tokens, _ = batch()
    _, trace = run_traced(model, tokens)
    torch.testing.assert_close(trace[-1]["h"], reference_expert_choice(model, tokens), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("sharing", SHARINGS)
def test_vectorised_token_choice_equals_loop_reference(sharing):
    model = MoRModel(tiny(routing="token_choice", sharing=sharing, init_std=SHARP_STD)).eval()
    tokens, _ = batch()
    _, trace = run_traced(model, tokens)
    depth = trace[0]["depth"]
    assert len(set(depth.flatten().tolist())) > 1, "the test needs tokens at several depths"
    torch.testing.assert_close(trace[-1]["h"], reference_token_choice(model, tokens), atol=1e-5, rtol=1e-5)


def test_residual_gating_option():
    model = MoRModel(tiny(router=RouterConfig(gating="residual")))
    tokens, _ = batch(b=1)
    _, trace = run_traced(model, tokens)
    # under residual gating, a kept token moves by g * (block(h) - h): check step 1 against a manual step
    plan, g = model.plan, trace[0]["gate"]
    with torch.no_grad():
        h0 = model.run_layers(plan.prelude, model.embed(tokens), torch.arange(T)[None])
        y = model.run_layers(plan.steps[0], h0, torch.arange(T)[None])
    assert torch.allclose(trace[0]["h"], h0 + g[..., None] * (y - h0), atol=1e-6)


@pytest.mark.parametrize("kind", [("none", "none"), ("none", "middle_cycle"), ("token_choice", "middle_cycle"),
                                  ("token_choice", "cycle")])
def test_causal_variants_never_look_ahead(kind):
    """Vanilla, recursive and token-choice are causal in training: the future never changes past logits."""
    routing, sharing = kind
    model = MoRModel(tiny(routing=routing, sharing=sharing)).eval()
    tokens, _ = batch(b=2)
    changed = tokens.clone()
    changed[:, 12:] = torch.randint(0, 128, (2, T - 12))
    a, b = model(tokens).logits, model(changed).logits
    assert torch.allclose(a[:, :12], b[:, :12], atol=1e-5)
    assert not torch.allclose(a[:, 12:], b[:, 12:])


def test_loss_mask_and_lm_loss():
    model = MoRModel(tiny()).eval()
    tokens, labels = batch()
    out = model(tokens, labels)
    logits = model(tokens).logits
    ce = F.cross_entropy(logits.reshape(-1, 128), labels.reshape(-1), reduction="none").view(B, T)
    assert torch.allclose(out.lm_loss, ce.mean(), atol=1e-5)
    mask = torch.zeros(B, T)
    mask[:, :5] = 1
    assert torch.allclose(model(tokens, labels, mask).lm_loss, ce[:, :5].mean(), atol=1e-5)
    assert torch.allclose(out.loss, out.lm_loss + out.aux_loss)


def test_fast_single_rank_cross_entropy_equals_megatron_vocab_parallel():
    from model.loss import lm_cross_entropy
    logits = torch.randn(2, 7, 50, requires_grad=True)
    labels = torch.randint(0, 50, (2, 7))
    fast = lm_cross_entropy(logits, labels)
    ref = lm_cross_entropy(logits, labels, force_vocab_parallel=True)
    assert torch.allclose(fast, ref, atol=1e-6)
    g_fast, = torch.autograd.grad(fast.sum(), logits)
    g_ref, = torch.autograd.grad(ref.sum(), logits)
    assert torch.allclose(g_fast, g_ref, atol=1e-6)


@pytest.mark.parametrize("routing", ["expert_choice", "token_choice"])
def test_activation_checkpointing_gives_the_same_loss_and_gradients(routing):
    model = MoRModel(tiny(routing=routing))
    tokens, labels = batch()
    model(tokens, labels).loss.backward()
    ref = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    model.activation_checkpointing = True
    model(tokens, labels).loss.backward()
    for n, p in model.named_parameters():
        assert torch.allclose(p.grad, ref[n], atol=1e-6), n
