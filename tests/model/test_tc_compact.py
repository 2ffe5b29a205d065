"""Token-choice steps on the gathered active tokens (tc_compact) compute exactly what the masked dense form
computes: same loss, logits, router state and gradients, for rows with different numbers of active tokens."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from model.mor import MoRModel
from tests.model.helpers import SHARP_STD, tiny


def _pair(**kw):
    cfg = tiny(routing="token_choice", sharing="middle_cycle", max_seq_len=256, init_std=SHARP_STD, **kw)
    torch.manual_seed(0)
    compact = MoRModel(dataclasses.replace(cfg, tc_compact=True))
    dense = MoRModel(dataclasses.replace(cfg, tc_compact=False))
    dense.load_state_dict(compact.state_dict())
    return compact, dense


@pytest.mark.parametrize("kv_sharing", [False, True])
@pytest.mark.parametrize("t", [32, 200])          # 200: the compact length (a multiple of 64) is below t
def test_compact_equals_masked_dense(t, kv_sharing):
    compact, dense = _pair(kv_sharing=kv_sharing)
    torch.manual_seed(1)
    x = torch.randint(0, 128, (3, t + 1))
    compact.trace, dense.trace = [], []
    a, b = compact(x[:, :-1], x[:, 1:]), dense(x[:, :-1], x[:, 1:])
    depth = compact.trace[0]["depth"]
    counts = (depth > 1).sum(dim=1)
    assert counts.min() < counts.max() and counts.max() < t   # rows differ; some tokens stop early
    torch.testing.assert_close(a.loss, b.loss, rtol=1e-5, atol=1e-6)
    for ra, rb in zip(compact.trace, dense.trace):
        torch.testing.assert_close(ra["h"], rb["h"], rtol=1e-5, atol=1e-5)
    a.loss.backward()
    b.loss.backward()
    for (name, pa), pb in zip(compact.named_parameters(), dense.parameters()):
        torch.testing.assert_close(pa.grad, pb.grad, rtol=1e-4, atol=1e-6, msg=name)


def test_compact_runs_every_step_on_fewer_tokens():
    compact, _ = _pair()
    seen = []
    layer = compact.layers[str(max(int(k) for k in compact.layers) - 1)]
    hook = layer.register_forward_pre_hook(lambda m, args: seen.append(args[0].shape[1]))
    x = torch.randint(0, 128, (2, 201))
    compact(x[:, :-1], x[:, 1:])
    hook.remove()
    assert seen[0] == 200 and min(seen) < 200


def _capped_by_hand(depth: torch.Tensor, caps: dict[int, int]) -> torch.Tensor:
    """The capacity rule, token by token: at step r a row's running tokens past the first caps[r] leave at r-1."""
    depth = depth.clone()
    for row in depth:
        for r, cap in sorted(caps.items()):
            seen = 0
            for i in range(len(row)):
                if row[i] >= r:
                    seen += 1
                    if seen > cap:
                        row[i] = r - 1
    return depth


def test_capacity_gives_static_lengths_and_caps_the_latest_tokens():
    compact, dense = _pair(tc_capacity=0.3)          # L_2 = L_3 = 64 of 200 (0.3·200·2/3 = 40 -> 64)
    free = MoRModel(dataclasses.replace(compact.cfg, tc_capacity=0.0))
    free.load_state_dict(compact.state_dict())
    torch.manual_seed(1)
    x = torch.randint(0, 128, (3, 201))
    seen = []
    layer = compact.layers[str(max(int(k) for k in compact.layers) - 1)]
    hook = layer.register_forward_pre_hook(lambda m, args: seen.append(args[0].shape[1]))
    compact.trace, dense.trace, free.trace = [], [], []
    a, b = compact(x[:, :-1], x[:, 1:]), dense(x[:, :-1], x[:, 1:])
    free(x[:, :-1], x[:, 1:])
    hook.remove()
    assert seen == [200, 64, 64]                     # static, whatever the router chose
    chosen, capped = free.trace[0]["depth"], compact.trace[0]["depth"]
    assert ((chosen >= 2).sum(dim=1) > 64).any()     # the capacity bites in some row
    assert torch.equal(capped, _capped_by_hand(chosen, {2: 64, 3: 64}))
    # the masked dense form with the same capacity is the same model
    torch.testing.assert_close(a.loss, b.loss, rtol=1e-5, atol=1e-6)
    assert torch.equal(dense.trace[0]["depth"], capped)
    a.loss.backward()
    b.loss.backward()
    for (name, pa), pb in zip(compact.named_parameters(), dense.parameters()):
        torch.testing.assert_close(pa.grad, pb.grad, rtol=1e-4, atol=1e-6, msg=name)
    # inference (causal routing) never caps: the same logits as without a capacity
    with torch.no_grad():
        torch.testing.assert_close(compact(x[:, :-1], causal_routing=True).logits,
                                   free(x[:, :-1], causal_routing=True).logits, rtol=0, atol=0)
