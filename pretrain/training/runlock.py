"""One owner per run folder: ``RUN/run.lock`` names the launch that trains into it.

Rank 0 takes the lock before anything is read or written there (the other ranks learn the outcome from it), and
gives it back when the run ends, however it ends short of a kill. A second launch on a held folder stops with one
line naming the holder: host, pid, Slurm job, since when.

The file system. The lock is a file that appears whole or not at all: its text is written to a private file which
is then hard-linked to ``run.lock`` (``link`` fails when the name exists, atomically, on local disks, NFS v3/v4 and
Lustre alike; NFS may report a link that did succeed as failed, so success is judged by the private file's link
count, the classic NFS-safe recipe). No fcntl/flock lock: across nodes those hold only with the right mount
options (Lustre's ``flock``, not ``localflock``; a working NFS lock daemon), and where they do not they say
"yours" to every node without a word.

A lock whose holder is gone. A kill -9, a node failure or a job's hard end leave the file behind. It is taken over
(one line saying so) when its holder is known to be gone:
  - the same Slurm job at a later start (a requeue: Slurm ends every process of a start before the next one), or at
    the same start on this host with its process gone;
  - another Slurm job that Slurm no longer lists as pending, running, suspended or completing (``squeue``);
  - no Slurm job, this host: its process is gone (pid and start time, so a reused pid does not count).
Anything else (another host without Slurm, or Slurm not answering) counts as alive: the line then says how to
take the folder over by hand (remove the file once that launch is surely gone).

Taking over is safe against a race with another launch doing the same: the stale file is renamed to a private
name (only one renamer can win), checked to be the one judged stale, and only then is the new lock linked in.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import time
from pathlib import Path
from typing import Callable, Optional

from conf.errors import ConfigError

LOCK = "run.lock"
# Slurm states of a job that may still run (or run again) in its folder
_ALIVE_STATES = {"PENDING", "RUNNING", "SUSPENDED", "COMPLETING", "CONFIGURING", "REQUEUED", "REQUEUE_HOLD",
                 "REQUEUE_FED", "RESIZING", "SIGNALING", "STAGE_OUT", "STOPPED", "RESV_DEL_HOLD"}


def _start_time(pid: int) -> Optional[str]:
    """The kernel's start time of process ``pid`` (clock ticks since boot), None where it is not running (or a
    zombie: ended, not yet reaped) or /proc is not there."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()   # the name may hold ")"
    except OSError:
        return None
    return None if fields[0] in ("Z", "X") else fields[19]   # state, field 3; start time, field 22


