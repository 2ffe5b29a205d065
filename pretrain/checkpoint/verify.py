"""Checkpoints that are complete, verified on load, and never lost to a bad file.

    RUN/checkpoints/step-000500/      one checkpoint: DeepSpeed's files from every rank, trainer.pt,
                                      trainer-rank-R.pt, and checkpoint.json (its record), written last
    RUN/checkpoints/latest            text file naming the newest checkpoint, replaced after the folder is in place
    RUN/checkpoints/step-000400.rejected   a checkpoint that failed its check on load: set aside, never deleted

Saving (collective; pretrain/checkpoint/save.py, which builds on this module). Every rank writes into
``.staging-step-N`` (DeepSpeed its model/optimizer shards, each rank ``trainer-rank-R.pt`` with its RNG and loader
state); rank 0 adds ``trainer.pt`` (step, tokens, config, tokenizer
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
reason) and set aside as ``step-N.rejected``. A missing file counts only when it is still missing on a second look
after ``SECOND_LOOK_S`` (shared file systems may show another node's file late). When none passes nothing is
renamed: the caller stops with one line, so a requeued job does not silently start over. Nothing else sets a
checkpoint aside: one that passed its check but does not load (``load_engine``) is a mismatch with the run or the
program, which the caller reports without renaming anything (pretrain/checkpoint/resume.py).

Without a record. Checkpoints written before records existed hold the same files, but their trainer.pt lacks the
keys that came in with records (``_RECORD_ERA_KEY``): they are checked by the CRC-32 of every member of their torch
zip files, and the resume says so. A folder whose trainer.pt has those keys but no record lost its record (this
code always writes one last): it fails its check like a missing file.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import re
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch
import torch.distributed as dist

from conf.errors import one_line
from conf.files import atomic_write_bytes
from pretrain.checkpoint import faults

LATEST = "latest"
RECORD = "checkpoint.json"
FORMAT = "mor-checkpoint/1"
REJECTED = ".rejected"
_NAME = re.compile(r"^step-(\d{6,})$")
# A missing file is looked for again after this many seconds before its checkpoint counts as damaged (_missing).
SECOND_LOOK_S = 2.0
# A key of trainer.pt since records exist (pretrain/training/trainer.py state()): a folder whose trainer.pt holds
# it but that has no record lost its record; one without it was saved before records existed.
_RECORD_ERA_KEY = "consecutive_skips"


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
def digest(path: Path, chunk: int = 1 << 22) -> dict[str, Any]:
    """Size and sha256 of a file; fsyncs it on the way, so what the record vouches for is on disk."""
    h, size = hashlib.sha256(), 0
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
            size += len(block)
        os.fsync(f.fileno())
    return {"bytes": size, "sha256": h.hexdigest()}


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def rank_and_size() -> tuple[int, int]:
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def broadcast(obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather(obj: Any) -> list[Any]:
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def my_share(names: list[str]) -> list[str]:
    rank, size = rank_and_size()
    return names[rank::size]


def files_in(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file() and p.name != RECORD)


# ---- saving: pretrain/checkpoint/save.py ------------------------------------------------------------------------
def aside_name(path: Path, suffix: str) -> Path:
    """A free name beside ``path`` with ``suffix`` (``.rejected``, ``.rejected-2``, ...)."""
    target, n = path.with_name(path.name + suffix), 1
    while target.exists():
        n += 1
        target = path.with_name(f"{path.name}{suffix}-{n}")
    return target


# ---- checking ---------------------------------------------------------------------------------------------------
def _missing(path: Path) -> bool:
    """Whether ``path`` is not a file, confirmed on a second look: on a shared file system whose metadata lags
    (NFS attribute caches), a file another node wrote may show up late, and a checkpoint is never set aside for
    that. The folder is listed again before the second look, which makes such clients revalidate it."""
    if path.is_file():
        return False
    time.sleep(SECOND_LOOK_S)
    with contextlib.suppress(OSError):
        os.listdir(path.parent)
    return not path.is_file()


def _written_with_record(folder: Path) -> bool:
    """Whether the trainer.pt of a folder without record was written by a version that writes records (then the
    record was lost: damage). The key below entered trainer.pt in the same change that introduced records. False
    too when trainer.pt cannot be read here: the folder is then checked as an older one, by the CRC check, and the
    load reports the rest."""
    try:
        with zipfile.ZipFile(folder / "trainer.pt") as z:
            if z.testzip() is not None:
                return False
        state = torch.load(folder / "trainer.pt", weights_only=False, map_location="cpu")
    except Exception:  # noqa: BLE001 - any unreadable file: decided by the checks after this one
        return False
    return isinstance(state, dict) and _RECORD_ERA_KEY in state


def _check_record(folder: Path) -> tuple[Optional[dict], Optional[str]]:
    """(record, None), (None, None) for an older checkpoint without one, or (None, reason)."""
    path = folder / RECORD
    if not path.is_file() and (folder / "trainer.pt").exists() and not _written_with_record(folder):
        return None, None              # saved before records existed
    if _missing(path):
        why = "" if not (folder / "trainer.pt").exists() else (
            ", though its trainer.pt was saved by a version that always writes one (the record was deleted or lost)")
        return None, f"{RECORD}: missing{why}"
    try:
        record = json.loads(path.read_bytes())
        files = record["files"]
        if record.get("format") != FORMAT or not isinstance(files, dict):
            raise ValueError(f"format {record.get('format')!r}")
    except (OSError, ValueError, KeyError, TypeError, UnicodeDecodeError) as e:
        return None, f"{RECORD}: unreadable ({one_line(e, 120)})"
    return record, None


def _check_file(folder: Path, name: str, expected: Optional[dict]) -> Optional[str]:
    """Why ``folder/name`` fails its check, or None. ``expected`` None: an older checkpoint's file (zip CRCs)."""
    path = folder / name
    if _missing(path):
        return f"{name}: missing (also on a second look after {SECOND_LOOK_S:g} s)"
    if expected is not None:
        size = path.stat().st_size
        if size != expected["bytes"]:
            return f"{name}: {size} bytes, the record says {expected['bytes']} (truncated or replaced)"
        if digest(path)["sha256"] != expected["sha256"]:
            return f"{name}: sha256 differs from the record (the file changed after it was saved)"
        return None
    if not name.endswith(".pt"):
        return None
    try:
        with zipfile.ZipFile(path) as z:
            bad = z.testzip()
    except (OSError, zipfile.BadZipFile, EOFError) as e:
        return f"{name}: not a readable torch file ({one_line(e, 120, name=False)})"
    return f"{name}: member {bad} fails its CRC-32 check (corrupt)" if bad else None


