"""Run a hyper-parameter sweep: ``python -m pretrain.sweep SWEEP.yaml [--dry-run] [--no-wait] [--collect]``.

One submitit job array, one element per sweep point, each element a whole multi-task distributed training run
(the same trainer as ``python -m pretrain.train``). Every point is validated before anything is submitted; the
sweep then waits and writes ``results.csv`` / ``results.md`` next to the runs. Elements survive time limits: the
trainer saves on the warning signal and submitit requeues the element, which resumes from that checkpoint.

SWEEP.yaml:
  run: tiny_cpu                  # base run: a name in conf/run/ or a path to a run file
  name: tiny_lr                  # default: the file's stem
  out_dir: runs/sweeps/tiny_lr   # default: runs/sweeps/<name>; point P runs in <out_dir>/<P>, logs in submitit/
  executor: auto                 # auto (Slurm when present, else local processes) | slurm | local
  overrides: {train.steps: 200}  # dotted key: value, for every point
  grid: {optim.lr: [1.0e-3, 3.0e-3]}   # cartesian product of the lists, keys in file order
  points: [{model.num_recursions: 2}, {model.num_recursions: 3}]   # explicit points; with a grid: each × grid
  slurm: {nodes: 1, tasks_per_node: 8, gpus_per_node: 8, cpus_per_task: 12, timeout_min: 1440, partition: null,
          signal_delay_s: 120, max_num_timeout: 3, array_parallelism: 64, mem_gb: null, extra: {qos: high}}

Point names are <name>-<index>-<slug of its own overrides>. Relative paths (run, out_dir, data.path) are relative
to the working directory, which is also the jobs' working directory. Exit status: 0 when every point completed,
1 when some did not, 2 for a mistake in the sweep file or a point's config.
"""
from __future__ import annotations

import argparse
import dataclasses
import difflib
import itertools
import os
import re
import signal
import sys
import types
import typing
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import submitit
import yaml

from conf.errors import ConfigError
from pretrain.sweep import results
from pretrain.training.preempt import REQUEUE_EXIT_CODE

warnings.filterwarnings("ignore", message="Transformer Engine and Apex are not installed")


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
    extra: dict = field(default_factory=dict)   # more sbatch options, e.g. {qos: high, account: lab}


@dataclass
class SweepConfig:
    run: str
    name: str = ""
    out_dir: str = ""
    executor: Literal["auto", "slurm", "local"] = "auto"
    overrides: dict = field(default_factory=dict)
    grid: dict = field(default_factory=dict)
    points: list = field(default_factory=list)
    slurm: SlurmSpec = field(default_factory=SlurmSpec)


@dataclass
class Point:
    name: str
    own_overrides: list[str]      # what distinguishes this point: its list entry and grid values
    overrides: list[str]          # everything passed to the run config, name and out_dir first
    run_dir: Path


class _Loader(yaml.SafeLoader):
    """Reads 1e-3 as a float, as conf/ files do (plain YAML 1.1 needs 1.0e-3)."""


