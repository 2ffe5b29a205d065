"""MOR_FAULT_STEP_SECONDS slows every step, or with MOR_FAULT_SLOW_STARTS=K only those of a Slurm job's first K
starts (pretrain/checkpoint/faults.py): the Slurm time-limit test's requeued start then finishes at full speed."""
from __future__ import annotations

import pytest

from pretrain.checkpoint import faults


@pytest.mark.parametrize("restarts,starts,slow", [(None, None, True), ("3", None, True), (None, "1", True),
                                                   ("0", "1", True), ("1", "1", False), ("1", "2", True),
                                                   ("2", "2", False)])
def test_steps_are_slowed_only_in_the_first_starts_asked_for(monkeypatch, restarts, starts, slow):
    slept: list[float] = []
    monkeypatch.setattr(faults.time, "sleep", slept.append)
    monkeypatch.setenv("MOR_FAULT_STEP_SECONDS", "3")
    for name, value in (("SLURM_RESTART_COUNT", restarts), ("MOR_FAULT_SLOW_STARTS", starts)):
        if value is None:
            monkeypatch.delenv(name, raising=False)
        else:
            monkeypatch.setenv(name, value)
    assert faults.before_step(1, 0) is False
    assert slept == ([3.0] if slow else [])
