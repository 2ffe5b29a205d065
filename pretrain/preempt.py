"""Preemption: a signal sets a flag; at each step boundary the ranks agree on it and save together.

SIGTERM, SIGUSR1 and SIGUSR2 (Slurm's warning before a time limit, submitit's, or a scheduler's kill) may reach
only some ranks, so ``should_stop`` all-reduces the flag: every rank then saves the same step collectively and
exits with REQUEUE_EXIT_CODE, which the launchers read as "requeue me".
"""
from __future__ import annotations

import signal

import torch
import torch.distributed as dist

REQUEUE_EXIT_CODE = 75  # EX_TEMPFAIL: temporary failure, try again
SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)


class PreemptionFlag:
    def __init__(self) -> None:
        self.received: int | None = None
        self._previous = {}

    def install(self) -> "PreemptionFlag":
        for sig in SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handler)
        return self

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handler(self, signum, frame) -> None:
        self.received = signum

    def should_stop(self, device: torch.device) -> bool:
        """Collective: true on every rank if any rank got a signal."""
        flag = torch.tensor([1.0 if self.received is not None else 0.0], device=device)
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())
