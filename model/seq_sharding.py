"""How the layer ops between two routing ops see the stream they run on: whole (``NoSharding``), or split along
the sequence over the tensor-parallel group (``SequenceParallel``, megatron-core's sequence parallelism). Routing
ops always see whole sequences: the model calls ``gather`` before each, and at the end of its ops, so routers see
exactly what a TP = 1 run sees and keep the same tokens under any layout. Context parallelism would be a third
kind here: the model's op loop only calls ``layer`` and ``gather``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core.tensor_parallel import gather_from_sequence_parallel_region, scatter_to_sequence_parallel_region

from model.layers import tp_group, tp_world_size
from model.program import Op
from model.state import ForwardState, SequenceShard


class NoSharding:
    """Every rank runs the whole stream (no sequence parallelism; also inference). ``model`` is the MoRModel whose
    op loop calls in (its _stream, rope, _key_source and _layer)."""

    def layer(self, model, op: Op, s: ForwardState) -> None:
        # a KV cache appends whole rows under a mask: never a gathered subsequence
        stream = model._stream(op, s, compact=model.cfg.tc_compact and s.cache is None)
        x = s[stream.key]
        if stream.positions is None:  # the rows' own positions: one RoPE for the whole forward pass
            if s.rope is None:
                b, n = x.shape[:2]
                if s.positions is None:
                    s.positions = torch.arange(n, device=x.device).expand(b, n)
                s.rope = model.rope(s.positions)
            positions, rope = s.positions, s.rope
        else:  # the step's tokens at their original positions: one RoPE per step
            if s.step_rope is None:
                s.step_rope = model.rope(stream.positions)
            positions, rope = stream.positions, s.step_rope
        kv = model._key_source(op, s, positions, stream.key_active, positions.shape[1])
        if stream.index is None:
            s[stream.key] = model._layer(op.layer, x, rope, stream.key_active, kv)
            return
        where = stream.index[..., None].expand(-1, -1, x.shape[-1])
        y = model._layer(op.layer, torch.gather(x, 1, where), rope, stream.key_active, kv)
        # Rows outside the index keep their value (compact token-choice: those tokens' y is never read again).
        s[stream.key] = x.scatter(1, where, y)

    def gather(self, s: ForwardState) -> None:
        pass


class SequenceParallel(NoSharding):
    """Between routing ops the stream a layer runs on (h, the compacted x, or token-choice's y) is split along the
    sequence over the TP group, padded to a multiple of TP at the end (causal attention keeps the padding from
    touching real tokens); the split lives in ``s.shard`` until ``gather``."""

    def layer(self, model, op: Op, s: ForwardState) -> None:
        stream = model._stream(op, s, compact=False)
        if s.shard is None or s.shard.key != stream.key:
            self.gather(s)
            full = s[stream.key]
            b, n = full.shape[:2]
            pad = (-n) % tp_world_size()
            positions = (stream.positions if stream.positions is not None
                         else torch.arange(n, device=full.device).expand(b, n))
            active = stream.key_active
            if pad:
                full = F.pad(full, (0, 0, 0, pad))
                positions = F.pad(positions, (0, pad))
                active = F.pad(active, (0, pad)) if active is not None else None
            local = scatter_to_sequence_parallel_region(full.transpose(0, 1).contiguous(), group=tp_group())
            s.shard = SequenceShard(stream.key, local.transpose(0, 1), n, model.rope(positions), active, positions)
        sh = s.shard
        # the padding rows are keys of no real token; shared keys keep only the first n rows
        kv = model._key_source(op, s, sh.positions, sh.active, sh.n)
        sh.x = model._layer(op.layer, sh.x, sh.rope, sh.active, kv)

    def gather(self, s: ForwardState) -> None:
        sh, s.shard = s.shard, None
        if sh is None:
            return
        # Everything after this point is computed identically on every TP rank: backward splits the gradient.
        full = gather_from_sequence_parallel_region(sh.x.transpose(0, 1).contiguous(),
                                                    tensor_parallel_output_grad=False, group=tp_group())
        s[sh.key] = full.transpose(0, 1)[:, :sh.n]


def sequence_sharding(sequence_parallel: bool) -> NoSharding:
    return SequenceParallel() if sequence_parallel else NoSharding()
