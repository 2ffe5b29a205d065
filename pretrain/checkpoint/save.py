"""Writing a checkpoint (collective; the layout on disk is pretrain/checkpoint/verify.py's), and a full disk
told in one line.

Every rank writes into ``.staging-step-N``, the ranks hash the files between them, rank 0 writes the record, renames
the folder into place, replaces ``latest`` and prunes. A crash at any point leaves the earlier checkpoints valid.

A full disk. Before writing, rank 0 checks that the file system has room for about what the run's newest
checkpoint takes (the earlier ones stay until the new one is in place). When it has not, or when the disk fills
while the ranks write anyway (another writer, or a first checkpoint whose size is not known yet), every rank stops
together at the next agreement point: the staging folder is removed, the earlier checkpoints and ``latest`` are
untouched, and DiskFull carries one line naming the folder, what the checkpoint needs and what is free; the entry
point prints it and exits DISK_FULL_EXIT_CODE. torch's writer hides the errno ("unexpected pos 1168640 vs
1168532"), so a failure while writing counts as a full disk when ENOSPC/EDQUOT is in its chain of exceptions, or
when less room is left than the save needed. Any other failure stops every rank too (no rank left waiting in a
collective): the rank that failed raises its exception, the others a CheckpointError naming it.
"""
from __future__ import annotations

import errno
import json
import shutil
import traceback
from pathlib import Path
from typing import Any, Iterator, Optional

import torch

from conf.errors import one_line
from conf.files import atomic_write_bytes
from pretrain.checkpoint import verify as ckpt
from pretrain.checkpoint import faults

DISK_FULL_EXIT_CODE = 74   # EX_IOERR: not a requeue (75), the disk needs a person
_NO_SPACE = (errno.ENOSPC, errno.EDQUOT)
# Without a checkpoint to size the next one by, a failure counts as a full disk below this much free space.
_NEARLY_FULL = 64 << 20


class DiskFull(Exception):
    """No room for a checkpoint; the message is one line."""


def free_bytes(folder: Path) -> int:
    """Bytes free to this user on the file system holding ``folder`` (or its nearest existing parent)."""
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    return shutil.disk_usage(folder).free


def size_of(folder: Path) -> int:
    """Bytes in the files under ``folder`` (0 when it is not there)."""
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) if folder.is_dir() else 0


def human(n: float) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB"):
        if n < 1024:
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def _chain(e: BaseException) -> Iterator[BaseException]:
    """``e`` and the exceptions it was raised from or during, each once."""
    seen: set[int] = set()
    cur: Optional[BaseException] = e
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        yield cur
        cur = cur.__cause__ or cur.__context__


def is_full(e: BaseException, folder: Path, need: Optional[int]) -> bool:
    """Whether ``e``, raised while writing under ``folder``, is the file system running out of space."""
    for cur in _chain(e):
        if isinstance(cur, OSError) and cur.errno in _NO_SPACE:
            return True
        if "No space left on device" in str(cur) or "Disk quota exceeded" in str(cur):
            return True
    return free_bytes(folder) < max(need or 0, _NEARLY_FULL)


def no_space_line(root: Path, name: str, need: Optional[int], written: int, newest: Optional[str]) -> str:
    """The one line for a save of ``name`` under ``root`` that found no room. ``written``: what it had staged
    (a floor for its size when ``need`` is not known)."""
    size = f"about {human(need)} (as the newest one)" if need else f"more than {human(written)}"
    kept = (f"the earlier checkpoints are intact (newest: {newest}, which a restart resumes from)" if newest
            else "there is no earlier checkpoint")
    return (f"error: no space left on the device of {root} for checkpoint {name}: it needs {size}, "
            f"{human(free_bytes(root))} is free; the unfinished one is removed and {kept}. Free space there (or "
            "set out_dir to a larger disk), then start the run again")


