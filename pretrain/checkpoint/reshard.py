"""Resuming a checkpoint under another parallel layout: the training state made layout-free, then re-sharded.

A checkpoint holds DeepSpeed's files as the saving layout wrote them: per pipeline stage (``stage-P/``), per
tensor-parallel rank, and with ZeRO-1/2 the fp32 master weights and Adam moments cut into one flat partition per
data-parallel rank. ``read_training_state`` turns them into one record per parameter of the whole (TP = PP = 1)
model — fp32 master weight, ``exp_avg``, ``exp_avg_sq`` — plus the optimizer's step count, the way
pretrain/checkpoint/consolidate.py does for the weights alone: TP shards joined (model/tp_shard.py), pipeline
replicas taken once, ZeRO fragments put back in place by DeepSpeed's own ``param_slice_mappings`` (each
parameter's slice of each partition). ``load_training_state`` then gives each rank of the new layout its slice:
the module's weights, and the optimizer's state — the torch optimizer's per-parameter state under ZeRO-0, the
fragments of the flat fp32 partitions (DeepSpeed's ``_hp_mapping`` of each parameter) under ZeRO-1/2.

Why our own consolidation rather than torch.distributed.checkpoint or DeepSpeed's universal checkpoint: the
checkpoints stay DeepSpeed's (same-layout resume is bit-exact and already checked file by file), the universal
converter expects Megatron-DeepSpeed's pipeline files and TP patterns rather than our stage folders and megatron-
core shards, and the re-sharding needs only the rules model/tp_shard.py already has. The cost is paid only when
the layout changes, on load: every rank reads the whole state (fp32 weights and two moments) into CPU memory.
ZeRO-3 partitions (each rank ceil(numel / DP) elements of every parameter) are read and written the same way.

Precision. The same path carries a run between fp32 and bf16 (pretrain/checkpoint/resume.py sends a precision change
here even when the layout is unchanged): the state is fp32 either way — the fp32 masters and moments of a bf16 run
(under ZeRO-0 DeepSpeed's FP16_UnfusedOptimizer keeps them as ``fp32_groups`` beside the bf16 module; under ZeRO
in its flat partitions), the module weights and torch's AdamW state of an fp32 one — and each engine is given it
in its own form, its bf16 weights the masters rounded. ``saved_bf16`` tells which precision a checkpoint computed
in from DeepSpeed's saved config, not from ``train.precision``, whose ``auto`` depends on the device.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch

from model.tp_shard import shard_state_dict, unshard_tensor
from pretrain.config import RunConfig
from pretrain.checkpoint.verify import CheckpointError
from pretrain.checkpoint.consolidate import _stages, _torch_load

MOMENTS = ("exp_avg", "exp_avg_sq")


@dataclass
class TrainingState:
    """The layout-free optimizer-level state of a checkpoint: per parameter of the whole model, its fp32 master
    weight and Adam moments; and the optimizer's step count."""
    params: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)   # name -> {param, exp_avg, ...}
    step: float = 0.0


def _stage_order(run: RunConfig, pp_rank: int, pp_size: int) -> list[str]:
    """The names of a stage's parameters in the optimizer's order (pretrain/parallel/zero.py param_groups: the
    decayed matrices, then the rest), from a model built on the meta device."""
    from model.layers import make_parallel_config
    from model.mor import MoRModel
    from pretrain.parallel.zero import param_groups
    mp = make_parallel_config(run.model, use_cpu_initialization=True)
    mp.perform_initialization = False
    with torch.device("meta"):
        stage = MoRModel(run.model, mp, pp_rank=pp_rank, pp_size=pp_size)
    names = {id(p): n for n, p in stage.named_parameters()}
    return [names[id(p)] for g in param_groups(stage, run.optim.weight_decay) for p in g["params"]]


def _flat_format(files: list[dict[str, Any]], shapes: dict[str, torch.Size]
                 ) -> tuple[dict[str, dict[str, torch.Tensor]], float]:
    """ZeRO-1/2 (one file per DP rank, in rank order): every parameter's master and moments, whole."""
    pieces: dict[str, dict[str, list[torch.Tensor]]] = {}
    step = 0.0
    for osd in files:
        base = osd["base_optimizer_state"]["state"]
        for g, mapping in enumerate(osd["param_slice_mappings"]):
            master = osd["single_partition_of_fp32_groups"][g].float()
            saved = base.get(g) or {}         # none: saved before the first step (an import), moments zero
            flats = {"param": master, **{k: saved[k].float() if k in saved else torch.zeros_like(master)
                                         for k in MOMENTS}}
            step = float(saved.get("step", 0.0))
            for name, addr in mapping.items():
                for key, flat in flats.items():
                    pieces.setdefault(name, {}).setdefault(key, []).append(flat.narrow(0, addr.start, addr.numel))
    return {name: {k: torch.cat(v).view(shapes[name]) for k, v in kinds.items()}
            for name, kinds in pieces.items()}, step