def verify(folder: Path) -> Optional[str]:
    """Collective. Why ``folder`` fails its check (the same on every rank), or None when it passes."""
    rank, _ = rank_and_size()
    record, why = _check_record(folder) if rank == 0 else (None, None)
    record, why = broadcast((record, why))
    if why:
        return why
    if record is not None:
        expected: dict[str, Optional[dict]] = record["files"]
        names = sorted(expected)
    else:   # an older checkpoint: every file in it, checked by its zip CRCs
        names = broadcast(files_in(folder) if rank == 0 else None)
        expected = {n: None for n in names}
    faults.point("resume.verify")
    mine = [w for n in my_share(names) if (w := _check_file(folder, n, expected[n]))]
    problems = sorted(w for part in gather(mine) for w in part)
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
    rank, _ = rank_and_size()
    if rank == 0:
        _, note = _read_pointer(root)
        candidates = [str(p) for p in reversed(list_checkpoints(root))]
        state = (candidates, [note] if note else [])
    res_candidates, notes = broadcast(state if rank == 0 else None)
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
    barrier()
    return res


def reject(path: Path, why: str, log: Callable[[str], None], *, fallback: Optional[Path]) -> Path:
    """Collective: rank 0 renames a failed checkpoint aside and every rank knows the new name."""
    rank, _ = rank_and_size()
    aside = aside_name(path, REJECTED) if rank == 0 else None
    if rank == 0:
        path.rename(aside)
        then = f"falling back to {fallback.name}" if fallback is not None else "no checkpoint left to fall back to"
        log(f"checkpoint: {path}/{why}; set aside as {aside.name}, {then}")
    return Path(broadcast(str(aside) if aside is not None else None))


# ---- loading ----------------------------------------------------------------------------------------------------
def read_trainer_state(path: Path) -> dict[str, Any]:
    """The run-level state (step, config, ...) of a verified checkpoint, without touching the engine."""
    return torch.load(path / "trainer.pt", weights_only=False)


def agree(why: Optional[str]) -> Optional[str]:
    """Collective: the first rank's problem (one line) when any rank has one, the same on every rank; None when
    none has. For steps where one rank may fail alone, so that every rank stops together."""
    return next((w for w in gather(why) if w), None)


def load_engine(engine, path: Path) -> None:
    """Collective. Restores the engine (model, optimizer) from DeepSpeed's files in ``path`` (its ``engine/``
    folder, or each stage's). Raises CheckpointError (one line naming the files and the exception, the same on
    every rank) when any rank cannot read its part: for a checkpoint that passed ``verify``, a mismatch with this
    run or program, not damage."""
    why = None
    try:
        faults.point("resume.load")
        engine.load(path)
    except Exception as e:  # noqa: BLE001 - any failure to read is reported the same way, on every rank
        why = f"engine/ (DeepSpeed's model and optimizer files): {one_line(e)}"
    why = agree(why)
    if why:
        raise CheckpointError(why)

