"""Preemption: a signal sets a flag; at each step boundary the ranks agree on it and save together.

SIGUSR1 and SIGUSR2 are a scheduler's warning before a time limit (Slurm's ``--signal``, submitit's USR2); SIGTERM
is a requeue, a preemption or a cancel. Any of them may reach only some ranks, so ``should_stop`` all-reduces the
flag: every rank then saves the same step collectively and exits with REQUEUE_EXIT_CODE, which the launchers read
as "requeue me".

Start-up. slurm/launch.sh starts every rank with USR1 and USR2 blocked (``env --block-signal``), so a warning that
comes while the interpreter starts stays pending; ``catch_early()``, the entry point's first act, installs a
handler that keeps warnings and unblocks them. A kept warning counts at the first step boundary. SIGTERM keeps its
default action (the process ends) until this start's first step is done: before that there is nothing to save
that is not on disk already, and a rank whose peer died while starting must end when its launcher sends SIGTERM,
even while it waits in a collective (a Python handler would only run once that wait returns, and it may never).

A warning sent to the batch shell only (``sbatch --signal=B:USR1@...``, the slurm/ scripts' choice) reaches the
ranks as a file: the launcher writes ``SIGNAME EPOCH`` to MOR_WARNING_FILE and ``should_stop`` looks for it.

A warning in the first half of the time limit. Slurm sends it LEAD seconds before the end (up to a minute
earlier), or at once when the limit is not longer than LEAD. When it comes before half the limit has passed, the
lead takes half the limit or more, and every requeued start would be warned as early: a loop of starts that
mostly start and save. Where the job's start and end are known (SLURM_JOB_START_TIME and SLURM_JOB_END_TIME, epoch
seconds: Slurm >= 23.02 sets them, slurm/launch.sh sets them on older ones), the ranks agree on that too, and
``no_requeue_reason()`` gives the one line that says so; the entry point then exits TOO_SHORT_EXIT_CODE.
"""
from __future__ import annotations

import os
import signal
import time

REQUEUE_EXIT_CODE = 75  # EX_TEMPFAIL: temporary failure, try again
TOO_SHORT_EXIT_CODE = 2  # the job's configuration is wrong (its time limit, for its warning): fix it, then resubmit
SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)
WARNINGS = (signal.SIGUSR1, signal.SIGUSR2)
_early: list[tuple[int, float]] = []   # warnings received before a PreemptionFlag was installed, with their time
_current: "PreemptionFlag | None" = None


def _early_handler(signum, frame) -> None:
    _early.append((signum, time.time()))


def catch_early() -> None:
    """Keep the warning signals from here on (default action: kill the process) until the trainer takes over, and
    take one that came while they were blocked."""
    for sig in WARNINGS:
        signal.signal(sig, _early_handler)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, WARNINGS)


def _job_times() -> tuple[float, float] | None:
    try:
        start, end = float(os.environ["SLURM_JOB_START_TIME"]), float(os.environ["SLURM_JOB_END_TIME"])
    except (KeyError, ValueError):
        return None
    return (start, end) if end > start else None


def no_requeue_reason() -> str | None:
    """Why the last run must not be requeued although it saved on a signal (one line), or None."""
    return _current.too_short if _current is not None else None


class PreemptionFlag:
    def __init__(self) -> None:
        self.received: int | None = None     # the last signal received
        self.warned_at: float | None = None  # when the first warning came (time.time())
        self.too_short: str | None = None    # set when the ranks agree that a warning came too early to requeue
        self._previous: dict = {}

    def install(self) -> "PreemptionFlag":
        global _current
        for sig in WARNINGS:
            self._previous[sig] = signal.signal(sig, self._handler)
        if _early:
            self.received, self.warned_at = _early[0]
            _early.clear()
        _current = self
        return self

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    def _handler(self, signum, frame) -> None:
        self.received = signum
        if signum in WARNINGS and self.warned_at is None:
            self.warned_at = time.time()

    def _read_warning_file(self) -> None:
        path = os.environ.get("MOR_WARNING_FILE")
        if self.warned_at is not None or not path or not os.path.exists(path):
            return
        try:
            name, at = open(path).read().split()
            sig, when = signal.Signals["SIG" + name], float(at)
        except (OSError, ValueError, KeyError):   # unreadable: still a warning, from the moment it was seen
            sig, when = signal.SIGUSR1, time.time()
        self.received = self.received or sig
        self.warned_at = when

    def should_stop(self, device) -> bool:
        """Collective, at each step boundary: true on every rank if any rank got a signal."""
        import torch
        import torch.distributed as dist
        if signal.SIGTERM not in self._previous:   # a step is done: from now on SIGTERM saves it
            self._previous[signal.SIGTERM] = signal.signal(signal.SIGTERM, self._handler)
        self._read_warning_file()
        times, elapsed, early = _job_times(), -1.0, 0.0
        if times is not None and self.warned_at is not None:
            elapsed = self.warned_at - times[0]
            early = float(elapsed < times[1] - self.warned_at)
        flag = torch.tensor([float(self.received is not None), early, elapsed], dtype=torch.float64, device=device)
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        stop, early, elapsed = flag.tolist()
        if stop and early and times is not None:
            limit = times[1] - times[0]
            self.too_short = (f"error: time limit too short for its warning: it came {elapsed:.0f} s into this job's "
                              f"{limit / 60:.4g} min, before half of it, so every requeue would end the same way; "
                              "saved, not requeueing: resubmit with a --time over twice the --signal lead time "
                              "plus 2 minutes (or a shorter lead)")
        return bool(stop)
