"""A study file (format: ``python -m pretrain.study --help``) as a typed dataclass read by conf's loader, and its
plan: each model's training steps from the FLOPs budget, through the project's FLOPs counter (model/flops.py).

    steps = round(flops / (training FLOPs per token × tokens per optimizer step))
    tokens per optimizer step = micro_batch_size × gradient accumulation × data-parallel size × seq_len

A plan counts FLOPs at assumed depth loads (``ModelPlan.plan_basis``): exact for vanilla, recursive and
expert-choice, an assumption for token-choice (uniform loads: its router decides the real ones as it trains). The
report (report.py) counts each run's FLOPs again at the loads it logged (``ModelPlan.step_flops``).

seq_len is the data's (its manifest); the data-parallel size follows from the job's world size (slurm.nodes ×
slurm.tasks_per_node) as the trainer's layout check computes it. Each model then evaluates every steps // evals
steps, so its evaluations fall at the same fractions of the budget as every other model's.
"""
from __future__ import annotations

import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Sequence

from conf import load_config, run_file
from conf.errors import ConfigError, one_line
from model.flops import param_counts, training_flops
from model.sharing import build_plan
from pretrain.config import RunConfig
from pretrain.data.loader import load_manifest
from pretrain.parallel.layout import check_layout, grad_accumulation_steps
from pretrain.sweep.spec import Point, SlurmSpec, SweepConfig, flat, render

# Set by the study for each model (from the budget), never by the file's overrides.
RESERVED = ("name", "out_dir", "train.steps", "train.eval_every", "eval.downstream_every")
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]*$")


@dataclass
class StudyConfig:
    run: str
    flops: float
    name: str = ""
    out_dir: str = ""
    evals: int = 4
    downstream: bool = True          # evaluate downstream at every evaluation (false: validation only)
    executor: Literal["auto", "slurm", "local"] = "auto"
    overrides: dict[str, Any] = field(default_factory=dict)
    models: dict[str, dict[str, Any] | None] = field(default_factory=dict)
    slurm: SlurmSpec = field(default_factory=SlurmSpec)

    def validate(self) -> StudyConfig:
        # Each message starts with the key, so that conf's loader points at the line where it was set.
        try:
            run_file(self.run)
        except ConfigError as e:
            raise ConfigError(f"run: {e}") from None
        if not self.flops > 0:
            raise ConfigError(f"flops: the training-FLOPs budget must be > 0, got {self.flops:g}")
        if self.evals < 1:
            raise ConfigError(f"evals: must be >= 1, got {self.evals}")
        if not self.models:
            raise ConfigError("models: expected at least one model (name: {overrides})")
        for name, own in self.models.items():
            if not NAME.match(name):
                raise ConfigError(f"models.{name}: a model name is its run folder's name: letters, digits, ._+- only")
        for section, keys in (("overrides", flat(self.overrides)),
                              *((f"models.{n}", flat(o or {})) for n, o in self.models.items())):
            for k in keys:
                if k in RESERVED:
                    raise ConfigError(f"{section}.{k}: set by the study for each model from the FLOPs budget"
                                      + (f"; set the study's own {k}: instead" if k in ("name", "out_dir") else ""))
        return self


@dataclass
class ModelPlan:
    name: str
    cfg: RunConfig                   # the run config as trained (steps and evaluation intervals set)
    own: list[str]                   # the model's own overrides
    params: int                      # unique parameters
    flops_per_token: float           # training FLOPs per token (model/flops.py)
    seq_len: int
    tokens_per_step: int
    steps: int
    eval_every: int
    point: Point                     # the sweep point that trains it

    @property
    def flops_per_step(self) -> float:
        return self.flops_per_token * self.tokens_per_step

    @property
    def routing(self) -> str:
        return self.cfg.model.routing

    @property
    def loads_decide_flops(self) -> bool:
        """Whether the router's depth loads change this model's FLOPs (token-choice: a token's depth is its
        router's choice). Not without a router, nor under expert-choice, whose capacities fix every step's tokens."""
        n = len(build_plan(self.cfg.model).steps)
        return n > 1 and self._flops_at([0.0] * (n - 1) + [1.0]) != self.flops_per_step   # all at the deepest

    @property
    def plan_basis(self) -> str:
        """What the planned FLOPs assume about how many tokens each recursion step runs on."""
        if self.loads_decide_flops:
            n = len(build_plan(self.cfg.model).steps)
            return (f"uniform depth loads (1/{n} of the tokens leave at each of the {n} depths): an assumption, the "
                    "router decides them")
        return "fixed by the config (no router, or the capacities): exact"

    def step_flops(self, kept: Optional[Sequence[float]] = None) -> float:
        """Training FLOPs of one optimizer step. ``kept``: the fraction of tokens that ran each recursion step
        (the r{i}/kept_frac a run logs), turned into the depth loads model/flops.py counts with (the fraction
        leaving at depth i is kept_i − kept_{i+1}); None: the plan's loads."""
        if kept is None:
            return self._flops_at(None)
        return self._flops_at([k - (kept[i + 1] if i + 1 < len(kept) else 0.0) for i, k in enumerate(kept)])

    def _flops_at(self, loads: Optional[Sequence[float]]) -> float:
        return training_flops(self.cfg.model, self.seq_len, depth_loads=loads).training_per_token * \
            self.tokens_per_step


