"""Resuming a run: pick the checkpoint (verified, with fallback), check it belongs to this run, then load it.

Order matters: the checkpoint is checked against its record first (pretrain/training/checkpoint.py), then its config and
tokenizer are compared with this run's — before any state is loaded, so a changed shape is one line listing the
keys, not a page of size mismatches — and only then are the engine, RNG and data position restored.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch

from conf import config_to_dict
from conf.errors import ConfigError
from pretrain.training import checkpoint as ckpt

# Keys that may change between a checkpoint and the run resuming it; any other difference is an error. The
# layout keys (LAYOUT) may change too: the checkpoint is then re-sharded (pretrain/training/reshard.py).
_RESUME_FREE = ("name", "out_dir", "train.", "checkpoint.", "logging.", "on_nonfinite", "max_consecutive_skips",
                "schedule.", "optim.lr", "data.num_workers", "data.readers", "data.path", "eval.",
                "model.loss_chunk", "model.attention_backend")
# Keys added after checkpoints were first written, with the value every older run had.
_ADDED = {"model.tc_capacity": 0.0}
LAYOUT = ("parallel.tensor_parallel", "parallel.pipeline_parallel", "parallel.zero_stage",
          "parallel.sequence_parallel")


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def config_mismatch(saved: dict, current: dict) -> list[str]:
    a, b = {**_ADDED, **_flatten(saved)}, _flatten(current)
    keys = sorted(set(a) | set(b))
    return [k for k in keys if a.get(k) != b.get(k) and not k.startswith(_RESUME_FREE) and k not in LAYOUT]


def _layout_of(parallel: dict, world: int) -> tuple[int, int, int, int]:
    tp, pp = parallel.get("tensor_parallel", 1), parallel.get("pipeline_parallel", 1)
    return tp, pp, world // (tp * pp), parallel.get("zero_stage", 0)


def _describe(layout: tuple[int, int, int, int]) -> str:
    return "TP={} PP={} DP={} ZeRO-{}".format(*layout)


def _check_belongs(trainer, path: Path, state: dict) -> None:
    """ConfigError unless the checkpoint at ``path`` was saved by this run's config, data and world size."""
    diff = config_mismatch(state["config"], config_to_dict(trainer.cfg))
    if diff:
        raise ConfigError(f"checkpoint.resume: {path} was saved with a different config in {', '.join(diff)}; "
                          "restore those keys or start a new run (checkpoint.resume=none, another name)")
    if state["tokenizer_sha256"] != trainer.manifest.tokenizer.get("sha256"):
        raise ConfigError(f"data.path: tokenized with another tokenizer than the checkpoint {path}")



def _layout_change(trainer, path: Path, state: dict) -> bool:
    """Whether the checkpoint was saved under another layout than this run's (ConfigError where that change
    cannot be resumed yet)."""
    saved_world = state.get("world_size") or trainer.layout.world
    old = _layout_of(state["config"]["parallel"], saved_world)
    new = _layout_of(config_to_dict(trainer.cfg)["parallel"], trainer.layout.world)
    return old != new


def _load_resharded(trainer, path: Path, state: dict) -> dict:
    """Collective: the checkpoint saved under another layout, re-sharded into this run's engine; returns the rank
    state (data position, RNG) of a saving rank with this rank's data-parallel index."""
    from megatron.core import parallel_state as ps

    from pretrain.training.consolidate import read_run
    from pretrain.training.reshard import load_training_state, read_training_state
    try:
        saved_run, _ = read_run(path)
        training = read_training_state(path, saved_run)
        load_training_state(trainer.engine, training, ps.get_tensor_model_parallel_rank(), trainer.layout.tp)
    except ckpt.CheckpointError as e:
        raise ConfigError(f"checkpoint.resume: {e}") from None
    # Any saving rank's data position will do (taken at an optimizer step, every rank's is the same count of
    # global micro-batches); one of this data-parallel index where there is one, so that an unchanged DP size
    # continues each rank's own stream (pretrain/data/loader.py: load_state_dict).
    dp_rank = ps.get_data_parallel_rank()
    files = sorted(path.glob("trainer-rank-*.pt"), key=lambda p: int(p.stem.rsplit("-", 1)[1]))
    states = [torch.load(f, weights_only=False) for f in files]
    if not states:
        raise ConfigError(f"checkpoint.resume: {path} has no trainer-rank-*.pt (data position)")
    rank_state = next((s for s in states if s["loader"].get("dp_rank") == dp_rank), states[0])
    if trainer.is_main:
        old = _layout_of(state["config"]["parallel"], state.get("world_size") or 1)
        new = _layout_of(config_to_dict(trainer.cfg)["parallel"], trainer.layout.world)
        trainer.print(f"checkpoint: {path} was saved under {_describe(old)}; re-sharded for {_describe(new)}")
    return rank_state


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
        if _layout_change(trainer, path, state):
            rank_state = _load_resharded(trainer, path, state)
            trainer.load_state(state)
            _restore(trainer, path, rank_state)
            return path
        try:
            rank_state = ckpt.load_engine(trainer.engine, path)
        except ckpt.CheckpointError as e:
            older = [p for p in ckpt.list_checkpoints(path.parent) if ckpt.step_of(p) < ckpt.step_of(path)]
            if trainer.cfg.checkpoint.resume != "auto" or not older:
                raise ConfigError(f"checkpoint.resume: {path} {e}; nothing was changed there") from None
            ckpt.reject(path, str(e), trainer.print, fallback=older[-1])
            continue   # the next one is loaded over whatever this one left behind
        trainer.load_state(state)
        _restore(trainer, path, rank_state)
        return path


def _restore(trainer, path: Path, rank_state: dict) -> None:
    """The data position and the RNG of ``rank_state``. With data.readers unset the run reads with the
    checkpoint's number of readers, so that another DP size or worker count continues the same data order."""
    saved = rank_state["loader"]
    readers = saved.get("readers", saved["dp_size"] * max(1, saved["num_workers"]))
    if not trainer.cfg.data.readers and trainer.loader.readers != readers:
        from megatron.core import parallel_state as ps

        from pretrain.data.loader import split_loader
        try:
            trainer.loader = split_loader(trainer.cfg, "train", dp_rank=ps.get_data_parallel_rank(),
                                          dp_size=trainer.layout.dp, readers=readers)
        except ConfigError:
            raise ConfigError(f"checkpoint.resume: {path}: its data position is in {readers} readers, which "
                              f"{trainer.layout.dp} data-parallel rank(s) × {max(1, trainer.cfg.data.num_workers)} "
                              f"worker(s) cannot share; set data.num_workers so that DP × workers divides "
                              f"{readers}") from None
    try:
        trainer.loader.load_state_dict(rank_state["loader"])
    except ValueError as e:
        raise ConfigError(f"checkpoint.resume: {path}: {e}") from None
    ckpt.set_rng_state(rank_state["rng"])
    if trainer.is_main:
        trainer.print(f"resumed from {path} at step {trainer.step}")
