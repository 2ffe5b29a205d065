"""Preemption: a signal sets a flag; at each step boundary the ranks agree on it and save together.

SIGTERM, SIGUSR1 and SIGUSR2 (Slurm's warning before a time limit, submitit's, or a scheduler's kill) may reach
only some ranks, so ``should_stop`` all-reduces the flag: every rank then saves the same step collectively and
exits with REQUEUE_EXIT_CODE, which the launchers read as "requeue me".

A signal may also come while the process is still starting (imports, process groups, loading a checkpoint): the
entry point calls ``catch_early()`` first thing, so such a signal is kept, not fatal, and counts at the first step.
"""
from __future__ import annotations

import signal

REQUEUE_EXIT_CODE = 75  # EX_TEMPFAIL: temporary failure, try again
SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)
_early: list[int] = []             # signals received before a PreemptionFlag was installed


def _early_handler(signum, frame) -> None:
    _early.append(signum)


def catch_early() -> None:
    """Keep the preemption signals from here on (default action: kill the process) until the trainer takes over."""
    for sig in SIGNALS:
        signal.signal(sig, _early_handler)


class PreemptionFlag:
    def __init__(self) -> None:
        self.received: int | None = None
        self._previous = {}

    def install(self) -> "PreemptionFlag":
        for sig in SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handler)
        if _early:
            self.received = _early[0]
            _early.clear()
        return self

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handler(self, signum, frame) -> None:
        self.received = signum

    def should_stop(self, device) -> bool:
        """Collective: true on every rank if any rank got a signal."""
        import torch
        import torch.distributed as dist
        flag = torch.tensor([1.0 if self.received is not None else 0.0], device=device)
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())
