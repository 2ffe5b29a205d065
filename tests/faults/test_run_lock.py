"""One owner per run folder (pretrain/training/runlock.py), with real processes as holders: a live one is named
(host, pid, since) and keeps the folder, a dead one's lock is taken over with one line, a requeued Slurm job takes
over its own earlier start's lock, and of several launches racing for one stale lock exactly one wins. A second
launch of the trainer on a held folder is tests/faults/test_launcher_death.py's (it has a live run at hand)."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

from pretrain.training import runlock
from pretrain.training.runlock import LOCK, RunLock
from tests.distributed.harness import ROOT
from tests.faults.runs import args, run_main
from tests.pretrain.fixtures import make_shards


def lock_of(pid: int, **extra) -> dict:
    """What a launch with process ``pid`` on this host would have written."""
    return {"host": socket.gethostname(), "pid": pid, "pid_start": runlock._start_time(pid), "slurm_job": None,
            "slurm_restart": None, "since": "2026-01-02 03:04:05 +0000", **extra}


def write(run: Path, holder: dict) -> None:
    run.mkdir(parents=True, exist_ok=True)
    (run / LOCK).write_text(json.dumps(holder) + "\n")


def holder_of(run: Path) -> dict:
    return json.loads((run / LOCK).read_text())


def test_a_live_holder_keeps_the_folder_and_a_gone_one_is_taken_over(tmp_path):
    run, said = tmp_path / "run", []
    sleeper = subprocess.Popen(["sleep", "300"])
    try:
        write(run, lock_of(sleeper.pid))
        why = RunLock(run).acquire(said.append)
        assert why is not None and f"pid {sleeper.pid}" in why and socket.gethostname() in why, why
        assert "since 2026-01-02 03:04:05" in why and str(run / LOCK) in why and not said
        assert holder_of(run)["pid"] == sleeper.pid                       # untouched
        # the same pid, started at another time: a reused pid, not the holder
        write(run, lock_of(sleeper.pid, pid_start="1"))
        lock = RunLock(run)
        assert lock.acquire(said.append) is None and holder_of(run)["pid"] == os.getpid()
        lock.release()
        assert not (run / LOCK).exists()
    finally:
        sleeper.kill()
        sleeper.wait()
    write(run, lock_of(sleeper.pid))                                       # its process is gone now
    said.clear()
    lock = RunLock(run)
    assert lock.acquire(said.append) is None
    assert len(said) == 1 and said[0].startswith(f"run lock: taking over {run / LOCK}") and \
        f"pid {sleeper.pid}" in said[0] and "its process is gone" in said[0], said
    assert holder_of(run)["pid"] == os.getpid() and not list(run.glob(f".{LOCK}*"))   # no private files left
    lock.release()


def test_a_requeued_slurm_job_takes_over_its_earlier_starts_lock(tmp_path, monkeypatch):
    run, said = tmp_path / "run", []
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    other_host = {"host": "node-that-is-not-this-one", "pid": 1, "pid_start": None, "slurm_job": "4242",
                  "since": "2026-01-02 03:04:05 +0000"}
    write(run, {**other_host, "slurm_restart": 1})          # this very start, on another node: alive
    why = RunLock(run).acquire(said.append)
    assert why is not None and "Slurm job 4242" in why and "node-that-is-not-this-one" in why, why
    write(run, {**other_host, "slurm_restart": 0})          # the start before the requeue
    lock = RunLock(run)
    assert lock.acquire(said.append) is None
    assert len(said) == 1 and "this Slurm job's earlier start (0)" in said[0], said
    mine = holder_of(run)
    assert mine["slurm_job"] == "4242" and mine["slurm_restart"] == 1 and mine["pid"] == os.getpid()
    lock.release()


RACER = """
import sys, time
from pathlib import Path
from pretrain.training.runlock import RunLock
run, n = Path(sys.argv[1]), int(sys.argv[2])
(run.parent / f"ready-{sys.argv[3]}").touch()
while len(list(run.parent.glob("ready-*"))) < n:   # all at once, however long each took to start
    time.sleep(0.01)
lock = RunLock(run)
why = lock.acquire(lambda line: None)
print("WON" if why is None else "LOST " + why, flush=True)
while why is None and not (run.parent / "done").exists():   # hold it until every other racer has looked
    time.sleep(0.05)
if why is None:
    lock.release()
"""


def test_a_lock_taken_after_it_was_judged_stale_is_left_alone(tmp_path):
    """The interleaving a race needs (another launch takes the stale lock over between this launch's reading it
    and removing it), made to happen: the fresh lock stays, as it was."""
    run = tmp_path / "run"
    write(run, lock_of(999_999_999))
    stale = (run / LOCK).read_bytes()
    write(run, lock_of(os.getpid()))              # another launch's, taken meanwhile
    fresh = (run / LOCK).read_bytes()
    assert RunLock(run)._remove_if(stale) is False
    assert (run / LOCK).read_bytes() == fresh and not list(run.glob(f".{LOCK}*"))
    assert RunLock(run)._remove_if(fresh) is True and not (run / LOCK).exists()


def test_of_several_launches_taking_over_one_stale_lock_exactly_one_wins(tmp_path):
    run, n = tmp_path / "run", 5
    gone = subprocess.Popen(["true"])
    gone.wait()
    write(run, lock_of(gone.pid))
    racers = [subprocess.Popen([sys.executable, "-c", RACER, str(run), str(n), str(i)], cwd=ROOT, text=True,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               env={**os.environ, "PYTHONPATH": str(ROOT)}) for i in range(n)]
    try:
        outs = [p.stdout.readline().strip() for p in racers]   # each says its outcome before anyone lets go
    finally:
        (tmp_path / "done").touch()
        codes = [p.wait(timeout=120) for p in racers]
    assert codes == [0] * n, outs
    won = [i for i, out in enumerate(outs) if out == "WON"]
    assert len(won) == 1, outs
    winner = racers[won[0]].pid
    for out in outs:
        assert out == "WON" or (out.startswith("LOST ") and f"pid {winner}" in out), outs
    assert not list(run.glob(f".{LOCK}*")) and not (run / LOCK).exists()   # released by the winner


def test_a_launch_on_a_folder_whose_owner_was_killed_takes_it_over_and_gives_it_back(tmp_path):
    data = make_shards(tmp_path / "data")
    run = tmp_path / "runs" / "run"
    gone = subprocess.Popen(["true"])
    gone.wait()
    write(run, lock_of(gone.pid))   # what a kill -9 leaves
    code, out, err = run_main(args(data, tmp_path / "runs", "run", "train.steps=1"))
    assert code == 0, err
    said = [ln for ln in out.splitlines() if ln.startswith("run lock:")]
    assert len(said) == 1 and f"pid {gone.pid}" in said[0] and "taking over" in said[0], out
    assert not (run / LOCK).exists()
