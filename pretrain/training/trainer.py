"""The training loop: DeepSpeed engine over the parallel model, LR schedule, checkpoints, preemption, metrics.

One optimizer step = micro_batch_size × accumulation × DP sequences. With PP = 1 each micro-batch goes through
the engine (forward, backward, step; DeepSpeed accumulates, reduces and clips at the boundary); with PP > 1 the
step runs megatron's 1F1B schedule (pretrain/parallel/pipeline.py).

A non-finite loss (any rank, any micro-batch) is handled per ``on_nonfinite``: ``skip`` finishes the step with
zero gradients and a learning rate of 0 — the weights do not move, the optimizer's moment estimates age by one
step — and ``stop`` exits with NONFINITE_EXIT_CODE after logging a report. ``max_consecutive_skips`` skipped steps
in a row stop the run the same way: a run that has gone bad stops while good checkpoints still exist, and the
newest checkpoint saved before the stretch of non-finite steps is never pruned. A non-finite gradient norm with a
finite loss stops the run (the update may already be applied by then).

Token counts (tokens/s, MFU, the ``tokens`` total) count real labels only: the padding that ends a split carries
IGNORE_INDEX labels and counts nowhere.
"""
from __future__ import annotations

import math
import signal
import sys
import time
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps

from conf import config_to_dict
from conf.errors import ConfigError
from model.flops import training_flops
from pretrain.training import checkpoint as ckpt
from pretrain.training import faults
from pretrain.config import RunConfig
from pretrain.data.loader import TokenLoader, label_count, load_manifest
from pretrain.training.metrics import MetricsLog, NullLog, Progress, device_peak_flops, format_line, mfu
from pretrain.parallel.layout import grad_accumulation_steps, init_distributed
from pretrain.parallel.pipeline import (build_stage, clip_grad_norm, finish_pipeline_step, pipeline_forward_backward,
                               replica_layout, sync_replicas)
from pretrain.training.preempt import REQUEUE_EXIT_CODE, PreemptionFlag
from pretrain.training.resume import resume
from pretrain.training.schedule import lr_multiplier
from pretrain.parallel.zero import build_engine, param_groups

NONFINITE_EXIT_CODE = 3


