"""The Mixture-of-Recursions language model: vanilla, recursive and MoR (expert- or token-choice) in one class.

    tokens -> embedding -> prelude layers -> recursion step 1 .. Nr (shared block, routed) -> coda -> norm -> head

Routing (none, expert-choice, token-choice) lives in model/routing, one module per variant: ``self.router`` runs
the routing ops of the program and tells each layer op inside a recursion step which tokens to run (the kept,
compacted tokens of expert-choice; the tokens still recursing under token-choice) at which RoPE positions.
This module holds the rest: embedding, layers, head, pipeline stages, sequence parallelism and the op loop.

The forward pass runs the flat op program of model/program.py. A pipeline stage (``pp_size`` > 1) builds only
the layers its slice of the program uses, and receives / returns the packed state at its edges.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from functools import partial
from typing import TYPE_CHECKING, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint
from megatron.core import ModelParallelConfig
from megatron.core.tensor_parallel import (VocabParallelEmbedding,
                                           gather_from_sequence_parallel_region, scatter_to_sequence_parallel_region)

from model.config import ModelConfig
from model.layers import (RMSNorm, Rotary, TransformerLayer, make_parallel_config, normal_init, tp_group,
                          tp_world_size)
from model.kv_sharing import ReadFirstStep, SaveFirstStep
from model.head import LMHead
from model.program import Op, build_program, pack, packed_rows, stage_ranges, state_spec, unpack
from model.routing import Routing, Stream, build_routing
from model.sharing import build_plan

if TYPE_CHECKING:
    from model.inference.cache import KVCache


@dataclass
class MoROutput:
    loss: Optional[torch.Tensor]           # lm_loss + aux_loss (None without labels)
    lm_loss: Optional[torch.Tensor]
    aux_loss: torch.Tensor                 # router losses, coefficients applied, summed over steps
    logits: Optional[torch.Tensor] = None  # (B, T, V / TP) when no labels were given
    router_stats: dict[str, torch.Tensor] = field(default_factory=dict)  # detached scalars for logging
    # forward(..., per_token=True): per position, log p(label) and whether the label is the argmax (0 and False
    # where the label is IGNORE_INDEX) — what loglikelihood scoring needs, on any tensor-parallel size
    token_logprob: Optional[torch.Tensor] = None
    token_greedy: Optional[torch.Tensor] = None


class MoRModel(nn.Module):
    def __init__(self, cfg: ModelConfig, mp: Optional[ModelParallelConfig] = None, *, pp_rank: int = 0,
                 pp_size: int = 1):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        mp = mp or make_parallel_config(cfg)
        self.sequence_parallel = mp.sequence_parallel
        self.plan = build_plan(cfg)
        self.program = build_program(cfg)
        self.pp_rank, self.pp_size = pp_rank, pp_size
        self.op_range = stage_ranges(cfg, pp_size)[pp_rank]
        self.is_first, self.is_last = pp_rank == 0, pp_rank == pp_size - 1
        my_ops = self.program[self.op_range[0]:self.op_range[1]]
        if self.is_first or (self.is_last and cfg.tie_embeddings):
            # The last stage of a tied model keeps a replica of the embedding for its head (kept in sync by
            # summing the replicas' gradients, as for shared layers).
            self.embedding = VocabParallelEmbedding(cfg.vocab_size, cfg.d_model,
                                                    init_method=normal_init(cfg.init_std), config=mp,
                                                    tp_group=tp_group())
        # Each unique layer exists once per stage; the program refers to it by index wherever it is reused, so
        # sharing is parameter identity, norms included. Keys are the unique layer indices.
        self.layers = nn.ModuleDict({str(i): TransformerLayer(cfg, mp)
                                     for i in sorted({op.layer for op in my_ops if op.kind == "layer"})})
        # int -> ModuleDict key, looked up rather than formatted: torch.compile cannot trace str(int)
        self._layer_keys = {int(k): k for k in self.layers}
        self.rotary = Rotary(cfg.head_dim, cfg.rope_theta)
        if self.is_last:
            self.final_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
            # Tied: the head borrows the embedding matrix at call time (skip_weight_param_allocation). It sees
            # the whole sequence (sequence parallelism ends before the final norm), so no SP gather here.
            # The loss is computed inside the head, chunk by chunk (model/head.py).
            self.output_layer = LMHead(cfg.d_model, cfg.vocab_size,
                                       config=dataclasses.replace(mp, sequence_parallel=False),
                                       init_method=normal_init(cfg.init_std), bias=False, gather_output=False,
                                       skip_weight_param_allocation=cfg.tie_embeddings, tp_group=tp_group(),
                                       chunk=cfg.loss_chunk)
        # Created after the layers, as always: the routers' initial weights depend on the RNG's position. Every
        # stage holds the routers (the pipeline keeps the replicas equal), whichever of them its ops use.
        self.router: Routing = build_routing(cfg)
        self.input_tensor: Optional[torch.Tensor] = None  # set by the pipeline schedule on non-first stages
        self.pipeline_dtype = torch.float32
        self.activation_checkpointing = False  # recompute each layer in backward (set by the trainer)
        # Tests and debugging set this to a list to record each recursion step's state (see _record).
        self.trace: Optional[list[dict[str, torch.Tensor]]] = None
        self.last_router_stats: dict[str, torch.Tensor] = {}
        # Recursive KV sharing: unrolled positions of the first-step layers whose keys later steps read.
        self.kv_sources = {op.kv_from for op in self.program if op.kv_from >= 0}

    def _record(self, **state: torch.Tensor) -> None:
        if self.trace is not None:
            self.trace.append({k: v.detach().clone() for k, v in state.items()})

    def _run(self, layer_ids: tuple[int, ...], h: torch.Tensor, positions: torch.Tensor,
             key_active: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Run unique layers ``layer_ids`` in order (tests and references use this directly)."""
        rope = self.rotary(positions)
        for i in layer_ids:
            h = self.layers[str(i)](h, rope, key_active)
        return h

    def _layer(self, i: int, x: torch.Tensor, rope, active, kv=None) -> torch.Tensor:
        layer = self.layers[self._layer_keys[i]]
        if self.activation_checkpointing and self.training and torch.is_grad_enabled():
            # keep only the layer's input; recompute its activations in backward (a first-step layer under KV
            # sharing writes its keys into the state again then: the same values)
            return torch.utils.checkpoint.checkpoint(layer, x, rope, active, kv, use_reentrant=False)
        return layer(x, rope, active, kv)

    def _key_source(self, op: Op, s: dict, positions: torch.Tensor, active: Optional[torch.Tensor], n: int):
        """Where layer op ``op`` takes keys and values from besides its own input: the inference KV cache, or
        recursive KV sharing's first-step keys (model/kv_sharing.py); None for its own, causally."""
        cache = s.get("_cache")
        if cache is not None:
            valid = s["_valid"] if active is None else s["_valid"] & active
            return cache.source(op, positions, valid)
        if op.kv_from >= 0:
            return ReadFirstStep(s, op.kv_from, positions)
        if op.pos in self.kv_sources:
            return SaveFirstStep(s, op.pos, positions, active, n)
        return None

    # ---- the op interpreter -----------------------------------------------------------------------------------
    def _op(self, op: Op, s: dict, stats: dict) -> None:
        """Apply one op to the state ``s`` in place. Keys with a leading "_" are local caches."""
        if op.kind == "layer":
            if self.sequence_parallel:
                self._sp_layer(op, s)
            else:
                self._sp_gather(s)
                self._plain_layer(op, s)
            return
        # Routing ops see whole sequences, and end the stream the layers before them ran on.
        self._sp_gather(s)
        s.pop("_stream", None)
        record = self.router.run_op(op, s, stats)
        if record is not None:
            self._record(**record)

    def _stream(self, op: Op, s: dict, compact: bool) -> Stream:
        """The stream of layer op ``op``, asked of the routing once per recursion step; outside the recursions,
        the whole residual stream."""
        cached = s.get("_stream")
        if cached is None or cached[0] != op.step:
            cached = s["_stream"] = (op.step, self.router.stream(op.step, s, compact) if op.step >= 0 else Stream("h"))
            s.pop("_step_rope", None)
        return cached[1]

    def _plain_layer(self, op: Op, s: dict) -> None:
        # a KV cache appends whole rows under a mask: never a gathered subsequence
        stream = self._stream(op, s, compact=self.cfg.tc_compact and "_cache" not in s)
        x = s[stream.key]
        if stream.positions is None:  # the rows' own positions: one RoPE for the whole forward pass
            if "_pos_rope" not in s:
                b, n = x.shape[:2]
                s.setdefault("_positions", torch.arange(n, device=x.device).expand(b, n))
                s["_pos_rope"] = self.rotary(s["_positions"])
            positions, rope = s["_positions"], s["_pos_rope"]
        else:  # the step's tokens at their original positions: one RoPE per step
            if "_step_rope" not in s:
                s["_step_rope"] = self.rotary(stream.positions)
            positions, rope = stream.positions, s["_step_rope"]
        kv = self._key_source(op, s, positions, stream.key_active, positions.shape[1])
        if stream.index is None:
            s[stream.key] = self._layer(op.layer, x, rope, stream.key_active, kv)
            return
        where = stream.index[..., None].expand(-1, -1, x.shape[-1])
        y = self._layer(op.layer, torch.gather(x, 1, where), rope, stream.key_active, kv)
        # Rows outside the index keep their value (compact token-choice: those tokens' y is never read again).
        s[stream.key] = x.scatter(1, where, y)

    # ---- sequence parallelism ---------------------------------------------------------------------------------
    # Between routing ops the stream a layer runs on (h, the compacted x, or token-choice's y) is split along the
    # sequence over the TP group, padded to a multiple of TP at the end (causal attention keeps the padding from
    # touching real tokens). Routing ops gather it back whole, so routers see exactly what a TP = 1 run sees and
    # keep the same tokens under any layout.
    def _sp_layer(self, op: Op, s: dict) -> None:
        stream = self._stream(op, s, compact=False)
        if s.get("_sp_key") != stream.key:
            self._sp_gather(s)
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
            s.update(_sp_key=stream.key, _sp_x=local.transpose(0, 1), _sp_len=n, _sp_rope=self.rotary(positions),
                     _sp_active=active, _sp_pos=positions)
        # the padding rows are keys of no real token; shared keys keep only the first n rows
        kv = self._key_source(op, s, s["_sp_pos"], s["_sp_active"], s["_sp_len"])
        s["_sp_x"] = self._layer(op.layer, s["_sp_x"], s["_sp_rope"], s["_sp_active"], kv)

    def _sp_gather(self, s: dict) -> None:
        key = s.pop("_sp_key", None)
        if key is None:
            return
        local, n = s.pop("_sp_x"), s.pop("_sp_len")
        s.pop("_sp_rope"), s.pop("_sp_active"), s.pop("_sp_pos")
        # Everything after this point is computed identically on every TP rank: backward splits the gradient.
        full = gather_from_sequence_parallel_region(local.transpose(0, 1).contiguous(),
                                                    tensor_parallel_output_grad=False, group=tp_group())
        s[key] = full.transpose(0, 1)[:, :n]

    # ---- forward ----------------------------------------------------------------------------------------------
    def set_input_tensor(self, tensor) -> None:
        """megatron's pipeline schedule hands a non-first stage its received activations here."""
        self.input_tensor = tensor[0] if isinstance(tensor, (list, tuple)) else tensor

    def forward(self, tokens: torch.Tensor, labels: Optional[torch.Tensor] = None,
                loss_mask: Optional[torch.Tensor] = None, *, causal_routing: bool = False,
                cache: Optional["KVCache"] = None, lengths: Optional[torch.Tensor] = None, per_token: bool = False):
        """tokens, labels, loss_mask: (B, T). Returns the mean next-token loss over loss_mask when labels given;
        labels equal to model.loss.IGNORE_INDEX (padding) count nowhere.

        ``causal_routing``: route as a deployed model does — every token decides from its own state whether it
        runs each recursion step (model/routing/*: ``continues``), so no position reads a later one. Training
        routing (the default) is the paper's: expert-choice picks the top-k of the whole sequence.

        ``cache`` (model/inference/cache.py; implies causal routing, one process): ``tokens`` continue each row
        of the cache at its current length; only the first ``lengths`` (B,) tokens of a row are real (default
        all), the rest is padding that is neither cached nor seen. The cache advances by ``lengths``.

        ``per_token`` (with labels): the output also carries each position's log-probability of its label and
        whether the label is the most likely token (MoROutput.token_logprob / token_greedy).

        On a pipeline stage other than the last, returns the packed state tensor for the next stage instead.
        """
        b, t = tokens.shape
        start, end = self.op_range
        causal_routing = causal_routing or cache is not None
        kept = self.router.kept_tokens(t)  # both sides of a stage boundary agree: same config, step and mode
        spec = partial(state_spec, self.cfg, batch=b, seq_len=t, kept=kept, causal=causal_routing,
                       tp=tp_world_size())
        if self.is_first:
            s = {"h": self.embedding(tokens), "aux": torch.zeros((), device=tokens.device)}
        else:
            s = unpack(self.input_tensor, spec(start), torch.float32)
        if causal_routing:
            s["_causal"] = True
        if cache is not None:
            if self.pp_size > 1 or tp_world_size() > 1:
                raise NotImplementedError("a KV cache runs the model in one process (tensor and pipeline parallel "
                                          "size 1); load the checkpoint with pretrain.generate")
            lengths = torch.full((b,), t, device=tokens.device) if lengths is None else lengths.to(tokens.device)
            s.update(_cache=cache, _positions=cache.positions(t), _valid=cache.valid(t, lengths))
        stats: dict[str, torch.Tensor] = {}
        for op in self.program[start:end]:
            self._op(op, s, stats)
        self._sp_gather(s)
        # the statistics of this stage's routing ops, also where no MoROutput carries them (a pipeline stage)
        self.last_router_stats = {k: v.detach() for k, v in stats.items()}
        if cache is not None:
            cache.advance(lengths)
        if not self.is_last:
            rows = packed_rows(self.cfg, self.pp_size, b, t, tp_world_size())
            return pack(s, spec(end), rows, self.pipeline_dtype)
        h = self.final_norm(s["h"])
        weight = self.embedding.weight if self.cfg.tie_embeddings else None
        aux_loss = s["aux"]
        if labels is None:
            logits, _ = self.output_layer(h, weight=weight)
            return MoROutput(None, None, aux_loss, logits, stats)
        # the mean over the labels that count: loss_mask, and never padding (labels IGNORE_INDEX, model/loss.py)
        if not per_token:
            lm_loss = self.output_layer(h, weight=weight, labels=labels, loss_mask=loss_mask)
            return MoROutput(lm_loss + aux_loss, lm_loss, aux_loss, None, stats)
        lm_loss, logprob, greedy = self.output_layer(h, weight=weight, labels=labels, loss_mask=loss_mask,
                                                     per_token=True)
        return MoROutput(lm_loss + aux_loss, lm_loss, aux_loss, None, stats, logprob, greedy)

    # ---- once per optimizer step (the trainer calls these on every rank) ---------------------------------------
    def begin_step(self, step: int) -> None:
        """Before the micro-batches of optimizer step ``step`` (0-based): routing warm-ups read it in training
        mode; eval mode ignores them."""
        self.router.begin_step(step)

    def end_step(self, applied: bool = True) -> dict[str, float]:
        """After the optimizer step: routing state that moves once per step (the loss-free balancing bias, from
        the loads of every training micro-batch since begin_step, summed over replicas; collective). ``applied``
        False, a skipped step, leaves it as it was. Returns scalars to log."""
        return self.router.end_step(applied)

    # ---- introspection ----------------------------------------------------------------------------------------
    def external_parameters(self) -> list[tuple[nn.Module, nn.Parameter]]:
        """(module, parameter) pairs where a module uses a parameter it does not own: the tied head."""
        if self.is_last and self.cfg.tie_embeddings:
            return [(self.output_layer, self.embedding.weight)]
        return []

    def shared_parameters(self) -> list[nn.Parameter]:
        """Parameters of the layers that the recursion steps reuse."""
        ids = sorted(set(sum(self.plan.steps, ())))
        return [p for i in ids if str(i) in self.layers for p in self.layers[str(i)].parameters()]
