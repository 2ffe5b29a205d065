"""Typed configuration of a training run: model, layout, optimizer, schedule, data, checkpoints, logging.

Run files live in conf/run/; ``model:`` may name a model preset (``model: 360m_mor_ec``) and every key can be
overridden on the command line (``train.steps=100 model.num_recursions=4 parallel.zero_stage=2``).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional

from conf.errors import ConfigError
from model.config import ModelConfig
from pretrain.parallel.layout import ParallelConfig


def computes_in_bf16(choice: str, device) -> bool:
    """The one precision rule, for train.precision and every --dtype: ``auto`` computes in bf16 on a GPU and in fp32
    elsewhere (a CPU's bf16 matmuls are slow and its fp32 ones exact)."""
    return choice == "bf16" or (choice == "auto" and getattr(device, "type", str(device)) == "cuda")


@dataclass
class OptimConfig:
    lr: float = 3e-3
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    weight_decay: float = 0.1      # matrices only: never on norms, biases or other 1-D parameters
    grad_clip: float = 1.0         # global norm; 0 disables


@dataclass
class ScheduleConfig:
    # wsd: linear warm-up, constant, linear decay (the paper's trapezoid); cosine: warm-up then cosine decay.
    kind: Literal["wsd", "cosine", "constant"] = "wsd"
    warmup_frac: float = 0.05
    decay_frac: float = 0.2        # wsd: the last fraction of steps decays linearly to min_lr_ratio × lr
    min_lr_ratio: float = 0.0


@dataclass
class SourceConfig:
    """One corpus of a mixture: a folder made by data_prep/tokenize.py and its weight in the mix."""
    path: str
    weight: float = 1.0


@dataclass
class PhaseConfig:
    """From optimizer step ``start`` on, the mix is ``weights`` (sources not named get 0)."""
    start: int
    weights: dict[str, float]


@dataclass
class DataConfig:
    path: Optional[str] = "data/sample"   # folder made by data_prep/tokenize.py (manifest.json + shards)
    num_workers: int = 2
    seed: int = 0
    # Readers of the training split (pretrain/data/loader.py); 0: DP × max(1, num_workers). A fixed number (a
    # multiple of DP × workers) makes the data order independent of the number of data-parallel ranks: runs on
    # different layouts then see the same samples, and a run can resume under another DP size.
    readers: int = 0
    # A mixture (pretrain/data/mixture.py): name -> {path, weight}; replaces data.path (leave it at its default or
    # null). Every global micro-batch comes from one source, by a deterministic schedule of the weights.
    sources: dict[str, SourceConfig] = field(default_factory=dict)
    # Later mixes: [{start: STEP, weights: {name: w, ...}}, ...], starts increasing; e.g. an annealing mix.
    phases: list[PhaseConfig] = field(default_factory=list)
    # Resuming with other weights for a phase that has begun: refused unless true; then they apply from the resume.
    allow_mix_change: bool = False

    @property
    def primary_path(self) -> str:
        """The folder whose manifest names the run's tokenizer and sequence length: data.path, or the first
        source's (the sources must share both; the trainer checks)."""
        return next(iter(self.sources.values())).path if self.sources else str(self.path)

    def validate(self) -> None:
        if not self.sources:
            if self.path is None:
                raise ConfigError("path: null without data.sources; give the tokenized folder to train on")
            if self.phases:
                raise ConfigError("phases: need data.sources (the mixture the phases re-weight)")
            return
        if self.path not in (None, "data/sample"):
            raise ConfigError(f"path: {self.path} is set together with data.sources; give one of them "
                              "(data.path=null with sources)")
        for name, src in self.sources.items():
            if not name.replace("_", "").replace("-", "").isalnum():
                raise ConfigError(f"sources.{name}: a source name is letters, digits, - and _")
            if not (src.weight >= 0 and src.weight < float("inf")):
                raise ConfigError(f"sources.{name}.weight: must be >= 0, got {src.weight}")
        if not any(s.weight > 0 for s in self.sources.values()):
            raise ConfigError("sources: every weight is 0; give at least one source a positive weight")
        last = 0
        for i, ph in enumerate(self.phases):
            if ph.start <= last:
                raise ConfigError(f"phases[{i}].start: {ph.start} must be greater than "
                                  + (f"data.phases[{i - 1}].start ({last})" if i else "0 (the sources' own weights "
                                     "hold from step 0)"))
            last = ph.start
            for name, w in ph.weights.items():
                if name not in self.sources:
                    raise ConfigError(f"phases[{i}].weights.{name}: not a source (sources: "
                                      f"{', '.join(self.sources)})")
                if not (w >= 0 and w < float("inf")):
                    raise ConfigError(f"phases[{i}].weights.{name}: must be >= 0, got {w}")
            if not any(w > 0 for w in ph.weights.values()):
                raise ConfigError(f"phases[{i}].weights: every weight is 0; give a source a positive weight")


@dataclass
class TrainConfig:
    steps: int = 1000
    precision: Literal["auto", "bf16", "fp32"] = "auto"   # auto: bf16 on GPU, fp32 on CPU
    compile: bool = False
    activation_checkpointing: bool = False
    log_every: int = 10
    eval_every: int = 200
    eval_batches: int = 20


@dataclass
class EvalConfig:
    """In-loop downstream evaluation (pretrain/training/downstream.py): few-shot accuracy on a fixed subset."""
    downstream_every: int = 0          # steps; 0: never
    downstream_limit: int = 50         # the first N items of each task (MMLU: spread over its subjects)
    downstream_tasks: list[str] = field(default_factory=lambda: [
        "arc_easy", "arc_challenge", "hellaswag", "piqa", "winogrande", "lambada", "mmlu"])
    downstream_shots: int = 0          # examples in each prompt: 0 or 5 (LAMBADA: 0)
    downstream_batch_size: int = 16    # sequences per forward pass on each data-parallel rank


@dataclass
class CheckpointConfig:
    every: int = 500               # steps; 0 saves only at the end and on signals
    keep: int = 3                  # most recent complete checkpoints kept
    resume: str = "auto"           # auto (latest complete one, if any) | none | a checkpoint folder


@dataclass
class LoggingConfig:
    wandb: Literal["offline", "online", "disabled"] = "offline"
    project: str = "mor-pretrain"
    spike_factor: float = 3.0      # a loss above this × its running mean is logged as a spike


@dataclass
class RunConfig:
    name: str = "run"
    out_dir: str = "runs"          # the run lives in out_dir/name: checkpoints/, metrics.jsonl, plots
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    on_nonfinite: Literal["skip", "stop"] = "skip"   # a NaN/inf loss or gradient norm: skip the step, or stop
    max_consecutive_skips: int = 5  # skip: this many non-finite steps in a row stop the run (it has gone bad)

    def validate(self) -> "RunConfig":
        def need(cond: bool, key: str, msg: str) -> None:
            if not cond:
                raise ConfigError(f"{key}: {msg}")

        need(self.train.steps >= 1, "train.steps", "must be >= 1")
        need(self.optim.lr > 0, "optim.lr", "must be > 0")
        need(len(self.optim.betas) == 2 and all(0 <= b < 1 for b in self.optim.betas), "optim.betas",
             "needs two values in [0, 1)")
        need(0 <= self.schedule.warmup_frac < 1, "schedule.warmup_frac", "must be in [0, 1)")
        need(0 <= self.schedule.decay_frac <= 1, "schedule.decay_frac", "must be in [0, 1]")
        need(self.schedule.warmup_frac + (self.schedule.decay_frac if self.schedule.kind == "wsd" else 0) <= 1,
             "schedule.decay_frac", "warm-up plus decay exceed the run")
        need(self.checkpoint.keep >= 1, "checkpoint.keep", "must be >= 1")
        need(self.max_consecutive_skips >= 1, "max_consecutive_skips", "must be >= 1")
        need(self.train.log_every >= 1, "train.log_every", "must be >= 1")
        ev = self.eval
        need(ev.downstream_every >= 0, "eval.downstream_every", "must be >= 0 (0: never)")
        need(ev.downstream_limit >= 1, "eval.downstream_limit", "must be >= 1")
        need(ev.downstream_batch_size >= 1, "eval.downstream_batch_size", "must be >= 1")
        need(bool(ev.downstream_tasks), "eval.downstream_tasks", "names no task")
        if ev.downstream_every:   # the names and shots now, not at the first evaluation hours into the run
            from pretrain.eval.tasks import load_task
            for name in ev.downstream_tasks:
                try:
                    load_task(name, ev.downstream_shots, limit=1)
                except ConfigError as e:   # the command's option names become the config's keys
                    msg = str(e)
                    for flag, key in (("--tasks: ", "eval.downstream_tasks: "),
                                      ("--shots: ", "eval.downstream_shots: ")):
                        msg = key + msg[len(flag):] if msg.startswith(flag) else msg
                    raise ConfigError(msg if msg.startswith("eval.") else f"eval.downstream_tasks: {msg}") from None
        return self