def _alive_here(pid: int, start: Optional[str]) -> bool:
    if Path("/proc/self/stat").exists():
        now = _start_time(pid)
        return now is not None and (start is None or now == start)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _slurm_state(job: str) -> Optional[str]:
    """The state Slurm gives job ``job`` ("GONE" when it no longer knows it), or None when Slurm does not answer."""
    try:
        res = subprocess.run(["squeue", "-h", "-j", job, "-o", "%T"], capture_output=True, text=True, timeout=30,
                             check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if res.returncode != 0:
        return "GONE" if "Invalid job id" in res.stderr else None
    return res.stdout.split()[0] if res.stdout.split() else "GONE"


def me() -> dict:
    """What this process writes into the lock."""
    pid = os.getpid()
    job = os.environ.get("SLURM_JOB_ID") or None
    return {"host": socket.gethostname(), "pid": pid, "pid_start": _start_time(pid), "slurm_job": job,
            "slurm_restart": int(os.environ.get("SLURM_RESTART_COUNT") or 0) if job else None,
            "since": time.strftime("%Y-%m-%d %H:%M:%S %z")}


def describe(holder: dict) -> str:
    job = f", Slurm job {holder['slurm_job']}" if holder.get("slurm_job") else ""
    return f"host {holder.get('host')}, pid {holder.get('pid')}{job}, since {holder.get('since')}"


def gone(holder: dict, mine: dict) -> Optional[str]:
    """Why ``holder`` (a lock's contents) no longer runs, or None while it may."""
    here = holder.get("host") == mine["host"]
    pid = holder.get("pid")
    if here and isinstance(pid, int) and _alive_here(pid, holder.get("pid_start")):
        return None
    job = holder.get("slurm_job")
    if job and job == mine["slurm_job"]:
        if (holder.get("slurm_restart") or 0) < (mine["slurm_restart"] or 0):
            return f"this Slurm job's earlier start ({holder.get('slurm_restart') or 0})"
        return "its process is gone" if here else None
    if job:
        state = _slurm_state(job)
        if state is None or state in _ALIVE_STATES:
            return None
        return f"Slurm job {job} is {'no longer listed' if state == 'GONE' else state}"
    return "its process is gone" if here else None


class RunLock:
    """The lock of one run folder, held by this process (rank 0) until ``release``."""

    def __init__(self, run_dir: Path):
        self.path = run_dir / LOCK
        self.text: Optional[bytes] = None

    def _link(self, text: bytes) -> bool:
        """Make ``run.lock`` hold ``text`` unless the name exists; True when this process made it."""
        private = self.path.with_name(f".{LOCK}.{socket.gethostname()}.{os.getpid()}")
        private.write_bytes(text)
        try:
            os.link(private, self.path)
        except FileExistsError:
            pass
        except OSError:   # NFS may report a link it made as failed: the link count says what happened
            pass
        try:
            return os.stat(private).st_nlink == 2
        finally:
            private.unlink()

    def _read(self) -> Optional[bytes]:
        try:
            return self.path.read_bytes()
        except FileNotFoundError:
            return None

    def _remove_if(self, seen: bytes) -> bool:
        """Remove the lock if it still holds ``seen`` (judged stale); False when another launch changed it since
        (then it stays as that launch left it). Renamed first: of several launches only one can win the rename."""
        aside = self.path.with_name(f".{LOCK}.stale.{socket.gethostname()}.{os.getpid()}")
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:
            return False   # another launch took it over first
        if aside.read_bytes() != seen:   # a lock taken since it was judged: put it back
            try:
                os.link(aside, self.path)
            except FileExistsError:
                pass
            aside.unlink()
            return False
        aside.unlink()
        return True

    def acquire(self, say: Callable[[str], None]) -> Optional[str]:
        """Take the lock; None when taken, else the one-line reason it is not."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        mine = me()
        text = (json.dumps(mine) + "\n").encode()
        for _ in range(5):   # a lock may vanish or appear under us while another launch does the same
            if self._link(text):
                self.text = text
                return None
            seen = self._read()
            if seen is None:
                continue
            try:
                holder = json.loads(seen)
                if not isinstance(holder, dict):
                    raise ValueError("not an object")
            except ValueError:
                return (f"{self.path} is there but unreadable; if no other launch trains in {self.path.parent}, "
                        "remove that file and start again")
            why = gone(holder, mine)
            if why is None:
                return (f"{self.path.parent} is in use by another launch ({describe(holder)}): wait for it to end, "
                        f"or train under another name=; if that launch is surely gone, remove {self.path}")
            if self._remove_if(seen):
                say(f"run lock: taking over {self.path} from a launch that is gone ({describe(holder)}: {why})")
        return f"{self.path}: could not be taken (it kept changing); start again"

    def release(self) -> None:
        """Give the lock back if this process still holds it."""
        if self.text is not None and self._read() == self.text:
            self.path.unlink()
        self.text = None


def take(run_dir: Path, *, is_main: bool, say: Callable[[str], None]) -> Optional[RunLock]:
    """Collective: rank 0 takes ``run_dir``'s lock; every rank raises the same ConfigError when it cannot. Returns
    the lock on rank 0, None elsewhere."""
    import torch.distributed as dist
    lock = RunLock(run_dir) if is_main else None
    try:
        why = lock.acquire(say) if lock is not None else None
    except OSError as e:   # a read-only or full file system: said here, not by a traceback on rank 0 alone
        why = f"cannot take {run_dir / LOCK}: {e.strerror or e}"
    if dist.is_initialized() and dist.get_world_size() > 1:
        box = [why]
        dist.broadcast_object_list(box, src=0)
        why = box[0]
    if why:
        raise ConfigError(f"run lock: {why}")
    return lock