class Trainer:
    def __init__(self, cfg: RunConfig, *, log=print):
        self.cfg, self.print = cfg, log
        faults.point("startup.config")
        try:
            self.manifest = load_manifest(Path(cfg.data.path))
        except (FileNotFoundError, ValueError) as e:
            raise ConfigError(f"data.path: {e}") from None
        if self.manifest.vocab_size > cfg.model.vocab_size:
            raise ConfigError(f"model.vocab_size: {cfg.model.vocab_size} is smaller than the data's tokenizer "
                              f"({self.manifest.vocab_size}); set model.vocab_size={self.manifest.vocab_size}")
        self.seq_len = self.manifest.seq_len
        if self.seq_len > cfg.model.max_seq_len:
            raise ConfigError(f"model.max_seq_len: {cfg.model.max_seq_len} < the data's seq_len {self.seq_len}")
        self.layout = init_distributed(cfg.parallel, cfg.model)
        faults.point("startup.distributed")
        self.device = self.layout.device
        self.is_main = self.layout.rank == 0
        precision = cfg.train.precision
        self.bf16 = precision == "bf16" or (precision == "auto" and self.device.type == "cuda")
        model = build_stage(cfg.model, sequence_parallel=cfg.parallel.sequence_parallel,
                            use_cpu_initialization=self.device.type == "cpu").to(self.device)
        model.activation_checkpointing = cfg.train.activation_checkpointing
        self.model = model
        self.optimizer = torch.optim.AdamW(param_groups(model, cfg.optim.weight_decay), lr=cfg.optim.lr,
                                           betas=tuple(cfg.optim.betas), eps=cfg.optim.eps,
                                           fused=self.device.type == "cuda")
        self.engine = build_engine(model, self.optimizer, cfg.parallel, self.layout, grad_clip=cfg.optim.grad_clip,
                                   bf16=self.bf16)
        if cfg.train.compile and self.device.type == "cuda":
            self.engine.compile()
        faults.point("startup.engine")
        self.replicas = replica_layout(cfg.model) if self.layout.pp > 1 else []
        sync_replicas(model, self.replicas)
        self.gas = grad_accumulation_steps(cfg.parallel, self.layout.dp)
        try:
            self.loader = TokenLoader(cfg.data.path, split="train", micro_batch_size=cfg.parallel.micro_batch_size,
                                      seed=cfg.data.seed, dp_rank=ps.get_data_parallel_rank(),
                                      dp_size=self.layout.dp, num_workers=cfg.data.num_workers, shuffle=True)
        except ValueError as e:
            raise ConfigError(f"data.path: {e}") from None
        self.run_dir = Path(cfg.out_dir) / cfg.name
        self.ckpt_dir = self.run_dir / "checkpoints"
        self.step, self.tokens, self.loss_ema = 0, 0, None
        # Non-finite steps: the run's total, the current run of them, and the newest checkpoint saved before it
        # began (pruning keeps that one).
        self.skipped, self.consecutive_skips, self.guard_step = 0, 0, None
        self.last_saved: Optional[int] = None
        self.flops_per_token = training_flops(cfg.model, self.seq_len).training_per_token
        self.peak = device_peak_flops()
        self.preempt = PreemptionFlag().install()
        faults.point("startup.resume")
        resume(self)
        self.metrics = (MetricsLog(self.run_dir, wandb_mode=cfg.logging.wandb, project=cfg.logging.project,
                                   name=cfg.name, config=config_to_dict(cfg), start_step=self.step)
                        if self.is_main else NullLog())
        if self.metrics.dropped:
            self.print(f"metrics: dropped {self.metrics.dropped} record(s) past step {self.step}, where this run "
                       "resumes (they are trained again)")
        self.batches = iter(self.loader)
        faults.point("startup.done")

    # ---- checkpoints ------------------------------------------------------------------------------------------
    def state(self) -> dict:
        """The run-level part of a checkpoint (rank 0 writes it as trainer.pt)."""
        return {"step": self.step, "tokens": self.tokens, "loss_ema": self.loss_ema,
                "config": config_to_dict(self.cfg), "tokenizer_sha256": self.manifest.tokenizer.get("sha256"),
                "world_size": self.layout.world, "skipped": self.skipped,
                "consecutive_skips": self.consecutive_skips, "guard_step": self.guard_step}

    def load_state(self, state: dict) -> None:
        self.step, self.tokens, self.loss_ema = state["step"], state["tokens"], state["loss_ema"]
        self.skipped = state.get("skipped", 0)
        self.consecutive_skips = state.get("consecutive_skips", 0)
        self.guard_step = state.get("guard_step")
        self.last_saved = self.step

    def save(self) -> Path:
        rank_state = {"rng": ckpt.rng_state(), "loader": self.loader.state_dict()}
        path = ckpt.save(self.engine, self.ckpt_dir, self.step, self.state(), rank_state,
                         keep=self.cfg.checkpoint.keep, protect=self.guard_step)
        self.last_saved = self.step
        return path

    # ---- one optimizer step -----------------------------------------------------------------------------------
    def _set_lr(self, lr: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    def _all_finite(self, value: torch.Tensor) -> bool:
        flag = torch.isfinite(value.detach().float()).all().float().reshape(1)
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        return bool(flag.item())

    def train_step(self, inject_nan: bool = False) -> dict:
        lr = self.cfg.optim.lr * lr_multiplier(self.step, self.cfg.train.steps, self.cfg.schedule)
        self._set_lr(lr)
        micro = [next(self.batches) for _ in range(self.gas)]
        micro = [(t.to(self.device), y.to(self.device)) for t, y in micro]
        real = sum(label_count(y) for _, y in micro).float()   # padding is no token
        stats: dict = {}
        if self.layout.pp > 1:
            loss, norm = pipeline_forward_backward(self.model, self.replicas, micro,
                                                   max_grad_norm=self.cfg.optim.grad_clip)
            loss = loss.to(self.device)
            dist.all_reduce(loss, group=ps.get_pipeline_model_parallel_group())  # only the last stage has it
            finite = math.isfinite(norm.item()) and math.isfinite(loss.item()) and not inject_nan
            if not finite:
                for p in self.model.parameters():
                    p.grad = torch.zeros_like(p.data)
                self._set_lr(0.0)
            finish_pipeline_step(self.engine)
        else:
            total, finite = torch.zeros((), device=self.device), True
            for i, (tokens, labels) in enumerate(micro):
                out = self.engine(tokens, labels)
                loss_i = out.loss * float("nan") if inject_nan else out.loss
                finite = finite and self._all_finite(loss_i)
                if not finite:  # contribute zero gradients from here on, and step with lr 0
                    loss_i = sum(p.sum() for p in self.model.parameters() if p.requires_grad) * 0.0
                    self._set_lr(0.0)
                self.engine.backward(loss_i)
                if i == self.gas - 1 and self.cfg.parallel.zero_stage == 0:
                    # Plain DP keeps whole gradients in p.grad: measure the norm before the engine clips it.
                    norm = clip_grad_norm(self.model, [], 0.0)
                self.engine.step()
                total += out.loss.detach().float() / self.gas
                stats = out.router_stats
            loss = total
            if self.cfg.parallel.zero_stage > 0:  # ZeRO keeps its partitions' norm from the step
                norm = torch.tensor(float(self.engine.get_global_grad_norm() or 0.0))
        both = torch.stack([loss.float(), real.to(loss.device)])
        dist.all_reduce(both, group=ps.get_data_parallel_group())
        return {"loss": both[0].item() / self.layout.dp, "lr": lr if finite else 0.0, "grad_norm": float(norm),
                "finite": finite, "step_tokens": int(both[1].item()), **{k: float(v) for k, v in stats.items()}}

    # ---- the loop ---------------------------------------------------------------------------------------------
    def _nonfinite(self, rec: dict, progress: Progress) -> Optional[int]:
        """Account for a skipped step; returns an exit code when the run must stop."""
        cfg = self.cfg
        if self.consecutive_skips == 0:
            self.guard_step = self.last_saved      # the newest checkpoint from before this stretch: keep it
        self.skipped += 1
        self.consecutive_skips += 1
        grad_only = rec["finite"] and not math.isfinite(rec["grad_norm"])
        stop = cfg.on_nonfinite == "stop" or grad_only
        step = self.step + 1                       # as the logs count it: the step being trained
        progress.say(f"step {step}: non-finite {'gradient norm' if grad_only else 'loss'} "
                     f"({'stopping' if stop else 'skipping the update'})")
        if not stop and self.consecutive_skips >= cfg.max_consecutive_skips:
            stop = True
            kept = (f"; the newest checkpoint before them, {self.ckpt_dir / ckpt.checkpoint_name(self.guard_step)}, "
                    "is kept" if self.guard_step is not None else "; no checkpoint was saved before them")
            progress.say(f"step {step}: {self.consecutive_skips} non-finite steps in a row "
                         f"(max_consecutive_skips={cfg.max_consecutive_skips}): stopping{kept}")
        if stop:
            self.metrics.log({**rec, "step": step, "event": "nonfinite_stop"})
            return NONFINITE_EXIT_CODE
        return None

    def fit(self, *, nan_at_step: Optional[int] = None) -> int:
        """Train to cfg.train.steps; returns the process exit code (0, REQUEUE_EXIT_CODE, NONFINITE_EXIT_CODE).
        Call ``close()`` when done with the trainer."""
        cfg = self.cfg
        window_start, window_tokens = time.perf_counter(), 0
        progress = Progress(self.print, show=self.is_main, total=cfg.train.steps, initial=self.step)
        try:
            while self.step < cfg.train.steps:
                inject = faults.before_step(self.step, self.layout.rank) or nan_at_step == self.step
                rec = self.train_step(inject_nan=inject)
                if not rec["finite"] or not math.isfinite(rec["grad_norm"]):
                    code = self._nonfinite(rec, progress)
                    if code is not None:
                        return code
                else:
                    self.consecutive_skips = 0
                self.step += 1
                self.tokens += rec["step_tokens"]
                window_tokens += rec["step_tokens"]
                if rec["finite"]:
                    self.loss_ema = rec["loss"] if self.loss_ema is None else 0.95 * self.loss_ema + 0.05 * rec["loss"]
                    if rec["loss"] > cfg.logging.spike_factor * self.loss_ema:
                        progress.say(f"step {self.step}: loss spike {rec['loss']:.3f} "
                                     f"(running mean {self.loss_ema:.3f})")
                progress.update(self.step, rec)
                if self.step % cfg.train.log_every == 0 or self.step == cfg.train.steps:
                    elapsed = time.perf_counter() - window_start
                    tok_s = window_tokens / max(elapsed, 1e-9)
                    rec.update(step=self.step, tokens=self.tokens, tokens_per_s=tok_s, skipped_steps=self.skipped,
                               mfu=mfu(tok_s, self.flops_per_token, self.peak, self.layout.world),
                               mem_gb=(torch.cuda.max_memory_allocated() / 2**30) if self.device.type == "cuda"
                               else None)
                    self.metrics.log(rec)
                    if self.is_main:
                        progress.say(format_line(rec))
                    window_start, window_tokens = time.perf_counter(), 0
                if cfg.train.eval_every and self.step % cfg.train.eval_every == 0:
                    self.evaluate(progress.say)
                stop = self.preempt.should_stop(self.device)
                if stop or (cfg.checkpoint.every and self.step % cfg.checkpoint.every == 0):
                    self.save()
                if stop:
                    if self.is_main:
                        got = self.preempt.received
                        why = signal.Signals(got).name if got is not None else "a signal to another rank"
                        progress.say(f"preempted: saved step {self.step}; exiting for requeue ({why})")
                    return REQUEUE_EXIT_CODE
            if self.last_saved != self.step:
                self.save()
            return 0
        finally:
            progress.close()

    def close(self) -> None:
        self.metrics.close()
        self.preempt.uninstall()

    @torch.no_grad()
    def evaluate(self, say=None) -> Optional[float]:
        """Mean validation loss over the real tokens of up to eval_batches micro-batches per DP rank."""
        if not self.manifest.splits.get("val"):
            return None
        from pretrain.training.evaluate import validation_loss
        loss = validation_loss(self, self.cfg.train.eval_batches)
        self.metrics.log({"step": self.step, "val_loss": loss, "val_ppl": math.exp(min(loss, 50.0))})
        if self.is_main:
            (say or self.print)(f"step {self.step:>6d}  val loss {loss:.4f}  ppl {math.exp(min(loss, 50.0)):.2f}")
        return loss


def run(cfg: RunConfig) -> int:
    trainer = Trainer(cfg)
    try:
        return trainer.fit()
    finally:
        trainer.close()
        sys.stdout.flush()
