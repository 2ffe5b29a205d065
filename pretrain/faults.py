"""Fault injection for tests of the training loop's recovery paths (never set in real runs).

    MOR_FAULT_KILL_AT_STEP=N      the process SIGKILLs itself when step N begins (crash without cleanup)
    MOR_FAULT_SIGNAL_AT_STEP=N    the process sends itself SIGUSR1 when step N begins (a scheduler's warning)
    MOR_FAULT_SIGNAL_RANK=R       ... only on global rank R (default: every rank)
    MOR_FAULT_NAN_AT_STEP=N       the loss of step N is made NaN
    MOR_FAULT_STEP_SECONDS=X      every step takes at least X seconds (so a scheduler's requeue or time limit
                                  lands mid-run in the Slurm tests)
"""
from __future__ import annotations

import os
import signal
import time
from typing import Optional


def _env(name: str) -> Optional[int]:
    value = os.environ.get(name, "")
    return int(value) if value else None


def before_step(step: int, rank: int) -> bool:
    """Called at the start of each step; returns True when this step's loss must be made NaN."""
    slow = os.environ.get("MOR_FAULT_STEP_SECONDS", "")
    if slow:
        time.sleep(float(slow))
    if _env("MOR_FAULT_KILL_AT_STEP") == step:
        os.kill(os.getpid(), signal.SIGKILL)
    if _env("MOR_FAULT_SIGNAL_AT_STEP") == step and _env("MOR_FAULT_SIGNAL_RANK") in (None, rank):
        os.kill(os.getpid(), signal.SIGUSR1)
    return _env("MOR_FAULT_NAN_AT_STEP") == step
