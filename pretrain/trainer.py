"""The training loop: DeepSpeed engine over the parallel model, LR schedule, checkpoints, preemption, metrics.

One optimizer step = micro_batch_size × accumulation × DP sequences. With PP = 1 each micro-batch goes through
the engine (forward, backward, step; DeepSpeed accumulates, reduces and clips at the boundary); with PP > 1 the
step runs megatron's 1F1B schedule (pretrain/pipeline.py).

A non-finite loss (any rank, any micro-batch) is handled per ``on_nonfinite``: ``skip`` finishes the step with
zero gradients and a learning rate of 0 — the weights do not move, the optimizer's moment estimates age by one
step — and ``stop`` exits with NONFINITE_EXIT_CODE after logging a report. A non-finite gradient norm with a
finite loss stops the run (the update may already be applied by then).
"""
from __future__ import annotations

import math
import sys
import time
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps

from conf import config_to_dict
from data_prep.shards import Manifest
from model.config import ConfigError
from model.flops import training_flops
from pretrain import checkpoint as ckpt
from pretrain import faults
from pretrain.config import RunConfig
from pretrain.metrics import MetricsLog, NullLog, device_peak_flops, format_line, mfu
from pretrain.parallel import grad_accumulation_steps, init_distributed
from pretrain.pipeline import (build_stage, clip_grad_norm, finish_pipeline_step, pipeline_forward_backward,
                               replica_layout, sync_replicas)
from pretrain.preempt import REQUEUE_EXIT_CODE, PreemptionFlag
from pretrain.schedule import lr_multiplier
from pretrain.zero import build_engine, param_groups

NONFINITE_EXIT_CODE = 3
# Keys that may change between a checkpoint and the run resuming it; any other difference is an error.
_RESUME_FREE = ("name", "out_dir", "train.", "checkpoint.", "logging.", "on_nonfinite", "schedule.", "optim.lr",
                "data.num_workers", "data.path")


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def config_mismatch(saved: dict, current: dict) -> list[str]:
    a, b = _flatten(saved), _flatten(current)
    keys = sorted(set(a) | set(b))
    return [k for k in keys if a.get(k) != b.get(k) and not k.startswith(_RESUME_FREE)]


