"""The Mixture-of-Recursions language model: vanilla, recursive and MoR (expert- or token-choice) in one class.

    tokens -> embedding -> prelude layers -> recursion step 1 .. Nr (shared block, routed) -> coda -> norm -> head

Routing (none, expert-choice, token-choice) lives in model/routing, one module per variant: ``self.router`` runs
the routing ops of the program and tells each layer op inside a recursion step which tokens to run (the kept,
compacted tokens of expert-choice; the tokens still recursing under token-choice) at which RoPE positions.
This module holds the rest: embedding, layers, head, pipeline stages and the op loop; the forward pass's state is
a model.state.ForwardState, and how layer ops see the stream (whole, or split by sequence parallelism) is
model/seq_sharding.py's.

The forward pass runs the flat op program of model/program.py. A pipeline stage (``pp_size`` > 1) builds only
the layers its slice of the program uses, and receives / returns the packed state at its edges.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from functools import partial
from typing import TYPE_CHECKING, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint
from megatron.core import ModelParallelConfig
from megatron.core.tensor_parallel import VocabParallelEmbedding

from model.config import ModelConfig
from model.layers import (RMSNorm, Rotary, TransformerLayer, make_parallel_config, normal_init, tp_group,
                          tp_world_size)
from model.kv_sharing import ReadFirstStep, SaveFirstStep
from model.head import LMHead
from model.program import Op, build_program, pack, packed_rows, stage_ranges, state_spec, unpack
from model.routing import Routing, Stream, build_routing
from model.seq_sharding import sequence_sharding
from model.sharing import build_plan
from model.state import ForwardState

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
        self.sharding = sequence_sharding(mp.sequence_parallel)   # how layer ops see the stream (none / SP)
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

    # ---- the pieces, for a serving engine (model/inference/engine.py), references and tests --------------------
    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, n) token ids -> (B, n, d) the residual stream's start."""
        return self.embedding(tokens)

    def rope(self, positions: torch.Tensor):
        """The RoPE tables of (B, n) positions, as ``run_layer`` takes them."""
        return self.rotary(positions)

    def run_layer(self, layer: int, x: torch.Tensor, rope, key_active: Optional[torch.Tensor] = None,
                  kv=None) -> torch.Tensor:
        """Unique layer ``layer`` on the rows ``x`` (B, n, d) at RoPE ``rope``; ``kv``: where its keys and values
        come from besides ``x`` (a cache's or a KV pool's source), None: x's own, causally."""
        return self.layers[self._layer_keys[layer]](x, rope, key_active, kv)

    def run_layers(self, layer_ids: Sequence[int], h: torch.Tensor, positions: torch.Tensor,
                   key_active: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Unique layers ``layer_ids`` in order over ``h`` at ``positions``, each token attending causally."""
        rope = self.rope(positions)
        for i in layer_ids:
            h = self.run_layer(i, h, rope, key_active)
        return h

    def head(self, h: torch.Tensor) -> torch.Tensor:
        """(B, n, d) final residual stream -> (B, n, V / TP) logits: final norm, then the (tied) output layer."""
        weight = self.embedding.weight if self.cfg.tie_embeddings else None
        return self.output_layer(self.final_norm(h), weight=weight)[0]

    def _layer(self, i: int, x: torch.Tensor, rope, active, kv=None) -> torch.Tensor:
        layer = self.layers[self._layer_keys[i]]
        if self.activation_checkpointing and self.training and torch.is_grad_enabled():
            # keep only the layer's input; recompute its activations in backward (a first-step layer under KV
            # sharing writes its keys into the state again then: the same values)
            return torch.utils.checkpoint.checkpoint(layer, x, rope, active, kv, use_reentrant=False)
        return layer(x, rope, active, kv)

    def _key_source(self, op: Op, s: ForwardState, positions: torch.Tensor, active: Optional[torch.Tensor], n: int):
        """Where layer op ``op`` takes keys and values from besides its own input: the inference KV cache, or
        recursive KV sharing's first-step keys (model/kv_sharing.py); None for its own, causally."""
        if s.cache is not None:
            valid = s.valid if active is None else s.valid & active
            return s.cache.source(op, positions, valid)
        if op.kv_from >= 0:
            return ReadFirstStep(s, op.kv_from, positions)
        if op.pos in self.kv_sources:
            return SaveFirstStep(s, op.pos, positions, active, n)
        return None

    # ---- the op interpreter -----------------------------------------------------------------------------------
    def _op(self, op: Op, s: ForwardState, stats: dict) -> None:
        """Apply one op to the state ``s`` in place."""
        if op.kind == "layer":
            self.sharding.layer(self, op, s)
            return
        # Routing ops see whole sequences, and end the stream the layers before them ran on.
        self.sharding.gather(s)
        s.stream = None
        record = self.router.run_op(op, s, stats)
        if record is not None:
            self._record(**record)

    def _stream(self, op: Op, s: ForwardState, compact: bool) -> Stream:
        """The stream of layer op ``op``, asked of the routing once per recursion step; outside the recursions,
        the whole residual stream."""
        if s.stream is None or s.stream[0] != op.step:
            s.stream = (op.step, self.router.stream(op.step, s, compact) if op.step >= 0 else Stream("h"))
            s.step_rope = None
        return s.stream[1]

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
            s = ForwardState({"h": self.embedding(tokens), "aux": torch.zeros((), device=tokens.device)})
        else:
            s = ForwardState(unpack(self.input_tensor, spec(start), torch.float32))
        s.causal = causal_routing
        if cache is not None:
            if self.pp_size > 1 or tp_world_size() > 1:
                raise NotImplementedError("a KV cache runs the model in one process (tensor and pipeline parallel "
                                          "size 1); load the checkpoint with pretrain.generate")
            lengths = torch.full((b,), t, device=tokens.device) if lengths is None else lengths.to(tokens.device)
            s.cache, s.positions, s.valid = cache, cache.positions(t), cache.valid(t, lengths)
        stats: dict[str, torch.Tensor] = {}
        for op in self.program[start:end]:
            self._op(op, s, stats)
        self.sharding.gather(s)
        # the statistics of this stage's routing ops, also where no MoROutput carries them (a pipeline stage)
        self.last_router_stats = {k: v.detach() for k, v in stats.items()}
        if cache is not None:
            cache.advance(lengths)
        if not self.is_last:
            rows = packed_rows(self.cfg, self.pp_size, b, t, tp_world_size())
            return pack(s.carried, spec(end), rows, self.pipeline_dtype)
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
