"""Recursive KV sharing in the training forward pass: every recursion step after the first attends to the keys
and values the first step made, checked against a hand-written reference; gradients reach the first step through
them, with or without activation checkpointing."""
from __future__ import annotations

import math

import pytest
import torch

from model.layers import apply_rotary
from model.mor import MoRModel
from tests.model.helpers import SHARP_STD, tiny


def _qkv(layer, x, rope):
    """Queries, keys, values of ``layer`` for x (B, T, d), after RoPE: (B, T, H, D), (B, T, Hkv, D) x 2."""
    attn = layer.attn
    qkv = attn.qkv(layer.attn_norm(x))[0]
    b, t, _ = qkv.shape
    qkv = qkv.view(b, t, attn.kv_local, attn.q_per_kv + 2, attn.head_dim)
    q = qkv[:, :, :, :attn.q_per_kv].reshape(b, t, -1, attn.head_dim)
    k, v = qkv[:, :, :, attn.q_per_kv], qkv[:, :, :, attn.q_per_kv + 1]
    return apply_rotary(q, *rope), apply_rotary(k, *rope), v


def _attend(q, k, v):
    """Causal softmax attention written out: (B, T, H, D) queries over (B, T, Hkv, D) keys and values."""
    rep = q.shape[2] // k.shape[2]
    k, v = k.repeat_interleave(rep, dim=2), v.repeat_interleave(rep, dim=2)
    scores = torch.einsum("bihd,bjhd->bhij", q, k) / math.sqrt(q.shape[-1])
    t = q.shape[1]
    scores = scores.masked_fill(~torch.ones(t, t, dtype=torch.bool).tril(), float("-inf"))
    return torch.einsum("bhij,bjhd->bihd", scores.softmax(dim=-1), v)


def _layer(layer, x, rope, kv=None):
    """One pre-norm layer; with ``kv`` its attention reads those keys and values instead of its own."""
    q, k, v = _qkv(layer, x, rope)
    if kv is not None:
        k, v = kv
    h = x + layer.attn.proj(_attend(q, k, v).flatten(2))[0]
    return h + layer.mlp(layer.mlp_norm(h)), (k, v)


@pytest.mark.parametrize("sharing", ["cycle", "middle_sequence"])
def test_later_steps_attend_to_the_first_steps_keys(sharing):
    """A plain recursive model (every token runs every step), so the reference is a loop over the plan."""
    torch.manual_seed(0)
    model = MoRModel(tiny(routing="none", sharing=sharing, init_std=SHARP_STD, kv_sharing=True)).eval()
    tokens = torch.randint(0, 128, (2, 24))
    rope = model.rotary(torch.arange(24).expand(2, 24))
    with torch.no_grad():
        h = model.embedding(tokens)
        for i in model.plan.prelude:
            h, _ = _layer(model.layers[str(i)], h, rope)
        first: list = []
        for r, ids in enumerate(model.plan.steps):
            for j, i in enumerate(ids):
                h, kv = _layer(model.layers[str(i)], h, rope, first[j] if r else None)
                if r == 0:
                    first.append(kv)
        for i in model.plan.coda:
            h, _ = _layer(model.layers[str(i)], h, rope)
        want = model.output_layer(model.final_norm(h), weight=model.embedding.weight)[0]
        got = model(tokens).logits
        unshared = MoRModel(tiny(routing="none", sharing=sharing, init_std=SHARP_STD)).eval()
        unshared.load_state_dict(model.state_dict())
        torch.testing.assert_close(got, want, rtol=0, atol=1e-4)
        assert (unshared(tokens).logits - want).abs().max() > 1e-2   # sharing changes the model


@pytest.mark.parametrize("routing", ["expert_choice", "token_choice"])
def test_gradients_reach_the_first_step_through_shared_keys_with_checkpointing_alike(routing):
    torch.manual_seed(0)
    cfg = tiny(routing=routing, sharing="middle_cycle", init_std=SHARP_STD, kv_sharing=True)
    plain, ckpt = MoRModel(cfg), MoRModel(cfg)
    ckpt.load_state_dict(plain.state_dict())
    ckpt.activation_checkpointing = True
    x = torch.randint(0, 128, (2, 33))
    a, b = plain(x[:, :-1], x[:, 1:]), ckpt(x[:, :-1], x[:, 1:])
    a.loss.backward()
    b.loss.backward()
    torch.testing.assert_close(a.loss, b.loss, rtol=0, atol=0)
    for (name, pa), pb in zip(plain.named_parameters(), ckpt.parameters()):
        assert pa.grad is not None, name
        torch.testing.assert_close(pa.grad, pb.grad, rtol=1e-5, atol=1e-7, msg=name)
