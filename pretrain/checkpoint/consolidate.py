"""One process's model from a checkpoint saved under any layout: TP × PP × DP, ZeRO 0-3, fp32 or bf16.

What a checkpoint folder holds (pretrain/checkpoint/verify.py; the DeepSpeed files come from
pretrain/parallel/engine.py, which saves with the tag ``engine``, into ``stage-P/`` for pipeline stage P when
PP > 1):

    step-N/checkpoint.json, trainer.pt                     the record; the run's config and tokenizer checksum
    step-N/[stage-P/]engine/mp_rank_TT_model_states.pt     ZeRO 0-2: the whole module of TP rank TT (written by
                                                           data-parallel rank 0 only: the others hold the same)
    step-N/[stage-P/]engine/zero_pp_rank_D_mp_rank_TT_model_states.pt      ZeRO-3: buffers and parameter shapes;
                                                           every parameter is an empty placeholder
    step-N/[stage-P/]engine/[bf16_]zero_pp_rank_D_mp_rank_TT_optim_states.pt   ZeRO 1-3: the fp32 partitions of
                                                           DP rank D (the parameters themselves, under ZeRO-3)

DeepSpeed's "mp rank" is what the engine's ``mpu`` calls the model-parallel rank; MegatronMPU
(pretrain/parallel/zero.py) answers with the tensor-parallel rank, so TT is the TP rank and nothing in a name
tells the pipeline stage: the stage is the folder. Every folder holding ``*_model_states.pt`` files is taken as
one stage, in the natural order of the folders' paths. A pipeline checkpoint saved before the stages had folders
of their own (every stage wrote the same names, overwriting each other) is refused in one line.

Merging, in that order: ZeRO-3 partitions into each TP rank's parameters (DeepSpeed's own
``zero_to_fp32.get_fp32_state_dict_from_zero_checkpoint``, handed one TP rank's files at a time: given a folder
with several mp ranks it counts all their files as data-parallel partitions and fails); TP shards into full
tensors (model/tp_shard.py knows each layout: QKV grouped by kv head, SwiGLU [gate; up] per rank, row-parallel
columns, vocab-parallel rows; norms, routers and buffers are replicated); pipeline stages by union (a parameter
replicated on several stages — a shared layer, a tied model's embedding on the last stage — is bit-identical on
each: the first stage's copy is taken, and copies that differ are reported). Buffers (token-choice's
``bias_steps``) come along with the parameters; the result is loaded strictly: nothing missing, nothing left over.

Precision: the weights the run computed with. ZeRO 0-2 keep them in the module files (bf16 in a bf16 run);
ZeRO-3 keeps only the fp32 master partitions, which a bf16 run rounds to bf16 before every forward: they are
rounded the same way here, so one run gives the same model whatever its layout. The result is fp32 (a bf16
value is exact in fp32); the caller may cast it.

Nothing under the checkpoint is written, renamed or moved: the newest checkpoint that passes its check is used,
and newer ones that fail are only reported (``CheckpointInfo.notes``).

    info = open_checkpoint(path)      the checkpoint and its run's config (and tokenizer), no weight read yet
    loaded = load_model(info)         Consolidated: the model, how it was saved, warnings
    loaded = load(path)               both
"""
from __future__ import annotations

import contextlib
import dataclasses
import io
import os
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch

from conf import build_dataclass
from conf.errors import ConfigError, one_line
from model.config import ModelConfig
from model.mor import MoRModel
from model.tp_shard import unshard_tensor
from pretrain.config import RunConfig
from pretrain.checkpoint import verify as ckpt
from pretrain.checkpoint.verify import CheckpointError

_MODEL_FILE = re.compile(r"^(?:zero_pp_rank_(\d+)_)?mp_rank_(\d+)_model_states\.pt$")
_OPTIM_FILE = re.compile(r"^(?:bf16_)?zero_pp_rank_(\d+)_mp_rank_(\d+)_optim_states\.pt$")


@dataclass
class RunTokenizer:
    """The tokenizer a run was trained with, as its data manifest (the run config's data.path) names it."""
    path: Optional[Path]        # the SentencePiece model; None when it cannot be found (then ``why`` says why)
    sha256: Optional[str]       # as trainer.pt records it: what any tokenizer used with the model must match
    bos: Optional[bool]         # documents begin with BOS in the run's data (else they only end with EOS);
                                # None: unknown (no manifest)
    why: str = ""


