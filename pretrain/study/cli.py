"""The equal-FLOPs study: ``python -m pretrain.study STUDY.yaml [--dry-run] [--plot-only] [--executor local]``.

Trains several models (the paper's comparison: vanilla, recursive, MoR expert-choice, MoR token-choice) to the
same training-FLOPs budget and draws validation loss and downstream accuracy against training FLOPs. The project's
FLOPs counter (model/flops.py, which follows sharing and routing) sets each model's steps:

  steps = round(flops / (training FLOPs per token × micro_batch_size × grad accumulation × DP × seq_len))

(seq_len from the data's manifest; DP from the job's world size, slurm.nodes × slurm.tasks_per_node), so every
model's steps × FLOPs per step lies within half a step of the budget. Each model evaluates every steps // evals
steps (validation under both routings, and downstream when downstream: true) and checkpoints there too. The plan
(model, params, FLOPs/token, steps, tokens, eval every) is printed first; then the models train as one job array
through the sweep machinery (pretrain.sweep: Slurm when present, else local processes; timed-out or preempted
jobs requeue and resume), and the study draws out_dir/study.png (left: validation loss against measured training
FLOPs, one colour per model, expert-choice's causal-routing loss dashed; right: downstream_avg) and writes
out_dir/study.md and study.json (per model: unique params, FLOPs/token, steps, tokens, planned and measured training
FLOPs, final val_loss and val_loss_causal, the last downstream record's average and per-task primary metrics;
study.json also the curves). Planned FLOPs count at the plan's depth loads: exact for vanilla, recursive and
expert-choice (capacities), assumed uniform for token-choice, whose router decides them; measured FLOPs count at
the depth loads each run logged (its r{i}/kept_frac records in metrics.jsonl).

STUDY.yaml:
  run: demo_cpu                   # base run: a name in conf/run/ or a path to a run file
  name: tiny_equal_flops          # default: the file's stem
  out_dir: runs/studies/tiny      # default: runs/studies/<name>; model M runs in <out_dir>/M, job logs in submitit/
  flops: 3.0e14                   # training-FLOPs budget per model
  evals: 4                        # evaluations per model, evenly spaced in FLOPs (eval_every = steps // evals)
  downstream: true                # in-loop downstream evaluation at each evaluation (eval.downstream_every)
  executor: auto                  # auto (Slurm when present, else local processes) | slurm | local
  overrides: {eval.downstream_limit: 30}    # dotted key: value, for every model
  models:                         # name: its own overrides (the run folder is the name)
    vanilla: {model.routing: none, model.sharing: none, model.num_recursions: 1}
    mor_ec: {model.routing: expert_choice}
  slurm: {nodes: 1, tasks_per_node: 8, gpus_per_node: 8, cpus_per_task: 12, timeout_min: 1440, ...}   # as a sweep's

train.steps, train.eval_every and eval.downstream_every are set by the study (an override of them is an error);
checkpoint.every defaults to eval_every. Rerunning the command skips the models whose run has its final checkpoint
and resumes the others from their newest checkpoint (checkpoint.resume=auto); a changed budget changes the steps,
which a resumed run refuses: give a new study a new name or out_dir. --plot-only (alias --collect) redraws the plot
and tables from the runs as they are. Relative paths are relative to the working directory. Exit status: 0 when
every model trained its steps, 1 when some did not, 2 for a mistake in the study file or a model's config.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from conf.errors import one_line

if TYPE_CHECKING:
    from pretrain.study.spec import ModelPlan, StudyConfig

# The rest (submitit, the FLOPs counter and with it torch, the report's matplotlib) is imported after the
# arguments are parsed, so that --help answers at once.


def finished(p: ModelPlan) -> bool:
    """The run holds a checkpoint of its final step: rerunning it would only load it and exit."""
    from pretrain.checkpoint.verify import list_checkpoints, step_of
    found = list_checkpoints(p.point.run_dir / "checkpoints")
    return bool(found) and step_of(found[-1]) >= p.steps


def print_plan(cfg: StudyConfig, plans: list[ModelPlan], kind: str) -> None:
    s = cfg.slurm
    print(f"study {cfg.name}: {len(plans)} model(s) of {cfg.run}, {cfg.flops:.3g} training FLOPs each, "
          f"{cfg.evals} evaluation(s) per model; executor {kind}; out_dir {cfg.out_dir}")
    print(f"  each job: {s.nodes} node(s) × {s.tasks_per_node} task(s), {s.gpus_per_node} GPU(s)/node, "
          f"{s.cpus_per_task} CPU(s)/task, {s.timeout_min} min")
    head = ("model", "params", "FLOPs/token", "tokens/step", "steps", "tokens", "eval every", "planned FLOPs")
    rows = [(p.name, f"{p.params / 1e6:.2f}M", f"{p.flops_per_token:.4g}", f"{p.tokens_per_step:,}", str(p.steps),
             f"{p.steps * p.tokens_per_step:,}", str(p.eval_every), f"{p.steps * p.flops_per_step:.4g}")
            for p in plans]
    width = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    for r in [head, *rows]:
        print("  " + "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, width))))
    for p in plans:
        print(f"  {p.name}: {' '.join(p.own) or '(base run)'}")
    for p in plans:
        if p.loads_decide_flops:   # token-choice: its router, not the config, decides the FLOPs
            print(f"  {p.name}: planned FLOPs assume {p.plan_basis}; the report also counts them at the depth "
                  "loads the run logs (measured)")


def write_report(cfg: StudyConfig, plans: list[ModelPlan]) -> int:
    from pretrain.study import report
    rows, paths = report.write(cfg, plans)
    print(paths[1].read_text(), end="")
    print(f"study: {', '.join(map(str, paths))}")
    missing = [f"{r['model']} ({r['step']} of {r['steps']} steps)" for r in rows if not r["done"]]
    if missing:
        print(f"not finished: {', '.join(missing)}", file=sys.stderr)
    return 1 if missing else 0


def main(argv: list[str] | None = None) -> int:
    head, body = __doc__.split("\n\n", 1)
    parser = argparse.ArgumentParser(prog="python -m pretrain.study", description=head, epilog=body,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("study", help="study file (YAML, format below)")
    parser.add_argument("--dry-run", action="store_true", help="print the plan (steps per model); train nothing")
    parser.add_argument("--plot-only", "--collect", dest="plot_only", action="store_true",
                        help="train nothing: redraw study.png and rewrite study.md/.json from the runs' metrics")
    parser.add_argument("--executor", choices=("auto", "slurm", "local"), help="overrides the file's executor: key")
    parser.add_argument("--no-wait", action="store_true", help="submit, print the job ids, exit (later: --plot-only)")
    parser.add_argument("--poll", type=float, default=5.0, help="seconds between status checks (default 5)")
    args = parser.parse_args(argv)
    import submitit

    from conf import cli_errors
    from pretrain.study.spec import load_study, plan, sweep_config
    from pretrain.sweep import results
    from pretrain.sweep.plan import submit, validate
    with cli_errors():
        cfg = load_study(args.study)
        plans = plan(cfg, args.study, strict=not (args.dry_run or args.plot_only))
        if args.plot_only:
            return write_report(cfg, plans)
        sweep = sweep_config(cfg)
        kind = results.executor_kind(sweep, args.executor, args.study)
    print_plan(cfg, plans, kind)
    if args.dry_run:
        print(f"dry run: would train {len(plans)} model(s); nothing submitted")
        return 0
    todo = [p for p in plans if not finished(p)]
    for p in plans:
        if p not in todo:
            print(f"  {p.name}: finished already ({p.steps} steps); not rerun")
    if todo:
        points = [p.point for p in todo]
        with cli_errors():
            validate(sweep, points, args.study)
        try:
            jobs = submit(sweep, points, kind)
        except submitit.core.utils.FailedJobError as e:  # sbatch said no: a partition, account or limit problem
            print(f"error: submission failed: {one_line(e, None, name=False)}", file=sys.stderr)
            return 2
        print(f"submitted: {', '.join(f'{n}={j.job_id}' for n, j in jobs.items())}")
        print(f"logs: {Path(cfg.out_dir) / 'submitit'}/<job id>_<task>_log.out|err; runs: {cfg.out_dir}/<model>")
        if args.no_wait:
            print(f"not waiting; later: python -m pretrain.study {args.study} --plot-only")
            return 0
        try:
            results.wait(jobs, args.poll)
        except KeyboardInterrupt:
            print(f"\nstopped waiting; the jobs keep running. Later: python -m pretrain.study {args.study} --plot-only")
            return 130
        for name, job in jobs.items():
            state = results.job_state(job)
            if state != "COMPLETED":
                log = Path(cfg.out_dir) / "submitit" / f"{job.job_id}_0_log.err"
                print(f"  {name}: job {job.job_id} {state}; see {log}", file=sys.stderr)
    with cli_errors():  # a damaged metrics.jsonl is one line naming it
        return write_report(cfg, plans)
