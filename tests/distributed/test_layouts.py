"""Layouts against a single-process reference: losses, gradient norms, kept tokens and weights after 3 AdamW
steps; and the layout-free initial weights (model/init.py), bit-identical to one process's for the same seed."""
from __future__ import annotations

import pytest
import torch

from model.init import init_weights
from model.mor import MoRModel
from pretrain.parallel.layout import ParallelConfig

from model.program import stage_ranges, state_spec
from tests.distributed.harness import SEQ, VARIANTS, assert_matches, run_layout

ALL = ["vanilla", "mor_ec", "mor_tc"]


# Recursive KV sharing trains alike under TP (the kv heads split), SP (keys of the padded, scattered sequence) and
# PP with a cut inside a recursion step (the first step's keys and values cross it): its variants ride along in
# those layouts' runs (one spawn per layout).
KV = ["mor_ec_kv", "mor_tc_kv"]
WITH_KV = {"tp2-sp", "pp2", "tp2-pp2-zero1"}


@pytest.mark.parametrize("world,parallel", [
    pytest.param(2, {"tensor_parallel": 2, "zero_stage": 0, "micro_batch_size": 2}, id="tp2"),
    pytest.param(2, {"tensor_parallel": 2, "sequence_parallel": True, "zero_stage": 0, "micro_batch_size": 2},
                 id="tp2-sp"),
    pytest.param(2, {"zero_stage": 1, "micro_batch_size": 1}, id="dp2-zero1"),
    pytest.param(2, {"zero_stage": 2, "micro_batch_size": 1}, id="dp2-zero2"),
    pytest.param(2, {"zero_stage": 3, "micro_batch_size": 1}, id="dp2-zero3"),
    pytest.param(4, {"tensor_parallel": 2, "zero_stage": 2, "micro_batch_size": 1}, id="tp2-dp2-zero2"),
    pytest.param(2, {"pipeline_parallel": 2, "zero_stage": 0, "micro_batch_size": 1}, id="pp2"),
    pytest.param(4, {"pipeline_parallel": 4, "zero_stage": 0, "micro_batch_size": 2}, id="pp4"),
    pytest.param(4, {"tensor_parallel": 2, "pipeline_parallel": 2, "zero_stage": 1, "micro_batch_size": 1},
                 id="tp2-pp2-zero1"),
])
def test_layout_matches_single_process(request, tmp_path, world, parallel):
    kv = KV if request.node.callspec.id in WITH_KV else []
    results = run_layout(tmp_path, world, parallel, ALL + kv)
    for variant, (ref, got) in results.items():
        assert_matches(ref, got), variant
        if variant in kv:
            continue
        assert max(ref["norms"]) > 1.0, "the runs must exercise gradient clipping"
        # the same seed, the same initial weights as one process: bit for bit
        one = MoRModel(VARIANTS[variant]())
        init_weights(one, one.cfg, ParallelConfig().seed)
        want = dict(one.named_parameters())
        assert set(got["initial"]) == set(want), variant
        for name, w in got["initial"].items():
            assert torch.equal(w, want[name].detach()), (variant, name)
    if parallel.get("pipeline_parallel", 1) > 1:
        # the shared block's layers sit on several stages: they are replicas, and stayed identical
        assert any(name.startswith("layers.") for name in results["mor_ec"][1]["replicated"])


def test_kv_sharing_variants_have_a_pipeline_cut_inside_a_recursion_step():
    """What the pp2 and tp2-pp2-zero1 runs above prove for KV sharing needs a cut that its keys cross."""
    for v in KV:
        cfg = VARIANTS[v]()
        cuts = [end for _, end in stage_ranges(cfg, 2, SEQ)[:-1]]
        assert any(k.startswith("kv") for c in cuts for k in state_spec(cfg, c, 1, SEQ)), v