@dataclass
class CheckpointInfo:
    """A checkpoint found and checked, before any weight is read (``open_checkpoint``)."""
    path: Path                       # the checkpoint folder used (step-NNNNNN)
    run: RunConfig                   # the run's config, as saved in trainer.pt
    step: int
    world_size: Optional[int]        # processes that saved it
    tokenizer: RunTokenizer
    notes: list[str] = field(default_factory=list)   # newer checkpoints passed over, and why


@dataclass
class Consolidated:
    """A checkpoint as one process's model."""
    model: MoRModel                  # TP = PP = 1, every weight and buffer of the run, eval mode, CPU, fp32
    info: CheckpointInfo
    layout: str                      # how it was saved, e.g. "TP=2 PP=1 DP=2 ZeRO-3, bf16"
    warnings: list[str] = field(default_factory=list)   # e.g. pipeline replicas that differ (full_state_dict)


# ---- which checkpoint ---------------------------------------------------------------------------------------------
def find_checkpoint(path: Path) -> tuple[Path, list[str]]:
    """The checkpoint folder that ``path`` names — a step-NNNNNN folder, a run folder (RUN/checkpoints/...) or its
    checkpoints folder — checked against its record; with several, the newest that passes. Returns (folder,
    notes on newer ones that failed). Read-only, unlike checkpoint.resolve: nothing is set aside. Raises
    CheckpointError (one line)."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or folder; give a run folder (RUN, holding "
                              "checkpoints/step-NNNNNN/) or one checkpoint folder")
    if not path.is_dir():
        raise CheckpointError(f"{path}: not a folder; give a run folder or a checkpoint folder (step-NNNNNN)")
    if (path / ckpt.RECORD).exists() or (path / "trainer.pt").exists():
        why = ckpt.verify(path)
        if why:
            raise CheckpointError(f"{path}/{why}")
        return path, []
    root = path / "checkpoints" if (path / "checkpoints").is_dir() else path
    candidates = list(reversed(ckpt.list_checkpoints(root)))
    if not candidates:
        raise CheckpointError(f"{path}: no checkpoint there (a run folder holds checkpoints/step-NNNNNN/ with "
                              f"{ckpt.RECORD}); is the run saved yet?")
    failed: list[tuple[Path, str]] = []
    for folder in candidates:
        why = ckpt.verify(folder)
        if why is None:
            return folder, [f"{f}/{w}; passing over it" for f, w in failed]
        failed.append((folder, why))
    newest, why = failed[0]
    raise CheckpointError(f"{root}: no checkpoint passes its check: {newest.name}/{why}"
                          + (f" (and {len(failed) - 1} older one(s) fail too)" if len(failed) > 1 else ""))


def read_run(folder: Path) -> tuple[RunConfig, dict[str, Any]]:
    """(the run's config, trainer.pt) of a checkpoint folder. Raises CheckpointError (one line)."""
    try:
        state = ckpt.read_trainer_state(folder)
        run = build_dataclass(RunConfig, state["config"], where=str(folder / "trainer.pt"))
    except ConfigError as e:   # a config this version no longer reads: a key renamed since, say
        raise CheckpointError(str(e)) from None
    except Exception as e:  # noqa: BLE001 - unreadable in any way: one line
        raise CheckpointError(f"{folder / 'trainer.pt'}: cannot be read ({one_line(e)})") from None
    return run, state


# ---- reading DeepSpeed's files ------------------------------------------------------------------------------------
def _torch_load(path: Path) -> dict[str, Any]:
    # mmap: ZeRO-0 module files carry the whole optimizer too, which is never read here. DeepSpeed pickles some
    # of its own classes (ZeroStageEnum, LossScaler): not weights_only. Importing pretrain.parallel.zero first
    # tells DeepSpeed its accelerator, so unpickling them does not print its probe's warning.
    import pretrain.parallel.zero  # noqa: F401
    try:
        return torch.load(path, map_location="cpu", mmap=True, weights_only=False)
    except Exception as e:  # noqa: BLE001 - any unreadable file is one line
        raise CheckpointError(f"{path}: cannot be read ({one_line(e)})") from None


@dataclass
class _Stage:
    """One pipeline stage's files: module files by (TP rank, DP rank), optimizer files likewise."""
    folder: Path
    model: dict[tuple[int, int], Path] = field(default_factory=dict)
    optim: dict[tuple[int, int], Path] = field(default_factory=dict)

    @property
    def zero3(self) -> bool:
        return any(name.name.startswith("zero_pp_rank_") for name in self.model.values())

    def tp_ranks(self) -> list[int]:
        return sorted({tp for tp, _ in self.model})


def _natural(path: Path) -> list:
    return [int(s) if s.isdigit() else s for s in re.split(r"(\d+)", str(path))]


def _stages(folder: Path) -> list[_Stage]:
    stages: dict[Path, _Stage] = {}
    for f in folder.rglob("*_states.pt"):
        if m := _MODEL_FILE.match(f.name):
            stage = stages.setdefault(f.parent, _Stage(f.parent))
            stage.model[(int(m.group(2)), int(m.group(1) or 0))] = f
        elif m := _OPTIM_FILE.match(f.name):
            stage = stages.setdefault(f.parent, _Stage(f.parent))
            stage.optim[(int(m.group(2)), int(m.group(1)))] = f
    return [stages[k] for k in sorted(stages, key=_natural)]


def _check_layout(folder: Path, stages: list[_Stage], run: RunConfig) -> None:
    """What the run's config says must be there is there, before anything large is read."""
    tp, pp = run.parallel.tensor_parallel, run.parallel.pipeline_parallel
    if not stages or not any(s.model for s in stages):
        raise CheckpointError(f"{folder}: no DeepSpeed model files (*_model_states.pt) in it; not a checkpoint of "
                              "pretrain.train")
    if pp > 1 and len(stages) != pp:
        files = ", ".join(str(p.relative_to(folder)) for s in stages for p in sorted(s.model.values()))
        raise CheckpointError(
            f"{folder}: saved with parallel.pipeline_parallel={pp} but holds {len(stages)} stage folder(s): every "
            f"stage wrote the same DeepSpeed files ({files}), overwriting each other, so the stages' weights are "
            "lost; such a checkpoint (saved before each stage had a folder of its own, stage-P) cannot be loaded")
    for stage in stages:
        where = stage.folder.relative_to(folder)
        if stage.tp_ranks() != list(range(tp)):
            have = ", ".join(f"{r:02d}" for r in stage.tp_ranks()) or "none"
            raise CheckpointError(f"{folder}: {where} holds model files of TP rank(s) {have}; the run had "
                                  f"parallel.tensor_parallel={tp}, so mp_rank_00..{tp - 1:02d} must all be there")
        if stage.zero3 and not stage.optim:
            raise CheckpointError(f"{folder}: {where} is a ZeRO-3 checkpoint without its *_optim_states.pt files, "
                                  "which hold its weights")


def _zero3_rank(stage: _Stage, tp_rank: int) -> dict[str, torch.Tensor]:
    """One TP rank's fp32 parameters and buffers from its ZeRO-3 partitions, through DeepSpeed's zero_to_fp32.

    That function globs every *_model_states.pt / *_optim_states.pt of a folder and takes them all for data-
    parallel partitions, so it is handed a scratch folder of links to this TP rank's files only."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    mine = [p for (tp, _), p in [*stage.model.items(), *stage.optim.items()] if tp == tp_rank]
    with tempfile.TemporaryDirectory(prefix="mor-zero3-") as tmp:
        tag = Path(tmp) / "tp"
        tag.mkdir()
        for p in mine:
            os.symlink(p.resolve(), tag / p.name)
        # It prints its progress on stdout (where generated text goes) and draws tqdm bars: keep both quiet.
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            try:
                state = get_fp32_state_dict_from_zero_checkpoint(tmp, tag="tp")
            except Exception as e:  # noqa: BLE001 - its errors are ValueError / FileNotFoundError / asserts
                raise CheckpointError(f"{stage.folder}: ZeRO-3 partitions of TP rank {tp_rank} cannot be merged "
                                      f"({one_line(e)})") from None
    return dict(state)


def _rank_state(stage: _Stage, tp_rank: int) -> tuple[dict[str, Any], bool]:
    """(one TP rank's whole state dict for this stage, whether the run was bf16)."""
    first = _torch_load(stage.model[(tp_rank, 0)])
    bf16 = bool(first.get("ds_config", {}).get("bf16", {}).get("enabled", False))
    module = first["module"]
    if not stage.zero3:
        return {k: (v.float() if torch.is_tensor(v) and v.is_floating_point() else v)
                for k, v in module.items()}, bf16
    weights = _zero3_rank(stage, tp_rank)
    if bf16:   # what the run's forward passes saw: the fp32 masters rounded to bf16 (see the module docstring)
        weights = {k: v.to(torch.bfloat16).float() if v.is_floating_point() else v for k, v in weights.items()}
    # the module file keeps the entries that are neither parameters nor buffers (megatron's _extra_state: None);
    # everything else in it is an empty placeholder
    out = {k: v for k, v in module.items() if not torch.is_tensor(v)}
    out.update(weights)
    placeholders = [k for k, v in module.items() if torch.is_tensor(v) and k not in out]
    if placeholders:
        raise CheckpointError(f"{stage.folder}: ZeRO-3 partitions of TP rank {tp_rank} lack {placeholders[0]}"
                              + (f" and {len(placeholders) - 1} more" if len(placeholders) > 1 else ""))
    return out, bf16


def full_state_dict(folder: Path, run: RunConfig) -> tuple[dict[str, Any], bool, list[str]]:
    """The TP = PP = 1 state dict of a checkpoint folder saved by ``run`` (fp32 tensors), whether the run computed
    in bf16, and warnings: pipeline replicas of a parameter that differ between stages (the pipeline keeps them
    equal; when a run's did not, the first stage's copy is taken, and the model may not compute what the
    pipeline did). Raises CheckpointError (one line)."""
    stages = _stages(folder)
    _check_layout(folder, stages, run)
    full: dict[str, Any] = {}
    holder: dict[str, Path] = {}
    differ: list[tuple[str, float]] = []
    bf16 = False
    for stage in stages:
        ranks = []
        for tp_rank in stage.tp_ranks():
            state, bf16 = _rank_state(stage, tp_rank)
            ranks.append(state)
        for name in ranks[0]:
            if any(name not in r for r in ranks):
                raise CheckpointError(f"{stage.folder}: {name} is missing from some TP ranks' files")
            parts = [r[name] for r in ranks]
            value = unshard_tensor(name, parts) if torch.is_tensor(parts[0]) else parts[0]
            if name not in full:
                full[name], holder[name] = value, stage.folder
            elif torch.is_tensor(value) and not torch.equal(full[name], value):
                differ.append((name, (full[name].double() - value.double()).abs().max().item()))
    notes = []
    if differ:
        name, delta = max(differ, key=lambda d: d[1])
        notes.append(f"{len(differ)} parameter(s) replicated on several pipeline stages differ between them (most: "
                     f"{name}, by up to {delta:.3g}); using the copy in {holder[name].relative_to(folder)}: the "
                     "model may not compute what the pipeline computed")
    return full, bf16, notes


def describe_layout(run: RunConfig, world: Optional[int], bf16: bool) -> str:
    """E.g. "TP=2 PP=1 DP=2 ZeRO-3, bf16": how a checkpoint was saved."""
    p = run.parallel
    dp = world // (p.tensor_parallel * p.pipeline_parallel) if world else "?"
    return (f"TP={p.tensor_parallel} PP={p.pipeline_parallel} DP={dp} ZeRO-{p.zero_stage}, "
            f"{'bf16' if bf16 else 'fp32'}")


# ---- the model ----------------------------------------------------------------------------------------------------
def _single_process_world() -> None:
    """MoRModel's megatron layers need megatron's parallel state: a world of one, unless one is already set up
    (the demo's trainer, tests) with TP = PP = 1."""
    from megatron.core import parallel_state as ps
    if not ps.model_parallel_is_initialized():
        from pretrain.parallel.layout import init_single_process
        init_single_process()
    elif ps.get_tensor_model_parallel_world_size() > 1 or ps.get_pipeline_model_parallel_world_size() > 1:
        raise CheckpointError("consolidating builds a single-process model (TP = PP = 1); this process runs under "
                              "tensor or pipeline parallelism: call it from a process of its own")


def build_model(cfg: ModelConfig, state: dict[str, Any]) -> MoRModel:
    """A TP = PP = 1 MoRModel holding exactly ``state``: every entry used, none missing (strict), on the CPU."""
    from model.layers import make_parallel_config
    _single_process_world()
    mp = make_parallel_config(cfg, use_cpu_initialization=True)
    mp.perform_initialization = False
    # Built on the meta device and given the checkpoint's tensors (assign): no random initialisation and no
    # second copy of the weights.
    with torch.device("meta"):
        model = MoRModel(cfg, mp)
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    if missing or unexpected:
        what = (f"lacks {len(missing)} entr(ies) of the model (e.g. {missing[0]})" if missing else
                f"holds {len(unexpected)} entr(ies) the model has not (e.g. {unexpected[0]})")
        raise CheckpointError(f"the checkpoint {what}: it does not match its own config's model "
                              f"({cfg.name}); was it saved by another version of model/?")
    for k, v in expected.items():
        if torch.is_tensor(v) and tuple(v.shape) != tuple(state[k].shape):
            raise CheckpointError(f"the checkpoint's {k} has shape {tuple(state[k].shape)}, the model's "
                                  f"{tuple(v.shape)}: it does not match its own config's model ({cfg.name})")
    model.load_state_dict(state, strict=True, assign=True)
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise CheckpointError(f"{left[0]} was not in the checkpoint (the model built it outside its state dict)")
    return model.eval()


def run_tokenizer(run: RunConfig, run_dir: Path, sha256: Optional[str]) -> RunTokenizer:
    """The run's tokenizer: the data manifest at the config's data.path names it. A relative data.path was
    relative to where the run started: the current folder, or the one that out_dir (when relative) puts the run
    folder ``run_dir`` under."""
    from data_prep.shards import Manifest
    data = Path(run.data.primary_path)
    places = [data]
    if not data.is_absolute() and not Path(run.out_dir).is_absolute():
        depth = len(Path(run.out_dir).parts)
        if depth < len(run_dir.resolve().parents):
            places.append(run_dir.resolve().parents[depth] / data)
    for folder in places:
        try:
            manifest = Manifest.load(folder)
        except (FileNotFoundError, ValueError, OSError):
            continue
        bos = bool(manifest.settings.get("bos", False))
        path = Path(str(manifest.tokenizer.get("path", "")))
        if path.is_file():
            return RunTokenizer(path, sha256, bos)
        return RunTokenizer(None, sha256, bos, f"the run's data manifest ({folder}) names {path}, which is not "
                                               "there")
    return RunTokenizer(None, sha256, None, f"its data manifest, which names it, is not at {run.data.primary_path}")


def open_checkpoint(path: Path) -> CheckpointInfo:
    """Find and check the checkpoint ``path`` names (see find_checkpoint) and read its run's config; no weight is
    read yet. Raises CheckpointError (one line)."""
    folder, notes = find_checkpoint(path)
    run, state = read_run(folder)
    run_dir = folder.parent.parent            # RUN/checkpoints/step-N
    tok = run_tokenizer(run, run_dir, state.get("tokenizer_sha256"))
    return CheckpointInfo(folder, run, int(state.get("step", ckpt.step_of(folder))), state.get("world_size"),
                          tok, notes)


def load_model(info: CheckpointInfo, *, attention_backend: Optional[str] = "auto") -> Consolidated:
    """The checkpoint of ``info`` as one process's model, on the CPU in fp32. The config's
    ``attention_backend`` is replaced by ``attention_backend`` (the kernel is the machine's choice, not the
    run's: a run trained with flash-attn loads on a CPU); None keeps it. Raises CheckpointError (one line)."""
    full, bf16, warnings = full_state_dict(info.path, info.run)
    cfg = info.run.model
    if attention_backend is not None:
        cfg = dataclasses.replace(cfg, attention_backend=attention_backend)
    return Consolidated(build_model(cfg, full), info, describe_layout(info.run, info.world_size, bf16), warnings)


def load(path: Path, *, attention_backend: Optional[str] = "auto") -> Consolidated:
    """``open_checkpoint`` then ``load_model``: a run folder or a checkpoint folder as one process's model."""
    return load_model(open_checkpoint(path), attention_backend=attention_backend)
