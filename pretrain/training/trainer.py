"""The training loop: the step, its accounting, and the callbacks that hang on it.

One optimizer step = micro_batch_size × accumulation × DP sequences, run by the engine seam
(pretrain/parallel/engine.py), which owns everything that depends on the layout. Per-step features — the
routing step hooks, the spike monitor, metrics, validation, checkpoints, preemption — are callbacks
(pretrain/training/callbacks.py), called in order after every step.

A non-finite loss (any rank, any micro-batch) is handled per ``on_nonfinite``: ``skip`` finishes the step with
zero gradients and a learning rate of 0 — the weights do not move, the optimizer's moment estimates age by one
step — and ``stop`` exits with NONFINITE_EXIT_CODE after logging a report. ``max_consecutive_skips`` skipped steps
in a row stop the run the same way: a run that has gone bad stops while good checkpoints still exist, and the
newest checkpoint saved before the stretch of non-finite steps is never pruned. A non-finite gradient norm with a
finite loss stops the run (the update may already be applied by then).

Token counts (tokens/s, MFU, the ``tokens`` total) count real labels only: the padding that ends a split carries
IGNORE_INDEX labels and counts nowhere.

The run folder is locked (pretrain/training/runlock.py) from right after the process group exists until ``close``;
a full disk during a save ends the run with one line and DISK_FULL_EXIT_CODE (pretrain/checkpoint/save.py).
Checkpoints go through a Checkpointer (pretrain/checkpoint/checkpointer.py): the trainer hands it a TrainerState
and takes one back.
"""
from __future__ import annotations

import errno
import math
import sys
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps

from conf import config_to_dict
from conf.errors import ConfigError
from model.flops import training_flops
from pretrain.checkpoint import faults
from pretrain.checkpoint.checkpointer import Checkpointer
from pretrain.checkpoint.save import DISK_FULL_EXIT_CODE, DiskFull, free_bytes, human
from pretrain.checkpoint.state import TrainerState
from pretrain.config import RunConfig, computes_in_bf16
from pretrain.data.loader import label_count, load_manifest
from pretrain.data.splits import split_loader
from pretrain.data.mixed_loader import load_sources
from pretrain.parallel.engine import TrainEngine
from pretrain.parallel.layout import describe_nodes, init_distributed
from pretrain.training import downstream, runlock
from pretrain.training.callbacks import Callback, default_callbacks
from pretrain.training.evaluate import (ValidationMetrics, sources_line, sources_record, validate,
                                        validate_sources)
from pretrain.training.mix_accounting import MixAccounting
from pretrain.training.metrics import MetricsLog, NullLog, Progress, device_peak_flops
from pretrain.training.preempt import PreemptionFlag
from pretrain.training.schedule import lr_multiplier

NONFINITE_EXIT_CODE = 3


