"""Hugging Face export of every model variant (random weights, no training): the Auto model gives the project's
causal-routing logits, greedy tokens and recursion-wise cache contents (tests/pretrain/test_export.py tests a
trained run)."""
from __future__ import annotations

import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")   # nothing here may reach for the network

import pytest
import torch

from model.config import RouterConfig
from model.inference import KVCache, Sampling, generate, prefill
from model.mor import MoRModel
from model.routing import ExpertChoiceRouting, routing_class
from tests.model.helpers import tiny
from tests.model.variants import matrix

pytest.importorskip("transformers")
pytest.importorskip("safetensors")


def _auto(folder):
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True, dtype=torch.float32).eval()


# ---- every variant, random weights ---------------------------------------------------------------------------------
# The registry's matrix (tests/model/variants.py), and option cases beside it.
VARIANTS = {
    **matrix(),
    "vanilla_untied": dict(routing="none", sharing="none", tie_embeddings=False),
    "ec_middle_cycle_aux_kvshare": dict(routing="expert_choice", sharing="middle_cycle", kv_sharing=True,
                                        router=RouterConfig(aux_router=True)),
    "ec_sequence_residual_tanh": dict(routing="expert_choice", sharing="sequence",
                                      router=RouterConfig(gating="residual", func="tanh")),
    "ec_middle_sequence_mlp_no_full_step": dict(routing="expert_choice", sharing="middle_sequence",
                                                router=RouterConfig(arch="mlp", capacities=[0.8, 0.5, 0.3])),
    "tc_middle_cycle_loss_free": dict(routing="token_choice", sharing="middle_cycle",
                                      router=RouterConfig(balance="loss_free", bias_update_rate=0.05)),
    "tc_cycle_sigmoid_kvshare": dict(routing="token_choice", sharing="cycle", kv_sharing=True,
                                     router=RouterConfig(func="sigmoid")),
}


@pytest.mark.slow
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_every_variant_exports_to_the_same_model(variant, tmp_path):
    check_export(VARIANTS[variant], tmp_path / "m")


def check_export(variant: dict, folder) -> None:
    from pretrain.export import write_export
    kw = dict(variant)
    cfg = tiny(kw.pop("routing"), kw.pop("sharing"), init_std=0.1, **kw)
    model = MoRModel(cfg).eval()
    if cfg.router.balance == "loss_free" and hasattr(model.router, "bias_steps"):
        model.router.bias_steps.copy_(torch.tensor([3, -2, 0]))
    out = write_export(model, cfg, folder)
    hf = _auto(out)
    tokens = torch.randint(0, cfg.vocab_size, (2, 48))
    with torch.no_grad():
        want = model(tokens, causal_routing=True).logits
        got = hf(tokens).logits
    assert (got - want).abs().max().item() < 1e-5
    # prefill + greedy decoding through each model's own cache: the same tokens, the same cached tokens per layer
    prompts = [tokens[0, :9].tolist(), tokens[1, :5].tolist()]
    want_new = generate(model, prompts, 10, sampling=Sampling(temperature=0.0))
    for p, w in zip(prompts, want_new):
        out_ids = hf.generate(torch.tensor([p]), max_new_tokens=10, do_sample=False)
        assert out_ids[0, len(p):].tolist() == w
    MoRCache = sys.modules[type(hf).__module__].MoRCache    # the class of the folder's own code
    ref_cache = KVCache(cfg, 1, 32)
    with torch.no_grad():
        prefill(model, ref_cache, [tokens[0, :20].tolist()])
        cache = MoRCache()
        hf(tokens[:1, :20], past_key_values=cache, use_cache=True)
    ours = {pos: int(n[0]) for pos, n in cache.cached_tokens().items()}
    theirs = {pos: int(buf.count[0]) for pos, buf in ref_cache.buffers.items()}
    assert ours == theirs
    if issubclass(routing_class(cfg), ExpertChoiceRouting) and not cfg.kv_sharing:   # recursion-wise: fewer later
        assert min(ours.values()) < 20
