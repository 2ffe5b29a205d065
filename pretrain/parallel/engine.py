"""The model as the engine runs it: the one seam between the training loop and the parallel layout.

Under every layout (TP × PP × DP, ZeRO 0-3) the loop, validation and checkpoints see the same few calls:

    engine = TrainEngine(cfg, layout, bf16=...)     this rank's stage, the optimizer, the DeepSpeed engine
    engine.set_lr(lr)
    engine.begin_step(step) ... engine.end_step(applied)   routing state that moves once per optimizer step
    result = engine.train_step(micro_batches)  forward, backward and optimizer step over the micro-batches
    sums = engine.eval_sums(batches, causal_routing=...)   forward only: loss and router statistic sums
    scores = engine.token_scores(batches)      forward only, causal routing: per-token log p(label), greedy flags
    engine.save(folder) / engine.load(folder)  this rank's model and optimizer state

With PP = 1 each micro-batch goes through DeepSpeed's engine (forward, backward, step: DeepSpeed accumulates,
reduces over data-parallel ranks and clips at the boundary). With PP > 1 megatron's 1F1B schedule runs the
micro-batches (pipeline.py) and DeepSpeed only steps the optimizer. DeepSpeed's API is used here and in zero.py
only; nothing above this module branches on the pipeline or the ZeRO stage.

A non-finite loss on any rank, in any micro-batch, makes the step a no-op that still completes every collective:
the rest of the micro-batches contribute zero gradients and the optimizer steps with a learning rate of 0 (the
weights do not move; the moment estimates age by one step). With PP = 1 a NaN loss is caught before its backward,
so no NaN reaches a gradient or ZeRO's partitions; a pipeline's backward runs inside megatron's schedule, so there
the NaN reaches every stage's gradients, which are replaced by zeros before the optimizer sees them. Every rank
takes the same decision (a MIN all-reduce of the finite flag over the world).

Fault injection (``train_step(inject_nan=True)``, from pretrain/checkpoint/faults.py): one element of the input
embedding's output in the step's last micro-batch becomes NaN (``nan_output``), so the NaN travels the real
forward (and, through a pipeline, backward) pass.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Optional, Sequence

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps

from conf.errors import ConfigError
from model.init import init_weights
from model.layers import use_attention_backend
from model.mor import MoRModel
from pretrain.config import RunConfig
from pretrain.data.loader import label_count
from pretrain.parallel.layout import Layout, grad_accumulation_steps
from pretrain.parallel.pipeline import (build_stage, clip_grad_norm, finish_pipeline_step, pipeline_forward_backward,
                                        pipeline_forward_only, pipeline_token_scores, replica_layout, sync_replicas)
from pretrain.parallel.zero import build_engine, param_groups

Batch = tuple[torch.Tensor, torch.Tensor]   # (tokens, labels), each (B, T)
_TAG = "engine"                             # DeepSpeed's sub-folder inside a checkpoint folder


@dataclass
class StepResult:
    loss: torch.Tensor        # mean loss over this rank's micro-batches (pipeline: every stage has it)
    grad_norm: float          # global norm before clipping
    finite: bool              # False: the step was a no-op (see the module docstring)
    router_stats: dict[str, float] = field(default_factory=dict)


@dataclass
class EvalSums:
    """What ``TrainEngine.eval_sums`` adds up over one rank's batches (validation adds these over data-parallel
    ranks)."""
    loss: torch.Tensor                              # (2,): Σ batch's mean lm loss × its real tokens, Σ real tokens
    stats: dict[str, tuple[float, float]]           # router statistic -> (Σ batch value × positions, Σ positions)


def _weigh_stats(per_batch: Sequence[dict[str, torch.Tensor]], positions: Sequence[int]
                 ) -> dict[str, tuple[float, float]]:
    """Router statistics are means over a batch's positions (all B·T, or a step's B·k candidates, k fixed by T).
    Validation batches share one T, so weighing each batch by B·T pools them exactly: the mean over every
    position (or candidate) of all batches, as one big batch would give."""
    out: dict[str, tuple[float, float]] = {}
    for stats, n in zip(per_batch, positions, strict=True):
        for k, v in stats.items():
            s, w = out.get(k, (0.0, 0.0))
            out[k] = (s + float(v) * n, w + n)
    return out


def merge_stat_sums(parts: Sequence[dict[str, tuple[float, float]]]) -> dict[str, tuple[float, float]]:
    """Sums of several ranks' weighed statistics, added in the order given (the same on every rank that merges
    the same list, so the result is bit-identical everywhere)."""
    out: dict[str, tuple[float, float]] = {}
    for part in parts:
        for k, (s, w) in part.items():
            s0, w0 = out.get(k, (0.0, 0.0))
            out[k] = (s0 + s, w0 + w)
    return out


@contextmanager
def nan_output(module: Optional[torch.nn.Module], call: int = 1) -> Iterator[None]:
    """While open, the ``call``-th forward of ``module`` (1-based; None: nothing happens) returns its output with
    its first element NaN — a value in the graph, as an overflow would leave it, that the layers after it and
    their gradients carry on. The fault injection of pretrain/checkpoint/faults.py (MOR_FAULT_NAN_*)."""
    if module is None:
        yield
        return
    seen = 0

    def poison(_module, _args, output):
        nonlocal seen
        seen += 1
        if seen != call:
            return None
        nan = torch.zeros_like(output, memory_format=torch.contiguous_format)
        nan.view(-1)[0] = float("nan")   # a fresh tensor: the output itself, and its autograd history, stay intact
        return output + nan

    # A compiled model (train.compile) would not see a hook added after it was compiled (dynamo does not guard on
    # module hooks): the poisoned step runs eagerly.
    with torch.compiler.set_stance("force_eager"):
        handle = module.register_forward_hook(poison)
        try:
            yield
        finally:
            handle.remove()


def check_compile(cfg: RunConfig) -> None:
    """ConfigError for a ``train.compile`` that cannot work, before anything is built."""
    if cfg.train.compile and cfg.parallel.zero_stage == 3:
        # Seen with DeepSpeed 0.19.8 and torch 2.13: dynamo traces the routers' weights as ZeRO-3 leaves them
        # between gathers (empty shards) and stops with a size mismatch at the first step.
        raise ConfigError("train.compile=true: torch.compile cannot trace ZeRO-3's partitioned parameters "
                          "(parallel.zero_stage=3); use parallel.zero_stage 0, 1 or 2 with train.compile=true, or "
                          "train.compile=false")


class TrainEngine:
    # train.compile's torch.compile backend, on CPU as on GPU (on CPU inductor builds C++ with the system's
    # compiler: minutes before the first step of even a tiny model on two cores)
    compile_backend = "inductor"

    def __init__(self, cfg: RunConfig, layout: Layout, *, bf16: bool,
                 init: Optional[Callable[[MoRModel, int, int], None]] = None):
        """``init(model, tp_rank, tp_size)`` sets the stage's initial weights (default: model/init.py's draw from
        parallel.seed); it runs before DeepSpeed wraps the model, so the fp32 master copies start from them."""
        check_compile(cfg)
        self.cfg, self.layout, self.device = cfg, layout, layout.device
        model = build_stage(cfg.model, sequence_parallel=cfg.parallel.sequence_parallel,
                            use_cpu_initialization=self.device.type == "cpu").to(self.device)
        # the same initial weights under every layout (megatron draws each shard from its own stream)
        if init is None:
            init_weights(model, cfg.model, cfg.parallel.seed, ps.get_tensor_model_parallel_rank(), layout.tp)
        else:
            init(model, ps.get_tensor_model_parallel_rank(), layout.tp)
        model.activation_checkpointing = cfg.train.activation_checkpointing
        # decided once, here, for the device the model runs on (the trainer logs it)
        self.attention_backend = use_attention_backend(model, self.device)
        self.model = model
        self.pipelined = layout.pp > 1
        self.replicas = replica_layout(cfg.model) if self.pipelined else []
        # Before DeepSpeed wraps the model: ZeRO-1/2 copy the parameters into their fp32 partitions there, and the
        # first step writes those back, so replicas made equal after it would part again (by 0.1 in 3 steps).
        sync_replicas(model, self.replicas)
        self.optimizer = torch.optim.AdamW(param_groups(model, cfg.optim.weight_decay), lr=cfg.optim.lr,
                                           betas=tuple(cfg.optim.betas), eps=cfg.optim.eps,
                                           fused=self.device.type == "cuda")
        self._ds = build_engine(model, self.optimizer, cfg.parallel, layout, grad_clip=cfg.optim.grad_clip,
                                bf16=bf16)
        if cfg.train.compile:
            # DeepSpeed compiles the module in place (nn.Module.compile), so every caller of the model is compiled:
            # the engine's micro-batch steps, validation and the pipeline schedule's stage calls alike.
            self._ds.compile(backend=self.compile_backend)
        self.micro_batches = grad_accumulation_steps(cfg.parallel, layout.dp)

    # ---- the optimizer step -------------------------------------------------------------------------------------
    def set_lr(self, lr: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    def begin_step(self, step: int) -> None:
        """Before optimizer step ``step`` (0-based): routing warm-ups read it."""
        self.model.begin_step(step)

    def end_step(self, applied: bool) -> dict[str, float]:
        """After the optimizer step (collective over the data-parallel group): routing state that moves once per
        step, e.g. the loss-free balancing bias; ``applied`` False (a skipped step) leaves it where it was.
        Returns what to log."""
        return self.model.end_step(applied=applied)

    def _all_finite(self, value: torch.Tensor) -> bool:
        flag = torch.isfinite(value.detach().float()).all().float().reshape(1)
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        return bool(flag.item())

    def _poisoned(self, inject_nan: bool, micro: Sequence[Batch]):
        """The fault's NaN (module docstring) in the last micro-batch's embedding output, where this stage holds
        the input embedding; otherwise nothing happens."""
        here = inject_nan and self.model.is_first
        return nan_output(self.model.embedding if here else None, call=len(micro))

    def train_step(self, micro: Sequence[Batch], *, inject_nan: bool = False) -> StepResult:
        """One optimizer step over ``micro`` (this rank's micro-batches, already on the device). ``inject_nan``:
        the fault of pretrain/checkpoint/faults.py poisons this step (module docstring)."""
        if self.pipelined:
            return self._pipeline_step(micro, inject_nan)
        total, finite, stats = torch.zeros((), device=self.device), True, {}
        zero = self.cfg.parallel.zero_stage
        with self._poisoned(inject_nan, micro):
            for i, (tokens, labels) in enumerate(micro):
                out = self._ds(tokens, labels)
                loss_i = out.loss
                finite = finite and self._all_finite(loss_i)
                if not finite:  # contribute zero gradients from here on, and step with lr 0
                    loss_i = sum(p.sum() for p in self.model.parameters() if p.requires_grad) * 0.0
                    self.set_lr(0.0)
                self._ds.backward(loss_i)
                if i == len(micro) - 1 and zero == 0:
                    # Plain DP keeps whole gradients in p.grad: measure the norm before the engine clips it.
                    norm = clip_grad_norm(self.model, [], 0.0)
                self._ds.step()
                total += out.loss.detach().float() / len(micro)
                stats = out.router_stats
        if zero > 0:  # ZeRO keeps its partitions' norm from the step
            norm = torch.tensor(float(self._ds.get_global_grad_norm() or 0.0))
        return StepResult(total, float(norm), finite, {k: float(v) for k, v in stats.items()})

    def _pipeline_step(self, micro: Sequence[Batch], inject_nan: bool) -> StepResult:
        with self._poisoned(inject_nan, micro):
            loss, norm = pipeline_forward_backward(self.model, self.replicas, micro,
                                                   max_grad_norm=self.cfg.optim.grad_clip)
        loss = loss.to(self.device)
        dist.all_reduce(loss, group=ps.get_pipeline_model_parallel_group())  # only the last stage has it
        # The backward has run: a NaN loss left NaN gradients on every stage (and, averaged, on every replica).
        finite = self._all_finite(torch.stack([loss.float(), norm.to(loss.device).float()]))
        if not finite:
            for p in self.model.parameters():
                p.grad = torch.zeros_like(p.data)
            self.set_lr(0.0)
        finish_pipeline_step(self._ds)
        return StepResult(loss, float(norm), finite)

    # ---- evaluation -----------------------------------------------------------------------------------------------
    @torch.no_grad()
    def eval_sums(self, batches: Sequence[Batch], *, causal_routing: bool = False) -> EvalSums:
        """Forward only over this rank's ``batches``, routed as in training or, with ``causal_routing``, as a
        deployed model routes (MoRModel.forward). The same on every rank of this data-parallel replica."""
        self.model.eval()
        total = torch.zeros(2, device=self.device)
        stats: list[dict[str, torch.Tensor]] = []    # per batch: its router statistics
        if self.pipelined:
            # every stage gets the statistics of its own routing ops; the loss only the last stage
            losses = pipeline_forward_only(self.model, batches, causal_routing=causal_routing, router_stats=stats)
            for (_, labels), lm_loss in zip(batches, losses):
                n = label_count(labels).float()
                total += torch.stack([lm_loss.float().to(self.device) * n, n])
            dist.all_reduce(total, group=ps.get_pipeline_model_parallel_group())   # only the last stage has them
        else:
            for tokens, labels in batches:
                out = self._ds(tokens, labels, causal_routing=causal_routing)
                n = label_count(labels).float()
                total += torch.stack([out.lm_loss.detach().float() * n, n])
                stats.append(out.router_stats)
        self.model.train()
        # The short last batch is listed last in both paths (pipeline_forward_only groups batches by shape).
        weighed = _weigh_stats(stats, [tokens.numel() for tokens, _ in batches])
        if self.pipelined:  # each routing op runs on one stage: put the stages' statistics together
            gathered: list = [None] * ps.get_pipeline_model_parallel_world_size()
            dist.all_gather_object(gathered, weighed, group=ps.get_pipeline_model_parallel_group())
            weighed = merge_stat_sums(gathered)
        return EvalSums(total, weighed)

    @torch.no_grad()
    def token_scores(self, batches: Sequence[Batch]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Forward only with causal routing (a deployed model's: no position reads a later one): per batch, in
        order, (log p(label), label is the argmax), each (B, T), 0 / False where the label is IGNORE_INDEX. The
        same on every rank of this data-parallel replica (a pipeline's last stage sends them to the others)."""
        self.model.eval()
        try:
            if not self.pipelined:
                outs = [self._ds(tokens, labels, causal_routing=True, per_token=True) for tokens, labels in batches]
                return [(o.token_logprob.float(), o.token_greedy) for o in outs]
            scores = pipeline_token_scores(self.model, batches, causal_routing=True)
            if not scores:   # not the last stage: room for what it sends
                scores = [(torch.zeros(t.shape, device=self.device), torch.zeros(t.shape, dtype=torch.bool,
                                                                                device=self.device))
                          for t, _ in batches]
            group, src = ps.get_pipeline_model_parallel_group(), ps.get_pipeline_model_parallel_last_rank()
            out = []
            for logprob, greedy in scores:
                logprob, flags = logprob.float().contiguous(), greedy.to(torch.uint8).contiguous()
                dist.broadcast(logprob, src=src, group=group)
                dist.broadcast(flags, src=src, group=group)
                out.append((logprob, flags.bool()))
            return out
        finally:
            self.model.train()

    # ---- state ------------------------------------------------------------------------------------------------------
    def _stage_folder(self, folder: Path) -> Path:
        """Where this rank's DeepSpeed files go: ``folder``, or ``folder/stage-P`` for pipeline stage P. DeepSpeed
        names its files by data-parallel and model-parallel rank, and the model-parallel rank our MPU reports is
        the tensor-parallel one (pretrain/parallel/zero.py): without a folder per stage, the stages of a
        pipeline would write the same file names over each other."""
        if not self.pipelined:
            return folder
        return folder / f"stage-{ps.get_pipeline_model_parallel_rank()}"

    def save(self, folder: Path) -> None:
        """Collective: this rank's model and optimizer shards into ``folder``."""
        self._ds.save_checkpoint(str(self._stage_folder(folder)), tag=_TAG, save_latest=False)

    def load(self, folder: Path) -> None:
        """Collective: the model and optimizer state that ``save`` wrote, under the same layout."""
        self._ds.load_checkpoint(str(self._stage_folder(folder)), tag=_TAG, load_module_strict=True,
                                 load_optimizer_states=True, load_lr_scheduler_states=False)
