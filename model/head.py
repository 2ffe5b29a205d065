"""The output head and its cross-entropy, fused and chunked so the vocabulary's logits never exist whole.

For a micro-batch of N tokens the plain path keeps N × V/TP fp32 logits (and as many again for their softmax)
alive from the forward pass to the backward: 16 × 2048 × 49,152 × 4 B = 6.4 GB at the 360M shapes. Here the
head's matmul and the loss run over chunks of ``ModelConfig.loss_chunk`` tokens: a chunk's logits are made,
reduced to its loss, turned at once into the gradients of the hidden states and of the head's weight, and
dropped. The backward pass then only scales the stored gradients by the incoming one (the loss is the last op
of the graph, so its upstream gradient is a scalar). Memory: one chunk's logits plus N × d and V/TP × d of
gradients. FLOPs: the same three matmuls as the plain path.

Tensor parallel: the weight is split by vocabulary rows as in megatron-core's vocab-parallel cross-entropy; per
chunk the row maximum is all-reduced (MAX) and the sum of exponentials with the label's logit (SUM; ranks that
do not hold the label add 0), and the hidden states' gradient is summed over ranks by megatron's
copy-to-tensor-parallel-region on the way in. The values are the plain path's to fp32 rounding
(tests/model/test_head.py, TP=2 included).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
from megatron.core.tensor_parallel import ColumnParallelLinear, copy_to_tensor_model_parallel_region
from torch.autograd.function import once_differentiable

from model.layers import tp_world_size
from model.loss import IGNORE_INDEX, label_is_argmax, label_weights, lm_cross_entropy


def _chunks(h: torch.Tensor, w: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor, *, chunk: int,
            dtype: torch.dtype, group, vocab_start: int, grads: bool, scores: bool):
    """h (N, d), w (V_local, d), labels (N,), weights (N,) fp32 → Σ weights·CE (fp32), and on request the
    gradients of that sum with respect to h and w, and per token log p(label) and "label is the argmax"."""
    n, v_local = h.shape[0], w.shape[0]
    wc = w.to(dtype)
    loss = torch.zeros((), dtype=torch.float32, device=h.device)
    grad_h = torch.empty(h.shape, dtype=dtype, device=h.device) if grads else None
    grad_w = torch.zeros(w.shape, dtype=torch.float32, device=w.device) if grads else None
    logprob, greedy = [], []
    for i in range(0, n, chunk):
        hc, lab, weight = h[i:i + chunk].to(dtype), labels[i:i + chunk], weights[i:i + chunk]
        z = (hc @ wc.t()).float()                    # this chunk's logits: the plain path's values, rounding included
        local = lab - vocab_start
        mine = (local >= 0) & (local < v_local) & (lab != IGNORE_INDEX)
        local = local.clamp(0, v_local - 1)
        target = z.gather(1, local[:, None])[:, 0].masked_fill(~mine, 0.0)
        top = z.amax(dim=1)
        if group is not None:
            dist.all_reduce(top, op=dist.ReduceOp.MAX, group=group)
        z.sub_(top[:, None]).exp_()                  # z is exp(logit − max) from here on
        total = z.sum(dim=1)
        if group is not None:
            both = torch.stack([total, target])
            dist.all_reduce(both, group=group)
            total, target = both[0], both[1]
        ce = top + total.log() - target
        loss = loss + (weight * ce).sum()
        if scores:
            valid = lab != IGNORE_INDEX
            logprob.append(torch.where(valid, -ce, torch.zeros_like(ce)))
            greedy.append((target >= top) & valid)   # exact: the label's logit is among those maxed over
        if grads:
            z.div_(total[:, None])                   # softmax
            z.scatter_add_(1, local[:, None], -mine.to(z.dtype)[:, None])
            g = z.mul_(weight[:, None]).to(dtype)
            grad_h[i:i + chunk] = g @ wc
            grad_w += (g.t() @ hc).float()
    return loss, grad_h, grad_w, logprob, greedy


class _LinearCrossEntropy(torch.autograd.Function):
    """Σ weights·CE(h·wᵀ, labels), its gradients made in the forward pass."""

    @staticmethod
    def forward(ctx, h, w, labels, weights, chunk, dtype, group, vocab_start):
        loss, grad_h, grad_w, _, _ = _chunks(h, w, labels, weights, chunk=chunk, dtype=dtype, group=group,
                                             vocab_start=vocab_start, grads=True, scores=False)
        ctx.save_for_backward(grad_h, grad_w)
        ctx.dtypes = (h.dtype, w.dtype)
        return loss

    @staticmethod
    @once_differentiable
    def backward(ctx, upstream):
        grad_h, grad_w = ctx.saved_tensors
        return ((grad_h * upstream).to(ctx.dtypes[0]), (grad_w * upstream).to(ctx.dtypes[1]),
                None, None, None, None, None, None)


class LMHead(ColumnParallelLinear):
    """megatron-core's column-parallel output layer that can also return its loss. Called without labels it is
    the plain layer (logits, for generation); with labels it computes the loss chunk by chunk (``chunk`` > 0)
    or from whole logits (``chunk`` = 0). Staying one module call keeps DeepSpeed ZeRO-3's parameter gathering
    (a hook on the module's forward) working for the untied weight and for the tied embedding it borrows."""

    def __init__(self, *args, chunk: int, **kwargs):
        super().__init__(*args, **kwargs)
        self.chunk = chunk
        self.head_group = self.tp_group if tp_world_size() > 1 else None
        # this rank's first row of the (split) vocabulary
        self.vocab_start = (0 if self.head_group is None
                            else dist.get_rank(self.head_group) * self.output_size_per_partition)

    def forward(self, input_: torch.Tensor, weight: Optional[torch.Tensor] = None, runtime_gather_output=None, *,
                labels: Optional[torch.Tensor] = None, loss_mask: Optional[torch.Tensor] = None,
                per_token: bool = False):
        """Without ``labels``: (logits, None) as megatron's layer returns. With them: the mean next-token loss over
        the labels that count (``loss_mask``, never IGNORE_INDEX); with ``per_token`` a tuple (loss, log p(label)
        (B, T), label-is-argmax (B, T)), chunked only where no gradient is asked for."""
        if labels is None:
            return super().forward(input_, weight=weight, runtime_gather_output=runtime_gather_output)
        grad = torch.is_grad_enabled()
        if self.chunk == 0 or (per_token and grad):
            logits, _ = super().forward(input_, weight=weight)
            if not per_token:
                return lm_cross_entropy(logits, labels, loss_mask=loss_mask, reduction="mean")
            token_loss = lm_cross_entropy(logits, labels)
            weight = label_weights(labels, loss_mask)
            lm_loss = (token_loss * weight).sum() / weight.sum().clamp(min=1.0)   # as reduction="mean" computes it
            return lm_loss, -token_loss.detach(), label_is_argmax(logits.detach(), labels)
        w = self.weight if weight is None else weight
        device = input_.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else input_.dtype
        h = input_
        if self.head_group is not None:
            h = copy_to_tensor_model_parallel_region(h, group=self.head_group)  # backward: sum over TP ranks
        h = h.reshape(-1, h.shape[-1])
        weights = label_weights(labels, loss_mask).reshape(-1)
        weights = weights / weights.sum().clamp(min=1.0)   # each label's share of the mean; no host sync
        flat = labels.reshape(-1)
        with torch.autocast(device, enabled=False):
            if per_token or not (grad and (h.requires_grad or w.requires_grad)):
                loss, _, _, logprob, greedy = _chunks(h, w, flat, weights, chunk=self.chunk, dtype=dtype,
                                                      group=self.head_group, vocab_start=self.vocab_start,
                                                      grads=False, scores=per_token)
                if not per_token:
                    return loss
                return loss, torch.cat(logprob).view(labels.shape), torch.cat(greedy).view(labels.shape)
            return _LinearCrossEntropy.apply(h, w, flat, weights, self.chunk, dtype, self.head_group,
                                             self.vocab_start)