class _Stop:
    """This rank's first failure during a save; ``agree`` (collective) stops every rank when any rank has one."""

    def __init__(self, root: Path, staging: Path, name: str, need: Optional[int], newest: Optional[str]):
        self.root, self.staging, self.name, self.need, self.newest = root, staging, name, need, newest
        self.error: Optional[BaseException] = None

    def __enter__(self) -> "_Stop":
        return self

    def __exit__(self, kind, error, tb) -> bool:
        if isinstance(error, Exception) and self.error is None:
            self.error = error
        return isinstance(error, Exception)   # kept for ``agree``: every rank must get there

    def agree(self) -> None:
        rank, _ = ckpt.rank_and_size()
        mine = None
        if self.error is not None:
            mine = (is_full(self.error, self.root, self.need), one_line(self.error))
        failures = [(r, f) for r, f in enumerate(ckpt.gather(mine)) if f]
        if not failures:
            return
        if self.error is not None:   # a failed writer's open file, held by a traceback's frames, keeps its
            for cur in _chain(self.error):   # space after the folder is removed
                traceback.clear_frames(cur.__traceback__)
        full, line = any(f[0] for _, f in failures), None
        if rank == 0:
            written = size_of(self.staging)
            shutil.rmtree(self.staging, ignore_errors=True)   # ours, never a checkpoint (no record)
            line = no_space_line(self.root, self.name, self.need, written, self.newest) if full else None
        if full:
            raise DiskFull(ckpt.broadcast(line))
        if self.error is not None:
            raise self.error
        r, (_, why) = failures[0]
        raise ckpt.CheckpointError(f"{self.root}: saving {self.name} failed on rank {r} ({why})")


def save_checkpoint(engine, root: Path, step: int, trainer_state: dict[str, Any], rank_state: dict[str, Any], *,
                    keep: int, protect: Optional[int] = None) -> Path:
    """Collective: every rank calls it at the same step. ``protect``: a step whose checkpoint pruning keeps."""
    rank, _ = ckpt.rank_and_size()
    name = ckpt.checkpoint_name(step)
    final, staging = root / name, root / f".staging-{name}"
    done = ckpt.list_checkpoints(root) if rank == 0 else []
    # about what the newest one takes, and its name
    need, newest = ckpt.broadcast((size_of(done[-1]), done[-1].name) if done else (None, None))
    stop = _Stop(root, staging, name, need, newest)
    if rank == 0:
        with stop:
            root.mkdir(parents=True, exist_ok=True)
            if staging.exists():                  # a crashed save's leftovers: never a checkpoint
                shutil.rmtree(staging)
            if need is not None and free_bytes(root) < need:
                raise OSError(errno.ENOSPC, "less free space than the newest checkpoint takes", str(root))
            staging.mkdir()
    stop.agree()
    with stop:
        faults.point("save.begin")
        engine.save(staging)
    if stop.error is not None:
        ckpt.barrier()   # DeepSpeed's save writes between two barriers: join the second, which the others wait in
    with stop:
        torch.save(rank_state, staging / f"trainer-rank-{rank}.pt")
        if rank == 0:
            torch.save(trainer_state, staging / "trainer.pt")
    stop.agree()
    faults.point("save.staged")
    names = ckpt.broadcast(ckpt.files_in(staging) if rank == 0 else None)
    mine: dict[str, Any] = {}
    with stop:   # fsync is where a file system that writes late (NFS, ext4) may first say it is full
        mine = {n: ckpt.digest(staging / n) for n in ckpt.my_share(names)}
    stop.agree()
    digests = {n: d for part in ckpt.gather(mine) for n, d in part.items()}
    if rank == 0:
        with stop:
            record = {"format": ckpt.FORMAT, "step": step, "files": {n: digests[n] for n in names}}
            atomic_write_bytes(staging / ckpt.RECORD, (json.dumps(record, indent=1, sort_keys=True) + "\n").encode())
            ckpt.fsync_dir(staging)
            faults.point("save.recorded")
            if final.exists():   # a checkpoint of this step from an earlier attempt: keep it, renamed, not deleted
                final.rename(ckpt.aside_name(final, ".superseded"))
            staging.rename(final)
    stop.agree()
    if rank == 0:
        ckpt.fsync_dir(root)
        faults.point("save.renamed")
        atomic_write_bytes(root / ckpt.LATEST, (name + "\n").encode())
        faults.point("save.pointed")
        for old in ckpt.list_checkpoints(root)[:-keep]:
            if protect is None or ckpt.step_of(old) != protect:
                shutil.rmtree(old, ignore_errors=True)
    ckpt.barrier()
    return final
