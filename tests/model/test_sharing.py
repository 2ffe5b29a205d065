"""Sharing strategies: layer plans, parameter identity, and parameter counts against closed-form formulas."""
from __future__ import annotations

import pytest
import torch

from model.config import ModelConfig, RouterConfig
from model.flops import param_counts
from model.layers import make_parallel_config
from model.mor import MoRModel
from model.sharing import build_plan
from tests.model.helpers import SHARINGS, tiny


def unique_param_count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())  # parameters() yields each Parameter object once


def test_plans_match_the_paper_figures():
    cyc = build_plan(tiny(sharing="cycle", n_layers=9, routing="none"))
    assert cyc.unrolled == (0, 1, 2, 0, 1, 2, 0, 1, 2)
    seq = build_plan(tiny(sharing="sequence", n_layers=9, routing="none"))
    assert seq.unrolled == (0, 0, 0, 1, 1, 1, 2, 2, 2)
    assert seq.steps == ((0, 0, 0), (1, 1, 1), (2, 2, 2))
    mc = build_plan(tiny(sharing="middle_cycle", n_layers=8, routing="none"))
    assert mc.prelude == (0,) and mc.coda == (3,) and mc.steps == ((1, 2),) * 3
    ms = build_plan(tiny(sharing="middle_sequence", n_layers=8, routing="none"))
    assert ms.unrolled == (0, 1, 1, 1, 2, 2, 2, 3)
    van = build_plan(tiny(sharing="none", n_layers=5))
    assert van.unrolled == (0, 1, 2, 3, 4)


@pytest.mark.parametrize("sharing", SHARINGS)
def test_recursion_steps_reuse_the_same_parameter_objects(sharing):
    model = MoRModel(tiny(sharing=sharing))
    plan = model.plan
    # Unique layers own disjoint parameters; reuse happens only through the plan's indices.
    params_by_layer = [{id(p) for p in layer.parameters()} for layer in model.layers.values()]
    for a in range(len(params_by_layer)):
        for b in range(a + 1, len(params_by_layer)):
            assert params_by_layer[a].isdisjoint(params_by_layer[b])
    if sharing in ("cycle", "middle_cycle"):
        # the block (norms included) is literally identical across recursion steps
        first, second = plan.steps[0], plan.steps[1]
        for i, j in zip(first, second):
            assert model.layers[str(i)] is model.layers[str(j)]
            assert model.layers[str(i)].attn_norm.weight is model.layers[str(j)].attn_norm.weight
    assert len(model.layers) == model.cfg.unique_layers


@pytest.mark.parametrize("routing", ["none", "expert_choice", "token_choice"])
@pytest.mark.parametrize("sharing", SHARINGS)
@pytest.mark.parametrize("tie", [True, False])
def test_unique_parameter_count_matches_formula(sharing, routing, tie):
    cfg = tiny(sharing=sharing, routing=routing, tie_embeddings=tie)
    model = MoRModel(cfg)
    assert unique_param_count(model) == param_counts(cfg)["unique"]
    # Hand formula for this tiny shape: layer = qkv + o + mlp + 2 norms.
    d, hd, ffn = 32, 8, 64
    layer = d * (4 + 2 * 2) * hd + 4 * hd * d + 3 * d * ffn + 2 * d
    routers = {"none": 0, "expert_choice": 3 * d, "token_choice": d * 3}[routing]
    emb = 128 * d * (1 if tie else 2)
    assert unique_param_count(model) == emb + d + routers + layer * cfg.unique_layers


def test_vanilla_count_and_mlp_router_count():
    cfg = tiny(sharing="none", n_layers=4)
    assert unique_param_count(MoRModel(cfg)) == param_counts(cfg)["unique"]
    cfg = tiny(router=RouterConfig(arch="mlp"))
    assert unique_param_count(MoRModel(cfg)) == param_counts(cfg)["unique"]


def _meta_count(cfg: ModelConfig) -> int:
    mp = make_parallel_config(cfg, use_cpu_initialization=True)
    mp.perform_initialization = False
    with torch.device("meta"):
        return unique_param_count(MoRModel(cfg, mp))


def test_360m_presets_match_paper_sizes():
    from conf import load_config
    vanilla = load_config("360m_vanilla", schema=ModelConfig)
    mor = load_config("360m_mor_ec", schema=ModelConfig)
    n_vanilla, n_mor = _meta_count(vanilla), _meta_count(mor)
    assert n_vanilla == param_counts(vanilla)["unique"]
    assert n_mor == param_counts(mor)["unique"]
    assert abs(n_vanilla - 361.8e6) / 361.8e6 < 0.01, n_vanilla
    assert abs(n_mor - 165.2e6) / 165.2e6 < 0.01, n_mor
    assert mor.unique_layers == 12 and mor.layers_per_recursion == 10
