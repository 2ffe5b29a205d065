"""Resuming a run (the read side of pretrain/checkpoint/checkpointer.py): pick the checkpoint (verified, with
fallback), check it belongs to this run, then load it.

Order matters. The checkpoint is checked against its record first (pretrain/checkpoint/verify.py): only a
failed integrity check — a file of another size or sha256, a missing file — sets a checkpoint aside. Then, before
any state is loaded, everything this run could disagree with is checked, each a one-line error: the config
(every key classified in pretrain/checkpoint/config_keys.py), the tokenizer, the effective global batch and the data
position (the loader is rebuilt and positioned here). Only then are the engine, RNG and step restored. A checkpoint
that passed its check but cannot be loaded is a mismatch with this run or program, not damage: one line naming
the file and the exception, nothing renamed (exit 2).

A changed layout or compute precision (fp32 ↔ bf16, also ``auto`` resolving differently on another device) goes
through pretrain/checkpoint/reshard.py: the checkpoint's training state made layout-free — fp32 master weights,
Adam moments and step per parameter — and written into this run's engine. DeepSpeed's own loader cannot do it
(its bf16 and fp32 optimizers save different state: ``KeyError: 'dynamic_loss_scale'``), and refusing would
strand a run that moves between a GPU (bf16 under ``auto``) and a CPU.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch

from conf import config_to_dict
from conf.errors import ConfigError, one_line
from pretrain.checkpoint import verify as ckpt
from pretrain.checkpoint.config_keys import ADDED, MATCH, kind
from pretrain.checkpoint.state import TrainerState


@dataclass
class Resumed:
    path: Path             # the checkpoint folder
    state: TrainerState    # its run-level record
    loader: Any            # the training loader at its data position (another one where the readers changed)


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def config_mismatch(saved: dict, current: dict) -> list[str]:
    """The keys that must match (config_keys.MATCH, or unknown) and differ between two configs, sorted."""
    a, b = {**ADDED, **_flatten(saved)}, _flatten(current)
    return [k for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k) and kind(k) == MATCH]


def _layout_of(parallel: dict, world: int) -> tuple[int, int, int, int]:
    tp, pp = parallel.get("tensor_parallel", 1), parallel.get("pipeline_parallel", 1)
    return tp, pp, world // (tp * pp), parallel.get("zero_stage", 0)


def _describe(layout: tuple[int, int, int, int], bf16: bool) -> str:
    return "TP={} PP={} DP={} ZeRO-{}".format(*layout) + (", bf16" if bf16 else ", fp32")


def _check_belongs(ck, path: Path, state: dict) -> None:
    """ConfigError unless the checkpoint at ``path`` was saved by this run's config and tokenizer."""
    saved, now = {**ADDED, **_flatten(state["config"])}, _flatten(config_to_dict(ck.cfg))
    diff = config_mismatch(state["config"], config_to_dict(ck.cfg))
    if diff:
        shown = ", ".join(f"{k} (saved {saved.get(k, '-')!r}, now {now.get(k, '-')!r})" for k in diff[:6])
        raise ConfigError(f"checkpoint.resume: {path} was saved with a different config in {shown}"
                          + (f" and {len(diff) - 6} more" if len(diff) > 6 else "")
                          + "; restore those keys or start a new run (checkpoint.resume=none, another name)")
    if state["tokenizer_sha256"] != ck.tokenizer_sha256:
        raise ConfigError(f"data.path: tokenized with another tokenizer than the checkpoint {path}")


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def batch_change(saved: dict, saved_dp: int, micro: int, global_batch: Optional[int], dp: int
                 ) -> tuple[int, int, Optional[str]]:
    """(the checkpoint's sequences per optimizer step, this run's, why this run may not continue with its own).
    ``saved``: the checkpoint's ``parallel`` config; the rest is this run's. A different batch is refused unless
    parallel.global_batch_size is set: unset, it follows the data-parallel size, and a run resumed on more ranks
    would silently take larger steps."""
    saved_micro = saved.get("micro_batch_size", 1)
    old = saved.get("global_batch_size") or saved_micro * saved_dp
    new = global_batch or micro * dp
    if old == new or global_batch is not None:
        return old, new, None
    how_old = (f"parallel.global_batch_size={old}" if saved.get("global_batch_size")
               else f"micro_batch_size {saved_micro} × DP {saved_dp}, global_batch_size unset")
    why = (f"was trained with {old} sequences per optimizer step ({how_old}); this run would take {new} "
           f"(micro_batch_size {micro} × DP {dp}, global_batch_size unset). ")
    if old % (micro * dp) == 0:
        why += (f"Set parallel.global_batch_size={old} to continue exactly, or parallel.global_batch_size={new} to "
                "accept the change")
    else:
        fits = _divisors(old // micro) if old % micro == 0 else []
        why += (f"{old} is not a multiple of micro_batch_size × DP = {micro * dp}, so this layout cannot continue it "
                "exactly" + (f" (data-parallel sizes that can: {', '.join(map(str, fits))})" if fits else "")
                + f"; set parallel.global_batch_size={new} to accept the change")
    return old, new, why


def data_position_problem(readers: int, set_readers: int, dp: int, num_workers: int) -> Optional[str]:
    """Why a data position saved over ``readers`` readers cannot continue under ``dp`` ranks × ``num_workers``
    workers with data.readers=``set_readers`` (0: unset), or None. The data order is fixed by the number of readers
    (pretrain/data/loader.py); a position moves between layouts only over the same readers, each rank's workers
    sharing its readers evenly."""
    if set_readers and set_readers != readers:
        return (f"data.readers: the checkpoint's data position is in {readers} readers and this run sets "
                f"data.readers={set_readers}; the data order depends on it, so the position cannot be carried "
                f"over: set data.readers={readers}, or leave it unset to adopt it")
    workers = max(1, num_workers)
    if readers % (dp * workers) == 0:
        return None
    why = (f"its data position is in {readers} reader{'s' * (readers != 1)}, which {dp} data-parallel rank(s) × "
           f"{workers} worker(s) cannot share (DP × max(1, data.num_workers) must divide {readers}); ")
    if readers % dp == 0:   # worker counts w with DP × w dividing the readers (0 reads like 1)
        counts = [0, *_divisors(readers // dp)[1:]]
        return why + "set data.num_workers to " + " or ".join(map(str, counts))
    return why + (f"its data order cannot be spread over {dp} ranks: resume it under a data-parallel size (world "
                  f"size / (TP × PP)) that divides {readers}: {', '.join(map(str, _divisors(readers)))} (a run meant "
                  "to move between DP sizes starts with data.readers set to a multiple of each)")


def _check_batch(ck, path: Path, state: dict) -> Optional[str]:
    """ConfigError for a changed effective batch that was not asked for; a note to print for one that was."""
    saved = state["config"]["parallel"]
    saved_world = state.get("world_size") or ck.layout.world
    saved_dp = _layout_of(saved, saved_world)[2]
    p = ck.cfg.parallel
    old, new, why = batch_change(saved, saved_dp, p.micro_batch_size, p.global_batch_size, ck.layout.dp)
    if why:
        raise ConfigError(f"parallel.global_batch_size: {path} {why}")
    if old == new:
        return None
    return (f"checkpoint: {path} was trained with {old} sequences per optimizer step; continuing with {new} "
            f"(parallel.global_batch_size={new})")


def _conversion(ck, engine, path: Path, state: dict) -> Optional[tuple[str, str, bool]]:
    """(how the checkpoint was saved, how this run trains, whether the layout differs) when its state must be
    converted (another layout or compute precision), else None."""
    from pretrain.checkpoint.reshard import engine_bf16, saved_bf16
    saved_world = state.get("world_size") or ck.layout.world
    old = _layout_of(state["config"]["parallel"], saved_world)
    new = _layout_of(config_to_dict(ck.cfg)["parallel"], ck.layout.world)
    now_bf16 = engine_bf16(engine)
    try:
        was_bf16 = saved_bf16(path)
    except ckpt.CheckpointError as e:
        raise ConfigError(f"checkpoint.resume: {e}") from None
    was_bf16 = now_bf16 if was_bf16 is None else was_bf16
    if old == new and was_bf16 == now_bf16:
        return None
    return _describe(old, was_bf16), _describe(new, now_bf16), old != new


def _rank_state(ck, path: Path, converting: bool) -> dict:
    """This rank's saved state (RNG, data position): its own file under the same layout; under another, a saving
    rank's with this rank's data-parallel index where there is one (taken at an optimizer step, every rank's
    position is the same count of global micro-batches), so that an unchanged DP size continues each rank's own
    stream (pretrain/data/loader.py: load_state_dict)."""
    if not converting:
        return _torch_read(path / f"trainer-rank-{ck.layout.rank}.pt")
    from megatron.core import parallel_state as ps
    files = sorted(path.glob("trainer-rank-*.pt"), key=lambda p: int(p.stem.rsplit("-", 1)[1]))
    if not files:
        raise ConfigError(f"checkpoint.resume: {path} has no trainer-rank-*.pt (data position)")
    states = [_torch_read(f) for f in files]
    dp_rank = ps.get_data_parallel_rank()
    return next((s for s in states if s["loader"].get("dp_rank") == dp_rank), states[0])


def _torch_read(file: Path) -> dict:
    try:
        return torch.load(file, weights_only=False, map_location="cpu")
    except Exception as e:  # noqa: BLE001 - a file that passed its check yet does not load: one line
        raise ConfigError(_not_loadable(file, one_line(e))) from None


def _not_loadable(where, why: str) -> str:
    return (f"checkpoint.resume: {where} passed its integrity check but cannot be loaded by this run ({why}); "
            "nothing was renamed or changed: resume it with the config and program version that saved it, or "
            "start afresh with checkpoint.resume=none or another name")


def _saved_readers(rank_state: dict) -> int:
    saved = rank_state["loader"]
    return saved.get("readers", saved["dp_size"] * max(1, saved["num_workers"]))   # saved before readers were


def _check_data(ck, path: Path, rank_state: dict) -> None:
    why = data_position_problem(_saved_readers(rank_state), ck.cfg.data.readers, ck.layout.dp,
                                ck.cfg.data.num_workers)
    if why:
        raise ConfigError(why if why.startswith("data.") else f"checkpoint.resume: {path}: {why}")


def _position_data(ck, loader, path: Path, rank_state: dict):
    """The training loader at the checkpoint's data position (ConfigError where the loader refuses it). With
    data.readers unset the run reads with the checkpoint's number of readers, so that another DP size or worker
    count continues the same data order."""
    from megatron.core import parallel_state as ps

    from pretrain.data.splits import split_loader
    readers = _saved_readers(rank_state)
    if loader.readers != readers:
        loader = split_loader(ck.cfg, "train", dp_rank=ps.get_data_parallel_rank(),
                                      dp_size=ck.layout.dp, readers=readers)
    try:
        loader.load_state_dict(rank_state["loader"])
    except ValueError as e:
        raise ConfigError(f"checkpoint.resume: {path}: {e}") from None
    return loader


def _before_loading(ck, engine, loader, path: Path) -> tuple[dict, dict, Optional[tuple[str, str, bool]],
                                                             Optional[str], object]:
    """Every check that needs no weight (see the module docstring); (trainer state, rank state, conversion, a note
    on a changed batch)."""
    state = _torch_read(path / "trainer.pt")
    _check_belongs(ck, path, state)
    conversion = _conversion(ck, engine, path, state)
    rank_state = _rank_state(ck, path, conversion is not None)
    _check_data(ck, path, rank_state)   # first: where the data cannot continue under this DP, the batch is moot
    note = _check_batch(ck, path, state)
    loader = _position_data(ck, loader, path, rank_state)
    return state, rank_state, conversion, note, loader


def _load_converted(ck, engine, path: Path) -> None:
    """Collective: the checkpoint's training state, layout-free, into this run's engine."""
    from megatron.core import parallel_state as ps

    from pretrain.checkpoint.consolidate import read_run
    from pretrain.checkpoint.reshard import load_training_state, read_training_state
    why = None
    try:
        saved_run, _ = read_run(path)
        training = read_training_state(path, saved_run)
        load_training_state(engine, training, ps.get_tensor_model_parallel_rank(), ck.layout.tp)
    except ckpt.CheckpointError as e:
        why = _not_loadable(path, str(e))
    except Exception as e:  # noqa: BLE001 - any failure while converting: one line, the same on every rank
        why = _not_loadable(path, one_line(e))
    why = ckpt.agree(why)
    if why:
        raise ConfigError(why)


def _pick(ck) -> Optional[Path]:
    """The checkpoint to resume from (collective): the verified newest one, an explicit folder, or None."""
    mode = ck.cfg.checkpoint.resume
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
        return ckpt.resolve(ck.dir, ck.log).path
    except ckpt.CheckpointError as e:
        raise ConfigError(str(e)) from None


def resume(ck, engine, loader) -> Optional[Resumed]:
    """Collective. Loads the checkpoint to resume from, if any, into ``engine`` and this rank's RNG; None when the
    run starts afresh. See Checkpointer.resume."""
    path = _pick(ck)
    if path is None:
        return None
    if ck.is_main and not (path / ckpt.RECORD).exists():
        ck.log(f"checkpoint: {path} has no {ckpt.RECORD} (saved before records existed): checked only by "
               "the CRC-32 of its zip members")
    why, found = None, None
    try:
        found = _before_loading(ck, engine, loader, path)
    except ConfigError as e:   # one rank alone may fail (its own file): every rank stops, with the same line
        why = str(e)
    except Exception as e:  # noqa: BLE001 - a verified file that holds something else: one line, not a traceback
        why = _not_loadable(path, one_line(e))
    why = ckpt.agree(why)
    if why:
        raise ConfigError(why)
    state, rank_state, conversion, note, loader = found
    if conversion is not None:
        _load_converted(ck, engine, path)
        if ck.is_main:
            saved, now, relayout = conversion
            verb = "re-sharded" if relayout else "converted"
            ck.log(f"checkpoint: {path} was saved under {saved}; {verb} for {now} (fp32 master weights and "
                   "Adam moments carried over)")
    else:
        try:
            ckpt.load_engine(engine, path)
        except ckpt.CheckpointError as e:
            raise ConfigError(_not_loadable(path, str(e))) from None
    ckpt.set_rng_state(rank_state["rng"])
    resumed = Resumed(path, TrainerState.from_dict(state), loader)
    if ck.is_main:
        if note:
            ck.log(note)
        ck.log(f"resumed from {path} at step {resumed.state.step}")
    return resumed
