"""Where a command may write a folder of its own: never into a run, over a run, or over what it reads.

A **run folder** is what the trainer (pretrain/training/trainer.py) fills: ``checkpoints/`` with ``step-NNNNNN``
folders (or their ``.rejected`` / ``.superseded`` / ``.staging-`` siblings, and the ``latest`` pointer),
``metrics.jsonl``, ``run.lock`` (held while a launch trains there; left behind by one that was killed), or
``run.yaml`` (the config that ``python -m pretrain.import_hf`` writes beside its checkpoint). ``is_run`` is the one
test of it; commands that create or replace an output folder (``python -m pretrain.export``'s OUT_DIR, ``python -m
pretrain.import_hf``'s RUN_DIR) call ``check_place`` before any work, so that no such command can write into a run,
replace one, or replace the folder that holds the runs. Paths are compared after ``resolve()``, so a symbolic link
or ``..`` does not hide a run.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable, Optional

from conf.errors import ConfigError

CHECKPOINTS = "checkpoints"       # Trainer.ckpt_dir
METRICS = "metrics.jsonl"         # pretrain/training/metrics.py, MetricsLog
RUN_FILE = "run.yaml"             # pretrain/import_hf.py
RUN_LOCK = "run.lock"             # pretrain/training/runlock.py: the first file a launch writes there
LATEST = "latest"                 # pretrain/checkpoint/verify.py, LATEST
STEP_PREFIX = "step-"             # pretrain/checkpoint/verify.py, checkpoint_name()
# How far check_place looks below a folder for a run (runs/NAME, runs/studies/S/MODEL, runs/sweeps/S/POINT are
# within it) and how many entries it reads at most: the check runs before every export and must stay cheap.
_DEPTH, _BUDGET = 4, 20_000


def is_run(folder: Path) -> bool:
    """Whether ``folder`` is a run folder (see the module docstring)."""
    folder = Path(folder)
    if any((folder / name).is_file() for name in (METRICS, RUN_FILE, RUN_LOCK)):
        return True
    ckpts = folder / CHECKPOINTS
    if not ckpts.is_dir():
        return False
    if (ckpts / LATEST).is_file():
        return True
    try:
        with os.scandir(ckpts) as entries:
            return any(STEP_PREFIX in e.name and e.is_dir() for e in entries)
    except OSError:
        return False


def run_around(path: Path) -> Optional[Path]:
    """``path`` itself or the nearest folder above it that is a run folder (None: none is)."""
    path = Path(path).resolve()
    for folder in (path, *path.parents):
        if folder.is_dir() and is_run(folder):
            return folder
    return None


def run_below(folder: Path) -> Optional[Path]:
    """A run folder inside ``folder`` (not ``folder`` itself), looking ``_DEPTH`` levels down; None: none found."""
    level, seen = [Path(folder)], 0
    for _ in range(_DEPTH):
        below = []
        for parent in level:
            try:
                with os.scandir(parent) as entries:
                    dirs = [Path(e.path) for e in entries if e.is_dir(follow_symlinks=False)]
            except OSError:
                continue
            seen += len(dirs)
            for d in sorted(dirs):
                if is_run(d):
                    return d
            below += dirs
            if seen > _BUDGET:
                return None
        level = below
    return None


def check_place(out: Path, sources: Iterable[Path] = (), *, what: str = "OUT_DIR") -> None:
    """ConfigError (one line, nothing touched) unless ``out`` may hold a new folder of a command: ``out`` is not a
    file, does not overlap any of ``sources`` (the folders the command reads: the same, inside, or above one), is
    not a run folder or inside one, and holds no run folder. Whether a non-empty ``out`` may be replaced is the
    command's own rule (only what it wrote itself)."""
    given = Path(out)
    if given.exists() and not given.is_dir():
        raise ConfigError(f"{what} {given}: exists and is not a folder; give a new or empty folder")
    here = given.resolve()
    for source in sources:
        src = Path(source).resolve()
        if here == src:
            raise ConfigError(f"{what} {given}: is {source}, the folder being read; give another folder")
        if here in src.parents:
            raise ConfigError(f"{what} {given}: holds {source}, the folder being read; give a folder outside it")
        if src in here.parents:
            raise ConfigError(f"{what} {given}: is inside {source}, the folder being read; give a folder "
                              "outside it")
    run = run_around(here)
    if run == here:
        raise ConfigError(f"{what} {given}: is a run folder (it has {_evidence(run)}); nothing of a run is "
                          "replaced: give another folder")
    if run is not None:
        raise ConfigError(f"{what} {given}: is inside the run folder {run} (it has {_evidence(run)}); give a "
                          "folder outside every run")
    inner = run_below(here) if here.is_dir() else None
    if inner is not None:
        raise ConfigError(f"{what} {given}: holds the run folder {inner} (it has {_evidence(inner)}); give "
                          "another folder")


def _evidence(run: Path) -> str:
    found = [name for name in (METRICS, RUN_FILE, RUN_LOCK) if (run / name).is_file()]
    if (run / CHECKPOINTS).is_dir():
        found.insert(0, f"{CHECKPOINTS}/")
    return " and ".join(found) or "a run's files"
