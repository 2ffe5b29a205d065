"""What hangs on the training loop: each per-step feature is a callback the trainer calls in list order.

    step_start(trainer)            before the micro-batches of a step (trainer.step: steps done so far)
    step_end(trainer, rec)         after the step is counted (trainer.step is the step just trained); may add to
                                   ``rec`` for later callbacks, or return an exit code to end the run
    train_end(trainer)             after the last step, when the run finished normally
    state() / load_state(state)    what the callback keeps across a restart (merged into trainer.pt)

Every callback runs on every rank: several of them are collective (the bias update, validation, saving, the
preemption check), so they must be called in the same order everywhere.
"""
from __future__ import annotations

import signal
import time
from typing import Any, Optional

import torch

from pretrain.training.metrics import format_line, mfu
from pretrain.training.preempt import REQUEUE_EXIT_CODE


class Callback:
    def step_start(self, trainer) -> None:
        pass

    def step_end(self, trainer, rec: dict[str, Any]) -> Optional[int]:
        return None

    def train_end(self, trainer) -> None:
        pass

    def state(self) -> dict[str, Any]:
        return {}

    def load_state(self, state: dict[str, Any]) -> None:
        pass


class RoutingStep(Callback):
    """Routing state that moves once per optimizer step: the warm-ups read the step, and loss-free balancing moves
    its bias from the depth loads of all the step's micro-batches (identical on every data-parallel rank). The
    bias itself lives in the model (a buffer), so checkpoints carry it."""

    def step_start(self, trainer) -> None:
        trainer.engine.begin_step(trainer.step)

    def step_end(self, trainer, rec: dict[str, Any]) -> None:
        rec.update(trainer.engine.end_step(applied=rec["finite"]))


class SpikeMonitor(Callback):
    """A running mean of the loss; a step above ``logging.spike_factor`` times it is reported."""

    def __init__(self, factor: float):
        self.factor, self.loss_ema = factor, None

    def step_end(self, trainer, rec: dict[str, Any]) -> None:
        if not rec["finite"]:
            return
        loss = rec["loss"]
        self.loss_ema = loss if self.loss_ema is None else 0.95 * self.loss_ema + 0.05 * loss
        if loss > self.factor * self.loss_ema:
            trainer.progress.say(f"step {trainer.step}: loss spike {loss:.3f} (running mean {self.loss_ema:.3f})")

    def state(self) -> dict[str, Any]:
        return {"loss_ema": self.loss_ema}

    def load_state(self, state: dict[str, Any]) -> None:
        self.loss_ema = state.get("loss_ema")   # absent in an imported run's first checkpoint


class MetricsLogger(Callback):
    """The progress bar every step; every ``log_every`` steps (and at the last) one record in metrics.jsonl and
    wandb and one readable line, with tokens/s and MFU over the steps since the last record."""

    def __init__(self, log_every: int, total: int):
        self.log_every, self.total = log_every, total
        self.window_start, self.window_tokens = time.perf_counter(), 0

    def step_end(self, trainer, rec: dict[str, Any]) -> None:
        self.window_tokens += rec["step_tokens"]
        trainer.progress.update(trainer.step, rec)
        if trainer.step % self.log_every and trainer.step != self.total:
            return
        elapsed = time.perf_counter() - self.window_start
        tok_s = self.window_tokens / max(elapsed, 1e-9)
        cuda = trainer.device.type == "cuda"
        rec.update(step=trainer.step, tokens=trainer.tokens, tokens_per_s=tok_s, skipped_steps=trainer.skipped,
                   mfu=mfu(tok_s, trainer.flops_per_token, trainer.peak, trainer.layout.world),
                   mem_gb=torch.cuda.max_memory_allocated() / 2**30 if cuda else None)
        trainer.metrics.log(rec)
        if trainer.is_main:
            trainer.progress.say(format_line(rec))
        self.window_start, self.window_tokens = time.perf_counter(), 0


class Validation(Callback):
    """Validation every ``every`` steps (0: never): the loss under training routing and under a deployed model's
    causal routing, and what the inference rule does per recursion step (pretrain/training/evaluate.py)."""

    def __init__(self, every: int):
        self.every = every

    def step_end(self, trainer, rec: dict[str, Any]) -> None:
        if self.every and trainer.step % self.every == 0:
            trainer.validate(trainer.progress.say)


class Downstream(Callback):
    """Few-shot accuracy on a fixed subset every ``every`` steps (pretrain/training/downstream.py)."""

    def __init__(self, every: int):
        self.every = every

    def step_end(self, trainer, rec: dict[str, Any]) -> None:
        if self.every and trainer.step % self.every == 0:
            trainer.downstream(trainer.progress.say)


class Checkpointing(Callback):
    """A checkpoint every ``every`` steps (0: only at the end) and at the end of the run."""

    def __init__(self, every: int):
        self.every = every

    def step_end(self, trainer, rec: dict[str, Any]) -> None:
        if self.every and trainer.step % self.every == 0:
            trainer.save()

    def train_end(self, trainer) -> None:
        if trainer.last_saved != trainer.step:
            trainer.save()


class Preemption(Callback):
    """A scheduler's warning (or a signal to any rank) saves the step just trained and ends the run for requeue."""

    def step_end(self, trainer, rec: dict[str, Any]) -> Optional[int]:
        if not trainer.preempt.should_stop(trainer.device):
            return None
        if trainer.last_saved != trainer.step:
            trainer.save()
        if trainer.is_main:
            got = trainer.preempt.received
            why = signal.Signals(got).name if got is not None else "a signal to another rank"
            trainer.progress.say(f"preempted: saved step {trainer.step}; exiting for requeue ({why})")
        return REQUEUE_EXIT_CODE


def default_callbacks(cfg) -> list[Callback]:
    """The run's callbacks, in the order they run after every step (``cfg``: pretrain.config.RunConfig)."""
    return [RoutingStep(), SpikeMonitor(cfg.logging.spike_factor),
            MetricsLogger(cfg.train.log_every, cfg.train.steps), Validation(cfg.train.eval_every),
            Downstream(cfg.eval.downstream_every), Checkpointing(cfg.checkpoint.every), Preemption()]