def _zero3_format(files: list[dict[str, Any]], shapes: dict[str, torch.Size]
                  ) -> tuple[dict[str, dict[str, torch.Tensor]], float]:
    """ZeRO-3 (one file per DP rank, in rank order): each rank's flat partition holds, parameter after parameter
    in the optimizer's order, its ceil(numel / DP) elements of every parameter (the last rank's padded)."""
    world = len(files)
    flats = []
    step = 0.0
    for osd in files:
        base = osd["optimizer_state_dict"]["state"]
        groups = [f.float() for f in osd["fp32_flat_groups"]]
        flats.append({"param": torch.cat(groups),
                      **{k: torch.cat([base[g][k].float() if g in base else torch.zeros_like(f)
                                       for g, f in enumerate(groups)]) for k in MOMENTS}})
        step = float(base[min(base)]["step"]) if base else 0.0
    out, offset = {}, 0
    for name, shape in shapes.items():
        numel = shape.numel()
        part = -(-numel // world)
        out[name] = {k: torch.cat([f[k].narrow(0, offset, part) for f in flats]).narrow(0, 0, numel).view(shape)
                     for k in flats[0]}
        offset += part
    return out, step


def _torch_format(optim: dict[str, Any], module: dict[str, Any], order: list[str]
                  ) -> tuple[dict[str, dict[str, torch.Tensor]], float]:
    """ZeRO-0 (torch's AdamW state, by position in the optimizer's parameter order) with the module's weights,
    which are the fp32 masters there. In bf16 (DeepSpeed's FP16_UnfusedOptimizer, which ZeRO-0 uses for bf16) the
    torch state is one level down and the fp32 masters are its ``fp32_groups``, in the same order."""
    masters = None
    if "fp32_groups" in optim:
        masters = [t for group in optim["fp32_groups"] for t in group]
        optim = optim["optimizer_state_dict"]
        if len(masters) != len(order):
            raise CheckpointError(f"the fp32 master weights hold {len(masters)} parameters, the model {len(order)}")
    out, step = {}, 0.0
    if len(optim["state"]) not in (0, len(order)):
        raise CheckpointError(f"the optimizer state holds {len(optim['state'])} parameters, the model {len(order)}")
    for i, name in enumerate(order):
        state = optim["state"].get(i)
        weight = module[name].float() if masters is None else masters[i].float().view(module[name].shape)
        if state is None:   # saved before the first step: no moments yet
            out[name] = {"param": weight, **{k: torch.zeros_like(weight) for k in MOMENTS}}
            continue
        out[name] = {"param": weight, **{k: state[k].float() for k in MOMENTS}}
        step = float(state["step"])
    return out, step


def saved_bf16(folder: Path) -> Optional[bool]:
    """Whether the checkpoint ``folder`` was trained in bf16 (DeepSpeed's config, saved in every model file:
    what the run computed with, whatever ``train.precision`` said — ``auto`` depends on the device). None: no
    model file, or one without DeepSpeed's config. Reads the file memory-mapped: no weight is read."""
    stages = _stages(folder)
    files = [f for s in stages for _, f in sorted(s.model.items())]
    if not files:
        return None
    ds_config = _torch_load(files[0]).get("ds_config")
    if not isinstance(ds_config, dict):
        return None
    return bool(ds_config.get("bf16", {}).get("enabled", False))


def engine_bf16(engine) -> bool:
    """Whether this run's engine (pretrain/parallel/engine.py) computes in bf16."""
    return bool(engine._ds.bfloat16_enabled())


def read_training_state(folder: Path, run: RunConfig) -> TrainingState:
    """The layout-free training state of the checkpoint ``folder`` saved by ``run``. CheckpointError (one line)
    for what cannot be read."""
    stages = _stages(folder)
    pp = run.parallel.pipeline_parallel
    out = TrainingState()
    for pp_rank, stage in enumerate(stages):
        order = _stage_order(run, pp_rank, pp)
        ranks = []
        for tp_rank in stage.tp_ranks():
            model_file = _torch_load(stage.model[(tp_rank, 0)])
            module = model_file["module"]
            dp_files = [p for (tp, _), p in sorted(stage.optim.items()) if tp == tp_rank]
            if stage.zero3:   # the module holds placeholders; the shapes are DeepSpeed's record, in its order
                shapes = {n: torch.Size(sh) for group in model_file["param_shapes"] for n, sh in group.items()}
                parts, step = _zero3_format([_torch_load(p)["optimizer_state_dict"] for p in dp_files], shapes)
                ranks.append(parts)
                out.step = step
                continue
            shapes = {n: module[n].shape for n in order}
            if dp_files:
                parts, step = _flat_format([_torch_load(p)["optimizer_state_dict"] for p in dp_files], shapes)
            elif "param_slice_mappings" in (model_file.get("optimizer") or {}):   # bf16 without ZeRO
                parts, step = _flat_format([model_file["optimizer"]], shapes)
            else:
                parts, step = _torch_format(model_file.get("optimizer") or {"state": {}}, module, order)
            missing = [n for n in order if n not in parts]
            if missing:
                raise CheckpointError(f"{stage.folder}: the optimizer state of TP rank {tp_rank} lacks {missing[0]}")
            ranks.append(parts)
            out.step = step
        for name in order:
            if name not in out.params:   # a pipeline replica: the first stage's copy (the pipeline keeps them equal)
                out.params[name] = {k: unshard_tensor(name, [r[name][k] for r in ranks]) for k in ranks[0][name]}
    return out


def _adam_step(step: float, like: torch.Tensor, optimizer: torch.optim.Optimizer) -> torch.Tensor:
    """The ``step`` entry torch's AdamW keeps: a float32 scalar, on the parameter's device when fused/capturable."""
    group = optimizer.param_groups[0]
    on_device = group.get("fused") or group.get("capturable")
    return torch.tensor(step, dtype=torch.float32, device=like.device if on_device else "cpu")


@torch.no_grad()
def load_training_state(engine, state: TrainingState, tp_rank: int, tp_size: int) -> None:
    """Give this rank's engine (pretrain/parallel/engine.py, any layout, fp32 or bf16) its slice of ``state``."""
    mine = {name: {k: shard_state_dict({name: v}, tp_rank, tp_size)[name] for k, v in kinds.items()}
            for name, kinds in state.params.items()}
    model = engine.model
    named = dict(model.named_parameters())
    missing = [n for n in named if n not in mine]
    if missing:
        raise CheckpointError(f"the checkpoint has no {missing[0]} (of {len(missing)} parameter(s) missing)")
    ds_optimizer = engine._ds.optimizer
    if engine.cfg.parallel.zero_stage == 3:
        _load_zero3(ds_optimizer, named, mine, state.step)
        return
    for name, p in named.items():
        p.copy_(mine[name]["param"].to(p.dtype))
    inner = getattr(ds_optimizer, "optimizer", None)
    mapped = [p for p in named.values() if getattr(p, "_hp_mapping", None) is not None]
    if mapped:   # ZeRO-1/2 (or DeepSpeed's bf16 optimizer): fp32 flat partitions, one per parameter group
        for g, group in enumerate(inner.param_groups):
            flat = group["params"][0]
            slot = inner.state[flat]
            if not slot:
                slot.update({k: torch.zeros_like(flat) for k in MOMENTS})
            slot["step"] = _adam_step(state.step, flat, inner)
        for name, p in named.items():
            hp = p._hp_mapping
            if hp is None:
                continue
            lp = hp.lp_fragment_address
            flat = inner.param_groups[hp.param_group_index]["params"][0]
            for key in ("param", *MOMENTS):
                target = flat if key == "param" else inner.state[flat][key]
                value = mine[name][key].flatten().narrow(0, lp.start, lp.numel)
                target.narrow(0, hp.hp_fragment_address.start, lp.numel).copy_(value.to(target.dtype))
    elif hasattr(ds_optimizer, "fp32_groups"):   # ZeRO-0 in bf16: fp32 masters beside the bf16 weights
        names = {id(p): n for n, p in named.items()}
        inner = ds_optimizer.optimizer
        for lp_group, hp_group in zip(ds_optimizer.fp16_groups, ds_optimizer.fp32_groups):
            for p, master in zip(lp_group, hp_group):
                name = names[id(p)]
                master.copy_(mine[name]["param"].view_as(master))
                inner.state[master] = {"step": _adam_step(state.step, master, inner),
                                       **{k: mine[name][k].to(device=master.device, dtype=torch.float32)
                                          .view_as(master) for k in MOMENTS}}
    else:        # ZeRO-0 in fp32: the torch optimizer, per parameter (the weights are the masters)
        optimizer = engine.optimizer
        for name, p in named.items():
            optimizer.state[p] = {"step": _adam_step(state.step, p, optimizer),
                                  **{k: mine[name][k].to(device=p.device, dtype=torch.float32) for k in MOMENTS}}


def _load_zero3(ds_optimizer, named: dict[str, torch.nn.Parameter], mine: dict[str, dict[str, torch.Tensor]],
                step: float) -> None:
    """ZeRO-3: each rank holds ceil(numel / DP) elements of every parameter — in the module (``ds_tensor``) and in
    its sub-group's flat fp32 partition at DeepSpeed's ``grad_position`` — and the moments beside the latter."""
    import torch.distributed as dist
    inner = ds_optimizer.optimizer
    for flat in ds_optimizer.fp32_partitioned_groups_flat:
        slot = inner.state[flat]
        if not slot:
            slot.update({k: torch.zeros_like(flat) for k in MOMENTS})
        slot["step"] = _adam_step(step, flat, inner)
    for name, p in named.items():
        group, offset, numel = ds_optimizer.grad_position[ds_optimizer.get_param_id(p)]
        rank = dist.get_rank(group=ds_optimizer._get_param_partition_group(p))
        flat = ds_optimizer.fp32_partitioned_groups_flat[group]
        for key in ("param", *MOMENTS):
            value = mine[name][key].flatten().float()
            value = torch.cat([value, value.new_zeros(max(0, (rank + 1) * numel - value.numel()))])
            part = value.narrow(0, rank * numel, numel)
            target = flat if key == "param" else inner.state[flat][key]
            target.narrow(0, offset, numel).copy_(part)
            if key == "param":
                p.ds_tensor.data.copy_(part.to(p.ds_tensor.dtype).view_as(p.ds_tensor))