_Loader.add_implicit_resolver("tag:yaml.org,2002:float",
                              re.compile(r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"), list("-+0123456789"))


def _lines(node: Any, prefix: str = "", out: dict | None = None) -> dict[str, int]:
    """Dotted key -> line number, so that an error can point into the file."""
    out = {} if out is None else out
    if isinstance(node, yaml.MappingNode):
        for k, v in node.value:
            out[prefix + str(k.value)] = k.start_mark.line + 1
            _lines(v, f"{prefix}{k.value}.", out)
    return out


def _check(tp: Any, value: Any) -> bool:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        return any(_check(a, value) for a in args)
    if origin is Literal:
        return value in args
    if tp is type(None):
        return value is None
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, origin or tp)


def _build(cls: type, data: dict, where: str, lines: dict[str, int], prefix: str = "") -> Any:
    hints, names = typing.get_type_hints(cls), [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        at = f"{where}:{lines.get(prefix + str(key), 1)}: {prefix}{key}"
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            raise ConfigError(f"{at}: unknown key; " + (f"did you mean {close[0]!r}?" if close
                                                        else f"valid keys: {', '.join(names)}"))
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            if not isinstance(value, dict):
                raise ConfigError(f"{at}: expected a mapping of {', '.join(f.name for f in dataclasses.fields(tp))}")
            value = _build(tp, value, where, lines, f"{prefix}{key}.")
        elif not _check(tp, value):
            want = (f"one of {', '.join(map(repr, typing.get_args(tp)))}" if typing.get_origin(tp) is Literal
                    else str(tp).replace("typing.", "").replace("<class '", "").replace("'>", ""))
            raise ConfigError(f"{at}: expected {want}, got {value!r}; fix the value")
        kwargs[key] = value
    missing = [f.name for f in dataclasses.fields(cls) if f.name not in kwargs
               and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    if missing:
        raise ConfigError(f"{where}: {prefix}{missing[0]}: missing required key; add it")
    return cls(**kwargs)


def _flat(d: dict, prefix: str = "") -> dict[str, Any]:
    """{train: {steps: 5}} and {train.steps: 5} are the same override."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def render(value: Any) -> str:
    """A value as override text that the config loader parses back to the same value."""
    return yaml.safe_dump(value, default_flow_style=True, width=1 << 20).strip().removesuffix("...").strip()


def load_sweep(path: str) -> SweepConfig:
    where = os.path.relpath(path) if not os.path.relpath(path).startswith("..") else path
    try:
        text = Path(path).read_text()
        node = yaml.compose(text, Loader=_Loader)
        data = yaml.load(text, Loader=_Loader)
    except OSError as e:
        raise ConfigError(f"{where}: cannot read the sweep file: {e.strerror or e}") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        raise ConfigError(f"{where}{f':{mark.line + 1}' if mark else ''}: invalid YAML: "
                          f"{getattr(e, 'problem', None) or e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: the top level must be a mapping (run:, grid:, ...); see --help")
    lines = _lines(node)
    cfg = _build(SweepConfig, data, where, lines)
    cfg.name = cfg.name or Path(path).stem
    cfg.out_dir = str(Path(cfg.out_dir or f"runs/sweeps/{cfg.name}").absolute())
    cfg.overrides = _flat(cfg.overrides)
    for key, values in cfg.grid.items():
        if not isinstance(values, list) or not values:
            raise ConfigError(f"{where}:{lines.get(f'grid.{key}', 1)}: grid.{key}: expected a non-empty list of "
                              f"values, got {values!r}")
    for i, p in enumerate(cfg.points):
        if not isinstance(p, dict) or not p:
            raise ConfigError(f"{where}:{lines.get('points', 1)}: points[{i}]: expected a mapping of dotted "
                              f"key: value, got {p!r}")
    for section, keys in (("overrides", cfg.overrides), ("grid", cfg.grid),
                          *((f"points[{i}]", _flat(p)) for i, p in enumerate(cfg.points))):
        for k in keys:
            if k in ("name", "out_dir"):
                raise ConfigError(f"{where}:{lines.get(f'{section}.{k}', lines.get(section, 1))}: {section}.{k}: "
                                  f"set by the sweep for each point; set the sweep's own {k}: instead")
    if not Path(run_path(cfg.run)).is_file():
        from conf.loader import CONF_DIR
        names = ", ".join(sorted(p.stem for p in (CONF_DIR / "run").glob("*.yaml")))
        raise ConfigError(f"{where}:{lines.get('run', 1)}: run: no run file {run_path(cfg.run)}; use a path or a "
                          f"name in conf/run/ ({names})")
    s = cfg.slurm
    for key in ("nodes", "tasks_per_node", "timeout_min", "array_parallelism", "cpus_per_task"):
        if getattr(s, key) < 1:
            raise ConfigError(f"{where}:{lines.get(f'slurm.{key}', 1)}: slurm.{key}: must be >= 1")
    return cfg


def expand(cfg: SweepConfig) -> list[Point]:
    """Each explicit point × every grid combination; names carry the index (unique) and a readable slug."""
    keys = list(cfg.grid)
    combos = [dict(zip(keys, c)) for c in itertools.product(*(cfg.grid[k] for k in keys))]
    points = []
    for own in ({**_flat(p), **c} for p in (cfg.points or [{}]) for c in combos):
        texts = [f"{k}={render(v)}" for k, v in own.items()]
        slug = "_".join(f"{k.rsplit('.', 1)[-1]}{render(v)}" for k, v in own.items())
        slug = re.sub(r"[^A-Za-z0-9._+-]+", "", slug)[:48]
        name = f"{cfg.name}-{len(points)}" + (f"-{slug}" if slug else "")
        base = [f"{k}={render(v)}" for k, v in cfg.overrides.items()]
        points.append(Point(name, texts, [f"name={render(name)}", f"out_dir={render(cfg.out_dir)}", *base, *texts],
                            Path(cfg.out_dir) / name))
    return points


def run_path(run: str) -> str:
    from conf.loader import CONF_DIR
    if "/" not in run and not run.endswith((".yaml", ".yml")):
        return str(CONF_DIR / "run" / f"{run}.yaml")
    return str(Path(run).absolute())


def validate(cfg: SweepConfig, points: list[Point], where: str, *, dry_run: bool = False) -> None:
    """Before anything is submitted: every point's config, its layout on the job's world size, and its data. In
    a dry run a data problem is a warning: the plan can be read before the shards are made."""
    from conf import load_config
    from pretrain.config import RunConfig
    from pretrain.data.loader import TokenLoader
    from pretrain.parallel.layout import check_layout
    world = cfg.slurm.nodes * cfg.slurm.tasks_per_node
    for p in points:
        try:
            rc = load_config(run_path(cfg.run), p.overrides, schema=RunConfig)
            dp = check_layout(rc.parallel, world, rc.model)
        except ConfigError as e:
            raise ConfigError(f"{where}: point {p.name}: {' '.join(str(e).split())}") from None
        try:  # the trainer's own loader checks: a finished data set, enough samples for dp × workers readers
            TokenLoader(rc.data.path, "train", micro_batch_size=rc.parallel.micro_batch_size, dp_size=dp,
                        num_workers=rc.data.num_workers)
        except (FileNotFoundError, ValueError) as e:
            msg = f"{where}: point {p.name}: data.path: {e}"
            if not dry_run:
                raise ConfigError(msg) from None
            print(f"warning: {msg} (a submission would stop here)", file=sys.stderr)


class TrainPoint(submitit.helpers.Checkpointable):
    """One array element: a distributed training run. Checkpointable, so that submitit's time-limit hook requeues
    it; the inherited checkpoint() resubmits this same call, which resumes because checkpoint.resume=auto."""

    def __init__(self, run: str, overrides: list[str], threads: int) -> None:
        self.run, self.overrides, self.threads = run, overrides, threads

    def __call__(self) -> dict | None:
        import torch
        import torch.distributed as dist

        from conf import load_config
        from pretrain.config import RunConfig
        from pretrain.training.trainer import Trainer
        # overwrite: a requeued or nested launch may carry the previous layout; this job's own is the truth.
        # No CUDA_VISIBLE_DEVICES: the trainer picks cuda:LOCAL_RANK among all of the node's GPUs.
        env = submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False, overwrite=True)
        os.environ.setdefault("WANDB_MODE", "offline")
        if "OMP_NUM_THREADS" not in os.environ:  # torch would use every core of the node in every task
            torch.set_num_threads(self.threads)
        cfg = load_config(self.run, self.overrides, schema=RunConfig)
        trainer = Trainer(cfg)
        try:
            rc = trainer.fit()
        finally:
            trainer.close()  # also restores submitit's signal handlers, which the USR2 hand-over needs
        if rc == 0:
            return results.read_metrics(Path(cfg.out_dir) / cfg.name) if env.rank == 0 else None
        if rc != REQUEUE_EXIT_CODE:
            raise RuntimeError(f"training of {cfg.name} stopped with exit code {rc} (3: non-finite loss); "
                               f"see {Path(cfg.out_dir) / cfg.name / 'metrics.jsonl'} and this job's log")
        # Saved collectively on every rank already. Only ranks that caught the signal know which one it was, so
        # agree: a SIGTERM anywhere (scancel, Slurm's own preemption/requeue) wins over the time-limit warning.
        got = {None: 0, signal.SIGUSR1: 1, signal.SIGUSR2: 1, signal.SIGTERM: 2}.get(trainer.preempt.received, 2)
        flag = torch.tensor([got], device=trainer.device)
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if flag.item() == 1 and env.rank == 0:
            # submitit calls checkpoint() on global rank 0 only (no collective save could happen there, which is
            # why the trainer saved first); its USR2 handler then dumps the call, runs `scontrol requeue`, exits.
            signal.raise_signal(submitit.JobEnvironment._usr_sig())
        # SIGTERM: Slurm requeues a preempted job itself, and a cancelled one must stay cancelled.
        sys.exit(REQUEUE_EXIT_CODE)


def main(argv: list[str] | None = None) -> int:
    head, body = __doc__.split("\n\n", 1)
    parser = argparse.ArgumentParser(prog="python -m pretrain.sweep", description=head, epilog=body,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sweep", help="sweep file (YAML, format below)")
    parser.add_argument("--dry-run", action="store_true", help="print the points and job parameters; submit nothing")
    parser.add_argument("--no-wait", action="store_true", help="submit, print the job ids, exit")
    parser.add_argument("--collect", action="store_true",
                        help="submit nothing: rebuild the results table from the runs' metrics (and job records)")
    parser.add_argument("--executor", choices=("auto", "slurm", "local"), help="overrides the file's executor: key")
    parser.add_argument("--poll", type=float, default=5.0, help="seconds between status checks (default 5)")
    args = parser.parse_args(argv)
    from conf import cli_errors
    with cli_errors():
        cfg = load_sweep(args.sweep)
        points = expand(cfg)
        if args.collect:
            return results.collect(Path(cfg.out_dir), points, results.load_jobs(Path(cfg.out_dir)))
        validate(cfg, points, args.sweep, dry_run=args.dry_run)
        kind = results.executor_kind(cfg, args.executor, args.sweep)
    s = cfg.slurm
    print(f"sweep {cfg.name}: {len(points)} point(s) of {cfg.run}, one job each, executor {kind}; "
          f"out_dir {cfg.out_dir}")
    print(f"  each job: {s.nodes} node(s) × {s.tasks_per_node} task(s), {s.gpus_per_node} GPU(s)/node, "
          f"{s.cpus_per_task} CPU(s)/task, {s.timeout_min} min" + (
              f", partition {s.partition}, USR2 {s.signal_delay_s} s before the limit, up to {s.max_num_timeout} "
              f"requeues, {s.array_parallelism} at once" if kind == "slurm" else ""))
    for p in points:
        print(f"  {p.name}: {' '.join(p.own_overrides) or '(base run)'}")
    if args.dry_run:
        print(f"dry run: would submit {len(points)} job(s); nothing submitted")
        return 0
    executor = results.make_executor(cfg, kind)
    fns = [TrainPoint(run_path(cfg.run), p.overrides, s.cpus_per_task) for p in points]
    # The jobs unpickle pretrain.sweep.TrainPoint, so the checkout must be importable there even when it is not
    # installed into the environment (a plain clone): hand them the repo root (sbatch and the local executor pass
    # the submitting environment on).
    pythonpath = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).resolve().parents[1]), *filter(None, [pythonpath])])
    try:
        with submitit.helpers.clean_env():  # a sweep started inside a job must not hand its layout to the new jobs
            job_list = executor.submit_array(fns)
    except submitit.core.utils.FailedJobError as e:  # sbatch said no: a partition, account or limit problem
        print(f"error: submission failed: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    finally:
        os.environ.pop("PYTHONPATH") if pythonpath is None else os.environ.update(PYTHONPATH=pythonpath)
    jobs = {p.name: j for p, j in zip(points, job_list)}
    results.save_jobs(Path(cfg.out_dir), kind, s.nodes * s.tasks_per_node, jobs)
    print(f"submitted: {', '.join(f'{n}={j.job_id}' for n, j in jobs.items())}")
    print(f"logs: {executor.folder}/<job id>_<task>_log.out|err; runs: {cfg.out_dir}/<point>")
    if args.no_wait:
        print(f"not waiting; later: python -m pretrain.sweep {args.sweep} --collect")
        return 0
    try:
        results.wait(jobs, args.poll)
    except KeyboardInterrupt:
        print(f"\nstopped waiting; the jobs keep running. Later: python -m pretrain.sweep {args.sweep} --collect")
        return 130
    return results.collect(Path(cfg.out_dir), points, jobs)

