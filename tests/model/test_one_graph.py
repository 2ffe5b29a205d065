"""A compiled training step is one graph: no graph break and no host synchronisation in the forward or backward
pass of vanilla, MoR expert-choice and MoR token-choice with a capacity (static compact lengths), and a bounded
number of compilations over steps.

``torch.compile(fullgraph=True)`` raises at any graph break; with dynamo's defaults (no captured scalar outputs,
no data-dependent output shapes) a ``.item()``, ``.tolist()``, ``nonzero`` or boolean-mask index — the ways a
forward pass reads device values on the host — is a graph break, so a full graph is also a step without host
syncs. ``aot_eager`` traces the backward too (AOTAutograd) without paying for code generation on CPU."""
from __future__ import annotations

import pytest
import torch
import torch._dynamo
from torch._dynamo.utils import counters

from model.config import RouterConfig
from model.mor import MoRModel
from tests.model.helpers import tiny

VARIANTS = {
    "vanilla": (lambda: tiny(sharing="none", n_layers=2, loss_chunk=96), 1),
    "mor_ec": (lambda: tiny(loss_chunk=96), 1),
    # static lengths from the capacity; the balancing warm-up (step 0) runs every token: a second graph
    "mor_tc_capacity": (lambda: tiny(routing="token_choice", tc_capacity=1.0, max_seq_len=192, loss_chunk=96,
                                     router=RouterConfig(bal_warmup_step=1)), 2),
}


@pytest.mark.slow
@pytest.mark.parametrize("variant", VARIANTS)
def test_compiled_training_step_is_one_graph_with_bounded_recompiles(variant: str):
    make, graphs = VARIANTS[variant]
    cfg = make()
    torch.manual_seed(0)
    model = MoRModel(cfg).train()
    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    for step in range(3):
        model.begin_step(step)
        tokens = torch.randint(0, cfg.vocab_size, (2, 193), generator=torch.Generator().manual_seed(step))
        out = compiled(tokens[:, :-1], tokens[:, 1:])
        out.loss.backward()
        got = {n: p.grad.clone() for n, p in model.named_parameters()}
        model.zero_grad()
        ref = model(tokens[:, :-1], tokens[:, 1:])                # eager, the same weights
        ref.loss.backward()
        assert torch.equal(out.loss, ref.loss)
        for n, p in model.named_parameters():
            assert torch.allclose(got[n], p.grad, rtol=1e-5, atol=1e-7), n
        model.zero_grad()
    assert counters["stats"]["unique_graphs"] == graphs
