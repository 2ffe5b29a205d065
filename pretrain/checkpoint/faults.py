"""Fault injection for tests of the training loop's recovery paths (never set in real runs).

    MOR_FAULT_KILL_AT_STEP=N      the process SIGKILLs itself when step N begins (crash without cleanup)
    MOR_FAULT_SIGNAL_AT_STEP=N    the process sends itself SIGUSR1 when step N begins (a scheduler's warning)
    MOR_FAULT_SIGNAL_RANK=R       ... only on global rank R (default: every rank)
    MOR_FAULT_NAN_AT_STEP=N       the loss of step N is made NaN: one element of the input embedding's output in
                                  the step's last micro-batch becomes NaN, and the forward pass (and, through a
                                  pipeline, the backward pass) carries it on (TrainEngine.train_step's inject_nan)
    MOR_FAULT_NAN_STEPS=K         ... and of the K-1 steps after N too (default 1)
    MOR_FAULT_NAN_RANK=R          ... only on global rank R (default: every rank). Under pipeline parallelism only
                                  a first-stage rank holds the embedding: the NaN enters there or nowhere.
    MOR_FAULT_STEP_SECONDS=X      every step takes at least X seconds (so a scheduler's requeue or time limit
                                  lands mid-run in the Slurm tests)
    MOR_FAULT_SLOW_STARTS=K       ... only in the first K starts of a Slurm job (SLURM_RESTART_COUNT < K; default:
                                  every start), so that a requeued job finishes without waiting for another warning

Named points. The code calls ``point("startup.engine")``, ``point("save.staged")`` ... at the moments a fault is
worth testing; the environment picks one of them:

    MOR_FAULT_POINT=NAME          the point (``point`` calls name them: see ``grep -rn 'faults.point'``)
    MOR_FAULT_POINT_SIGNAL=SIG    what the process sends itself there: KILL (default), TERM, USR1, USR2
    MOR_FAULT_POINT_RANK=R        ... only on global rank R (default: every rank)
    MOR_FAULT_POINT_COUNT=K       ... only the K-th time the point is reached (1-based; default 1)
"""
from __future__ import annotations

import os
import signal
import time
from typing import Optional

_reached: dict[str, int] = {}


def _env(name: str) -> Optional[int]:
    value = os.environ.get(name, "")
    return int(value) if value else None


def _rank() -> int:
    # The launcher's variables, so that points before the process group exists can be aimed at one rank.
    return int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0")))


def point(name: str) -> None:
    """A named moment where a test may make this process receive a signal (see the module docstring)."""
    if os.environ.get("MOR_FAULT_POINT") != name:
        return
    _reached[name] = _reached.get(name, 0) + 1
    if _reached[name] != (_env("MOR_FAULT_POINT_COUNT") or 1) or _env("MOR_FAULT_POINT_RANK") not in (None, _rank()):
        return
    sig = getattr(signal, "SIG" + os.environ.get("MOR_FAULT_POINT_SIGNAL", "KILL").upper())
    os.kill(os.getpid(), sig)


def before_step(step: int, rank: int) -> bool:
    """Called at the start of each step; returns True when this step's loss must be made NaN on this rank."""
    slow = os.environ.get("MOR_FAULT_STEP_SECONDS", "")
    starts = _env("MOR_FAULT_SLOW_STARTS")
    if slow and (starts is None or (_env("SLURM_RESTART_COUNT") or 0) < starts):
        time.sleep(float(slow))
    if _env("MOR_FAULT_KILL_AT_STEP") == step:
        os.kill(os.getpid(), signal.SIGKILL)
    if _env("MOR_FAULT_SIGNAL_AT_STEP") == step and _env("MOR_FAULT_SIGNAL_RANK") in (None, rank):
        os.kill(os.getpid(), signal.SIGUSR1)
    first = _env("MOR_FAULT_NAN_AT_STEP")
    nan = first is not None and first <= step < first + (_env("MOR_FAULT_NAN_STEPS") or 1)
    return nan and _env("MOR_FAULT_NAN_RANK") in (None, rank)
