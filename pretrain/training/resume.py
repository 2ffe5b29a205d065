"""Resuming a run: pick the checkpoint (verified, with fallback), check it belongs to this run, then load it.

Order matters: the checkpoint is checked against its record first (pretrain/training/checkpoint.py), then its config and
tokenizer are compared with this run's — before any state is loaded, so a changed shape is one line listing the
keys, not a page of size mismatches — and only then are the engine, RNG and data position restored.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

from conf import config_to_dict
from conf.errors import ConfigError
from pretrain.training import checkpoint as ckpt

# Keys that may change between a checkpoint and the run resuming it; any other difference is an error.
_RESUME_FREE = ("name", "out_dir", "train.", "checkpoint.", "logging.", "on_nonfinite", "max_consecutive_skips",
                "schedule.", "optim.lr", "data.num_workers", "data.path")


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def config_mismatch(saved: dict, current: dict) -> list[str]:
    a, b = _flatten(saved), _flatten(current)
    keys = sorted(set(a) | set(b))
    return [k for k in keys if a.get(k) != b.get(k) and not k.startswith(_RESUME_FREE)]


def _check_belongs(trainer, path: Path, state: dict) -> None:
    """ConfigError unless the checkpoint at ``path`` was saved by this run's config, data and world size."""
    diff = config_mismatch(state["config"], config_to_dict(trainer.cfg))
    if diff:
        raise ConfigError(f"checkpoint.resume: {path} was saved with a different config in {', '.join(diff)}; "
                          "restore those keys or start a new run (checkpoint.resume=none, another name)")
    if state["tokenizer_sha256"] != trainer.manifest.tokenizer.get("sha256"):
        raise ConfigError(f"data.path: tokenized with another tokenizer than the checkpoint {path}")
    saved_world = state.get("world_size")
    if saved_world is not None and saved_world != trainer.layout.world:
        raise ConfigError(f"checkpoint.resume: {path} was saved by {saved_world} process(es), this run has "
                          f"{trainer.layout.world}; resume with {saved_world} (a checkpoint cannot change layout yet)")


def _pick(trainer) -> Optional[Path]:
    """The checkpoint to resume from (collective): the verified newest one, an explicit folder, or None."""
    mode = trainer.cfg.checkpoint.resume
    if mode == "none":
        return None
    if mode != "auto":
        path = Path(mode)
        if path not in ckpt.list_checkpoints(path.parent):
            raise ConfigError(f"checkpoint.resume: {path} is not a complete checkpoint (a step-NNNNNN folder with "
                              f"its {ckpt.RECORD})")
        why = ckpt.verify(path)
        if why:
            raise ConfigError(f"checkpoint.resume: {path}/{why}; nothing was changed there")
        return path
    try:
        return ckpt.resolve(trainer.ckpt_dir, trainer.print).path
    except ckpt.CheckpointError as e:
        raise ConfigError(str(e)) from None


def resume(trainer) -> Optional[Path]:
    """Collective. Restores ``trainer`` from its checkpoint, if any; returns the folder it resumed from."""
    while True:
        path = _pick(trainer)
        if path is None:
            return None
        state = ckpt.read_trainer_state(path)
        _check_belongs(trainer, path, state)
        try:
            rank_state = ckpt.load_engine(trainer.engine, path)
        except ckpt.CheckpointError as e:
            older = [p for p in ckpt.list_checkpoints(path.parent) if ckpt.step_of(p) < ckpt.step_of(path)]
            if trainer.cfg.checkpoint.resume != "auto" or not older:
                raise ConfigError(f"checkpoint.resume: {path} {e}; nothing was changed there") from None
            ckpt.reject(path, str(e), trainer.print, fallback=older[-1])
            continue   # the next one is loaded over whatever this one left behind
        trainer.load_state(state)
        try:
            trainer.loader.load_state_dict(rank_state["loader"])
        except ValueError as e:
            raise ConfigError(f"checkpoint.resume: {path}: {e}") from None
        ckpt.set_rng_state(rank_state["rng"])
        if trainer.is_main:
            trainer.print(f"resumed from {path} at step {trainer.step}")
        return path
