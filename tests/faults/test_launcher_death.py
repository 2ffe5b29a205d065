"""Ranks die with their launcher. torchrun starts each rank in a session of its own, so a kill -9 of torchrun alone
used to leave them training as orphans. Here a 2-rank torchrun run is killed that way mid-run: its ranks save the
step they were at and end (pretrain/training/preempt.py: die_with_launcher). While it runs, a second launch on its
run folder is refused in one line naming rank 0 (the run lock). The watchdog that covers platforms without
PR_SET_PDEATHSIG is tested alone: an orphan that ignores SIGTERM still ends, by SIGKILL after the grace time."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from pretrain.training.runlock import LOCK
from tests.distributed.harness import ROOT, _free_port
from tests.faults.runs import RUN, args, losses, run_main
from tests.faults.test_signals import NOT_IN_A_JOB
from tests.pretrain.fixtures import make_shards

GONE_WITHIN = 180   # seconds; a bound for a broken build on a busy machine, not a measure


def alive(pid: int) -> bool:
    """Running (a zombie nobody reaps has ended)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state not in ("Z", "X")


def children(pid: int) -> list[int]:
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                    out.append(int(entry.name))
            except (OSError, ValueError):
                pass
    return out


def rank_of(pid: int) -> str | None:
    try:
        env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return None
    return next((e.split(b"=", 1)[1].decode() for e in env if e.startswith(b"RANK=")), None)


def wait_until(cond, timeout: float, what: str) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if cond():
            return
        time.sleep(0.5)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def test_killing_torchrun_ends_its_ranks_which_save_first(tmp_path):
    data = make_shards(tmp_path / "data")
    run = tmp_path / "runs" / "run"
    port = str(_free_port())
    env = {**os.environ, **NOT_IN_A_JOB, "MOR_FAULT_STEP_SECONDS": "1", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": str(ROOT), "CUDA_VISIBLE_DEVICES": ""}
    log = open(tmp_path / "torchrun.log", "w")   # the ranks write here too: they inherit it
    torchrun = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                                 "--master-addr", "127.0.0.1", "--master-port", port, "-m", "pretrain.train", RUN,
                                 *args(data, tmp_path / "runs", "run", "train.steps=400", "checkpoint.every=0")],
                                cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    ranks: list[int] = []
    try:
        wait_until(lambda: torchrun.poll() is not None or (run / "metrics.jsonl").exists() and len(losses(run)) >= 2,
                   600, "two steps")
        assert torchrun.poll() is None, (tmp_path / "torchrun.log").read_text()[-3000:]
        ranks = children(torchrun.pid)
        assert len(ranks) == 2, ranks
        rank0 = next(p for p in ranks if rank_of(p) == "0")
        # A second launch on the same run folder, while the first trains: one line naming rank 0, nothing done.
        code, out, err = run_main(args(data, tmp_path / "runs", "run", "train.steps=400"))
        assert code == 2 and err.count("\n") == 1, (code, out, err)
        assert err.startswith(f"error: run lock: {run} is in use by another launch (host {socket.gethostname()}, "
                              f"pid {rank0}, since "), err
        torchrun.send_signal(signal.SIGKILL)
        torchrun.wait()
        wait_until(lambda: not any(alive(p) for p in ranks), GONE_WITHIN, "the orphaned ranks to end")
    finally:
        for p in ranks:
            if alive(p):
                os.kill(p, signal.SIGKILL)
        if torchrun.poll() is None:
            torchrun.kill()
            torchrun.wait()
        log.close()
    text = (tmp_path / "torchrun.log").read_text()
    said = [ln for ln in text.splitlines() if ln.startswith("preempted: saved step ")]
    assert len(said) == 1 and "(SIGTERM)" in said[0], text[-3000:]
    step = int(said[0].split()[3].rstrip(";"))
    assert (run / "checkpoints" / "latest").read_text().strip() == f"step-{step:06d}"
    assert sorted(losses(run)) == list(range(1, step + 1))
    assert not (run / LOCK).exists() and "Traceback" not in text


ORPHAN = """
import os, signal, sys, time
from pretrain.training.preempt import die_with_launcher
signal.signal(signal.SIGTERM, lambda *a: None)   # a rank that cannot act on SIGTERM (stuck in a collective)
os.environ["RANK"] = "0"
assert die_with_launcher(grace=float(sys.argv[2]), use_prctl=False)
open(sys.argv[1], "w").write(str(os.getpid()))
time.sleep(600)
"""
LAUNCHER = """
import subprocess, sys, time
subprocess.Popen([sys.executable, "-c", sys.argv[1], sys.argv[2], sys.argv[3]])
time.sleep(600)
"""


def test_without_prctl_the_watchdog_ends_an_orphan_that_ignores_sigterm(tmp_path):
    pid_file, grace = tmp_path / "orphan.pid", 3.0
    launcher = subprocess.Popen([sys.executable, "-c", LAUNCHER, ORPHAN, str(pid_file), str(grace)], cwd=ROOT,
                                env={**os.environ, "PYTHONPATH": str(ROOT)})
    orphan = None
    try:
        wait_until(lambda: pid_file.exists() and pid_file.read_text(), 120, "the rank to start")
        orphan = int(pid_file.read_text())
        time.sleep(grace + 2)
        assert alive(orphan)                      # its launcher lives: it runs on
        launcher.send_signal(signal.SIGKILL)
        launcher.wait()
        wait_until(lambda: not alive(orphan), 60, "the orphan to end")
    finally:
        if orphan is not None and alive(orphan):
            os.kill(orphan, signal.SIGKILL)
        if launcher.poll() is None:
            launcher.kill()
            launcher.wait()

