"""Layout-free initial weights (model/init.py): drawn per parameter name from the seed, with the model's own
distributions; the multi-process side (every layout bit-identical to one process) is in
tests/distributed/test_layouts.py."""
from __future__ import annotations

import math

import pytest
import torch

from model.init import init_weights, initial_value
from model.mor import MoRModel
from tests.model.helpers import tiny


def test_the_distributions_are_the_models_own():
    cfg = tiny(routing="expert_choice", d_model=64, ffn_hidden=128, vocab_size=512)
    model = MoRModel(cfg)
    init_weights(model, cfg, seed=7)
    params = dict(model.named_parameters())
    assert torch.equal(params["final_norm.weight"], torch.ones_like(params["final_norm.weight"]))
    residual = cfg.init_std / math.sqrt(2 * cfg.n_layers)
    assert params["layers.0.mlp.down.weight"].std().item() == pytest.approx(residual, rel=0.1)
    assert params["embedding.weight"].std().item() == pytest.approx(cfg.init_std, rel=0.05)
    assert params["layers.0.attn.qkv.weight"].std().item() == pytest.approx(cfg.init_std, rel=0.1)


def test_the_seed_and_the_name_decide():
    cfg = tiny(routing="token_choice")
    a, b, c = MoRModel(cfg), MoRModel(cfg), MoRModel(cfg)
    init_weights(a, cfg, seed=1)
    init_weights(b, cfg, seed=1)
    init_weights(c, cfg, seed=2)
    for (name, x), y, z in zip(a.named_parameters(), b.parameters(), c.parameters()):
        assert torch.equal(x, y), name
        if not name.endswith("norm.weight"):
            assert not torch.equal(x, z), name
    # two layers of the same shape do not start equal
    assert not torch.equal(a.layers["0"].attn.qkv.weight, a.layers["1"].attn.qkv.weight)


def test_a_parameter_without_a_rule_is_refused():
    with pytest.raises(ValueError, match="no layout-free initialisation rule for parameter 'layers.0.attn.bias'"):
        initial_value("layers.0.attn.bias", tiny())
