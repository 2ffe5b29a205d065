"""Checkpoints that are either complete or absent.

    RUN/checkpoints/step-000500/      one complete checkpoint: DeepSpeed's files from every rank + trainer.pt
    RUN/checkpoints/latest            text file naming the newest complete checkpoint, replaced last

Every rank writes into ``.staging-step-N`` (DeepSpeed writes its own model/optimizer shards there, each rank
adds ``trainer-rank-R.pt`` with its RNG and loader state); after a barrier rank 0 writes ``trainer.pt`` (step,
tokens, config, tokenizer checksum), renames the staging folder into place, then atomically replaces ``latest``,
then prunes all but the newest ``keep``. A crash at any point leaves the previous ``latest`` valid; a leftover
staging folder is ignored and cleared on the next save.
"""
from __future__ import annotations

import random
import re
import shutil
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
import torch.distributed as dist

from data_prep.shards import atomic_write_bytes

LATEST = "latest"
_NAME = re.compile(r"^step-(\d{6,})$")


def checkpoint_name(step: int) -> str:
    return f"step-{step:06d}"


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
    """Complete checkpoints under ``root``, oldest first."""
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and _NAME.match(p.name) and (p / "trainer.pt").exists()]
    return sorted(found, key=lambda p: int(_NAME.match(p.name).group(1)))


def latest_checkpoint(root: Path) -> Optional[Path]:
    pointer = root / LATEST
    if pointer.exists():
        path = root / pointer.read_text().strip()
        if (path / "trainer.pt").exists():
            return path
    done = list_checkpoints(root)  # the pointer is missing or stale: fall back to the newest complete one
    return done[-1] if done else None


def save(engine, root: Path, step: int, trainer_state: dict[str, Any], rank_state: dict[str, Any], *,
         keep: int, rank: int) -> Path:
    """Collective: every rank calls it at the same step."""
    name = checkpoint_name(step)
    final, staging = root / name, root / f".staging-{name}"
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        if staging.exists():
            shutil.rmtree(staging)
        staging.mkdir()
    dist.barrier()
    engine.save_checkpoint(str(staging), tag="engine", save_latest=False)
    torch.save(rank_state, staging / f"trainer-rank-{dist.get_rank()}.pt")
    dist.barrier()
    if rank == 0:
        torch.save(trainer_state, staging / "trainer.pt")
        if final.exists():  # a checkpoint of this very step exists (e.g. a rerun): keep the new, complete one
            shutil.rmtree(final)
        staging.rename(final)
        atomic_write_bytes(root / LATEST, (name + "\n").encode())
        for old in list_checkpoints(root)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    dist.barrier()
    return final


def load(engine, path: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """Collective. Restores the engine (model, optimizer) and returns (trainer state, this rank's state)."""
    engine.load_checkpoint(str(path), tag="engine", load_module_strict=True, load_optimizer_states=True,
                           load_lr_scheduler_states=False)
    trainer_state = torch.load(path / "trainer.pt", weights_only=False)
    rank_file = path / f"trainer-rank-{dist.get_rank()}.pt"
    if not rank_file.exists():
        raise ValueError(f"{path}: no state for rank {dist.get_rank()}; it was saved with a different world size")
    return trainer_state, torch.load(rank_file, weights_only=False)
