"""Padding counts nowhere: labels equal to IGNORE_INDEX give the loss (and gradients) of the unpadded tokens alone,
on torch's cross-entropy (TP = 1) and on megatron's vocab-parallel one (TP > 1, which knows no ignore index)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from model.loss import IGNORE_INDEX, lm_cross_entropy
from model.mor import MoRModel
from tests.model.helpers import tiny

V = 50


def padded_batch(b: int = 3, t: int = 9, pads=(0, 4, 0)):
    """Random logits and labels; row r ends in pads[r] padding labels (as the last sample of a split does)."""
    g = torch.Generator().manual_seed(0)
    logits = (3 * torch.randn(b, t, V, generator=g)).requires_grad_()
    labels = torch.randint(0, V, (b, t), generator=g)
    for r, p in enumerate(pads):
        if p:
            labels[r, -p:] = IGNORE_INDEX
    return logits, labels


def reference(logits: torch.Tensor, labels: torch.Tensor, weight=None) -> torch.Tensor:
    """The mean loss over the real labels only, from those positions alone (no ignore index involved)."""
    real = labels != IGNORE_INDEX
    per = F.cross_entropy(logits[real].float(), labels[real], reduction="none")
    if weight is None:
        return per.mean()
    w = weight[real].float()
    return (per * w).sum() / w.sum()


@pytest.mark.parametrize("vocab_parallel", [False, True], ids=["torch", "megatron-vocab-parallel"])
def test_mean_equals_the_loss_of_the_unpadded_tokens(vocab_parallel: bool):
    logits, labels = padded_batch()
    got = lm_cross_entropy(logits, labels, reduction="mean", force_vocab_parallel=vocab_parallel)
    ref = reference(logits, labels)
    assert torch.allclose(got, ref, atol=1e-6)
    g_got, = torch.autograd.grad(got, logits)
    g_ref, = torch.autograd.grad(ref, logits)
    assert torch.allclose(g_got, g_ref, atol=1e-7)
    assert torch.count_nonzero(g_got[1, -4:]) == 0                  # padding gets no gradient
    per_token = lm_cross_entropy(logits, labels, force_vocab_parallel=vocab_parallel)
    assert per_token.shape == labels.shape and torch.count_nonzero(per_token[1, -4:]) == 0


@pytest.mark.parametrize("vocab_parallel", [False, True], ids=["torch", "megatron-vocab-parallel"])
def test_loss_mask_and_padding_combine(vocab_parallel: bool):
    logits, labels = padded_batch()
    mask = torch.ones(labels.shape)
    mask[0, :2] = 0                                                  # a masked real label
    mask[2, 3] = 0.5
    got = lm_cross_entropy(logits, labels, loss_mask=mask, reduction="mean", force_vocab_parallel=vocab_parallel)
    assert torch.allclose(got, reference(logits, labels, mask), atol=1e-6)


@pytest.mark.parametrize("routing", ["expert_choice", "token_choice"])
def test_model_lm_loss_is_the_mean_over_real_labels(routing: str):
    """The tokens stay as they are (padding still runs through the model); only its labels leave the loss."""
    torch.manual_seed(0)
    model = MoRModel(tiny(routing=routing)).eval()
    seq = torch.randint(0, 128, (3, 25))
    tokens, labels = seq[:, :-1], seq[:, 1:].clone()
    labels[2, -7:] = IGNORE_INDEX
    out = model(tokens, labels)
    logits = model(tokens).logits
    assert torch.allclose(out.lm_loss, reference(logits, labels), atol=1e-5)
    assert torch.allclose(out.loss, out.lm_loss + out.aux_loss)
    unpadded = model(tokens, seq[:, 1:]).lm_loss                    # the same labels without padding differ
    assert not torch.allclose(out.lm_loss, unpadded, atol=1e-4)
