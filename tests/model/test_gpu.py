"""GPU paths: bf16 numerics, CUDA vs CPU, flash-attn vs SDPA, and no host-device sync in the forward pass."""
from __future__ import annotations

import pytest
import torch

from model.attention import causal_attention, flash_available
from model.mor import MoRModel
from tests.model.helpers import tiny

pytestmark = pytest.mark.gpu
VARIANTS = [("none", "none"), ("expert_choice", "middle_cycle"), ("token_choice", "middle_cycle")]


def _tokens(vocab=128, b=2, t=32, device="cpu"):
    x = torch.randint(0, vocab, (b, t + 1), device=device)
    return x[:, :-1], x[:, 1:]


@pytest.mark.parametrize("kind", VARIANTS)
def test_cuda_fp32_matches_cpu(kind):
    routing, sharing = kind
    cfg = tiny(routing=routing, sharing=sharing, attention_backend="sdpa")
    cpu = MoRModel(cfg)
    gpu = MoRModel(cfg).cuda()
    gpu.load_state_dict(cpu.state_dict())
    x, y = _tokens()
    a = cpu(x, y)
    b = gpu(x.cuda(), y.cuda())
    assert torch.allclose(a.loss, b.loss.cpu(), rtol=1e-4)


@pytest.mark.parametrize("kind", VARIANTS)
def test_bf16_autocast_forward_backward_close_to_fp32(kind):
    routing, sharing = kind
    model = MoRModel(tiny(routing=routing, sharing=sharing)).cuda()
    x, y = _tokens(device="cuda")
    ref = model(x, y).lm_loss
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = model(x, y)
    out.loss.backward()
    assert torch.isfinite(out.loss)
    assert abs(out.lm_loss.item() - ref.item()) / ref.item() < 2e-2
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


@pytest.mark.parametrize("kind", VARIANTS)
def test_forward_has_no_host_device_sync(kind):
    routing, sharing = kind
    # Compact token-choice reads each step's active-token count on the host (one sync per step, by design);
    # its masked form, like expert-choice, must not sync at all.
    model = MoRModel(tiny(routing=routing, sharing=sharing, tc_compact=False)).cuda()
    x, y = _tokens(device="cuda")
    model(x, y)  # warm-up: lazy initialisation may sync once
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = model(x, y)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    out.loss.backward()


def test_token_choice_compact_matches_masked_on_cuda_in_bf16():
    import dataclasses
    cfg = tiny(routing="token_choice", sharing="middle_cycle", max_seq_len=256)
    compact = MoRModel(cfg).cuda()
    dense = MoRModel(dataclasses.replace(cfg, tc_compact=False)).cuda()
    dense.load_state_dict(compact.state_dict())
    x, y = _tokens(b=4, t=200, device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        a, b = compact(x, y), dense(x, y)
    assert abs(a.lm_loss.item() - b.lm_loss.item()) / b.lm_loss.item() < 1e-2


@pytest.mark.skipif(not flash_available(), reason="flash-attn is not installed")
def test_flash_attn_matches_sdpa_in_bf16():
    q = torch.randn(2, 256, 8, 64, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(2, 256, 2, 64, device="cuda", dtype=torch.bfloat16)
    v = torch.randn_like(k)
    a = causal_attention(q, k, v, backend="flash")
    b = causal_attention(q, k, v, backend="sdpa")
    assert (a.float() - b.float()).abs().max() < 2e-2


@pytest.mark.parametrize("kind", VARIANTS + [("expert_choice", "middle_cycle", "kv")])
def test_decode_on_cuda_matches_the_full_forward_without_host_sync(kind):
    """A decode step with the cache's checks off reads nothing back to the host (CUDA-graph ready); prefill and
    decode equal the full causal forward on the GPU too (fp32)."""
    from model.inference import KVCache, decode_step, prefill
    routing, sharing, *kv = kind
    model = MoRModel(tiny(routing=routing, sharing=sharing, init_std=0.1, kv_sharing=bool(kv))).cuda().eval()
    seqs = torch.randint(0, 128, (3, 24), device="cuda")
    with torch.no_grad():
        full = model(seqs, causal_routing=True).logits
        cache = KVCache(model.cfg, 3, 24, device="cuda", checks=False)
        first = prefill(model, cache, [s[:8].tolist() for s in seqs])
        torch.testing.assert_close(first, full[:, :8], rtol=0, atol=1e-4)
        live = torch.ones(3, dtype=torch.bool, device="cuda")
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            steps = [decode_step(model, cache, seqs[:, i], live) for i in range(8, 24)]
        finally:
            torch.cuda.set_sync_debug_mode("default")
    torch.testing.assert_close(torch.stack(steps, dim=1), full[:, 8:], rtol=0, atol=1e-4)


@pytest.mark.parametrize("kind", ["vanilla", "mor_ec", "mor_tc_capacity"])
def test_compiled_training_step_has_no_host_sync_and_the_chunked_loss_matches_the_plain_one(kind):
    """Inductor-compiled forward + backward under bf16 autocast: no host-device sync at all (capped token-choice
    has static lengths), and the chunked head's loss and gradients within bf16 rounding of the plain head's."""
    import dataclasses
    cfg = {"vanilla": lambda: tiny(sharing="none", n_layers=2),
           "mor_ec": lambda: tiny(),
           "mor_tc_capacity": lambda: tiny(routing="token_choice", tc_capacity=1.0)}[kind]()
    cfg = dataclasses.replace(cfg, max_seq_len=256, vocab_size=4096, loss_chunk=128)
    runs = []
    for chunk in (0, 128):
        torch.manual_seed(0)
        model = MoRModel(dataclasses.replace(cfg, loss_chunk=chunk)).cuda()
        step = torch.compile(model)
        x, y = _tokens(vocab=cfg.vocab_size, b=4, t=256, device="cuda")
        with torch.autocast("cuda", dtype=torch.bfloat16):
            step(x, y).loss.backward()        # compiles; lazy initialisation may sync once
        model.zero_grad()
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            with torch.autocast("cuda", dtype=torch.bfloat16):
                out = step(x, y)
            out.loss.backward()
        finally:
            torch.cuda.set_sync_debug_mode("default")
        runs.append((out.lm_loss.detach().float(), {n: p.grad.float() for n, p in model.named_parameters()}))
    (l0, g0), (l1, g1) = runs
    assert abs(float(l1 - l0)) < 1e-2 * float(l0)
    for n in g0:
        assert float((g1[n] - g0[n]).abs().max()) <= 5e-2 * float(g0[n].abs().max()) + 1e-6, n
