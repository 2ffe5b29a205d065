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

Environment: MOR_MASTER_PORT (the jobs' rendezvous port; default on Slurm 20000 + job id mod 12000, as
slurm/launch.sh), MOR_RANK_EXIT_WAIT (seconds the other ranks get once one has exited; default 300).
"""
from __future__ import annotations

import argparse
import os
import signal
import sys
import warnings
from pathlib import Path

import submitit

from conf import cli_errors, load_config
from conf.errors import ConfigError, one_line
from pretrain.sweep import results
from pretrain.sweep.spec import Point, SweepConfig, expand, load_sweep, run_path
from pretrain.training.preempt import REQUEUE_EXIT_CODE

warnings.filterwarnings("ignore", message="Transformer Engine and Apex are not installed")


def validate(cfg: SweepConfig, points: list[Point], where: str, *, dry_run: bool = False) -> None:
    """Before anything is submitted: every point's config, its layout on the job's world size, and its data. In
    a dry run a data problem is a warning: the plan can be read before the shards are made."""
    from pretrain.config import RunConfig
    from pretrain.data.splits import split_loader
    from pretrain.parallel.layout import check_layout
    world = cfg.slurm.nodes * cfg.slurm.tasks_per_node
    for p in points:
        try:
            rc = load_config(run_path(cfg), p.overrides, schema=RunConfig)
            dp = check_layout(rc.parallel, world, rc.model)
        except ConfigError as e:
            raise ConfigError(f"{where}: point {p.name}: {one_line(e, None, name=False)}") from None
        try:  # the trainer's own loader checks: a finished data set (or mixture), enough samples for the readers
            split_loader(rc, "train", dp_rank=0, dp_size=dp)
        except FileNotFoundError as e:
            msg = f"{where}: point {p.name}: {'data.sources' if rc.data.sources else 'data.path'}: {e}"
        except ConfigError as e:
            msg = f"{where}: point {p.name}: {one_line(e, None, name=False)}"
        else:
            msg = None
        if msg:
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

        from pretrain.config import RunConfig
        from pretrain.training.trainer import Trainer
        from pretrain.parallel.layout import rendezvous_port
        # The rendezvous port: MOR_MASTER_PORT, else the launcher's rule on Slurm (one per job id, below the
        # ephemeral ports; submitit's own draws from 20000-60000, where other sockets of the node may hold it).
        port = os.environ.get("MOR_MASTER_PORT") or (
            str(rendezvous_port(int(os.environ["SLURM_JOB_ID"]))) if os.environ.get("SLURM_JOB_ID") else None)
        if port:
            os.environ["MASTER_PORT"] = port
        # overwrite: a requeued or nested launch may carry the previous layout; this job's own is the truth.
        # No CUDA_VISIBLE_DEVICES: the trainer picks cuda:LOCAL_RANK among all of the node's GPUs.
        env = submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False, overwrite=True)
        if env.rank == 0:
            print(f"sweep point: {env.world_size} rank(s), rendezvous {env.master_addr}:{env.master_port}", flush=True)
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
            return results.run_summary(Path(cfg.out_dir) / cfg.name) if env.rank == 0 else None
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


def submit(cfg: SweepConfig, points: list[Point], kind: str) -> dict[str, submitit.Job]:
    """Submit ``points`` as one job array (one TrainPoint each) and record the job ids in out_dir/jobs.json;
    {point name: job}. Raises submitit.core.utils.FailedJobError when the scheduler refuses the array. Also used by
    pretrain.study, whose points are its models."""
    executor = results.make_executor(cfg, kind)
    fns = [TrainPoint(run_path(cfg), p.overrides, cfg.slurm.cpus_per_task) for p in points]
    # The jobs unpickle pretrain.sweep.plan.TrainPoint, so the checkout must be importable there even when it is not
    # installed into the environment (a plain clone): hand them the repo root (sbatch and the local executor pass
    # the submitting environment on).
    pythonpath = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).resolve().parents[2]), *filter(None, [pythonpath])])
    try:
        with submitit.helpers.clean_env():  # a sweep started inside a job must not hand its layout to the new jobs
            job_list = executor.submit_array(fns)
    finally:
        os.environ.pop("PYTHONPATH") if pythonpath is None else os.environ.update(PYTHONPATH=pythonpath)
    jobs = {p.name: j for p, j in zip(points, job_list)}
    results.save_jobs(Path(cfg.out_dir), kind, cfg.slurm.nodes * cfg.slurm.tasks_per_node, jobs)
    return jobs


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
    try:
        jobs = submit(cfg, points, kind)
    except submitit.core.utils.FailedJobError as e:  # sbatch said no: a partition, account or limit problem
        print(f"error: submission failed: {one_line(e, None, name=False)}", file=sys.stderr)
        return 2
    print(f"submitted: {', '.join(f'{n}={j.job_id}' for n, j in jobs.items())}")
    print(f"logs: {Path(cfg.out_dir) / 'submitit'}/<job id>_<task>_log.out|err; runs: {cfg.out_dir}/<point>")
    if args.no_wait:
        print(f"not waiting; later: python -m pretrain.sweep {args.sweep} --collect")
        return 0
    try:
        results.wait(jobs, args.poll)
    except KeyboardInterrupt:
        print(f"\nstopped waiting; the jobs keep running. Later: python -m pretrain.sweep {args.sweep} --collect")
        return 130
    with cli_errors():  # a damaged metrics.jsonl is one line naming it
        return results.collect(Path(cfg.out_dir), points, jobs)