class Trainer:
    def __init__(self, cfg: RunConfig, *, log=print):
        self.cfg, self.print = cfg, log
        faults.point("startup.config")
        # A mixture's sources share one tokenizer and sequence length (checked here): the first one's manifest
        # speaks for all of them.
        try:
            if cfg.data.sources:
                self.source_manifests = load_sources({n: s.path for n, s in cfg.data.sources.items()})
                self.manifest = next(iter(self.source_manifests.values()))
            else:
                self.source_manifests = {}
                self.manifest = load_manifest(Path(cfg.data.path))
        except (FileNotFoundError, ValueError) as e:
            raise ConfigError(f"data.{e}" if cfg.data.sources else f"data.path: {e}") from None
        if self.manifest.vocab_size > cfg.model.vocab_size:
            raise ConfigError(f"model.vocab_size: {cfg.model.vocab_size} is smaller than the data's tokenizer "
                              f"({self.manifest.vocab_size}); set model.vocab_size={self.manifest.vocab_size}")
        self.seq_len = self.manifest.seq_len
        if self.seq_len > cfg.model.max_seq_len:
            raise ConfigError(f"model.max_seq_len: {cfg.model.max_seq_len} < the data's seq_len {self.seq_len}")
        self.downstream_eval = self._downstream_eval() if cfg.eval.downstream_every else None
        self.layout = init_distributed(cfg.parallel, cfg.model)
        faults.point("startup.distributed")
        self.device = self.layout.device
        self.is_main = self.layout.rank == 0
        self.run_dir = Path(cfg.out_dir) / cfg.name
        if self.is_main:
            lay = self.layout
            self.print(f"layout: {lay.world} rank(s) on {len(set(lay.nodes))} node(s) ({describe_nodes(lay.nodes)}); "
                       f"TP={lay.tp} PP={lay.pp} DP={lay.dp}")
        self.lock = runlock.take(self.run_dir, is_main=self.is_main, say=self.print)
        try:
            self._start(cfg)
        except BaseException:
            self._release()
            raise

    def _start(self, cfg: RunConfig) -> None:
        """The rest of start-up, once this launch owns the run folder."""
        self.engine = TrainEngine(cfg, self.layout, bf16=computes_in_bf16(cfg.train.precision, self.device))
        self.model = self.engine.model
        if self.is_main:
            self.print(f"attention: {self.engine.attention_backend} (model.attention_backend="
                       f"{cfg.model.attention_backend})")
        faults.point("startup.engine")
        self.loader = split_loader(cfg, "train", dp_rank=ps.get_data_parallel_rank(), dp_size=self.layout.dp)
        if cfg.data.sources and self.is_main:
            phases = self.loader.phases
            self.print(f"data: a mixture of {len(cfg.data.sources)} sources: {phases[0].describe()}"
                       + "".join(f"; from step {p.start}: {p.describe()}" for p in phases[1:]))
        self.checkpoints = Checkpointer(cfg, self.layout, self.run_dir, log=self.print,
                                        tokenizer_sha256=self.manifest.tokenizer.get("sha256"))
        self.step, self.tokens = 0, 0
        self.callbacks: list[Callback] = default_callbacks(cfg)
        if cfg.data.sources:   # before the metrics logger, which logs what it adds to the step's record
            self.callbacks.insert(1, MixAccounting(list(cfg.data.sources)))
        # Non-finite steps: the run's total, the current run of them, and the newest checkpoint saved before it
        # began (pruning keeps that one).
        self.skipped, self.consecutive_skips, self.guard_step = 0, 0, None
        self.last_saved: Optional[int] = None
        self.flops_per_token = training_flops(cfg.model, self.seq_len).training_per_token
        self.peak = device_peak_flops()
        self.preempt = PreemptionFlag().install()
        faults.point("startup.resume")
        resumed = self.checkpoints.resume(self.engine, self.loader)
        if resumed is not None:
            self.loader = resumed.loader
            self.load_state(resumed.state)
            if getattr(self.loader, "note", None) and self.is_main:
                self.print(self.loader.note)
        self.metrics = (MetricsLog(self.run_dir, wandb_mode=cfg.logging.wandb, project=cfg.logging.project,
                                   name=cfg.name, config=config_to_dict(cfg), start_step=self.step, say=self.print)
                        if self.is_main else NullLog())
        if self.metrics.dropped:
            self.print(f"metrics: dropped {self.metrics.dropped} record(s) past step {self.step}, where this run "
                       "resumes (they are trained again)")
        self.batches = iter(self.loader)
        faults.point("startup.done")

    # ---- checkpoints ------------------------------------------------------------------------------------------
    def state(self) -> TrainerState:
        """The run-level part of a checkpoint (rank 0 writes it as trainer.pt)."""
        extra = {}
        for cb in self.callbacks:
            extra.update(cb.state())
        return TrainerState(step=self.step, tokens=self.tokens, config=config_to_dict(self.cfg),
                            tokenizer_sha256=self.manifest.tokenizer.get("sha256"), world_size=self.layout.world,
                            skipped=self.skipped, consecutive_skips=self.consecutive_skips,
                            guard_step=self.guard_step, callbacks=extra)

    def load_state(self, state: TrainerState) -> None:
        self.step, self.tokens = state.step, state.tokens
        for cb in self.callbacks:
            cb.load_state(state.callbacks)
        self.skipped, self.consecutive_skips, self.guard_step = state.skipped, state.consecutive_skips, state.guard_step
        self.last_saved = self.step

    def save(self) -> Path:
        path = self.checkpoints.save(self.engine, self.state(), self.loader.state_dict(), protect=self.guard_step)
        self.last_saved = self.step
        return path

    # ---- one optimizer step -----------------------------------------------------------------------------------
    def train_step(self, inject_nan: bool = False) -> dict:
        lr = self.cfg.optim.lr * lr_multiplier(self.step, self.cfg.train.steps, self.cfg.schedule)
        self.engine.set_lr(lr)
        micro, sources = [], []
        for _ in range(self.engine.micro_batches):
            micro.append(next(self.batches))
            sources.append(self.loader.last_source)
        micro = [(t.to(self.device), y.to(self.device)) for t, y in micro]
        counts = [label_count(y) for _, y in micro]               # padding is no token
        real = sum(counts).float()
        out = self.engine.train_step(micro, inject_nan=inject_nan)
        # the loss, the step's real tokens and (a mixture) each source's, added over DP ranks in one collective
        per_source = torch.zeros(len(self.cfg.data.sources), device=out.loss.device)
        if self.cfg.data.sources:
            for c, s in zip(counts, sources):
                per_source[s] += c.to(per_source.device)
        both = torch.cat([torch.stack([out.loss.float(), real.to(out.loss.device)]), per_source])
        dist.all_reduce(both, group=ps.get_data_parallel_group())
        rec = {"loss": both[0].item() / self.layout.dp, "lr": lr if out.finite else 0.0,
               "grad_norm": out.grad_norm, "finite": out.finite, "step_tokens": int(both[1].item()),
               **out.router_stats}
        if self.cfg.data.sources:
            rec["source_tokens"] = [int(x) for x in both[2:].tolist()]
        return rec

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
            kept = (f"; the newest checkpoint before them, {self.checkpoints.path_of(self.guard_step)}, "
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
        self.progress = Progress(self.print, show=self.is_main, total=self.cfg.train.steps, initial=self.step)
        try:
            while self.step < self.cfg.train.steps:
                for cb in self.callbacks:
                    cb.step_start(self)
                inject = faults.before_step(self.step, self.layout.rank) or nan_at_step == self.step
                rec = self.train_step(inject_nan=inject)
                if not rec["finite"] or not math.isfinite(rec["grad_norm"]):
                    code = self._nonfinite(rec, self.progress)
                    if code is not None:
                        return code
                else:
                    self.consecutive_skips = 0
                self.step += 1
                self.tokens += rec["step_tokens"]
                for cb in self.callbacks:
                    code = cb.step_end(self, rec)
                    if code is not None:
                        return code
            for cb in self.callbacks:
                cb.train_end(self)
            return 0
        finally:
            self.progress.close()

    def close(self) -> None:
        try:
            self.metrics.close()
        finally:
            self._release()

    def _release(self) -> None:
        if getattr(self, "preempt", None) is not None:
            self.preempt.uninstall()
        if self.lock is not None:
            self.lock.release()

    @torch.no_grad()
    def validate(self, say=None) -> Optional[ValidationMetrics]:
        """Validation under both routings (training's top-k and a deployed model's causal routing) over the real
        tokens of up to eval_batches micro-batches per DP rank; logged to metrics.jsonl and as one line.
        Collective. None when the data has no validation split."""
        dp_rank, dp = ps.get_data_parallel_rank(), self.layout.dp
        if self.source_manifests:   # a mixture: each source's own validation split, and all of them pooled
            with_val = [n for n, m in self.source_manifests.items() if m.splits.get("val") and m.samples("val")]
            if not with_val:
                return None
            loaders = {n: split_loader(self.cfg, "val", dp_rank=dp_rank, dp_size=dp, source=n) for n in with_val}
            result, per_source = validate_sources(self.engine, loaders, self.cfg.train.eval_batches)
        else:
            if not self.manifest.splits.get("val"):
                return None
            loader = split_loader(self.cfg, "val", dp_rank=dp_rank, dp_size=dp)
            result, per_source = validate(self.engine, loader, self.cfg.train.eval_batches), {}
        self.metrics.log({"step": self.step, **result.record(), **sources_record(per_source)})
        if self.is_main:
            (say or self.print)(result.line(self.step))
            if per_source:
                (say or self.print)(sources_line(self.step, per_source))
        return result

    def _downstream_eval(self) -> downstream.DownstreamEval:
        """The in-loop few-shot tasks, tokenized with the data's tokenizer (checked at start-up)."""
        path = Path(str(self.manifest.tokenizer.get("path", "")))
        if not path.is_file():
            raise ConfigError(f"eval.downstream_every: the data manifest at data.path={self.cfg.data.path} names the "
                              f"tokenizer {path}, which is not there; downstream evaluation needs it "
                              "(or set eval.downstream_every=0)")
        return downstream.DownstreamEval(self.cfg.eval, path, bool(self.manifest.settings.get("bos", False)))

    @torch.no_grad()
    def downstream(self, say=None) -> Optional[dict]:
        """Few-shot accuracy on the fixed subset (pretrain/training/downstream.py), logged to metrics.jsonl and as
        one line. Collective. None when eval.downstream_every is 0."""
        if self.downstream_eval is None:
            return None
        results, rec = self.downstream_eval.run(self.engine)
        self.metrics.log({"step": self.step, **rec})
        if self.is_main:
            (say or self.print)(downstream.line(self.step, results))
        return rec

    def evaluate(self, say=None) -> Optional[float]:
        """``validate`` returning only the training-routing loss (val_loss), for callers that want one number;
        validate() has the causal-routing loss too."""
        result = self.validate(say)
        return None if result is None else result.loss


def run(cfg: RunConfig) -> int:
    trainer = Trainer(cfg)
    try:
        return trainer.fit()
    except DiskFull as e:           # every rank, from the save
        if trainer.is_main:
            print(e, file=sys.stderr, flush=True)
        return DISK_FULL_EXIT_CODE
    except OSError as e:            # rank 0's own files (metrics.jsonl, wandb's id)
        if e.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        where = Path(e.filename) if e.filename else trainer.run_dir
        print(f"error: no space left on the device of {where} ({human(free_bytes(where))} free): free space there "
              "(or set out_dir to a larger disk), then start the run again; it resumes from its newest checkpoint",
              file=sys.stderr, flush=True)
        return DISK_FULL_EXIT_CODE
    finally:
        trainer.close()
        sys.stdout.flush()
