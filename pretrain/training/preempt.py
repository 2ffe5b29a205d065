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

The launcher's death. torchrun starts each rank in a session of its own, so a kill -9 of torchrun alone leaves its
ranks training on as orphans (or waiting forever in a collective). ``die_with_launcher()``, called at a rank's
start, asks Linux to send SIGTERM when the launcher dies (PR_SET_PDEATHSIG): ranks that have trained a step save
it together and exit 75, ranks still starting end at once. A watchdog thread covers the rest: once the parent is
gone it sends that SIGTERM itself (for platforms without prctl, and a parent that died before the request), and
SIGKILL ORPHAN_GRACE_S later, for a rank that hangs (a collective whose peer is gone never returns, and a Python
handler only runs between bytecodes).
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os
import signal
import threading
import time

REQUEUE_EXIT_CODE = 75  # EX_TEMPFAIL: temporary failure, try again
TOO_SHORT_EXIT_CODE = 2  # the job's configuration is wrong (its time limit, for its warning): fix it, then resubmit
SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)
WARNINGS = (signal.SIGUSR1, signal.SIGUSR2)
_early: list[tuple[int, float]] = []   # warnings received before a PreemptionFlag was installed, with their time
_current: "PreemptionFlag | None" = None
# After the launcher's death: the time a rank has to save before its watchdog ends it (a save of the largest
# model takes well under this; a hung rank waits this long).
ORPHAN_GRACE_S = 60.0
_PR_SET_PDEATHSIG = 1
_watching = False


def _early_handler(signum, frame) -> None:
    _early.append((signum, time.time()))


def catch_early() -> None:
    """Keep the warning signals from here on (default action: kill the process) until the trainer takes over, and
    take one that came while they were blocked."""
    for sig in WARNINGS:
        signal.signal(sig, _early_handler)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, WARNINGS)


def _parent_death_signal(sig: int) -> bool:
    """Ask the kernel for ``sig`` when the parent dies (Linux's PR_SET_PDEATHSIG); False where there is none."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        return libc.prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def _watch(parent: int, grace: float) -> None:
    while os.getppid() == parent:
        time.sleep(1.0)
    # Also where the kernel sent one: a parent that died before the prctl call sent none (a second SIGTERM only
    # sets the flag again).
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(grace)
    os.kill(os.getpid(), signal.SIGKILL)


def die_with_launcher(*, grace: float = ORPHAN_GRACE_S, use_prctl: bool = True) -> bool:
    """A rank started by a launcher (RANK or SLURM_PROCID in the environment: torchrun, srun, the slurm/ scripts)
    ends with it (see the module docstring). Returns whether it watches; a plain single process does not.
    ``use_prctl=False``: the watchdog alone, as on a platform without PR_SET_PDEATHSIG."""
    global _watching
    if _watching or not (os.environ.get("RANK") or os.environ.get("SLURM_PROCID")):
        return _watching
    parent = os.getppid()
    if use_prctl:
        _parent_death_signal(signal.SIGTERM)
    threading.Thread(target=_watch, args=(parent, grace), name="launcher-watch", daemon=True).start()
    _watching = True
    return True


def _job_times() -> tuple[float, float] | None:
    try:
        start, end = float(os.environ["SLURM_JOB_START_TIME"]), float(os.environ["SLURM_JOB_END_TIME"])
    except (KeyError, ValueError):
        return None
    return (start, end) if end > start else None


def signalled() -> bool:
    """Whether the last run of this process ended on a signal (a warning, SIGTERM, or one to another rank)."""
    return _current is not None and _current.stopped


def no_requeue_reason() -> str | None:
    """Why the last run must not be requeued although it saved on a signal (one line), or None."""
    return _current.too_short if _current is not None else None


class PreemptionFlag:
    def __init__(self) -> None:
        self.received: int | None = None     # the last signal received
        self.warned_at: float | None = None  # when the first warning came (time.time())
        self.too_short: str | None = None    # set when the ranks agree that a warning came too early to requeue
        self.stopped = False                  # the ranks agreed to stop on a signal
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
        self.stopped = bool(stop)
        if stop and early and times is not None:
            limit = times[1] - times[0]
            self.too_short = (f"error: time limit too short for its warning: it came {elapsed:.0f} s into this job's "
                              f"{limit / 60:.4g} min, before half of it, so every requeue would end the same way; "
                              "saved, not requeueing: resubmit with a --time over twice the --signal lead time "
                              "plus 2 minutes (or a shorter lead)")
        return bool(stop)
