"""FLOPs counter: hand counts on a tiny config, and torch's FlopCounterMode on what actually runs."""
from __future__ import annotations

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from model.config import ModelConfig
from model.flops import training_flops
from model.mor import MoRModel
from tests.model.helpers import tiny


def test_hand_count_expert_choice_middle_cycle():
    cfg = tiny()  # d 32, 4 heads x 8, 2 kv heads, ffn 64, vocab 128, 8 layers: 1 + 3 x 2 + 1
    T = 12
    lin = 2 * (32 * 8 * 8 + 32 * 32 + 3 * 32 * 64)  # qkv (4+2+2 heads) + o + mlp, x2 for multiply-add
    assert lin == 2 * 9216
    ks = [12, 8, 4]
    layers = lin * (2 * T + 2 * sum(ks))                   # prelude + coda on T, two block layers per step

    def attn(n):
        return 4 * 32 * n * (n + 1) / 2                    # 4 * H * hd * causal pairs
    attention = 2 * attn(T) + 2 * sum(attn(k) for k in ks)
    routers = 2 * 32 * (T + 12 + 8)                        # step r scores the candidates kept at r - 1
    head = 2 * T * 32 * 128
    rep = training_flops(cfg, T)
    assert rep.tokens_per_step == ks
    assert (rep.layers, rep.attention, rep.routers, rep.head) == (layers, attention, routers, head)
    assert rep.training_per_token == pytest.approx(3 * (layers + attention + routers + head) / T)


def test_hand_count_vanilla_and_token_choice():
    T = 10
    van = training_flops(tiny(sharing="none", n_layers=3), T, causal=False)
    assert van.layers == 2 * 9216 * 3 * T and van.attention == 3 * 4 * 32 * T * T and van.routers == 0
    tc = training_flops(tiny(routing="token_choice"), T, depth_loads=[0.5, 0.3, 0.2])
    assert tc.tokens_per_step == pytest.approx([10.0, 5.0, 2.0])
    assert tc.routers == 2 * T * 32 * 3


def measured_training_flops(model: MoRModel, batch: int, seq_len: int) -> float:
    tokens = torch.randint(0, model.cfg.vocab_size, (batch, seq_len + 1))
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model(tokens[:, :-1], tokens[:, 1:]).loss.backward()
    return counter.get_total_flops() / (batch * seq_len)


@pytest.mark.parametrize("kind", [("none", "none"), ("none", "middle_cycle"), ("expert_choice", "middle_cycle"),
                                  ("expert_choice", "cycle"), ("expert_choice", "middle_cycle", "kv"),
                                  ("none", "cycle", "kv")])
def test_counter_agrees_with_torch_flop_counter(kind):
    # FlopCounterMode counts attention as a full T x T product, so compare with causal=False.
    routing, sharing, *kv = kind
    cfg = tiny(routing=routing, sharing=sharing, kv_sharing=bool(kv))
    measured = measured_training_flops(MoRModel(cfg), batch=2, seq_len=24)
    assert measured == pytest.approx(training_flops(cfg, 24, causal=False).training_per_token, rel=1e-9)


def test_mor_flops_below_vanilla_of_equal_depth():
    from conf import load_config
    mor, van = load_config("360m_mor_ec", schema=ModelConfig), load_config("360m_vanilla", schema=ModelConfig)
    ratio = training_flops(mor, 2048).training_per_token / training_flops(van, 2048).training_per_token
    assert 0.5 < ratio < 0.8