class Trainer:
    def __init__(self, cfg: RunConfig, *, log=print):
        self.cfg, self.print = cfg, log
        try:
            self.manifest = Manifest.load(Path(cfg.data.path))
        except (FileNotFoundError, ValueError) as e:
            raise ConfigError(f"data.path: {e}") from None
        if self.manifest.vocab_size > cfg.model.vocab_size:
            raise ConfigError(f"model.vocab_size: {cfg.model.vocab_size} is smaller than the data's tokenizer "
                              f"({self.manifest.vocab_size}); set model.vocab_size={self.manifest.vocab_size}")
        self.seq_len = self.manifest.seq_len
        if self.seq_len > cfg.model.max_seq_len:
            raise ConfigError(f"model.max_seq_len: {cfg.model.max_seq_len} < the data's seq_len {self.seq_len}")
        self.layout = init_distributed(cfg.parallel, cfg.model)
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
        self.replicas = replica_layout(cfg.model) if self.layout.pp > 1 else []
        sync_replicas(model, self.replicas)
        self.gas = grad_accumulation_steps(cfg.parallel, self.layout.dp)
        from pretrain.data import TokenLoader
        self.loader = TokenLoader(cfg.data.path, split="train", micro_batch_size=cfg.parallel.micro_batch_size,
                                  seed=cfg.data.seed, dp_rank=ps.get_data_parallel_rank(),
                                  dp_size=self.layout.dp, num_workers=cfg.data.num_workers, shuffle=True)
        self.run_dir = Path(cfg.out_dir) / cfg.name
        self.ckpt_dir = self.run_dir / "checkpoints"
        self.step, self.tokens, self.loss_ema, self.skipped = 0, 0, None, 0
        self.flops_per_token = training_flops(cfg.model, self.seq_len).training_per_token
        self.peak = device_peak_flops()
        self.preempt = PreemptionFlag().install()
        self._resume()
        self.metrics = (MetricsLog(self.run_dir, wandb_mode=cfg.logging.wandb, project=cfg.logging.project,
                                   name=cfg.name, config=config_to_dict(cfg), start_step=self.step)
                        if self.is_main else NullLog())
        if self.metrics.dropped:
            self.print(f"metrics: dropped {self.metrics.dropped} record(s) past step {self.step}, where this run "
                       "resumes (they are trained again)")
        self.batches = iter(self.loader)

    # ---- checkpoints ------------------------------------------------------------------------------------------
    def _resume(self) -> None:
        mode = self.cfg.checkpoint.resume
        path = None if mode == "none" else (ckpt.latest_checkpoint(self.ckpt_dir) if mode == "auto" else Path(mode))
        if path is None:
            return
        if not (path / "trainer.pt").exists():
            raise ConfigError(f"checkpoint.resume: {path} is not a complete checkpoint")
        state, rank_state = ckpt.load(self.engine, path)
        diff = config_mismatch(state["config"], config_to_dict(self.cfg))
        if diff:
            raise ConfigError(f"checkpoint.resume: {path} was saved with a different config in {', '.join(diff)}; "
                              "restore those keys or start a new run (checkpoint.resume=none, another name)")
        if state["tokenizer_sha256"] != self.manifest.tokenizer.get("sha256"):
            raise ConfigError(f"data.path: tokenized with another tokenizer than the checkpoint {path}")
        self.step, self.tokens, self.loss_ema = state["step"], state["tokens"], state["loss_ema"]
        self.loader.load_state_dict(rank_state["loader"])
        ckpt.set_rng_state(rank_state["rng"])
        self.print(f"resumed from {path} at step {self.step}")

    def save(self) -> Path:
        state = {"step": self.step, "tokens": self.tokens, "loss_ema": self.loss_ema,
                 "config": config_to_dict(self.cfg), "tokenizer_sha256": self.manifest.tokenizer.get("sha256")}
        rank_state = {"rng": ckpt.rng_state(), "loader": self.loader.state_dict()}
        return ckpt.save(self.engine, self.ckpt_dir, self.step, state, rank_state, keep=self.cfg.checkpoint.keep,
                         rank=self.layout.rank)

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
        dist.all_reduce(loss, group=ps.get_data_parallel_group())
        loss = loss / self.layout.dp
        return {"loss": loss.item(), "lr": lr if finite else 0.0, "grad_norm": float(norm), "finite": finite,
                **{k: float(v) for k, v in stats.items()}}

    # ---- the loop ---------------------------------------------------------------------------------------------
    def fit(self, *, nan_at_step: Optional[int] = None) -> int:
        """Train to cfg.train.steps; returns the process exit code (0, REQUEUE_EXIT_CODE, NONFINITE_EXIT_CODE).
        Call ``close()`` when done with the trainer."""
        cfg = self.cfg
        tokens_per_step = cfg.parallel.micro_batch_size * self.gas * self.layout.dp * self.seq_len
        window_start, window_steps = time.perf_counter(), 0
        while self.step < cfg.train.steps:
            inject = faults.before_step(self.step, self.layout.rank) or nan_at_step == self.step
            rec = self.train_step(inject_nan=inject)
            if not rec["finite"] or not math.isfinite(rec["grad_norm"]):
                self.skipped += 1
                self.print(f"step {self.step}: non-finite loss or gradient norm "
                           f"({'skipping the update' if cfg.on_nonfinite == 'skip' else 'stopping'})")
                if cfg.on_nonfinite == "stop" or not math.isfinite(rec["grad_norm"]) and rec["finite"]:
                    self.metrics.log({"step": self.step, "event": "nonfinite_stop", **rec})
                    return NONFINITE_EXIT_CODE
            self.step += 1
            self.tokens += tokens_per_step
            window_steps += 1
            if rec["finite"]:
                self.loss_ema = rec["loss"] if self.loss_ema is None else 0.95 * self.loss_ema + 0.05 * rec["loss"]
                if rec["loss"] > cfg.logging.spike_factor * self.loss_ema:
                    self.print(f"step {self.step}: loss spike {rec['loss']:.3f} (running mean {self.loss_ema:.3f})")
            if self.step % cfg.train.log_every == 0 or self.step == cfg.train.steps:
                elapsed = time.perf_counter() - window_start
                tok_s = window_steps * tokens_per_step / max(elapsed, 1e-9)
                rec.update(step=self.step, tokens=self.tokens, tokens_per_s=tok_s, skipped_steps=self.skipped,
                           mfu=mfu(tok_s, self.flops_per_token, self.peak, self.layout.world),
                           mem_gb=(torch.cuda.max_memory_allocated() / 2**30) if self.device.type == "cuda" else None)
                self.metrics.log(rec)
                if self.is_main:
                    self.print(format_line(rec))
                window_start, window_steps = time.perf_counter(), 0
            if cfg.train.eval_every and self.step % cfg.train.eval_every == 0:
                self.evaluate()
            stop = self.preempt.should_stop(self.device)
            if stop or (cfg.checkpoint.every and self.step % cfg.checkpoint.every == 0):
                self.save()
            if stop:
                self.print(f"preempted: saved step {self.step}; exiting for requeue")
                return REQUEUE_EXIT_CODE
        if not (cfg.checkpoint.every and self.step % cfg.checkpoint.every == 0):
            self.save()
        return 0

    def close(self) -> None:
        self.metrics.close()
        self.preempt.uninstall()

    @torch.no_grad()
    def evaluate(self) -> Optional[float]:
        """Mean validation loss over up to eval_batches micro-batches per DP rank (PP: on the last stage)."""
        if not self.manifest.splits.get("val"):
            return None
        from pretrain.evaluate import validation_loss
        loss = validation_loss(self, self.cfg.train.eval_batches)
        self.metrics.log({"step": self.step, "val_loss": loss, "val_ppl": math.exp(min(loss, 50.0))})
        if self.is_main:
            self.print(f"step {self.step:>6d}  val loss {loss:.4f}  ppl {math.exp(min(loss, 50.0)):.2f}")
        return loss


def run(cfg: RunConfig) -> int:
    trainer = Trainer(cfg)
    try:
        return trainer.fit()
    finally:
        trainer.close()
        sys.stdout.flush()
