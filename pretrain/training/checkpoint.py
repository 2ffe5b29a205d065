"""Checkpoints that are complete, verified on load, and never lost to a bad file.

    RUN/checkpoints/step-000500/      one checkpoint: DeepSpeed's files from every rank, trainer.pt,
                                      trainer-rank-R.pt, and checkpoint.json (its record), written last
    RUN/checkpoints/latest            text file naming the newest checkpoint, replaced after the folder is in place
    RUN/checkpoints/step-000400.rejected   a checkpoint that failed its check on load: set aside, never deleted

Saving (collective). Every rank writes into ``.staging-step-N`` (DeepSpeed its model/optimizer shards, each rank
``trainer-rank-R.pt`` with its RNG and loader state); rank 0 adds ``trainer.pt`` (step, tokens, config, tokenizer
checksum). Then the ranks hash the files between them (size + sha256, each file fsynced as it is read) and rank 0
writes the record ``checkpoint.json`` listing every file, renames the staging folder into place, atomically
replaces ``latest`` and prunes all but the newest ``keep`` (and the one checkpoint the trainer asks to protect). A
crash at any point leaves the earlier checkpoints valid; a folder without a record is never loaded; a leftover
staging folder is cleared on the next save. The files must be on a file system every rank sees, as for any
multi-node checkpoint.

Loading (collective, ``resolve``). Candidates are the step folders newest first (``latest`` only names one of
them; a pointer to a missing folder or an unreadable pointer is reported and passed over). Each candidate is
checked against its record — every listed file present, of its size and sha256, each rank hashing a share — and the
first that passes is used by every rank alike. Newer ones that failed are reported in one line each (file and
reason) and set aside as ``step-N.rejected``. When none passes nothing is renamed: the caller stops with one line,
so a requeued job does not silently start over. Checkpoints written before records existed are checked by the
CRC-32 of every member of their torch zip files.
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch
import torch.distributed as dist

from conf.files import atomic_write_bytes
from pretrain.training import faults

LATEST = "latest"
RECORD = "checkpoint.json"
FORMAT = "mor-checkpoint/1"
REJECTED = ".rejected"
_NAME = re.compile(r"^step-(\d{6,})$")


class CheckpointError(Exception):
    """A checkpoint that cannot be used; the message is one line naming the file and the reason."""


def checkpoint_name(step: int) -> str:
    return f"step-{step:06d}"


def step_of(path: Path) -> int:
    return int(_NAME.match(path.name).group(1))


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def list_checkpoints(root: Path) -> list[Path]:
    """Checkpoint folders under ``root`` that were completed (a record, or an older checkpoint's trainer.pt),
    oldest first. Completed is not verified: see ``resolve``."""
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and _NAME.match(p.name)
             and ((p / RECORD).exists() or (p / "trainer.pt").exists())]
    return sorted(found, key=step_of)


# ---- hashing, shared between ranks -----------------------------------------------------------------------------
def _digest(path: Path, chunk: int = 1 << 22) -> dict[str, Any]:
    """Size and sha256 of a file; fsyncs it on the way, so what the record vouches for is on disk."""
    h, size = hashlib.sha256(), 0
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
            size += len(block)
        os.fsync(f.fileno())
    return {"bytes": size, "sha256": h.hexdigest()}


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _world() -> tuple[int, int]:
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _broadcast(obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _gather(obj: Any) -> list[Any]:
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def _barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def _my_share(names: list[str]) -> list[str]:
    rank, world = _world()
    return names[rank::world]


def _files(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file() and p.name != RECORD)


# ---- saving ----------------------------------------------------------------------------------------------------
def save(engine, root: Path, step: int, trainer_state: dict[str, Any], rank_state: dict[str, Any], *,
         keep: int, protect: Optional[int] = None) -> Path:
    """Collective: every rank calls it at the same step. ``protect``: a step whose checkpoint pruning keeps."""
    rank, _ = _world()
    name = checkpoint_name(step)
    final, staging = root / name, root / f".staging-{name}"
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        if staging.exists():                  # a crashed save's leftovers: never a checkpoint
            shutil.rmtree(staging)
        staging.mkdir()
    _barrier()
    engine.save(staging)
    torch.save(rank_state, staging / f"trainer-rank-{rank}.pt")
    if rank == 0:
        torch.save(trainer_state, staging / "trainer.pt")
    _barrier()
    faults.point("save.staged")
    names = _broadcast(_files(staging) if rank == 0 else None)
    digests = {n: d for part in _gather({n: _digest(staging / n) for n in _my_share(names)}) for n, d in part.items()}
    if rank == 0:
        record = {"format": FORMAT, "step": step, "files": {n: digests[n] for n in names}}
        atomic_write_bytes(staging / RECORD, (json.dumps(record, indent=1, sort_keys=True) + "\n").encode())
        _fsync_dir(staging)
        faults.point("save.recorded")
        if final.exists():   # a checkpoint of this step from an earlier attempt: keep it, renamed, not deleted
            final.rename(_aside(final, ".superseded"))
        staging.rename(final)
        _fsync_dir(root)
        faults.point("save.renamed")
        atomic_write_bytes(root / LATEST, (name + "\n").encode())
        faults.point("save.pointed")
        done = list_checkpoints(root)
        for old in done[:-keep]:
            if protect is None or step_of(old) != protect:
                shutil.rmtree(old, ignore_errors=True)
    _barrier()
    return final


def _aside(path: Path, suffix: str) -> Path:
    """A free name beside ``path`` with ``suffix`` (``.rejected``, ``.rejected-2``, ...)."""
    target, n = path.with_name(path.name + suffix), 1
    while target.exists():
        n += 1
        target = path.with_name(f"{path.name}{suffix}-{n}")
    return target


# ---- checking ---------------------------------------------------------------------------------------------------
def _check_record(folder: Path) -> tuple[Optional[dict], Optional[str]]:
    """(record, None), (None, None) for an older checkpoint without one, or (None, reason)."""
    path = folder / RECORD
    if not path.exists():
        return (None, None) if (folder / "trainer.pt").exists() else (None, f"{RECORD}: missing")
    try:
        record = json.loads(path.read_bytes())
        files = record["files"]
        if record.get("format") != FORMAT or not isinstance(files, dict):
            raise ValueError(f"format {record.get('format')!r}")
    except (OSError, ValueError, KeyError, TypeError, UnicodeDecodeError) as e:
        return None, f"{RECORD}: unreadable ({type(e).__name__}: {' '.join(str(e).split())[:120]})"
    return record, None


def _check_file(folder: Path, name: str, expected: Optional[dict]) -> Optional[str]:
    """Why ``folder/name`` fails its check, or None. ``expected`` None: an older checkpoint's file (zip CRCs)."""
    path = folder / name
    if not path.is_file():
        return f"{name}: missing"
    if expected is not None:
        size = path.stat().st_size
        if size != expected["bytes"]:
            return f"{name}: {size} bytes, the record says {expected['bytes']} (truncated or replaced)"
        if _digest(path)["sha256"] != expected["sha256"]:
            return f"{name}: sha256 differs from the record (the file changed after it was saved)"
        return None
    if not name.endswith(".pt"):
        return None
    try:
        with zipfile.ZipFile(path) as z:
            bad = z.testzip()
    except (OSError, zipfile.BadZipFile, EOFError) as e:
        return f"{name}: not a readable torch file ({' '.join(str(e).split())[:120]})"
    return f"{name}: member {bad} fails its CRC-32 check (corrupt)" if bad else None


def verify(folder: Path) -> Optional[str]:
    """Collective. Why ``folder`` fails its check (the same on every rank), or None when it passes."""
    rank, _ = _world()
    record, why = _check_record(folder) if rank == 0 else (None, None)
    record, why = _broadcast((record, why))
    if why:
        return why
    if record is not None:
        expected: dict[str, Optional[dict]] = record["files"]
        names = sorted(expected)
    else:   # an older checkpoint: every file in it, checked by its zip CRCs
        names = _broadcast(_files(folder) if rank == 0 else None)
        expected = {n: None for n in names}
    faults.point("resume.verify")
    mine = [w for n in _my_share(names) if (w := _check_file(folder, n, expected[n]))]
    problems = sorted(w for part in _gather(mine) for w in part)
    return problems[0] if problems else None


@dataclass
class Resolution:
    """What ``resolve`` found: the checkpoint to load (None: start afresh), and what was said on the way."""
    path: Optional[Path]
    notes: list[str] = field(default_factory=list)
    rejected: list[tuple[Path, str]] = field(default_factory=list)   # (folder, reason), newest first


def _read_pointer(root: Path) -> tuple[Optional[str], Optional[str]]:
    """(folder name in ``latest``, None) or (None, a note when the pointer is unusable)."""
    pointer = root / LATEST
    if not pointer.exists():
        return None, None
    try:
        name = pointer.read_bytes().decode("utf-8").strip()
    except (OSError, UnicodeDecodeError):
        return None, f"{pointer}: unreadable (not UTF-8); passing over it"
    if not _NAME.match(name):
        return None, f"{pointer}: {name[:40]!r} is not a checkpoint name; passing over it"
    if not (root / name).is_dir():
        return None, f"{pointer}: names {name}, which is missing; using the newest checkpoint there is"
    return name, None


def resolve(root: Path, log: Callable[[str], None]) -> Resolution:
    """Collective. The newest checkpoint under ``root`` that passes ``verify``; newer ones that fail are set
    aside (renamed) once one passes. Raises CheckpointError (one line) when checkpoints exist and none passes."""
    rank, _ = _world()
    if rank == 0:
        _, note = _read_pointer(root)
        candidates = [str(p) for p in reversed(list_checkpoints(root))]
        state = (candidates, [note] if note else [])
    res_candidates, notes = _broadcast(state if rank == 0 else None)
    res = Resolution(None, notes)
    for path in map(Path, res_candidates):
        why = verify(path)
        if why is None:
            res.path = path
            break
        res.rejected.append((path, why))
    if res.path is None and res.rejected:
        newest, why = res.rejected[0]
        raise CheckpointError(
            f"checkpoint.resume: no usable checkpoint in {root}: {newest.name}/{why}"
            + (f" (and {len(res.rejected) - 1} older ones fail too)" if len(res.rejected) > 1 else "")
            + "; nothing was changed there: restore the file, or start afresh with checkpoint.resume=none or "
              "another name")
    if rank == 0:
        for note in res.notes:
            log(f"checkpoint: {note}")
    for path, why in res.rejected:
        aside = reject(path, why, log, fallback=res.path)
        res.notes.append(f"{path.name} set aside as {aside.name}")
    if rank == 0 and res.path is not None and _read_pointer(root)[0] != res.path.name:
        atomic_write_bytes(root / LATEST, (res.path.name + "\n").encode())
    _barrier()
    return res


def reject(path: Path, why: str, log: Callable[[str], None], *, fallback: Optional[Path]) -> Path:
    """Collective: rank 0 renames a failed checkpoint aside and every rank knows the new name."""
    rank, _ = _world()
    aside = _aside(path, REJECTED) if rank == 0 else None
    if rank == 0:
        path.rename(aside)
        then = f"falling back to {fallback.name}" if fallback is not None else "no checkpoint left to fall back to"
        log(f"checkpoint: {path}/{why}; set aside as {aside.name}, {then}")
    return Path(_broadcast(str(aside) if aside is not None else None))


# ---- loading ----------------------------------------------------------------------------------------------------
def read_trainer_state(path: Path) -> dict[str, Any]:
    """The run-level state (step, config, ...) of a verified checkpoint, without touching the engine."""
    return torch.load(path / "trainer.pt", weights_only=False)


def load_engine(engine, path: Path) -> dict[str, Any]:
    """Collective. Restores the engine (model, optimizer) and returns this rank's state. Raises CheckpointError
    (the same on every rank) when any rank cannot read its part."""
    rank, _ = _world()
    rank_file = path / f"trainer-rank-{rank}.pt"
    why, rank_state = None, None
    try:
        faults.point("resume.load")
        engine.load(path)
        rank_state = torch.load(rank_file, weights_only=False)
    except Exception as e:  # noqa: BLE001 - any failure to read is reported the same way, on every rank
        why = f"{e.__class__.__name__}: {' '.join(str(e).split())[:160]}"
    whys = [w for w in _gather(why) if w]
    if whys:
        raise CheckpointError(f"cannot be read ({whys[0]})")
    return rank_state