def load_study(path: str) -> StudyConfig:
    """The study file, checked; name and out_dir (absolute) filled in, overrides flattened."""
    cfg = load_config(Path(path), schema=StudyConfig)  # a Path: a bare word is a file here, not a model preset
    cfg.name = cfg.name or Path(path).stem
    cfg.out_dir = str(Path(cfg.out_dir or f"runs/studies/{cfg.name}").absolute())
    cfg.overrides = flat(cfg.overrides)
    cfg.models = {n: flat(o or {}) for n, o in cfg.models.items()}
    return cfg


def sweep_config(cfg: StudyConfig) -> SweepConfig:
    """The sweep that trains the study's models: same base run, out_dir, executor and job parameters."""
    return SweepConfig(run=cfg.run, name=cfg.name, out_dir=cfg.out_dir, executor=cfg.executor,
                       overrides=dict(cfg.overrides), slurm=cfg.slurm)


def _seq_len(rc: RunConfig, where: str, model: str, strict: bool, cache: dict[str, int]) -> int:
    data = rc.data.primary_path
    if data not in cache:
        try:
            cache[data] = load_manifest(data).seq_len
        except (FileNotFoundError, ValueError) as e:
            msg = f"{where}: model {model}: data.path: {one_line(e, None, name=False)}"
            if strict:
                raise ConfigError(msg) from None
            print(f"warning: {msg}; planning with seq_len = model.max_seq_len = {rc.model.max_seq_len} "
                  "(a run would stop here)", file=sys.stderr)
            cache[data] = rc.model.max_seq_len
    return cache[data]


def plan(cfg: StudyConfig, where: str, *, strict: bool = True) -> list[ModelPlan]:
    """Every model's steps and evaluation interval from the budget. ``strict`` False (a dry run, a re-plot):
    unreadable data is a warning and the plan assumes seq_len = model.max_seq_len."""
    world = cfg.slurm.nodes * cfg.slurm.tasks_per_node
    run = str(run_file(cfg.run).absolute())
    base = [f"{k}={render(v)}" for k, v in cfg.overrides.items()]
    seq_lens: dict[str, int] = {}
    plans = []
    for name, own_map in cfg.models.items():
        own = [f"{k}={render(v)}" for k, v in own_map.items()]
        head = [f"name={render(name)}", f"out_dir={render(cfg.out_dir)}"]
        try:
            rc = load_config(run, [*head, *base, *own], schema=RunConfig)
            dp = check_layout(rc.parallel, world, rc.model)
        except ConfigError as e:
            raise ConfigError(f"{where}: model {name}: {one_line(e, None, name=False)}") from None
        seq_len = _seq_len(rc, where, name, strict, seq_lens)
        tokens = rc.parallel.micro_batch_size * grad_accumulation_steps(rc.parallel, dp) * dp * seq_len
        per_token = training_flops(rc.model, seq_len).training_per_token
        steps = round(cfg.flops / (per_token * tokens))
        if steps < 1:
            raise ConfigError(f"{where}: flops: a budget of {cfg.flops:.3g} FLOPs is less than half a training step "
                              f"of model {name} ({per_token * tokens:.3g} FLOPs per step); raise flops")
        eval_every = steps // cfg.evals
        if eval_every < 1:
            raise ConfigError(f"{where}: evals: model {name} trains {steps} step(s) on this budget, fewer than "
                              f"evals={cfg.evals}; lower evals or raise flops")
        # Checkpoints at every evaluation unless the file says otherwise (its overrides come after this default).
        study = [f"train.steps={steps}", f"train.eval_every={eval_every}",
                 f"eval.downstream_every={eval_every if cfg.downstream else 0}"]
        overrides = [*head, f"checkpoint.every={eval_every}", *base, *own, *study]
        try:
            rc = load_config(run, overrides, schema=RunConfig)
        except ConfigError as e:
            raise ConfigError(f"{where}: model {name}: {one_line(e, None, name=False)}") from None
        point = Point(name, own, overrides, Path(cfg.out_dir) / name)
        plans.append(ModelPlan(name, rc, own, param_counts(rc.model)["unique"], per_token, seq_len, tokens, steps,
                               eval_every, point))
    return plans
