"""The chunked head + cross-entropy (model/head.py) against the plain one (``loss_chunk=0``: whole logits, torch's
or megatron's vocab-parallel cross-entropy): the same loss, gradients and per-token scores to fp32 rounding, on
one process and under TP=2; and the logits of the whole micro-batch are never kept for the backward pass."""
from __future__ import annotations

import dataclasses
import json
import sys

import pytest
import torch

from model.init import init_weights
from model.loss import IGNORE_INDEX
from model.mor import MoRModel
from tests.distributed.harness import ROOT, spawn_ranks
from tests.model.helpers import tiny

VARIANTS = {
    "vanilla-tied": lambda: tiny(sharing="none", n_layers=2),
    "mor_ec-untied": lambda: tiny(tie_embeddings=False),
    "mor_tc": lambda: tiny(routing="token_choice"),
}


def batch(cfg, b: int = 3, t: int = 40, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, cfg.vocab_size, (b, t + 1), generator=g)
    labels = tokens[:, 1:].clone()
    labels[1, -7:] = IGNORE_INDEX                                 # a padded row
    mask = (torch.rand(labels.shape, generator=g) > 0.25).float()
    return tokens[:, :-1], labels, mask


def run(cfg, chunk: int, autocast: bool = False, scale: float = 1.0):
    """Loss, every parameter's gradient, and the per-token scores of one forward/backward with ``chunk``; the
    backward starts from ``scale`` × the loss (the head's loss then gets ``scale`` as its upstream gradient)."""
    torch.manual_seed(0)
    model = MoRModel(dataclasses.replace(cfg, loss_chunk=chunk))
    tokens, labels, mask = batch(cfg)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out = model(tokens, labels, mask)
        (out.loss * scale).backward()
        with torch.no_grad():
            scored = model(tokens, labels, per_token=True)
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out.lm_loss.detach(), grads, scored


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp(min=1e-12))


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("chunk", [7, 4096], ids=["chunks-of-7", "one-chunk"])
def test_chunked_loss_equals_the_plain_loss(variant: str, chunk: int):
    cfg = VARIANTS[variant]()
    loss0, grads0, scored0 = run(cfg, 0)
    loss1, grads1, scored1 = run(cfg, chunk)
    assert abs(float(loss1 - loss0)) < 1e-6
    assert grads1.keys() == grads0.keys()
    for name in grads0:
        assert rel(grads1[name], grads0[name]) < 1e-5, name
    assert (scored1.token_logprob - scored0.token_logprob).abs().max() < 1e-5
    assert torch.equal(scored1.token_greedy, scored0.token_greedy)
    assert abs(float(scored1.lm_loss - scored0.lm_loss)) < 1e-6
    assert scored1.token_logprob[1, -7:].abs().max() == 0 and not scored1.token_greedy[1, -7:].any()


# A static loss scale (3.7) over an accumulation of 2 micro-batches, as a loss-scaled, accumulating step feeds the
# backward; every test above starts the backward from 1, which a backward that drops its upstream gradient passes.
UPSTREAM = 3.7 / 2


def test_chunked_backward_scales_by_its_upstream_gradient():
    cfg = VARIANTS["mor_ec-untied"]()
    _, grads0, _ = run(cfg, 0, scale=UPSTREAM)
    _, grads1, _ = run(cfg, 7, scale=UPSTREAM)
    assert grads1.keys() == grads0.keys()
    for name in grads0:
        assert rel(grads1[name], grads0[name]) < 1e-5, name


def test_chunked_loss_under_bf16_autocast_stays_within_bf16_rounding():
    cfg = VARIANTS["mor_ec-untied"]()
    loss0, grads0, _ = run(cfg, 0, autocast=True)
    loss1, grads1, _ = run(cfg, 7, autocast=True)
    assert abs(float(loss1 - loss0)) < 1e-3
    for name in grads0:
        assert grads1[name].dtype == grads0[name].dtype
        assert rel(grads1[name], grads0[name]) < 3e-2, name


def saved_for_backward(cfg, chunk: int) -> list[int]:
    """The element counts of every tensor that autograd keeps from the forward pass for the backward pass."""
    torch.manual_seed(0)
    model = MoRModel(dataclasses.replace(cfg, loss_chunk=chunk))
    tokens, labels, mask = batch(cfg, b=4, t=64)
    sizes: list[int] = []
    with torch.autograd.graph.saved_tensors_hooks(lambda x: sizes.append(x.numel()) or x, lambda x: x):
        model(tokens, labels, mask).loss.backward()
    return sizes


def test_logits_of_the_micro_batch_are_never_kept_for_backward():
    cfg = tiny(sharing="none", n_layers=1, vocab_size=4096, d_model=32)
    logits = 4 * 64 * cfg.vocab_size
    plain, chunked = saved_for_backward(cfg, 0), saved_for_backward(cfg, 32)
    assert max(plain) >= logits                     # the plain path keeps (a copy of) the whole logits
    # the largest kept tensor: the head weight's gradient (V × d), or the hidden states' (N × d)
    assert max(chunked) <= max(cfg.vocab_size, 4 * 64) * cfg.d_model < logits
    assert sum(chunked) < sum(plain) / 4


@pytest.mark.slow
def test_chunked_loss_equals_the_vocab_parallel_loss_under_tp2(tmp_path):
    case = tmp_path / "case.json"
    case.write_text(json.dumps({"out": str(tmp_path / "result.json")}))
    spawn_ranks(2, [str(ROOT / "tests" / "model" / "head_worker.py"), str(case)], tmp_path, timeout=240)
    result = json.loads((tmp_path / "result.json").read_text())
    assert result.keys() == VARIANTS.keys()
    for variant, r in result.items():
        assert r["loss"] < 1e-6 and r["grad"] < 1e-5 and r["logprob"] < 1e-5 and r["greedy"], (variant, r)
        # and the TP=2 loss is one process's, from the same layout-free initial weights
        cfg = dataclasses.replace(VARIANTS[variant](), loss_chunk=7)
        model = MoRModel(cfg)
        with torch.no_grad():
            init_weights(model, cfg, seed=3)
            assert abs(float(model(*batch(cfg)).lm_loss) - r["value"]) < 1e-5, variant


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
