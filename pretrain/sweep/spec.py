"""A sweep file (format: ``python -m pretrain.sweep --help``, or pretrain/sweep/plan.py) as typed dataclasses,
read by conf's loader like every other config, and its expansion into points.

The schema sits below plan.py (submission) and results.py (jobs and tables), which both need it.
"""
from __future__ import annotations

import itertools
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from conf import load_config, run_file
from conf.errors import ConfigError

RESERVED = ("name", "out_dir")  # set by the sweep for each point, never by the file's overrides


@dataclass
class SlurmSpec:
    nodes: int = 1
    tasks_per_node: int = 8          # one task per GPU: the trainer takes cuda:LOCAL_RANK itself
    gpus_per_node: int = 8           # 0 for a CPU partition (then no GPU request is made at all)
    cpus_per_task: int = 12          # also torch's CPU thread count in each task
    timeout_min: int = 24 * 60
    partition: str | None = None
    signal_delay_s: int = 120        # USR2 this long before the limit: time to finish a step and save
    max_num_timeout: int = 3         # requeues after time limits before submitit gives up
    array_parallelism: int = 64      # points running at once
    mem_gb: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)   # more sbatch options, e.g. {qos: high, account: lab}

    def validate(self) -> SlurmSpec:
        for key in ("nodes", "tasks_per_node", "timeout_min", "array_parallelism", "cpus_per_task"):
            if getattr(self, key) < 1:
                raise ConfigError(f"{key}: must be >= 1")
        return self


@dataclass
class SweepConfig:
    run: str
    name: str = ""
    out_dir: str = ""
    executor: Literal["auto", "slurm", "local"] = "auto"
    overrides: dict[str, Any] = field(default_factory=dict)
    grid: dict[str, Any] = field(default_factory=dict)
    points: list[dict[str, Any]] = field(default_factory=list)
    slurm: SlurmSpec = field(default_factory=SlurmSpec)

    def validate(self) -> SweepConfig:
        # Each message starts with the key, so that conf's loader points at the line where it was set.
        try:
            run_file(self.run)
        except ConfigError as e:
            raise ConfigError(f"run: {e}") from None
        for key, values in self.grid.items():
            if not isinstance(values, list) or not values:
                raise ConfigError(f"grid.{key}: expected a non-empty list of values, got {values!r}")
        for i, p in enumerate(self.points):
            if not p:
                raise ConfigError(f"points[{i}]: expected a mapping of dotted key: value, got {p!r}")
        for section, keys in (("overrides", flat(self.overrides)), ("grid", self.grid),
                              *((f"points[{i}]", flat(p)) for i, p in enumerate(self.points))):
            for k in keys:
                if k in RESERVED:
                    raise ConfigError(f"{section}.{k}: set by the sweep for each point; set the sweep's own {k}: "
                                      "instead")
        return self


@dataclass
class Point:
    name: str
    own_overrides: list[str]      # what distinguishes this point: its list entry and grid values
    overrides: list[str]          # everything passed to the run config, name and out_dir first
    run_dir: Path


def flat(d: dict, prefix: str = "") -> dict[str, Any]:
    """{train: {steps: 5}} and {train.steps: 5} are the same override."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        out.update(flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def render(value: Any) -> str:
    """A value as override text that the config loader parses back to the same value."""
    return yaml.safe_dump(value, default_flow_style=True, width=1 << 20).strip().removesuffix("...").strip()


def load_sweep(path: str | os.PathLike[str]) -> SweepConfig:
    """The sweep file, checked; name, out_dir (absolute) and run (a file) filled in, overrides flattened."""
    cfg = load_config(Path(path), schema=SweepConfig)  # a Path: a bare word is a file here, not a model preset
    cfg.name = cfg.name or Path(path).stem
    cfg.out_dir = str(Path(cfg.out_dir or f"runs/sweeps/{cfg.name}").absolute())
    cfg.overrides = flat(cfg.overrides)
    return cfg


def run_path(cfg: SweepConfig) -> str:
    """The base run file, absolute: the jobs load it, maybe after the submitting shell changed folder."""
    return str(run_file(cfg.run).absolute())


def expand(cfg: SweepConfig) -> list[Point]:
    """Each explicit point × every grid combination; names carry the index (unique) and a readable slug."""
    keys = list(cfg.grid)
    combos = [dict(zip(keys, c)) for c in itertools.product(*(cfg.grid[k] for k in keys))]
    points = []
    for own in ({**flat(p), **c} for p in (cfg.points or [{}]) for c in combos):
        texts = [f"{k}={render(v)}" for k, v in own.items()]
        slug = "_".join(f"{k.rsplit('.', 1)[-1]}{render(v)}" for k, v in own.items())
        slug = re.sub(r"[^A-Za-z0-9._+-]+", "", slug)[:48]
        name = f"{cfg.name}-{len(points)}" + (f"-{slug}" if slug else "")
        base = [f"{k}={render(v)}" for k, v in cfg.overrides.items()]
        points.append(Point(name, texts, [f"name={render(name)}", f"out_dir={render(cfg.out_dir)}", *base, *texts],
                            Path(cfg.out_dir) / name))
    return points
